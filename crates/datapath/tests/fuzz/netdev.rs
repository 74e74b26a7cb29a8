//! from_netdev under the fuzzer: frames from outside the node (world hosts, pods of other
//! nodes) to the node's own address, through BPF_PROG_TEST_RUN, each compared with a
//! model of what the underlay program must do with them:
//!  - a NodePort with a local backend (TCP 30080 to the pod's 8080): DNAT, the client's
//!    address kept, checksums following the change, counted as forwarded;
//!  - a NodePort without backends (30081, TCP and UDP): refused back out the device, a TCP
//!    RST or ICMP port unreachable from the node with valid checksums, counted
//!    NO_SERVICE; a TCP RST, a later fragment or a packet with IP options is dropped
//!    unanswered;
//!  - VXLAN to the node's tunnel port from a sender that is no node (forged, whatever it
//!    carries): never decapsulated here, it leaves untouched for the tunnel device (whose
//!    from_tunnel drops it);
//!  - everything else, malformed, fragmented or truncated (the node's stack's to judge):
//!    untouched and uncounted.
//!
//! The test namespace has no route to a local pod, so delivery into a pod from here (native
//! routing, decapsulated tunnel traffic) is not exercised: those fall to the stack.

use std::net::{Ipv4Addr, SocketAddrV4};

use sluice_common::{
    DropReason, IDENTITY_REMOTE_NODE, IPPROTO_TCP, IPPROTO_UDP, IpcacheEntry, METRIC_DIR_INGRESS,
    NodeConfig, RoutingMode, SVC_FLAG_NODE_PORT, addr_be, programs::FROM_NETDEV,
};
use sluice_datapath::{Datapath, PinnedMaps};

use super::{
    Report, WORLD_HOST, check_nat,
    model::{Model, Parsed, World},
    ones_sum,
    packets::{Addresses, Generator, Shape},
};
use crate::support::{
    self, ETH_HLEN, IPPROTO_ICMP, NODE_MAC, POD_MAC, PinDir, TC_ACT_OK, TC_ACT_REDIRECT,
    TC_ACT_SHOT, TCP_RST, checksum,
    world::{self, PEER, POD, POD_IDENTITY, STRANGER},
};

/// The node's own address, the NodePorts' frontend.
pub const NODE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// Another node, in the ipcache as one (the tunnel's only admitted sender).
pub const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
pub const NODE_PORT_LOCAL: u16 = 30080;
pub const NODE_PORT_NONE: u16 = 30081;
pub const VXLAN_PORT: u16 = 8472;
const BACKEND: SocketAddrV4 = SocketAddrV4::new(POD, 8080);

/// What from_netdev must do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Untouched and uncounted.
    Pass,
    /// DNATed to the local backend (its port kept in a later fragment), counted forwarded.
    Dnat(SocketAddrV4),
    /// Answered back out the device from the frontend, counted NO_SERVICE.
    Refused,
    /// Dropped and counted under the reason.
    Drop(DropReason),
}

/// A loaded datapath as a tunnel-mode node with the two NodePorts.
pub struct Fixture {
    pub datapath: Datapath,
    pub maps: PinnedMaps,
    _pins: PinDir,
}

impl Fixture {
    pub fn new() -> Self {
        let (pins, datapath) = support::load();
        let mut maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
        world::install(&mut maps, 0);
        maps.ipcache
            .insert(
                &aya::maps::lpm_trie::Key::new(32, addr_be(OTHER_NODE)),
                IpcacheEntry {
                    identity: IDENTITY_REMOTE_NODE,
                    tunnel_endpoint: 0,
                },
                0,
            )
            .unwrap();
        let config = NodeConfig::new(RoutingMode::Tunnel, 1, 1)
            .with_node_address(NODE)
            .with_tunnel_port(VXLAN_PORT);
        maps.node_config.set(0, config, 0).unwrap();
        let local = SocketAddrV4::new(NODE, NODE_PORT_LOCAL);
        support::add_service(&mut maps, local, IPPROTO_TCP, &[BACKEND]);
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            support::add_service(
                &mut maps,
                SocketAddrV4::new(NODE, NODE_PORT_NONE),
                proto,
                &[],
            );
        }
        // add_service writes ClusterIP frontends: these are node ports.
        for (port, proto, count) in [
            (NODE_PORT_LOCAL, IPPROTO_TCP, 1),
            (NODE_PORT_NONE, IPPROTO_TCP, 0),
            (NODE_PORT_NONE, IPPROTO_UDP, 0),
        ] {
            maps.services
                .insert(
                    sluice_common::Lb4Key::new(NODE, port, proto, 0),
                    sluice_common::Lb4Service::frontend(count, SVC_FLAG_NODE_PORT),
                    0,
                )
                .unwrap();
        }
        Self {
            datapath,
            maps,
            _pins: pins,
        }
    }

    fn counted(&self, code: u8) -> u64 {
        self.maps.counted(code, METRIC_DIR_INGRESS).unwrap().packets
    }
}

