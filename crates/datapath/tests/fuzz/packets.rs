//! A seeded generator of the packets a pod's veth can see: TCP, UDP, SCTP, ICMP echo,
//! errors and other types, GRE, ARP, IPv6 and unknown L3; with IP options, in every
//! fragment shape (in order, reordered, first missing, duplicated, overlapping, a tiny
//! first fragment that splits the TCP header as in RFC 1858, offsets past 64 KiB); and
//! a mutator that truncates, bends header fields and flips bytes.

use std::net::Ipv4Addr;

use sluice_common::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use super::model::{Dir, TCP_FLAG_CHOICES};
use crate::support::{ETH_HLEN, IPPROTO_ICMP, NODE_MAC, POD_MAC, checksum};

const IPPROTO_GRE: u8 = 47;

/// The addresses a packet is made of.
pub struct Addresses {
    pub pod: Ipv4Addr,
    /// Peers other than the pod (pods, world hosts, service frontends).
    pub peers: Vec<Ipv4Addr>,
    /// The services' frontend address (among the peers).
    pub frontend: Ipv4Addr,
    /// Ports the packets to the pod lean toward (the node's own ports when `pod` is a
    /// node), besides the usual ones.
    pub ingress_dports: Vec<u16>,
}

/// Which shape a generated datagram was sent in, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Whole,
    Fragments,
    ReorderedFragments,
    FirstFragmentMissing,
    DuplicatedFirstFragment,
    OverlappingFragments,
    TinyFirstFragment,
    OffsetPastTheEnd,
    NotIpv4,
    /// VXLAN to the node from a sender that is no node (from_netdev's campaign).
    ForgedVxlan,
}

/// One frame to run, in its direction, and whether the mutator bent it.
pub struct Frame {
    pub dir: Dir,
    pub bytes: Vec<u8>,
    pub shape: Shape,
    pub mutated: bool,
}

const DPORTS: [u16; 9] = [80, 53, 443, 5353, 8080, 1500, 1024, 22, 9999];
const SPORTS: [u16; 6] = [40000, 40001, 53, 80, 5353, 8080];
const IDS: [u16; 4] = [1, 2, 3, 0x1234];

pub struct Generator {
    rng: fastrand::Rng,
    addresses: Addresses,
}

/// One's complement sum of `data` folded into the Internet checksum, with a pseudo
/// header for TCP and UDP.
fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12 + l4.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(l4);
    checksum(&pseudo)
}

