//! Shared by the datapath tests: pin directory guards, packet crafting, checksums and
//! BPF_PROG_TEST_RUN.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use aya::{
    maps::lpm_trie::Key,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use sluice_common::{
    BACKEND_STATE_ACTIVE, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Lb4Backend, Lb4BackendKey,
    Lb4Key, Lb4Service, PolicyEntry, PolicyKey, PolicyMatch, SVC_FLAG_CLUSTER_IP,
    SVC_FLAG_WILDCARD,
};
use sluice_datapath::{Datapath, DatapathConfig, PinnedMaps, PolicyMap, create_policy_map};
use sluice_netns::NsThread;

/// A name unique to this process and call, for pin dirs, namespaces and interfaces.
pub fn unique_name(prefix: &str) -> String {
    sluice_netns::unique_name(prefix)
}

pub use sluice_datapath::PinDir;

/// A server thread in a namespace, stopped and joined on drop.
pub struct Server {
    pub stop: Arc<AtomicBool>,
    pub thread: Option<NsThread<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("a server thread panicked");
        }
    }
}

impl Server {
    /// Listens on TCP `bind` in `netns` and hands every accepted connection (blocking) with
    /// its peer to `serve`, on the server's thread, until dropped. Returns once listening.
    pub fn tcp(
        netns: &NetNs,
        bind: SocketAddrV4,
        mut serve: impl FnMut(TcpStream, SocketAddr) + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, is_ready) = std::sync::mpsc::channel();
        let thread = netns.spawn({
            let stop = stop.clone();
            move || {
                let listener =
                    TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
                listener
                    .set_nonblocking(true)
                    .unwrap_or_else(|e| panic!("nonblocking listener: {e}"));
                // The test waits for this unless it already failed.
                let _ = ready.send(());
                while !stop.load(Ordering::Relaxed) {
                    let mut poll = libc::pollfd {
                        fd: listener.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the duration of the call.
                    if unsafe { libc::poll(&mut poll, 1, 50) } <= 0 {
                        continue;
                    }
                    match listener.accept() {
                        Ok((conn, peer)) => {
                            conn.set_nonblocking(false)
                                .unwrap_or_else(|e| panic!("blocking connection: {e}"));
                            serve(conn, peer);
                        }
                        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(err) => panic!("accept: {err}"),
                    }
                }
            }
        });
        if is_ready
            .recv_timeout(std::time::Duration::from_secs(3))
            .is_err()
        {
            panic!("server on {bind} not ready");
        }
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

/// Loads the datapath into a fresh pin dir. Panics (fails the test) if BPF can't load.
pub fn load() -> (PinDir, Datapath) {
    let pins = PinDir::unique("sluice-test-");
    let datapath = Datapath::load(pins.path(), &DatapathConfig::default())
        .unwrap_or_else(|err| panic!("loading the datapath into {}: {err}", pins.path().display()));
    (pins, datapath)
}

// ---- services ----

/// Installs frontend `vip:port` with `backends` in slots 1..=n, plus the VIP's wildcard
/// key and the backends, as the realizer does.
pub fn add_service(
    maps: &mut PinnedMaps,
    frontend: SocketAddrV4,
    proto: u8,
    backends: &[SocketAddrV4],
) {
    let insert = |maps: &mut PinnedMaps, key: Lb4Key, value: Lb4Service| {
        maps.services
            .insert(key, value, 0)
            .unwrap_or_else(|err| panic!("insert {key:?}: {err}"));
    };
    let count = u16::try_from(backends.len()).unwrap_or(u16::MAX);
    insert(
        maps,
        Lb4Key::new(*frontend.ip(), frontend.port(), proto, 0),
        Lb4Service::frontend(count, SVC_FLAG_CLUSTER_IP),
    );
    insert(
        maps,
        Lb4Key::wildcard(*frontend.ip()),
        Lb4Service::frontend(0, SVC_FLAG_WILDCARD),
    );
    for (slot, backend) in (1..).zip(backends) {
        insert(
            maps,
            Lb4Key::new(*frontend.ip(), frontend.port(), proto, slot),
            Lb4Service::slot(*backend.ip(), backend.port()),
        );
        add_backend(maps, *backend, proto);
    }
}

pub fn add_backend(maps: &mut PinnedMaps, backend: SocketAddrV4, proto: u8) {
    let key = Lb4BackendKey::new(*backend.ip(), backend.port(), proto);
    let value = Lb4Backend {
        state: BACKEND_STATE_ACTIVE,
        pad: [0; 3],
    };
    maps.backends
        .insert(key, value, 0)
        .unwrap_or_else(|err| panic!("insert {key:?}: {err}"));
}

// ---- packet crafting ----

pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_ICMP: u8 = 1;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// One's complement sum of `data` as big-endian 16-bit words, added to `sum`.
fn sum16(data: &[u8], mut sum: u32) -> u32 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum16(data, 0))
}

