//! The packet fuzzer: generated and mutated frames run through from_container and
//! to_container by BPF_PROG_TEST_RUN, each compared with the model's verdict; every
//! passed frame must leave as the model says (untouched, or translated with checksums
//! that still add up) and every drop must be counted under the model's reason.

pub mod model;
pub mod netdev;
pub mod packets;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use sluice_common::{
    ENDPOINT_F_EGRESS_ENFORCED, ENDPOINT_F_INGRESS_ENFORCED, IDENTITY_ANY, IDENTITY_WORLD,
    IPPROTO_TCP, IPPROTO_UDP, METRIC_DIR_EGRESS, METRIC_DIR_INGRESS,
    programs::{FROM_CONTAINER, TO_CONTAINER},
};
use sluice_datapath::{Datapath, PinnedMaps, PolicyMap};

use crate::support::{
    self, ETH_HLEN, IPPROTO_ICMP, PinDir, TC_ACT_OK, TC_ACT_SHOT,
    world::{self, PEER, PEER_IDENTITY, POD, STRANGER, STRANGER_IDENTITY, VIP},
};
use model::{Dir, Expect, Model, Rewrite, Row, Service, World};
use packets::{Addresses, Generator, Shape};

/// A host outside the cluster.
pub const WORLD_HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

/// The rows of the endpoint's policy: some peers and ports admitted each way.
pub fn rows() -> Vec<Row> {
    let row = |identity, dir, proto, ports| Row {
        identity,
        dir,
        proto,
        ports,
    };
    vec![
        row(
            PEER_IDENTITY,
            Dir::Egress,
            Some(IPPROTO_TCP),
            Some((8080, 16)),
        ),
        // 1024-2047
        row(
            PEER_IDENTITY,
            Dir::Egress,
            Some(IPPROTO_UDP),
            Some((1024, 6)),
        ),
        row(
            IDENTITY_ANY,
            Dir::Egress,
            Some(IPPROTO_TCP),
            Some((443, 16)),
        ),
        row(STRANGER_IDENTITY, Dir::Egress, Some(IPPROTO_ICMP), None),
        row(
            IDENTITY_WORLD,
            Dir::Egress,
            Some(IPPROTO_UDP),
            Some((53, 16)),
        ),
        row(
            PEER_IDENTITY,
            Dir::Ingress,
            Some(IPPROTO_TCP),
            Some((80, 16)),
        ),
        row(
            IDENTITY_ANY,
            Dir::Ingress,
            Some(IPPROTO_UDP),
            Some((5353, 16)),
        ),
        row(STRANGER_IDENTITY, Dir::Ingress, None, None),
        row(
            IDENTITY_WORLD,
            Dir::Ingress,
            Some(IPPROTO_TCP),
            Some((22, 16)),
        ),
    ]
}

/// Two ClusterIP frontends: one whose backend egress policy admits, one it denies.
pub fn services() -> Vec<Service> {
    vec![
        Service {
            frontend: SocketAddrV4::new(VIP, 80),
            proto: IPPROTO_TCP,
            backend: SocketAddrV4::new(PEER, 8080),
        },
        Service {
            frontend: SocketAddrV4::new(VIP, 53),
            proto: IPPROTO_UDP,
            backend: SocketAddrV4::new(STRANGER, 5353),
        },
    ]
}

/// A loaded datapath with the model's world installed.
pub struct Fixture {
    pub datapath: Datapath,
    pub maps: PinnedMaps,
    _policy: PolicyMap,
    _pins: PinDir,
}

impl Fixture {
    pub fn new() -> Self {
        let (pins, datapath) = support::load();
        let mut maps = PinnedMaps::open(pins.path()).expect("open pinned maps");
        world::install(
            &mut maps,
            ENDPOINT_F_INGRESS_ENFORCED | ENDPOINT_F_EGRESS_ENFORCED,
        );
        let keys: Vec<_> = rows().iter().map(Row::key).collect();
        let policy = support::install_policy(&mut maps, world::IFINDEX, &keys);
        for s in services() {
            support::add_service(&mut maps, s.frontend, s.proto, &[s.backend]);
        }
        Self {
            datapath,
            maps,
            _policy: policy,
            _pins: pins,
        }
    }

    pub fn run(&mut self, dir: Dir, frame: &[u8]) -> support::RunResult {
        let program = match dir {
            Dir::Egress => FROM_CONTAINER,
            Dir::Ingress => TO_CONTAINER,
        };
        support::run(self.datapath.program(program).unwrap(), frame)
    }

    fn counted(&self, code: u8, dir: Dir) -> u64 {
        self.maps.counted(code, metric_dir(dir)).unwrap().packets
    }
}

fn metric_dir(dir: Dir) -> u32 {
    match dir {
        Dir::Egress => METRIC_DIR_EGRESS,
        Dir::Ingress => METRIC_DIR_INGRESS,
    }
}