/// Writes the IP header checksum of the header at the start of `ip` (`ihl` bytes).
fn seal_ip(ip: &mut [u8], ihl: usize) {
    ip[10..12].fill(0);
    let sum = checksum(&ip[..ihl.min(ip.len())]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
}

impl Generator {
    pub fn new(seed: u64, addresses: Addresses) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed),
            addresses,
        }
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.usize(..from.len())]
    }

    fn port(&mut self, pool: &[u16]) -> u16 {
        if self.rng.u8(..10) == 0 {
            self.rng.u16(..)
        } else {
            self.pick(pool)
        }
    }

    fn peer(&mut self) -> Ipv4Addr {
        if self.rng.u8(..40) == 0 {
            return self.addresses.pod;
        }
        let peers = self.addresses.peers.clone();
        self.pick(&peers)
    }

    /// The next frames: one datagram in some shape, each frame perhaps mutated.
    pub fn next(&mut self) -> Vec<Frame> {
        let dir = if self.rng.bool() {
            Dir::Egress
        } else {
            Dir::Ingress
        };
        if self.rng.u8(..20) == 0 {
            let bytes = self.not_ipv4();
            return vec![Frame {
                dir,
                bytes,
                shape: Shape::NotIpv4,
                mutated: false,
            }];
        }
        let (pod, peer) = (self.addresses.pod, self.peer());
        let (mut src, dst) = match dir {
            Dir::Egress => (pod, peer),
            Dir::Ingress => (peer, pod),
        };
        if dir == Dir::Egress && self.rng.u8(..20) == 0 {
            src = peer; // spoofed
        }
        let (proto, l4) = self.l4(src, dst, dir);
        let options = self.ip_options();
        let (shape, pieces) = self.shape(proto, &l4);
        let id = self.pick(&IDS);
        pieces
            .into_iter()
            .map(|(offset_units, more, data)| {
                let mut bytes = datagram(src, dst, proto, id, &options, offset_units, more, &data);
                let mutated = self.rng.u8(..8) == 0;
                if mutated {
                    self.mutate(&mut bytes);
                }
                Frame {
                    dir,
                    bytes,
                    shape,
                    mutated,
                }
            })
            .collect()
    }

    /// ARP, IPv6 (long enough for the kernel's test run) or any other ethertype.
    fn not_ipv4(&mut self) -> Vec<u8> {
        let ethertype: u16 = self.pick(&[0x0806, 0x86dd, 0x8100, 0x88cc, 0x0600]);
        let len = self.rng.usize(60..120);
        let mut frame: Vec<u8> = (0..len).map(|_| self.rng.u8(..)).collect();
        frame[..6].copy_from_slice(&NODE_MAC);
        frame[6..12].copy_from_slice(&POD_MAC);
        frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
        frame
    }

    /// An L4 header and payload with a valid checksum for the addresses.
    fn l4(&mut self, src: Ipv4Addr, dst: Ipv4Addr, dir: Dir) -> (u8, Vec<u8>) {
        let payload_len = match self.rng.u8(..10) {
            0 => self.rng.usize(100..400),
            1..=3 => 0,
            _ => self.rng.usize(1..64),
        };
        let payload: Vec<u8> = (0..payload_len).map(|_| self.rng.u8(..)).collect();
        let (sport, dport) = match dir {
            Dir::Egress => (self.port(&SPORTS), self.port(&DPORTS)),
            Dir::Ingress => (self.port(&DPORTS), self.port(&SPORTS)),
        };
        // Replies come from the well-known ports; requests go to them.
        let (mut sport, mut dport) = if self.rng.bool() {
            (sport, dport)
        } else {
            (dport, sport)
        };
        // Lean toward the services' frontends and their backends' answers, so that
        // translations, replies and the errors about them are common.
        if self.rng.bool() {
            match dir {
                Dir::Egress if dst == self.addresses.frontend => dport = self.pick(&[80, 53]),
                Dir::Ingress => sport = self.pick(&[8080, 5353, 80, 53]),
                _ => {}
            }
        }
        if dir == Dir::Ingress && !self.addresses.ingress_dports.is_empty() && self.rng.bool() {
            let ports = self.addresses.ingress_dports.clone();
            dport = self.pick(&ports);
        }
        match self.rng.u8(..100) {
            0..=34 => (IPPROTO_TCP, self.tcp(src, dst, sport, dport, &payload)),
            35..=59 => (IPPROTO_UDP, self.udp(src, dst, sport, dport, &payload)),
            60..=71 => {
                let kind = self.pick(&[0u8, 8]);
                let id = self.port(&SPORTS);
                let mut l4 = vec![kind, 0, 0, 0];
                l4.extend_from_slice(&id.to_be_bytes());
                l4.extend_from_slice(&self.rng.u16(..).to_be_bytes());
                l4.extend_from_slice(&payload);
                (IPPROTO_ICMP, seal_icmp(l4))
            }
            72..=79 => (IPPROTO_ICMP, self.icmp_error(dst)),
            80..=82 => {
                let kind = self.pick(&[13u8, 14, 9, 10, 42, 255]);
                let mut l4 = vec![kind, self.rng.u8(..), 0, 0, 0, 0, 0, 0];
                l4.extend_from_slice(&payload);
                (IPPROTO_ICMP, seal_icmp(l4))
            }
            83..=92 => {
                let mut l4 = vec![0, 0, 0x08, 0x00];
                l4.extend_from_slice(&payload);
                (IPPROTO_GRE, l4)
            }
            _ => {
                let mut l4 = vec![0u8; 12];
                l4[0..2].copy_from_slice(&sport.to_be_bytes());
                l4[2..4].copy_from_slice(&dport.to_be_bytes());
                l4[4..8].copy_from_slice(&self.rng.u32(..).to_be_bytes());
                l4[8..12].copy_from_slice(&self.rng.u32(..).to_be_bytes());
                l4.extend_from_slice(&payload);
                (IPPROTO_SCTP, l4)
            }
        }
    }

    /// A TCP segment (sometimes with NOP options) with a valid checksum.
    fn tcp(
        &mut self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        sport: u16,
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let options = 4 * self.rng.usize(0..4) * usize::from(self.rng.u8(..4) == 0);
        let mut l4 = vec![0u8; 20 + options];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[4..8].copy_from_slice(&self.rng.u32(..).to_be_bytes());
        l4[8..12].copy_from_slice(&self.rng.u32(..).to_be_bytes());
        l4[12] = (((20 + options) / 4) as u8) << 4;
        l4[13] = if self.rng.u8(..10) == 0 {
            self.rng.u8(..)
        } else {
            self.pick(&TCP_FLAG_CHOICES)
        };
        l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
        l4[20..].fill(1); // NOP options
        l4.extend_from_slice(payload);
        let sum = l4_checksum(src, dst, IPPROTO_TCP, &l4);
        l4[16..18].copy_from_slice(&sum.to_be_bytes());
        l4
    }

    /// A UDP datagram with a valid checksum, or now and then none (0).
    fn udp(
        &mut self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        sport: u16,
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut l4 = vec![0u8; 8];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(payload);
        if self.rng.u8(..10) != 0 {
            let sum = match l4_checksum(src, dst, IPPROTO_UDP, &l4) {
                0 => 0xffff,
                sum => sum,
            };
            l4[6..8].copy_from_slice(&sum.to_be_bytes());
        }
        l4
    }

    /// An ICMP error quoting a packet the receiver of the error sent: from `dst` to a
    /// peer (so an error entering the pod may be about one of its service connections).
    fn icmp_error(&mut self, dst: Ipv4Addr) -> Vec<u8> {
        let kind = self.pick(&[3u8, 11, 12, 4, 5]);
        let mut l4 = vec![kind, self.rng.u8(..5), 0, 0, 0, 0, 0, 0];
        let proto = self.pick(&[IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP]);
        let peer = self.peer();
        let mut quoted = vec![0u8; 20];
        quoted[0] = 0x45;
        quoted[2..4].copy_from_slice(&(60u16).to_be_bytes());
        quoted[8] = 64;
        quoted[9] = proto;
        quoted[12..16].copy_from_slice(&dst.octets());
        quoted[16..20].copy_from_slice(&peer.octets());
        seal_ip(&mut quoted, 20);
        let (sport, dport) = (self.port(&SPORTS), self.port(&DPORTS));
        let mut quoted_l4 = vec![0u8; 8];
        if proto == IPPROTO_ICMP {
            quoted_l4[0] = 8;
            quoted_l4[4..6].copy_from_slice(&sport.to_be_bytes());
        } else {
            quoted_l4[0..2].copy_from_slice(&sport.to_be_bytes());
            quoted_l4[2..4].copy_from_slice(&dport.to_be_bytes());
            quoted_l4[4..8].copy_from_slice(&self.rng.u32(..).to_be_bytes());
        }
        l4.extend_from_slice(&quoted);
        l4.extend_from_slice(&quoted_l4);
        // Some routers quote more than RFC 792's 8 bytes.
        let extra = self.rng.usize(0..24);
        l4.extend((0..extra).map(|_| self.rng.u8(..)));
        seal_icmp(l4)
    }

    /// IP options (NOPs, an end-of-list, or noise) filling 0 to 40 bytes.
    fn ip_options(&mut self) -> Vec<u8> {
        if self.rng.u8(..5) != 0 {
            return Vec::new();
        }
        let len = 4 * self.rng.usize(1..=10);
        match self.rng.u8(..3) {
            0 => vec![1; len],
            1 => {
                let mut o = vec![0; len];
                o[0] = 1;
                o
            }
            _ => (0..len).map(|_| self.rng.u8(..)).collect(),
        }
    }

    /// Splits `l4` into (offset in 8-byte units, more fragments, data) pieces.
    #[allow(clippy::type_complexity)]
    fn shape(&mut self, proto: u8, l4: &[u8]) -> (Shape, Vec<(u16, bool, Vec<u8>)>) {
        let whole = vec![(0, false, l4.to_vec())];
        if l4.len() < 24 || self.rng.u8(..4) != 0 {
            return (Shape::Whole, whole);
        }
        let units = l4.len().div_ceil(8);
        let mut cuts: Vec<usize> = (0..self.rng.usize(1..4))
            .map(|_| 8 * self.rng.usize(1..units))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut bounds = vec![0];
        bounds.extend(cuts);
        bounds.push(l4.len());
        let mut pieces: Vec<(u16, bool, Vec<u8>)> = bounds
            .windows(2)
            .map(|w| ((w[0] / 8) as u16, w[1] < l4.len(), l4[w[0]..w[1]].to_vec()))
            .collect();
        let shape = self.pick(&[
            Shape::Fragments,
            Shape::ReorderedFragments,
            Shape::FirstFragmentMissing,
            Shape::DuplicatedFirstFragment,
            Shape::OverlappingFragments,
            Shape::TinyFirstFragment,
            Shape::OffsetPastTheEnd,
        ]);
        match shape {
            Shape::ReorderedFragments => self.rng.shuffle(&mut pieces),
            Shape::FirstFragmentMissing => {
                pieces.remove(0);
            }
            Shape::DuplicatedFirstFragment => {
                // The same datagram id, a first fragment with other ports after the real one.
                let mut other = pieces[0].clone();
                if other.2.len() >= 4 && proto != IPPROTO_ICMP {
                    let port = self.port(&DPORTS);
                    other.2[2..4].copy_from_slice(&port.to_be_bytes());
                }
                let at = self.rng.usize(1..=pieces.len());
                pieces.insert(at, other);
            }
            Shape::OverlappingFragments => {
                // A later piece starting one unit early rewrites bytes already sent: with
                // offset 1 it covers the TCP flags (RFC 1858's overlapping attack).
                let start = 8 * self.rng.usize(1..units.min(3));
                let end = (start + 16).min(l4.len());
                let mut data = l4[start..end].to_vec();
                for b in data.iter_mut().take(8) {
                    *b = self.rng.u8(..);
                }
                pieces.push(((start / 8) as u16, true, data));
            }
            Shape::TinyFirstFragment => {
                // 8 bytes: the ports but no TCP flags (RFC 1858's tiny fragment attack).
                let rest = l4[8..].to_vec();
                pieces = vec![(0, true, l4[..8].to_vec()), (1, false, rest)];
            }
            Shape::OffsetPastTheEnd => {
                let last = pieces.len() - 1;
                pieces[last].0 = IP_OFFSET_MAX - self.rng.u16(..4);
            }
            _ => {}
        }
        (shape, pieces)
    }

    /// Bends one thing in `frame`, then (mostly) seals the IP header checksum again.
    fn mutate(&mut self, frame: &mut Vec<u8>) {
        let ihl = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
        match self.rng.u8(..8) {
            0 => {
                let len = self
                    .rng
                    .usize(ETH_HLEN + 20..frame.len().max(ETH_HLEN + 21));
                frame.truncate(len);
            }
            1 => {
                let tot_len = match self.rng.u8(..3) {
                    0 => self.rng.u16(..),
                    1 => self.rng.u16(..64),
                    _ => {
                        let now = u16::from_be_bytes([frame[ETH_HLEN + 2], frame[ETH_HLEN + 3]]);
                        now.wrapping_add(self.rng.u16(..16)).wrapping_sub(8)
                    }
                };
                frame[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&tot_len.to_be_bytes());
            }
            2 => frame[ETH_HLEN] = (frame[ETH_HLEN] & 0xf0) | self.rng.u8(..16),
            3 => frame[ETH_HLEN] = (self.rng.u8(..16) << 4) | (frame[ETH_HLEN] & 0x0f),
            4 => {
                // TCP data offset, or whatever sits there.
                if let Some(b) = frame.get_mut(ETH_HLEN + ihl + 12) {
                    *b = (self.rng.u8(..16) << 4) | (*b & 0x0f);
                }
            }
            5 => {
                let extra = self.rng.usize(1..32);
                frame.extend((0..extra).map(|_| self.rng.u8(..)));
            }
            6 => {
                // Fragment flags and offset.
                let v = self.rng.u16(..);
                frame[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&v.to_be_bytes());
            }
            _ => {
                for _ in 0..self.rng.usize(1..4) {
                    let at = self.rng.usize(ETH_HLEN..frame.len());
                    frame[at] = self.rng.u8(..);
                }
            }
        }
        let ihl = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
        if self.rng.u8(..10) != 0 && ihl >= 20 && frame.len() >= ETH_HLEN + ihl {
            seal_ip(&mut frame[ETH_HLEN..], ihl);
        }
    }
}