/// The TCP/UDP checksum of `l4` (checksum field zeroed by the caller) for the addresses.
fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    fold(sum16(l4, sum16(&pseudo, 0)))
}

/// An IPv4 header (no options) with a valid checksum.
pub fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: usize) -> Vec<u8> {
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip
}

pub fn ethernet(src: [u8; 6], dst: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_HLEN + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An Ethernet frame from the pod to the node with a TCP segment and valid checksums.
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![0u8; 20];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[4..8].copy_from_slice(&1000u32.to_be_bytes());
    if flags & TCP_ACK != 0 {
        l4[8..12].copy_from_slice(&2000u32.to_be_bytes());
    }
    l4[12] = 5 << 4;
    l4[13] = flags;
    l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
    l4.extend_from_slice(payload);
    let sum = l4_checksum(*src.ip(), *dst.ip(), IPPROTO_TCP, &l4);
    l4[16..18].copy_from_slice(&sum.to_be_bytes());
    frame(src, dst, IPPROTO_TCP, &l4)
}

/// An Ethernet frame from the pod to the node with a UDP datagram and a valid checksum.
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![0u8; 8];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(payload);
    let sum = match l4_checksum(*src.ip(), *dst.ip(), IPPROTO_UDP, &l4) {
        0 => 0xffff,
        sum => sum,
    };
    l4[6..8].copy_from_slice(&sum.to_be_bytes());
    frame(src, dst, IPPROTO_UDP, &l4)
}

/// An Ethernet frame from the pod to the node with an SCTP common header (verification
/// tag 1, a fixed CRC32c field the datapath must leave alone) and `chunks`.
pub fn sctp(src: SocketAddrV4, dst: SocketAddrV4, chunks: &[u8]) -> Vec<u8> {
    let mut l4 = vec![0u8; 12];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[4..8].copy_from_slice(&1u32.to_be_bytes());
    l4[8..12].copy_from_slice(&0x5c7f_0a11u32.to_be_bytes());
    l4.extend_from_slice(chunks);
    frame(src, dst, IPPROTO_SCTP, &l4)
}

pub const ICMP_ECHO: u8 = 8;
pub const ICMP_ECHOREPLY: u8 = 0;

/// An Ethernet frame with an ICMP echo request or reply (`kind`) and a valid checksum.
pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, id: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![kind, 0, 0, 0];
    l4.extend_from_slice(&id.to_be_bytes());
    l4.extend_from_slice(&1u16.to_be_bytes());
    l4.extend_from_slice(payload);
    let sum = checksum(&l4);
    l4[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut ip = ipv4_header(src, dst, IPPROTO_ICMP, l4.len());
    ip.extend_from_slice(&l4);
    ethernet(POD_MAC, NODE_MAC, &ip)
}