pub fn new_model() -> Model {
    Model::new(World {
        pod: POD,
        identities: vec![
            (POD, world::POD_IDENTITY),
            (PEER, PEER_IDENTITY),
            (STRANGER, STRANGER_IDENTITY),
        ],
        rows: rows(),
        services: services(),
    })
}

/// What a campaign saw.
#[derive(Default)]
pub struct Report {
    pub frames: u64,
    pub mutated: u64,
    /// By direction and outcome ("pass", "pass translated", or the drop reason).
    pub outcomes: BTreeMap<(String, String), u64>,
    pub shapes: BTreeMap<Shape, u64>,
    /// Translated frames whose checksums were checked.
    pub checksums_checked: u64,
    pub denied_tuples_passed_as_replies: u64,
    pub failures: Vec<String>,
    pub seconds: f64,
}

impl Report {
    pub fn print(&self, seed: u64) {
        let rate = self.frames as f64 / self.seconds.max(1e-9);
        println!(
            "packet fuzz: seed {seed:#x}, {} frames ({} mutated) in {:.1} s ({rate:.0}/s)",
            self.frames, self.mutated, self.seconds
        );
        for ((dir, outcome), n) in &self.outcomes {
            println!("  {dir:8} {outcome:28} {n}");
        }
        for (shape, n) in &self.shapes {
            println!("  shape {shape:?}: {n} frames");
        }
        println!(
            "  translated frames with checksums checked: {}; passed as replies although \
             their own tuple is denied: {}; failures: {}",
            self.checksums_checked,
            self.denied_tuples_passed_as_replies,
            self.failures.len()
        );
        for failure in self.failures.iter().take(10) {
            println!("  FAILURE {failure}");
        }
    }
}

