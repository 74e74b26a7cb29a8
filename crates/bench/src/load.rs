//! The load generator: a threaded TCP server (request/response and stream sink) and the
//! clients for transactions on one persistent connection (netperf's TCP_RR), new
//! connections (TCP_CRR: connect, one request, close) and stream throughput.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{BenchError, netns::NetNs};

pub const SERVER_PORT: u16 = 8080;
/// A stream client's first byte: the server then counts bytes instead of echoing them.
const STREAM_MARK: u8 = b'S';
const WORKERS: usize = 2;
const POLL_MS: i32 = 100;
const STREAM_CHUNK: usize = 128 * 1024;

fn io_err(
    call: &'static str,
    what: impl std::fmt::Display,
) -> impl FnOnce(io::Error) -> BenchError {
    let what = what.to_string();
    move |source| BenchError::Io { call, what, source }
}

/// The CPU every load thread (client and servers) runs on. One CPU for both ends, as in
/// the baseline measured with netperf on this machine kind: left to the scheduler, a
/// transaction's wake-up lands on the same or the other vCPU at random, and RR rates
/// jump between about 17k and 50k/s from one run to the next.
const LOAD_CPU: usize = 0;

fn pin_to_load_cpu() -> Result<(), BenchError> {
    let mut set = nix::sched::CpuSet::new();
    set.set(LOAD_CPU).map_err(|errno| BenchError::Io {
        call: "CpuSet::set",
        what: format!("cpu {LOAD_CPU}"),
        source: errno.into(),
    })?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(|errno| {
        BenchError::Io {
            call: "sched_setaffinity",
            what: format!("cpu {LOAD_CPU}"),
            source: errno.into(),
        }
    })
}

/// Waits up to [`POLL_MS`] for `fd` to become readable; false on timeout.
fn readable(fd: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
    n > 0
}

/// Server threads in a namespace, stopped and joined on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<Result<(), BenchError>>>,
}

impl Server {
    /// Listens on 0.0.0.0:[`SERVER_PORT`] in `ns`: one port, so a service's single port
    /// serves every test. A connection whose first byte is [`STREAM_MARK`] is counted
    /// until EOF and answered with the total; any other is echoed byte for byte.
    pub fn start(ns: &NetNs) -> Result<Self, BenchError> {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = ns.run(|| {
            let listener =
                TcpListener::bind(("0.0.0.0", SERVER_PORT)).map_err(io_err("bind", SERVER_PORT))?;
            // Every worker polls the listener; those that lose the race must not block.
            listener
                .set_nonblocking(true)
                .map_err(io_err("set_nonblocking", SERVER_PORT))?;
            Ok(Arc::new(listener))
        })?;
        let mut threads = Vec::new();
        for _ in 0..WORKERS {
            let (listener, stop) = (listener.clone(), stop.clone());
            threads.push(thread::spawn(move || serve(&listener, &stop)));
        }
        Ok(Self { stop, threads })
    }

    pub fn start_all(namespaces: &[NetNs]) -> Result<Vec<Self>, BenchError> {
        namespaces.iter().map(Self::start).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(err)) => eprintln!("server: {err}"),
                Err(_) => eprintln!("server: a thread panicked"),
            }
        }
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool) -> Result<(), BenchError> {
    pin_to_load_cpu()?;
    while !stop.load(Ordering::Relaxed) {
        if !readable(listener.as_raw_fd()) {
            continue;
        }
        match listener.accept() {
            // A client that vanished mid-run is not the server's failure.
            Ok((conn, _)) => drop(
                conn.set_nonblocking(false)
                    .and_then(|()| handle(conn, stop)),
            ),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(io_err("accept", "server")(err)),
        }
    }
    Ok(())
}

