//! How this node sends pod traffic to the others (`node_config`, one entry at index 0).

/// The routing mode of pod traffic between nodes (`ROUTING_MODE_*` in common.h), as
/// Cilium's `routing-mode` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
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

/// `struct node_config`: the devices and the mode of pod traffic between nodes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// The collect-metadata VXLAN device (tunnel mode).
    pub tunnel_ifindex: u32,
    /// The device toward the other nodes (native mode).
    pub underlay_ifindex: u32,
    pub routing_mode: u8,
    pub pad: [u8; 7],
}

impl NodeConfig {
    pub fn new(mode: RoutingMode, tunnel_ifindex: u32, underlay_ifindex: u32) -> Self {
        Self {
            tunnel_ifindex,
            underlay_ifindex,
            routing_mode: mode as u8,
            pad: [0; 7],
        }
    }
}

// SAFETY: #[repr(C)] plain data with explicit padding fields, so every byte is
// initialized and any bit pattern is valid.
unsafe impl aya::Pod for NodeConfig {}

const _: () = assert!(size_of::<NodeConfig>() == 16);