/// The model of from_netdev, on the shared reading of IPv4 (fragments included).
pub struct NetdevModel {
    parser: Model,
}

impl NetdevModel {
    pub fn new() -> Self {
        // Only the parser (and its fragment table) is used: no policy is judged here.
        Self {
            parser: Model::new(World {
                pod: NODE,
                identities: Vec::new(),
                rows: Vec::new(),
                services: Vec::new(),
            }),
        }
    }

    pub fn judge(&mut self, frame: &[u8]) -> Expect {
        let Parsed::L4 {
            tuple,
            tcp_flags,
            later_fragment,
        } = self.parser.parse(frame)
        else {
            return Expect::Pass;
        };
        if tuple.daddr != NODE {
            return Expect::Pass;
        }
        // VXLAN from a sender that is no node is left to the tunnel device.
        if tuple.proto == IPPROTO_UDP && tuple.dport == VXLAN_PORT && !later_fragment {
            return Expect::Pass;
        }
        match (tuple.proto, tuple.dport) {
            (IPPROTO_TCP, NODE_PORT_LOCAL) => Expect::Dnat(if later_fragment {
                SocketAddrV4::new(*BACKEND.ip(), tuple.dport)
            } else {
                BACKEND
            }),
            (IPPROTO_TCP | IPPROTO_UDP, NODE_PORT_NONE) => {
                let rst = tuple.proto == IPPROTO_TCP && tcp_flags & TCP_RST != 0;
                // The answer quotes an option-less header: a packet with options is
                // dropped unanswered.
                let options = frame[ETH_HLEN] & 0x0f != 5;
                if later_fragment || rst || options {
                    Expect::Drop(DropReason::NoService)
                } else {
                    Expect::Refused
                }
            }
            _ => Expect::Pass,
        }
    }
}

/// A VXLAN packet to the node from `sender`, carrying `identity` in its VNI and a pod's TCP
/// SYN to the local pod: what a pod or a world host forging tunnel traffic sends.
pub fn forged_vxlan(sender: Ipv4Addr, identity: u32, sport: u16) -> Vec<u8> {
    let mut inner = vec![0u8; 20 + 20];
    inner[0] = 0x45;
    inner[2..4].copy_from_slice(&40u16.to_be_bytes());
    inner[8] = 64;
    inner[9] = IPPROTO_TCP;
    inner[12..16].copy_from_slice(&PEER.octets());
    inner[16..20].copy_from_slice(&POD.octets());
    let sum = checksum(&inner[..20]);
    inner[10..12].copy_from_slice(&sum.to_be_bytes());
    inner[20..22].copy_from_slice(&40000u16.to_be_bytes());
    inner[22..24].copy_from_slice(&80u16.to_be_bytes());
    inner[32] = 5 << 4;
    inner[33] = 0x02;
    let mut payload = vec![0x08, 0, 0, 0];
    payload.extend_from_slice(&(identity << 8).to_be_bytes());
    payload.extend_from_slice(&POD_MAC);
    payload.extend_from_slice(&NODE_MAC);
    payload.extend_from_slice(&0x0800u16.to_be_bytes());
    payload.extend_from_slice(&inner);
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&VXLAN_PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&payload);
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&sender.octets());
    ip[16..20].copy_from_slice(&NODE.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut frame = NODE_MAC.to_vec();
    frame.extend_from_slice(&POD_MAC);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&udp);
    frame
}

/// Checks a refusal of `input`: an IPv4 answer from the frontend to the client, a TCP RST
/// or an ICMP port unreachable, every checksum valid.
fn check_refusal(input: &[u8], out: &[u8]) -> Option<String> {
    let (ip_in, ip) = (&input[ETH_HLEN..], out.get(ETH_HLEN..)?);
    if ip.len() < 20 || ip[0] != 0x45 {
        return Some("the answer is no option-less IPv4".into());
    }
    if ip[12..16] != ip_in[16..20] || ip[16..20] != ip_in[12..16] {
        return Some("the answer is not from the frontend to the client".into());
    }
    if ones_sum(&ip[..20]) != 0 {
        return Some("the answer's IP checksum is wrong".into());
    }
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let l4 = ip.get(20..tot_len)?;
    match ip[9] {
        IPPROTO_TCP => {
            let mut covered = ip[12..20].to_vec();
            covered.extend_from_slice(&[0, IPPROTO_TCP]);
            covered.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            covered.extend_from_slice(l4);
            if l4.len() < 20 || l4[13] & TCP_RST == 0 {
                return Some("the TCP answer is no RST".into());
            }
            (ones_sum(&covered) != 0).then(|| "the RST's checksum is wrong".into())
        }
        IPPROTO_ICMP => {
            if l4.len() < 8 || l4[0] != 3 || l4[1] != 3 {
                return Some("the ICMP answer is no port unreachable".into());
            }
            (ones_sum(l4) != 0).then(|| "the ICMP checksum is wrong".into())
        }
        other => Some(format!("the answer is protocol {other}")),
    }
}