fn handle(mut conn: TcpStream, stop: &AtomicBool) -> io::Result<()> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_millis(POLL_MS as u64)))?;
    let mut first = [0u8; 1];
    match read_or_stop(&mut conn, &mut first, stop)? {
        None | Some(0) => return Ok(()),
        Some(_) => {}
    }
    if first[0] == STREAM_MARK {
        return sink(conn, stop);
    }
    conn.write_all(&first)?;
    let mut buf = [0u8; 256];
    loop {
        match read_or_stop(&mut conn, &mut buf, stop)? {
            None | Some(0) => return Ok(()),
            Some(n) => conn.write_all(&buf[..n])?,
        }
    }
}

/// Reads into `buf`, waiting out read timeouts until data comes or `stop` is set (None).
fn read_or_stop(
    conn: &mut TcpStream,
    buf: &mut [u8],
    stop: &AtomicBool,
) -> io::Result<Option<usize>> {
    loop {
        match conn.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

fn sink(mut conn: TcpStream, stop: &AtomicBool) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_millis(POLL_MS as u64)))?;
    let mut buf = vec![0u8; STREAM_CHUNK];
    let mut total = 0u64;
    loop {
        match read_or_stop(&mut conn, &mut buf, stop)? {
            None => return Ok(()),
            Some(0) => break,
            Some(n) => total += n as u64,
        }
    }
    // The mark byte was read by the caller.
    conn.write_all(&(total + 1).to_be_bytes())
}

/// An operation slower than this waited for a retransmission (TCP's first SYN
/// retransmission comes after a second, a data segment's after 200 ms at least): a
/// handful of them halve a rate whose operations take some 100 µs, without showing in
/// the percentiles.
pub const STALL: Duration = Duration::from_millis(200);

/// Operations per second with latency percentiles, in microseconds; the operations that
/// failed, and those that stalled (took longer than [`STALL`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Rate {
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
    pub stalled: u64,
}

fn rate(mut samples: Vec<u32>, elapsed: Duration, errors: u64) -> Rate {
    let stall = nanos(STALL);
    let stalled = samples.iter().filter(|&&ns| ns > stall).count() as u64;
    samples.sort_unstable();
    let pct = |p: f64| {
        if samples.is_empty() {
            0.0
        } else {
            let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
            f64::from(samples[i]) / 1000.0
        }
    };
    Rate {
        per_sec: samples.len() as f64 / elapsed.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        errors,
        stalled,
    }
}

/// A namespace's TCP retransmission counters (its own /proc/net, which shows the
/// namespace of the thread reading it).
#[derive(Clone, Copy, Debug, Default)]
pub struct Retransmissions {
    /// TcpExt TCPSynRetrans: SYNs sent again for want of an answer.
    pub syn: u64,
    /// Tcp RetransSegs: every segment sent again.
    pub segments: u64,
}

impl Retransmissions {
    pub fn read(ns: &NetNs) -> Result<Self, BenchError> {
        ns.run(|| {
            Ok(Self {
                syn: proc_net_counter("netstat", "TcpExt", "TCPSynRetrans")?,
                segments: proc_net_counter("snmp", "Tcp", "RetransSegs")?,
            })
        })
    }

    /// What was counted between `before` and `self`.
    pub fn since(self, before: Self) -> Self {
        Self {
            syn: self.syn.saturating_sub(before.syn),
            segments: self.segments.saturating_sub(before.segments),
        }
    }
}

/// The counter `name` of `table` in /proc/net/`file`: a line of names, then one of values.
fn proc_net_counter(file: &str, table: &str, name: &str) -> Result<u64, BenchError> {
    let path = format!("/proc/thread-self/net/{file}");
    let text = std::fs::read_to_string(&path).map_err(io_err("read", &path))?;
    let prefix = format!("{table}:");
    let mut lines = text.lines().filter(|line| line.starts_with(&prefix));
    let missing = || BenchError::Failed(format!("{table} {name} not in {path}"));
    let (names, values) = (
        lines.next().ok_or_else(missing)?,
        lines.next().ok_or_else(missing)?,
    );
    let at = names
        .split_whitespace()
        .position(|n| n == name)
        .ok_or_else(missing)?;
    values
        .split_whitespace()
        .nth(at)
        .and_then(|v| v.parse().ok())
        .ok_or_else(missing)
}