/// Runs `frames` generated frames from `seed` through the programs of a fresh datapath.
/// Call it in a namespace of the test's own (the programs look routes up there).
pub fn campaign(seed: u64, frames: u64) -> Report {
    let mut fx = Fixture::new();
    let mut model = new_model();
    let mut generator = Generator::new(
        seed,
        Addresses {
            pod: POD,
            peers: vec![PEER, STRANGER, WORLD_HOST, VIP],
            frontend: VIP,
            ingress_dports: Vec::new(),
        },
    );
    let mut report = Report::default();
    let mut drops: BTreeMap<(u8, Dir), u64> = BTreeMap::new();
    let mut passes: BTreeMap<Dir, u64> = BTreeMap::new();
    let start = std::time::Instant::now();
    while report.frames < frames {
        for frame in generator.next() {
            report.frames += 1;
            report.mutated += u64::from(frame.mutated);
            *report.shapes.entry(frame.shape).or_default() += 1;
            let expect = model.judge(frame.dir, &frame.bytes);
            let out = fx.run(frame.dir, &frame.bytes);
            let dir_name = format!("{:?}", frame.dir);
            let outcome = match expect {
                Expect::Drop(reason) => {
                    let n = drops.entry((reason.code(), frame.dir)).or_default();
                    *n += 1;
                    let counted = fx.counted(reason.code(), frame.dir);
                    if out.verdict != TC_ACT_SHOT || counted != *n {
                        report.failures.push(format!(
                            "{:?} frame {}: expected a drop ({reason:?}, counted {} times \
                             by the model, {counted} by the datapath), got verdict {}: {:02x?}",
                            frame.dir, report.frames, *n, out.verdict, frame.bytes
                        ));
                        // Stay in step with the kernel's counter after a mismatch.
                        *n = counted;
                    }
                    format!("drop {reason:?}")
                }
                Expect::Pass(rewrite) => {
                    *passes.entry(frame.dir).or_default() += 1;
                    let problem = if out.verdict != TC_ACT_OK {
                        Some(format!("verdict {}", out.verdict))
                    } else {
                        check_pass(&frame.bytes, &out.packet, rewrite, &mut report)
                    };
                    if let Some(problem) = problem {
                        report.failures.push(format!(
                            "{:?} frame {}: expected a pass ({rewrite:?}): {problem}: \
                             {:02x?} -> {:02x?}",
                            frame.dir, report.frames, frame.bytes, out.packet
                        ));
                    }
                    match rewrite {
                        Rewrite::None => "pass".to_owned(),
                        Rewrite::Nat { .. } => "pass translated".to_owned(),
                        Rewrite::IcmpQuote { .. } => "pass ICMP error translated".to_owned(),
                    }
                }
            };
            *report.outcomes.entry((dir_name, outcome)).or_default() += 1;
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.denied_tuples_passed_as_replies = model.denied_tuples_passed_as_replies;
    // Every pass is counted as forwarded, and no drop is counted that the model did not expect.
    for dir in [Dir::Egress, Dir::Ingress] {
        let forwarded = fx.counted(0, dir);
        let expected = passes.get(&dir).copied().unwrap_or(0);
        if forwarded != expected {
            report.failures.push(format!(
                "{dir:?}: {forwarded} frames counted as forwarded, the model passed {expected}"
            ));
        }
    }
    report
}

/// One's complement sum of `data` (big-endian words), reduced modulo 0xffff so that
/// both zeros of one's complement compare equal.
pub fn ones_sum(data: &[u8]) -> u32 {
    let sum: u64 = data
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    (sum % 0xffff) as u32
}

/// The sum a TCP/UDP checksum covers over the bytes present: addresses, protocol and the
/// L4 bytes of this frame (the length word is the same before and after, so left out).
fn l4_sum(ip: &[u8], ihl: usize, end: usize) -> u32 {
    let mut covered = ip[12..20].to_vec();
    covered.extend_from_slice(&[0, ip[9]]);
    covered.extend_from_slice(&ip[ihl..end]);
    ones_sum(&covered)
}

/// Checks a passed frame against the expected rewrite; a description of what is wrong.
fn check_pass(input: &[u8], out: &[u8], rewrite: Rewrite, report: &mut Report) -> Option<String> {
    match rewrite {
        Rewrite::None => (out != input).then(|| "changed although nothing is translated".into()),
        Rewrite::Nat { src, dst } => {
            report.checksums_checked += 1;
            check_nat(input, out, src, dst)
        }
        Rewrite::IcmpQuote { frontend } => {
            report.checksums_checked += 1;
            check_icmp_quote(input, out, frontend)
        }
    }
}

pub fn check_nat(input: &[u8], out: &[u8], src: SocketAddrV4, dst: SocketAddrV4) -> Option<String> {
    if out.len() != input.len() {
        return Some("length changed".into());
    }
    let (ip_in, ip_out) = (&input[ETH_HLEN..], &out[ETH_HLEN..]);
    let ihl = usize::from(ip_in[0] & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([ip_in[2], ip_in[3]]));
    let proto = ip_in[9];
    let later_fragment = u16::from_be_bytes([ip_in[6], ip_in[7]]) & 0x1fff != 0;
    let mut expected = input.to_vec();
    let ip = ETH_HLEN;
    expected[ip + 12..ip + 16].copy_from_slice(&src.ip().octets());
    expected[ip + 16..ip + 20].copy_from_slice(&dst.ip().octets());
    let check_at = match proto {
        IPPROTO_TCP => Some(16),
        IPPROTO_UDP => Some(6),
        _ => None,
    };
    let l4_present = !later_fragment && check_at.is_some();
    if l4_present {
        expected[ip + ihl..ip + ihl + 2].copy_from_slice(&src.port().to_be_bytes());
        expected[ip + ihl + 2..ip + ihl + 4].copy_from_slice(&dst.port().to_be_bytes());
    }
    // Everything but the checksum fields must be as expected.
    let mut masked_out = out.to_vec();
    for at in [
        Some(ip + 10),
        check_at.filter(|_| l4_present).map(|c| ip + ihl + c),
    ]
    .into_iter()
    .flatten()
    {
        expected[at..at + 2].fill(0);
        masked_out[at..at + 2].fill(0);
    }
    if masked_out != expected {
        return Some("translated fields differ from the expected ones".into());
    }
    if ones_sum(&ip_in[..ihl]) != ones_sum(&ip_out[..ihl]) {
        return Some("IP header checksum does not follow the change".into());
    }
    if l4_present {
        let c = ihl + check_at.unwrap_or(0);
        let zero_udp = proto == IPPROTO_UDP && ip_in[c..c + 2] == [0, 0];
        if zero_udp {
            if ip_out[c..c + 2] != [0, 0] {
                return Some("a UDP datagram without checksum got one".into());
            }
        } else if l4_sum(ip_in, ihl, tot_len) != l4_sum(ip_out, ihl, tot_len) {
            return Some("L4 checksum does not follow the change".into());
        }
    }
    None
}

fn check_icmp_quote(input: &[u8], out: &[u8], frontend: SocketAddrV4) -> Option<String> {
    if out.len() != input.len() {
        return Some("length changed".into());
    }
    let (ip_in, ip_out) = (&input[ETH_HLEN..], &out[ETH_HLEN..]);
    let tot_len = usize::from(u16::from_be_bytes([ip_in[2], ip_in[3]]));
    let quoted = &ip_out[28..];
    if quoted[16..20] != frontend.ip().octets() {
        return Some("quoted destination not translated back to the frontend".into());
    }
    if quoted[9] != IPPROTO_ICMP && quoted[22..24] != frontend.port().to_be_bytes() {
        return Some("quoted destination port not translated back".into());
    }
    if ones_sum(&ip_in[..20]) != ones_sum(&ip_out[..20]) {
        return Some("IP header checksum does not follow the change".into());
    }
    if ones_sum(&quoted[..20]) != 0 {
        return Some("quoted IP header checksum wrong".into());
    }
    if ones_sum(&ip_in[20..tot_len]) != ones_sum(&ip_out[20..tot_len]) {
        return Some("ICMP checksum does not follow the change".into());
    }
    None
}
