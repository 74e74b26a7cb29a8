//! How this node sends pod traffic to the others (`node_config`, one entry at index 0).

/// The routing mode of pod traffic between nodes (`ROUTING_MODE_*` in common.h), as
/// Cilium's `routing-mode` names it; serialized and parsed as its word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum RoutingMode {
    /// One node: the node's stack routes every packet.
    #[default]
    Local = 0,
    /// VXLAN to the node the ipcache names, the sender's identity in the VNI.
    Tunnel = 1,
    /// Straight out of the underlay device to the node's address.
    Native = 2,
}

impl RoutingMode {
    pub const ALL: [RoutingMode; 3] =
        [RoutingMode::Local, RoutingMode::Tunnel, RoutingMode::Native];

    pub fn as_str(self) -> &'static str {
        match self {
            RoutingMode::Local => "local",
            RoutingMode::Tunnel => "tunnel",
            RoutingMode::Native => "native",
        }
    }

    /// The mode a `node_config` entry holds; None for a number the datapath does not define.
    pub fn from_number(mode: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|m| *m as u8 == mode)
    }
}

impl std::fmt::Display for RoutingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RoutingMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown routing mode {s:?} (local, tunnel or native)"))
    }
}

/// `struct node_config`: the devices and the mode of pod traffic between nodes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// The collect-metadata VXLAN device (tunnel mode).
    pub tunnel_ifindex: u32,
    /// The device toward the other nodes (native mode).
    pub underlay_ifindex: u32,
    pub routing_mode: u8,
    /// 1: pod traffic leaving the cluster is SNATed to `node_address` (to_netdev).
    pub masquerade: u8,
    /// VXLAN's UDP port (network order) when the datapath encapsulates and decapsulates
    /// pod traffic itself (tunnel mode); 0 leaves it all to the tunnel device.
    pub tunnel_port: u16,
    /// The node's InternalIP (network order): the source external traffic to a backend
    /// on another node is SNATed to; 0 when the node has none yet.
    pub node_address: u32,
}

impl NodeConfig {
    pub fn new(mode: RoutingMode, tunnel_ifindex: u32, underlay_ifindex: u32) -> Self {
        Self {
            tunnel_ifindex,
            underlay_ifindex,
            routing_mode: mode as u8,
            masquerade: 0,
            tunnel_port: 0,
            node_address: 0,
        }
    }

    /// The same, with the node's own address to SNAT to.
    pub fn with_node_address(self, address: std::net::Ipv4Addr) -> Self {
        Self {
            node_address: super::addr_be(address),
            ..self
        }
    }

    /// The same, with pod traffic between nodes encapsulated by the datapath itself to
    /// VXLAN's UDP `port` (tunnel mode).
    pub fn with_tunnel_port(self, port: u16) -> Self {
        Self {
            tunnel_port: port.to_be(),
            ..self
        }
    }

    /// The same, with pod traffic leaving the cluster masqueraded (or not).
    pub fn with_masquerade(self, on: bool) -> Self {
        Self {
            masquerade: u8::from(on),
            ..self
        }
    }
}

plain_data!(NodeConfig);

const _: () = assert!(size_of::<NodeConfig>() == 16);
