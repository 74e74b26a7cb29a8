//! The verdict a packet should get, worked out from its bytes alone: an independent
//! reading of IPv4 (RFC 791, fragments per RFC 1858: a first fragment must hold the
//! whole L4 header), of the endpoint's policy (a new connection is admitted by a row for
//! its peer's identity or for any peer) and of stateful filtering (what passes unjudged
//! is a reply to, or a later packet of, a connection policy admitted).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use sluice_common::{
    DropReason, IDENTITY_ANY, IDENTITY_WORLD, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    POLICY_EGRESS, POLICY_INGRESS, PolicyKey,
};

use crate::support::{ETH_HLEN, IPPROTO_ICMP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// Which program sees the packet: from_container (it leaves the pod) or to_container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dir {
    Egress,
    Ingress,
}

/// A connection's tuple as a packet carries it (ICMP echo: the identifier as both ports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple {
    fn reversed(self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

/// A policy row in the model's own terms; `key` writes it for the kernel.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    pub identity: u32,
    pub dir: Dir,
    /// None: any protocol.
    pub proto: Option<u8>,
    /// None: any port; else the port and how many of its leading bits must match.
    pub ports: Option<(u16, u8)>,
}

impl Row {
    pub fn key(&self) -> PolicyKey {
        let direction = match self.dir {
            Dir::Egress => POLICY_EGRESS,
            Dir::Ingress => POLICY_INGRESS,
        };
        match (self.proto, self.ports) {
            (None, _) => PolicyKey::any(self.identity, direction),
            (Some(proto), None) => PolicyKey::any_port(self.identity, direction, proto),
            (Some(proto), Some((port, bits))) => {
                PolicyKey::ports(self.identity, direction, proto, port, bits)
            }
        }
    }

    fn admits(&self, identity: u32, dir: Dir, proto: u8, port: u16) -> bool {
        let port_matches = |(base, bits): (u16, u8)| {
            let mask = if bits == 0 {
                0
            } else {
                u16::MAX << (16 - u32::from(bits))
            };
            port & mask == base & mask
        };
        (self.identity == identity || self.identity == IDENTITY_ANY)
            && self.dir == dir
            && self.proto.is_none_or(|p| p == proto)
            && (self.proto.is_none() || self.ports.is_none_or(port_matches))
    }
}

/// A ClusterIP frontend with its single backend.
#[derive(Clone, Copy, Debug)]
pub struct Service {
    pub frontend: SocketAddrV4,
    pub proto: u8,
    pub backend: SocketAddrV4,
}

/// The world the programs run in: the endpoint (the only one, enforced both ways), the
/// identities the ipcache names, the rows and the services.
pub struct World {
    pub pod: Ipv4Addr,
    pub identities: Vec<(Ipv4Addr, u32)>,
    pub rows: Vec<Row>,
    pub services: Vec<Service>,
}

/// How a passed packet should leave the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rewrite {
    /// Byte for byte as it came.
    None,
    /// Addresses (and, when the L4 header is present, ports) replaced.
    Nat {
        src: SocketAddrV4,
        dst: SocketAddrV4,
    },
    /// An ICMP error whose quoted packet is translated back to the frontend.
    IcmpQuote { frontend: SocketAddrV4 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Pass(Rewrite),
    Drop(DropReason),
}

/// What the model read from a frame.
pub enum Parsed {
    Arp,
    UnknownL3,
    Invalid,
    FragNotFound,
    /// An ICMP error (first fragment): passes unjudged.
    IcmpError,
    L4 {
        tuple: Tuple,
        tcp_flags: u8,
        later_fragment: bool,
    },
}

/// A connection policy admitted: the frontend an egress service connection was translated
/// from, and what its TCP segments showed of its close (conntrack.h: closing from a FIN or
/// RST, a FIN each way, then the last ACK removes its entries).
#[derive(Clone, Copy, Debug, Default)]
struct Conn {
    frontend: Option<SocketAddrV4>,
    closing: bool,
    fin_original: bool,
    fin_reply: bool,
}

