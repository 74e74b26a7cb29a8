//! The benchmark's client as a deployed pod's process: `sluice-bench-client`, a process of
//! its own in the client's namespace and in a cgroup the benchmark makes for it, where the
//! sluice variant attaches the pods' socket programs as the agent does on `--pod-cgroup`
//! (so a connect() to the ClusterIP is translated once, at the socket). cgroup v2 places
//! whole processes: a thread of the benchmark could not be in the cgroup without the
//! benchmark itself. The cgroup holds only the client's processes and goes on drop.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::Duration,
};

use sluice_netns::OwnedCgroup;

use crate::{BenchError, load, load::Rate, netns::NetNs};

pub const BINARY: &str = "sluice-bench-client";

/// What the client process measures: the operations of [`load`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    RequestResponse,
    ConnectRequestClose,
    Stream,
}

impl Operation {
    const ALL: [Self; 3] = [
        Self::RequestResponse,
        Self::ConnectRequestClose,
        Self::Stream,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::RequestResponse => "rr",
            Self::ConnectRequestClose => "crr",
            Self::Stream => "stream",
        }
    }
}

/// A client process's result, one line on its stdout.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    Rate(Rate),
    Gbps(f64),
}

impl Outcome {
    fn line(self) -> String {
        match self {
            Self::Rate(r) => format!(
                "rate {} {} {} {} {}",
                r.per_sec, r.p50_us, r.p99_us, r.errors, r.stalled
            ),
            Self::Gbps(g) => format!("gbps {g}"),
        }
    }

    fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        let outcome = match words.next()? {
            "rate" => {
                let mut float = || words.next()?.parse::<f64>().ok();
                let (per_sec, p50_us, p99_us) = (float()?, float()?, float()?);
                let mut int = || words.next()?.parse::<u64>().ok();
                Self::Rate(Rate {
                    per_sec,
                    p50_us,
                    p99_us,
                    errors: int()?,
                    stalled: int()?,
                })
            }
            "gbps" => Self::Gbps(words.next()?.parse().ok()?),
            _ => return None,
        };
        words.next().is_none().then_some(outcome)
    }
}

/// The client process's side: `<rr|crr|stream> <address:port> <milliseconds>` measured
/// from this process's namespace; the line to print.
pub fn client_main(args: &[String]) -> Result<String, BenchError> {
    let usage = || {
        BenchError::Failed(format!(
            "usage: {BINARY} <rr|crr|stream> <address:port> <milliseconds>, not {args:?}"
        ))
    };
    let [operation, to, millis] = args else {
        return Err(usage());
    };
    let operation = Operation::ALL
        .into_iter()
        .find(|o| o.name() == operation)
        .ok_or_else(usage)?;
    let to: SocketAddrV4 = to.parse().map_err(|_| usage())?;
    let duration = Duration::from_millis(millis.parse().map_err(|_| usage())?);
    let outcome = match operation {
        Operation::RequestResponse => Outcome::Rate(load::request_response_here(to, duration)?),
        Operation::ConnectRequestClose => {
            Outcome::Rate(load::connect_request_close_here(to, duration, None)?)
        }
        Operation::Stream => Outcome::Gbps(load::stream_here(to, duration)?),
    };
    Ok(outcome.line())
}

/// The client as a pod: its cgroup (removed, with any process left in it, on drop) and
/// the binary it runs.
pub struct PodClient {
    cgroup: OwnedCgroup,
    binary: PathBuf,
}

impl PodClient {
    pub fn new() -> Result<Self, BenchError> {
        Ok(Self {
            binary: crate::sibling_binary("SLUICE_BENCH_CLIENT_BIN", BINARY, "sluice-bench")?,
            cgroup: OwnedCgroup::unique("sluice-bench-pod-")?,
        })
    }

    /// The cgroup the client's processes run in, for the pods' socket programs.
    pub fn cgroup(&self) -> &Path {
        self.cgroup.path()
    }