const IP_OFFSET_MAX: u16 = 0x1fff;

fn seal_icmp(mut l4: Vec<u8>) -> Vec<u8> {
    l4[2..4].fill(0);
    let sum = checksum(&l4);
    l4[2..4].copy_from_slice(&sum.to_be_bytes());
    l4
}

/// An Ethernet frame with one IPv4 piece of a datagram: `data` at `offset_units`.
#[allow(clippy::too_many_arguments)]
fn datagram(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    id: u16,
    options: &[u8],
    offset_units: u16,
    more: bool,
    data: &[u8],
) -> Vec<u8> {
    let ihl = 20 + options.len();
    let mut ip = vec![0u8; ihl];
    ip[0] = 0x40 | (ihl / 4) as u8;
    ip[2..4].copy_from_slice(&((ihl + data.len()) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    let flags = if more { 0x2000 } else { 0 } | (offset_units & IP_OFFSET_MAX);
    ip[6..8].copy_from_slice(&flags.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    ip[20..].copy_from_slice(options);
    seal_ip(&mut ip, ihl);
    ip.extend_from_slice(data);
    let mut frame = Vec::with_capacity(ETH_HLEN + ip.len());
    frame.extend_from_slice(&NODE_MAC);
    frame.extend_from_slice(&POD_MAC);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame
}