/// Splits the IPv4 datagram in `frame` (no IP options) into a first fragment carrying
/// `first` bytes of it (a multiple of 8) and a later fragment with the rest, both with
/// valid IP header checksums.
pub fn fragment(frame: &[u8], first: usize) -> [Vec<u8>; 2] {
    assert_eq!(first % 8, 0, "fragment offsets count 8-byte units");
    let ip = &frame[ETH_HLEN..];
    let (head, l4) = ip.split_at(20);
    let piece = |flags_offset: u16, data: &[u8]| {
        let mut header = head.to_vec();
        header[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        header[6..8].copy_from_slice(&flags_offset.to_be_bytes());
        header[10..12].fill(0);
        let sum = checksum(&header);
        header[10..12].copy_from_slice(&sum.to_be_bytes());
        header.extend_from_slice(data);
        let mut out = frame[..ETH_HLEN].to_vec();
        out.extend_from_slice(&header);
        out
    };
    let more_fragments = 0x2000;
    [
        piece(more_fragments, &l4[..first]),
        piece((first / 8) as u16, &l4[first..]),
    ]
}

/// Whether the IP header checksum of `frame` is right.
pub fn ip_checksum_ok(frame: &[u8]) -> bool {
    checksum(&frame[ETH_HLEN..ETH_HLEN + 20]) == 0
}

/// Whether `l4` (a whole TCP/UDP segment, e.g. reassembled from fragments) carries the
/// right checksum for the addresses.
pub fn l4_checksum_ok(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> bool {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    fold(sum16(l4, sum16(&pseudo, 0))) == 0
}

fn frame(src: SocketAddrV4, dst: SocketAddrV4, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut ip = ipv4_header(*src.ip(), *dst.ip(), proto, l4.len());
    ip.extend_from_slice(l4);
    ethernet(POD_MAC, NODE_MAC, &ip)
}

// ---- reading packets back ----

/// Read access to a frame produced by the datapath (Ethernet + IPv4).
pub struct Frame<'a>(pub &'a [u8]);

impl Frame<'_> {
    pub fn eth_dst(&self) -> [u8; 6] {
        let mut mac = [0; 6];
        mac.copy_from_slice(&self.0[0..6]);
        mac
    }
    pub fn eth_src(&self) -> [u8; 6] {
        let mut mac = [0; 6];
        mac.copy_from_slice(&self.0[6..12]);
        mac
    }
    pub fn ip(&self) -> &[u8] {
        &self.0[ETH_HLEN..]
    }
    pub fn ihl(&self) -> usize {
        usize::from(self.ip()[0] & 0x0f) * 4
    }
    pub fn proto(&self) -> u8 {
        self.ip()[9]
    }
    pub fn tot_len(&self) -> usize {
        usize::from(u16::from_be_bytes([self.ip()[2], self.ip()[3]]))
    }
    pub fn src_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.ip()[12], self.ip()[13], self.ip()[14], self.ip()[15])
    }
    pub fn dst_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.ip()[16], self.ip()[17], self.ip()[18], self.ip()[19])
    }
    /// The L4 header and payload, up to the IP total length.
    pub fn l4(&self) -> &[u8] {
        &self.ip()[self.ihl()..self.tot_len()]
    }
    pub fn src(&self) -> SocketAddrV4 {
        SocketAddrV4::new(
            self.src_ip(),
            u16::from_be_bytes([self.l4()[0], self.l4()[1]]),
        )
    }
    pub fn dst(&self) -> SocketAddrV4 {
        SocketAddrV4::new(
            self.dst_ip(),
            u16::from_be_bytes([self.l4()[2], self.l4()[3]]),
        )
    }

    /// Asserts that the IP header checksum and the TCP/UDP/ICMP checksum are what a
    /// computation from scratch gives.
    pub fn assert_checksums(&self) {
        let header = &self.ip()[..self.ihl()];
        let mut zeroed = header.to_vec();
        zeroed[10..12].fill(0);
        assert_eq!(
            u16::from_be_bytes([header[10], header[11]]),
            checksum(&zeroed),
            "IP header checksum"
        );

        let l4 = self.l4();
        let (field, expected) = match self.proto() {
            IPPROTO_TCP => {
                let mut zeroed = l4.to_vec();
                zeroed[16..18].fill(0);
                (
                    16,
                    l4_checksum(self.src_ip(), self.dst_ip(), IPPROTO_TCP, &zeroed),
                )
            }
            IPPROTO_UDP => {
                let mut zeroed = l4.to_vec();
                zeroed[6..8].fill(0);
                let sum = l4_checksum(self.src_ip(), self.dst_ip(), IPPROTO_UDP, &zeroed);
                (6, if sum == 0 { 0xffff } else { sum })
            }
            IPPROTO_ICMP => {
                let mut zeroed = l4.to_vec();
                zeroed[2..4].fill(0);
                (2, checksum(&zeroed))
            }
            other => panic!("no L4 checksum for protocol {other}"),
        };
        assert_eq!(
            u16::from_be_bytes([l4[field], l4[field + 1]]),
            expected,
            "L4 checksum (protocol {})",
            self.proto()
        );
    }
}