    fn run(
        &self,
        ns: &NetNs,
        operation: Operation,
        to: SocketAddrV4,
        duration: Duration,
    ) -> Result<Outcome, BenchError> {
        let (to, millis) = (to.to_string(), duration.as_millis().to_string());
        let out = ns.exec_in_cgroup(
            &self.binary,
            &[operation.name(), &to, &millis],
            &self.cgroup,
        )?;
        Outcome::parse(out.trim()).ok_or_else(|| {
            BenchError::Failed(format!(
                "{BINARY} {}: unexpected output {out:?}",
                operation.name()
            ))
        })
    }

    fn rate(
        &self,
        ns: &NetNs,
        operation: Operation,
        to: SocketAddrV4,
        duration: Duration,
    ) -> Result<Rate, BenchError> {
        match self.run(ns, operation, to, duration)? {
            Outcome::Rate(rate) => Ok(rate),
            Outcome::Gbps(_) => Err(BenchError::Failed(format!(
                "{BINARY} {}: a throughput, not a rate",
                operation.name()
            ))),
        }
    }

    /// [`load::request_response`] from the pod's process.
    pub fn request_response(
        &self,
        ns: &NetNs,
        to: SocketAddrV4,
        duration: Duration,
    ) -> Result<Rate, BenchError> {
        self.rate(ns, Operation::RequestResponse, to, duration)
    }

    /// [`load::connect_request_close`] (unpaced) from the pod's process.
    pub fn connect_request_close(
        &self,
        ns: &NetNs,
        to: SocketAddrV4,
        duration: Duration,
    ) -> Result<Rate, BenchError> {
        self.rate(ns, Operation::ConnectRequestClose, to, duration)
    }

    /// [`load::stream`] from the pod's process.
    pub fn stream(
        &self,
        ns: &NetNs,
        to: SocketAddrV4,
        duration: Duration,
    ) -> Result<f64, BenchError> {
        match self.run(ns, Operation::Stream, to, duration)? {
            Outcome::Gbps(gbps) => Ok(gbps),
            Outcome::Rate(_) => Err(BenchError::Failed(format!(
                "{BINARY} stream: a rate, not a throughput"
            ))),
        }
    }
}

/// Where a measurement's client runs: the benchmark's threads entered into the client's
/// namespace, or a pod's process there.
#[derive(Clone, Copy)]
pub enum Client<'a> {
    Threads(&'a NetNs),
    Pod(&'a PodClient, &'a NetNs),
}

impl Client<'_> {
    pub fn request_response(
        self,
        to: SocketAddrV4,
        duration: Duration,
    ) -> Result<Rate, BenchError> {
        match self {
            Self::Threads(ns) => load::request_response(ns, to, duration),
            Self::Pod(pod, ns) => pod.request_response(ns, to, duration),
        }
    }

    pub fn connect_request_close(
        self,
        to: SocketAddrV4,
        duration: Duration,
    ) -> Result<Rate, BenchError> {
        match self {
            Self::Threads(ns) => load::connect_request_close(ns, to, duration, None),
            Self::Pod(pod, ns) => pod.connect_request_close(ns, to, duration),
        }
    }

    pub fn stream(self, to: SocketAddrV4, duration: Duration) -> Result<f64, BenchError> {
        match self {
            Self::Threads(ns) => load::stream(ns, to, duration),
            Self::Pod(pod, ns) => pod.stream(ns, to, duration),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_survive_their_line() {
        let rate = Rate {
            per_sec: 12_345.5,
            p50_us: 61.25,
            p99_us: 140.0,
            errors: 2,
            stalled: 1,
        };
        let Some(Outcome::Rate(back)) = Outcome::parse(&Outcome::Rate(rate).line()) else {
            panic!("rate line not parsed");
        };
        assert_eq!(
            (
                back.per_sec,
                back.p50_us,
                back.p99_us,
                back.errors,
                back.stalled
            ),
            (12_345.5, 61.25, 140.0, 2, 1)
        );
        assert!(matches!(
            Outcome::parse(&Outcome::Gbps(9.5).line()),
            Some(Outcome::Gbps(g)) if g == 9.5
        ));
        assert!(Outcome::parse("rate 1 2").is_none());
        assert!(Outcome::parse("gbps 1 2").is_none());
    }
}