/// Runs `frames` frames from `seed` through from_netdev of a fresh datapath; call it in a
/// namespace of the test's own.
pub fn campaign(seed: u64, frames: u64) -> Report {
    let mut fx = Fixture::new();
    let mut model = NetdevModel::new();
    let mut generator = Generator::new(
        seed,
        Addresses {
            pod: NODE,
            peers: vec![PEER, STRANGER, WORLD_HOST, OTHER_NODE],
            frontend: NODE,
            ingress_dports: vec![NODE_PORT_LOCAL, NODE_PORT_NONE, VXLAN_PORT],
        },
    );
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x7e7);
    let mut report = Report::default();
    let (mut forwarded, mut no_service) = (0, 0);
    let start = std::time::Instant::now();
    while report.frames < frames {
        let mut batch: Vec<(Vec<u8>, bool, Shape)> = Vec::new();
        if rng.u8(..10) == 0 {
            let sender = [PEER, STRANGER, WORLD_HOST][rng.usize(..3)];
            let identity = [POD_IDENTITY, IDENTITY_REMOTE_NODE, 0][rng.usize(..3)];
            let frame = forged_vxlan(sender, identity, rng.u16(1024..));
            batch.push((frame, false, Shape::ForgedVxlan));
        } else {
            for frame in generator.next() {
                // Only what arrives from outside: from_netdev is the device's ingress.
                if frame.dir == super::model::Dir::Ingress {
                    batch.push((frame.bytes, frame.mutated, frame.shape));
                }
            }
        }
        for (bytes, mutated, shape) in batch {
            report.frames += 1;
            report.mutated += u64::from(mutated);
            *report.shapes.entry(shape).or_default() += 1;
            let expect = model.judge(&bytes);
            let out = support::run(fx.datapath.program(FROM_NETDEV).unwrap(), &bytes);
            let problem = match expect {
                Expect::Pass => (out.verdict != TC_ACT_OK || out.packet != bytes)
                    .then(|| format!("verdict {}, changed {}", out.verdict, out.packet != bytes)),
                Expect::Dnat(to) => {
                    forwarded += 1;
                    report.checksums_checked += 1;
                    // The client's address and port stay (a later fragment has no port).
                    let l4 = ETH_HLEN + usize::from(bytes[ETH_HLEN] & 0x0f) * 4;
                    let src = SocketAddrV4::new(
                        Ipv4Addr::new(bytes[26], bytes[27], bytes[28], bytes[29]),
                        bytes
                            .get(l4..l4 + 2)
                            .map_or(0, |p| u16::from_be_bytes([p[0], p[1]])),
                    );
                    if out.verdict == TC_ACT_OK {
                        check_nat(&bytes, &out.packet, src, to)
                    } else {
                        Some(format!("verdict {}", out.verdict))
                    }
                }
                Expect::Refused => {
                    no_service += 1;
                    report.checksums_checked += 1;
                    if out.verdict == TC_ACT_REDIRECT {
                        check_refusal(&bytes, &out.packet)
                    } else {
                        Some(format!("verdict {}", out.verdict))
                    }
                }
                Expect::Drop(reason) => {
                    no_service += u64::from(reason == DropReason::NoService);
                    (out.verdict != TC_ACT_SHOT).then(|| format!("verdict {}", out.verdict))
                }
            };
            if let Some(problem) = problem {
                report.failures.push(format!(
                    "from_netdev frame {} expected {expect:?}: {problem}: {bytes:02x?} -> {:02x?}",
                    report.frames, out.packet
                ));
            }
            let outcome = match expect {
                Expect::Drop(reason) => format!("drop {reason:?}"),
                other => format!("{other:?}").to_lowercase(),
            };
            let outcome = outcome.split('(').next().unwrap_or_default().to_owned();
            *report
                .outcomes
                .entry(("Netdev".to_owned(), outcome))
                .or_default() += 1;
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    // Passing traffic is not counted; translations and refusals are, exactly.
    for (code, expected) in [(0, forwarded), (DropReason::NoService.code(), no_service)] {
        let counted = fx.counted(code);
        if counted != expected {
            report.failures.push(format!(
                "from_netdev: {counted} frames counted under reason {code}, the model expected \
                 {expected}"
            ));
        }
    }
    report
}