impl Conn {
    /// Accounts a packet of `proto` with `tcp_flags`, in the reply direction or not;
    /// returns whether it ended the connection (ct_closed).
    fn account(&mut self, proto: u8, tcp_flags: u8, reply: bool) -> bool {
        if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            self.closing = true;
        }
        if tcp_flags & TCP_FIN != 0 {
            if reply {
                self.fin_reply = true;
            } else {
                self.fin_original = true;
            }
        }
        proto == IPPROTO_TCP
            && self.fin_original
            && self.fin_reply
            && tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
    }
}

/// The model's state: connections admitted, by direction and tuple; and the ports of
/// fragmented datagrams whose first fragment was seen.
pub struct Model {
    world: World,
    admitted: HashMap<(Dir, Tuple), Conn>,
    fragments: HashMap<(Ipv4Addr, Ipv4Addr, u16, u8), (u16, u16)>,
    /// Passed packets whose own tuple policy denies: replies of admitted connections.
    pub denied_tuples_passed_as_replies: u64,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn addr(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

fn is_icmp_error(kind: u8) -> bool {
    matches!(kind, 3 | 4 | 5 | 11 | 12)
}

impl Model {
    pub fn new(world: World) -> Self {
        Self {
            world,
            admitted: HashMap::new(),
            fragments: HashMap::new(),
            denied_tuples_passed_as_replies: 0,
        }
    }

    fn identity(&self, address: Ipv4Addr) -> u32 {
        self.world
            .identities
            .iter()
            .find(|(a, _)| *a == address)
            .map_or(IDENTITY_WORLD, |(_, id)| *id)
    }

    fn policy_admits(&self, dir: Dir, remote: Ipv4Addr, proto: u8, dport: u16) -> bool {
        let identity = self.identity(remote);
        // ICMP has no port: only rows for any protocol or any port of ICMP match it.
        let port = if proto == IPPROTO_ICMP { 0 } else { dport };
        self.world
            .rows
            .iter()
            .any(|row| row.admits(identity, dir, proto, port))
    }

    fn service(&self, daddr: Ipv4Addr, dport: u16, proto: u8) -> Option<Service> {
        self.world
            .services
            .iter()
            .find(|s| *s.frontend.ip() == daddr && s.frontend.port() == dport && s.proto == proto)
            .copied()
    }

    fn vip_known(&self, daddr: Ipv4Addr) -> bool {
        self.world
            .services
            .iter()
            .any(|s| *s.frontend.ip() == daddr)
    }

    /// Reads `frame` as the programs' parser must, recording first fragments.
    pub fn parse(&mut self, frame: &[u8]) -> Parsed {
        match be16(frame, 12) {
            ETH_P_ARP => return Parsed::Arp,
            ETH_P_IP => {}
            _ => return Parsed::UnknownL3,
        }
        let ip = &frame[ETH_HLEN..];
        let (version, ihl) = (ip[0] >> 4, usize::from(ip[0] & 0x0f) * 4);
        if version != 4 || ihl < 20 {
            return Parsed::Invalid;
        }
        let tot_len = usize::from(be16(ip, 2));
        if tot_len < ihl || tot_len > ip.len() {
            return Parsed::Invalid;
        }
        let (saddr, daddr, proto) = (addr(ip, 12), addr(ip, 16), ip[9]);
        let (id, frag) = (be16(ip, 4), be16(ip, 6));
        let later = frag & IP_OFFSET != 0;
        let tuple = |sport, dport| Tuple {
            saddr,
            daddr,
            sport,
            dport,
            proto,
        };
        let has_ports = [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_ICMP].contains(&proto);
        if !has_ports {
            return Parsed::L4 {
                tuple: tuple(0, 0),
                tcp_flags: 0,
                later_fragment: later,
            };
        }
        if later {
            return match self.fragments.get(&(saddr, daddr, id, proto)) {
                Some(&(sport, dport)) => Parsed::L4 {
                    tuple: tuple(sport, dport),
                    tcp_flags: 0,
                    later_fragment: true,
                },
                None => Parsed::FragNotFound,
            };
        }
        let l4_min = match proto {
            IPPROTO_TCP => 20,
            IPPROTO_SCTP => 12,
            _ => 8,
        };
        if tot_len < ihl + l4_min {
            return Parsed::Invalid;
        }
        let l4 = &ip[ihl..];
        let (mut sport, mut dport, mut tcp_flags) = (0, 0, 0);
        if proto == IPPROTO_ICMP {
            if is_icmp_error(l4[0]) {
                return Parsed::IcmpError;
            }
            if l4[0] == 0 || l4[0] == 8 {
                (sport, dport) = (be16(l4, 4), be16(l4, 4));
            }
        } else {
            (sport, dport) = (be16(l4, 0), be16(l4, 2));
            if proto == IPPROTO_TCP {
                let doff = usize::from(l4[12] >> 4) * 4;
                if doff < 20 || ihl + doff > tot_len {
                    return Parsed::Invalid;
                }
                tcp_flags = l4[13];
            }
        }
        if frag & IP_MF != 0 {
            self.fragments
                .insert((saddr, daddr, id, proto), (sport, dport));
        }
        Parsed::L4 {
            tuple: tuple(sport, dport),
            tcp_flags,
            later_fragment: false,
        }
    }

    /// The expected outcome of `frame` in `dir`, updating the state as the programs must.
    pub fn judge(&mut self, dir: Dir, frame: &[u8]) -> Expect {
        let (tuple, tcp_flags, later_fragment) = match self.parse(frame) {
            Parsed::Arp => return Expect::Pass(Rewrite::None),
            Parsed::UnknownL3 => return Expect::Drop(DropReason::UnknownL3),
            Parsed::Invalid => return Expect::Drop(DropReason::Invalid),
            Parsed::FragNotFound => return Expect::Drop(DropReason::FragNotFound),
            Parsed::IcmpError => return self.icmp_error(dir, frame),
            Parsed::L4 {
                tuple,
                tcp_flags,
                later_fragment,
            } => (tuple, tcp_flags, later_fragment),
        };
        // A TCP RST is judged but opens nothing (its connection's entry may be gone).
        let opens = !(tuple.proto == IPPROTO_TCP && tcp_flags & TCP_RST != 0);
        let nat = |src: SocketAddrV4, dst: SocketAddrV4| Rewrite::Nat { src, dst };
        let (src, dst) = (
            SocketAddrV4::new(tuple.saddr, tuple.sport),
            SocketAddrV4::new(tuple.daddr, tuple.dport),
        );
        match dir {
            Dir::Egress => {
                if tuple.saddr != self.world.pod {
                    return Expect::Drop(DropReason::InvalidSource);
                }
                if self.reply(Dir::Ingress, tuple, tcp_flags).is_some() {
                    self.count_reply(Dir::Egress, tuple);
                    return Expect::Pass(Rewrite::None);
                }
                let balanced = [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP].contains(&tuple.proto);
                let service = balanced
                    .then(|| self.service(tuple.daddr, tuple.dport, tuple.proto))
                    .flatten();
                if service.is_none() && balanced && self.vip_known(tuple.daddr) {
                    return Expect::Drop(DropReason::ServicePortUnknown);
                }
                let (to, frontend) = match service {
                    Some(s) => (s.backend, Some(s.frontend)),
                    None => (dst, None),
                };
                if !self.policy_admits(Dir::Egress, *to.ip(), tuple.proto, to.port()) {
                    return Expect::Drop(DropReason::Policy);
                }
                let key = Tuple {
                    daddr: *to.ip(),
                    dport: to.port(),
                    ..tuple
                };
                self.track((Dir::Egress, key), frontend, tcp_flags, opens);
                Expect::Pass(match frontend {
                    Some(_) => nat(src, port_kept(to, later_fragment, tuple.dport)),
                    None => Rewrite::None,
                })
            }
            Dir::Ingress => {
                if let Some(frontend) = self.reply(Dir::Egress, tuple, tcp_flags) {
                    self.count_reply(Dir::Ingress, tuple);
                    return Expect::Pass(match frontend {
                        Some(f) => nat(port_kept(f, later_fragment, tuple.sport), dst),
                        None => Rewrite::None,
                    });
                }
                if !self.policy_admits(Dir::Ingress, tuple.saddr, tuple.proto, tuple.dport) {
                    return Expect::Drop(DropReason::Policy);
                }
                self.track((Dir::Ingress, tuple), None, tcp_flags, opens);
                Expect::Pass(Rewrite::None)
            }
        }
    }

    /// `tuple`, seen with `tcp_flags`, as a reply on the connection admitted in `dir`:
    /// its frontend if it is one, the connection removed if the packet ended it.
    fn reply(&mut self, dir: Dir, tuple: Tuple, tcp_flags: u8) -> Option<Option<SocketAddrV4>> {
        let key = (dir, tuple.reversed());
        let conn = self.admitted.get_mut(&key)?;
        let frontend = conn.frontend;
        if conn.account(tuple.proto, tcp_flags, true) {
            self.admitted.remove(&key);
        }
        Some(frontend)
    }

    /// A packet policy admitted, in its connection's own direction: accounted to the
    /// connection under `key` with `frontend` if that still describes it (not when a pure
    /// SYN follows its close: a reused port), else opening one if it `opens`.
    fn track(
        &mut self,
        key: (Dir, Tuple),
        frontend: Option<SocketAddrV4>,
        tcp_flags: u8,
        opens: bool,
    ) {
        let pure_syn = key.1.proto == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let mut conn = match self.admitted.get(&key) {
            Some(c) if c.frontend == frontend && !(pure_syn && c.closing) => *c,
            _ if opens => Conn {
                frontend,
                ..Conn::default()
            },
            _ => return,
        };
        if conn.account(key.1.proto, tcp_flags, false) {
            self.admitted.remove(&key);
        } else {
            self.admitted.insert(key, conn);
        }
    }

    fn count_reply(&mut self, dir: Dir, tuple: Tuple) {
        let remote = match dir {
            Dir::Egress => tuple.daddr,
            Dir::Ingress => tuple.saddr,
        };
        if !self.policy_admits(dir, remote, tuple.proto, tuple.dport) {
            self.denied_tuples_passed_as_replies += 1;
        }
    }

    /// An ICMP error passes unjudged (from the pod only from its own address); one
    /// entering the pod about a service connection it opened is translated back.
    fn icmp_error(&mut self, dir: Dir, frame: &[u8]) -> Expect {
        let ip = &frame[ETH_HLEN..];
        if dir == Dir::Egress {
            return if addr(ip, 12) == self.world.pod {
                Expect::Pass(Rewrite::None)
            } else {
                Expect::Drop(DropReason::InvalidSource)
            };
        }
        // The quote is read from the frame (not bounded by tot_len): an option-less outer
        // header, the ICMP header, an option-less quoted header and 8 bytes of its L4.
        let quote = ETH_HLEN + 20 + 8;
        if ip[0] & 0x0f != 5 || frame.len() < quote + 28 {
            return Expect::Pass(Rewrite::None);
        }
        let q = &frame[quote..];
        let proto = q[9];
        if q[0] >> 4 != 4 || q[0] & 0x0f != 5 || be16(q, 6) & IP_OFFSET != 0 {
            return Expect::Pass(Rewrite::None);
        }
        let (sport, dport) = match proto {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => (be16(q, 20), be16(q, 22)),
            IPPROTO_ICMP if q[20] == 0 || q[20] == 8 => (be16(q, 24), be16(q, 24)),
            _ => return Expect::Pass(Rewrite::None),
        };
        let quoted = Tuple {
            saddr: addr(q, 12),
            daddr: addr(q, 16),
            sport,
            dport,
            proto,
        };
        if quoted.saddr != addr(ip, 16) {
            return Expect::Pass(Rewrite::None);
        }
        match self
            .admitted
            .get(&(Dir::Egress, quoted))
            .map(|c| c.frontend)
        {
            Some(Some(frontend)) => Expect::Pass(Rewrite::IcmpQuote { frontend }),
            _ => Expect::Pass(Rewrite::None),
        }
    }
}

/// `to` with its port, or with `old` when the packet is a later fragment (no L4 header).
fn port_kept(to: SocketAddrV4, later_fragment: bool, old: u16) -> SocketAddrV4 {
    if later_fragment {
        SocketAddrV4::new(*to.ip(), old)
    } else {
        to
    }
}

/// TCP flag combinations worth generating (the last draws any byte).
pub const TCP_FLAG_CHOICES: [u8; 7] = [
    TCP_SYN,
    TCP_SYN | TCP_ACK,
    TCP_ACK,
    TCP_FIN | TCP_ACK,
    TCP_RST,
    TCP_RST | TCP_ACK,
    TCP_ACK | 0x08,
];