// ---- BPF_PROG_TEST_RUN ----

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// The program's return value and the packet it leaves behind.
pub struct RunResult {
    pub verdict: u32,
    pub packet: Vec<u8>,
}

/// Runs `program` once on `packet`. The skb's device is the loopback device of the
/// current network namespace, so bpf_redirect has a device to name (nothing is sent).
pub fn run(program: &SchedClassifier, packet: &[u8]) -> RunResult {
    let mut out = vec![0u8; packet.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|err| panic!("BPF_PROG_TEST_RUN on {packet:02x?}: {err:?}"));
    out.truncate(result.data_size_out as usize);
    RunResult {
        verdict: result.return_value,
        packet: out,
    }
}

// ---- network namespaces ----

/// A network namespace created for one test (through sluice-netns) and deleted, with its
/// interfaces, on drop. Nothing is ever created in the root namespace. Its helpers panic
/// (fail the test) where sluice-netns returns an error.
pub struct NetNs(sluice_netns::OwnedNetNs);

impl NetNs {
    pub fn new() -> Self {
        Self(
            sluice_netns::OwnedNetNs::unique("sluice-dp-")
                .unwrap_or_else(|err| panic!("creating a namespace: {err}")),
        )
    }

    pub fn name(&self) -> &str {
        self.0.name()
    }

    /// The namespace itself, for sysctls and offloads.
    pub fn ns(&self) -> &sluice_netns::NetNs {
        &self.0
    }

    /// A netlink connection acting in this namespace: links, addresses, routes.
    pub fn netlink(&self) -> sluice_netns::Netlink {
        self.0
            .netlink()
            .unwrap_or_else(|err| panic!("netlink in {}: {err}", self.name()))
    }

    /// Starts `f` on a new thread that has entered this namespace (the network namespace
    /// is per thread; the mount namespace, and so the host bpffs, stay as they are).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> sluice_netns::NsThread<T> {
        self.0
            .spawn(f)
            .unwrap_or_else(|err| panic!("a thread in {}: {err}", self.name()))
    }

    /// Runs `f` in this namespace on a thread of its own and waits for it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.0
            .run(f)
            .unwrap_or_else(|err| panic!("a thread in {}: {err}", self.name()))
    }

    /// (received, sent) packets of `device`, from this namespace's own `/proc/net/dev`
    /// (it shows the namespace of the thread that reads it).
    pub fn link_packets(&self, device: &'static str) -> (u64, u64) {
        self.run(move || {
            let table = std::fs::read_to_string("/proc/thread-self/net/dev")
                .unwrap_or_else(|err| panic!("reading /proc/net/dev: {err}"));
            let line = table
                .lines()
                .find_map(|line| line.trim_start().strip_prefix(&format!("{device}:")))
                .unwrap_or_else(|| panic!("{device} in /proc/net/dev"))
                .to_owned();
            let fields: Vec<u64> = line
                .split_whitespace()
                .map(|field| {
                    field
                        .parse()
                        .unwrap_or_else(|err| panic!("{device}: counter {field:?}: {err}"))
                })
                .collect();
            // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets
            (fields[1], fields[9])
        })
    }
}

/// Packets between two addresses that the node's netfilter saw: an nftables table in one
/// of the test's namespaces counting them on the prerouting, forward and postrouting hooks
/// (removed with the namespace).
pub struct NetfilterCounter {
    netns: String,
}

impl NetfilterCounter {
    pub const TABLE: &'static str = "sluice_probe";

    pub fn new(netns: &NetNs, a: Ipv4Addr, b: Ipv4Addr) -> Self {
        let mut script = format!("table ip {} {{\n", Self::TABLE);
        for hook in ["prerouting", "forward", "postrouting"] {
            script += &format!(
                "  chain {hook} {{ type filter hook {hook} priority 0; \
                 ip saddr {{ {a}, {b} }} ip daddr {{ {a}, {b} }} counter; }}\n"
            );
        }
        script += "}\n";
        let netns = netns.name().to_owned();
        nft(&netns, &["-f", "-"], Some(&script));
        Self { netns }
    }