fn nanos(d: Duration) -> u32 {
    u32::try_from(d.as_nanos()).unwrap_or(u32::MAX)
}

/// One-byte transactions on one persistent connection for `duration` (TCP_RR).
pub fn request_response(
    client: &NetNs,
    to: SocketAddrV4,
    duration: Duration,
) -> Result<Rate, BenchError> {
    client.run(move || request_response_here(to, duration))
}

/// [`request_response`] from the calling thread's namespace.
pub fn request_response_here(to: SocketAddrV4, duration: Duration) -> Result<Rate, BenchError> {
    pin_to_load_cpu()?;
    let mut conn = TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(2))
        .map_err(io_err("connect", to))?;
    conn.set_nodelay(true).map_err(io_err("setsockopt", to))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(io_err("setsockopt", to))?;
    let mut samples = Vec::with_capacity(1 << 20);
    let mut byte = [0u8; 1];
    let start = Instant::now();
    while start.elapsed() < duration {
        let t = Instant::now();
        conn.write_all(&[1]).map_err(io_err("write", to))?;
        conn.read_exact(&mut byte).map_err(io_err("read", to))?;
        samples.push(nanos(t.elapsed()));
    }
    Ok(rate(samples, start.elapsed(), 0))
}

/// Connect, one transaction, close, repeated for `duration` (TCP_CRR). With `target_rate`,
/// paced to about that many connections per second.
pub fn connect_request_close(
    client: &NetNs,
    to: SocketAddrV4,
    duration: Duration,
    target_rate: Option<f64>,
) -> Result<Rate, BenchError> {
    client.run(move || connect_request_close_here(to, duration, target_rate))
}

/// [`connect_request_close`] from the calling thread's namespace.
pub fn connect_request_close_here(
    to: SocketAddrV4,
    duration: Duration,
    target_rate: Option<f64>,
) -> Result<Rate, BenchError> {
    pin_to_load_cpu()?;
    let mut samples = Vec::with_capacity(1 << 20);
    let mut errors = 0u64;
    let mut byte = [0u8; 1];
    let start = Instant::now();
    let interval = target_rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut next = start;
    while start.elapsed() < duration {
        if let Some(interval) = interval {
            next += interval;
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            }
        }
        let t = Instant::now();
        let result = (|| -> io::Result<()> {
            let mut conn = TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(1))?;
            conn.set_nodelay(true)?;
            conn.set_read_timeout(Some(Duration::from_secs(1)))?;
            conn.write_all(&[1])?;
            conn.read_exact(&mut byte)?;
            Ok(())
        })();
        match result {
            Ok(()) => samples.push(nanos(t.elapsed())),
            Err(_) => errors += 1,
        }
    }
    if samples.is_empty() {
        return Err(BenchError::Failed(format!(
            "no connection to {to} succeeded ({errors} failed)"
        )));
    }
    Ok(rate(samples, start.elapsed(), errors))
}

/// Bulk transfer on one connection for `duration`; Gbit/s as counted by the receiver.
pub fn stream(client: &NetNs, to: SocketAddrV4, duration: Duration) -> Result<f64, BenchError> {
    client.run(move || stream_here(to, duration))
}

/// [`stream`] from the calling thread's namespace.
pub fn stream_here(to: SocketAddrV4, duration: Duration) -> Result<f64, BenchError> {
    pin_to_load_cpu()?;
    let mut conn = TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_secs(2))
        .map_err(io_err("connect", to))?;
    let buf = vec![STREAM_MARK; STREAM_CHUNK];
    let start = Instant::now();
    while start.elapsed() < duration {
        conn.write_all(&buf).map_err(io_err("write", to))?;
    }
    conn.shutdown(Shutdown::Write)
        .map_err(io_err("shutdown", to))?;
    let mut total = [0u8; 8];
    conn.read_exact(&mut total).map_err(io_err("read", to))?;
    let elapsed = start.elapsed().as_secs_f64();
    Ok(u64::from_be_bytes(total) as f64 * 8.0 / elapsed / 1e9)
}