    /// Packets counted on every hook, summed.
    pub fn packets(&self) -> u64 {
        let listing = nft(&self.netns, &["list", "table", "ip", Self::TABLE], None);
        listing
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "packets")
            .map(|w| w[1].parse::<u64>().unwrap_or_else(|e| panic!("{w:?}: {e}")))
            .sum()
    }
}

/// Runs nft in `netns` (with `stdin` as its script), panicking on failure; its stdout.
fn nft(netns: &str, args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "nft"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("nft in {netns}: {e}"));
    let mut input = child
        .stdin
        .take()
        .unwrap_or_else(|| panic!("nft's stdin in {netns}"));
    if let Some(script) = stdin {
        input
            .write_all(script.as_bytes())
            .unwrap_or_else(|e| panic!("writing nft's script in {netns}: {e}"));
    }
    drop(input);
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("nft in {netns}: {e}"));
    assert!(
        out.status.success(),
        "nft {args:?} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Joins `thread`, passing its panic on.
pub fn join<T>(thread: std::thread::JoinHandle<T>) -> T {
    match thread.join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

// ---- policy ----

/// The LPM key aya's trie takes for a policy row.
pub fn policy_row(key: PolicyKey) -> Key<PolicyMatch> {
    Key::new(key.prefixlen, key.rule)
}

/// Creates the policy map of endpoint `ifindex` holding `rows` (zeroed counters) and
/// installs it in the outer map, as the realizer does. The returned handle writes to
/// the installed map, which has room for at least 8 rows.
pub fn install_policy(maps: &mut PinnedMaps, ifindex: u32, rows: &[PolicyKey]) -> PolicyMap {
    let mut map = create_policy_map(rows.len().max(8) as u32)
        .unwrap_or_else(|err| panic!("create policy map: {err}"));
    for &row in rows {
        map.insert(&policy_row(row), PolicyEntry::default(), 0)
            .unwrap_or_else(|err| panic!("insert {row:?}: {err}"));
    }
    maps.policy
        .insert(ifindex, &map, 0)
        .unwrap_or_else(|err| panic!("install the policy of {ifindex}: {err}"));
    map
}

/// The endpoint and peers of the policy and event tests: POD is the endpoint on IFINDEX,
/// PEER and STRANGER are pods with identities of their own, and the rest is world.
pub mod two_pods;

pub mod world {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use aya::maps::lpm_trie::Key;
    use sluice_common::{EndpointInfo, IDENTITY_WORLD, IpcacheEntry, addr_be};
    use sluice_datapath::PinnedMaps;

    /// The test run's device: the loopback device, ifindex 1.
    pub const IFINDEX: u32 = 1;
    pub const POD: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
    pub const POD_IDENTITY: u32 = 300;
    pub const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    pub const PEER_IDENTITY: u32 = 301;
    /// A pod no row names.
    pub const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 3);
    pub const STRANGER_IDENTITY: u32 = 302;
    pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

    pub fn pod(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(POD, port)
    }

    pub fn peer(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(PEER, port)
    }

    /// POD as the endpoint on IFINDEX with `flags`.
    pub fn set_endpoint(maps: &mut PinnedMaps, flags: u32) {
        let mut endpoint = EndpointInfo::new(POD, POD_IDENTITY);
        endpoint.flags = flags;
        maps.endpoints
            .insert(IFINDEX, endpoint, 0)
            .unwrap_or_else(|e| panic!("writing the endpoint: {e}"));
    }

    pub fn ipcache(maps: &mut PinnedMaps, address: Ipv4Addr, prefixlen: u32, identity: u32) {
        maps.ipcache
            .insert(
                &Key::new(prefixlen, addr_be(address)),
                IpcacheEntry::local(identity),
                0,
            )
            .unwrap_or_else(|e| panic!("writing the ipcache: {e}"));
    }

    /// The endpoint with `flags`, the pods' identities and the world in the ipcache.
    pub fn install(maps: &mut PinnedMaps, flags: u32) {
        set_endpoint(maps, flags);
        for (address, identity) in [
            (POD, POD_IDENTITY),
            (PEER, PEER_IDENTITY),
            (STRANGER, STRANGER_IDENTITY),
        ] {
            ipcache(maps, address, 32, identity);
        }
        ipcache(maps, Ipv4Addr::UNSPECIFIED, 0, IDENTITY_WORLD);
    }
}
