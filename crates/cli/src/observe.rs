//! `sluice observe`: the agent's flows, as `hubble observe` prints them.

use std::{
    io::Write,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use sluice_api::{
    ApiError,
    flow::{Flow, FlowEventType, FlowFilter, FlowProtocol, ObserveRequest, Timestamp, Verdict},
};
use sluice_observer::{Arrival, FollowSource, SourceFlows};

use crate::{
    EXIT_ERROR, Output,
    agents::Agent,
    output::{Tone, paint, yaml},
};

/// Flows printed without --last, --follow or --since (as `hubble observe`).
const DEFAULT_LAST: usize = 20;

#[derive(Args)]
pub struct ObserveArgs {
    /// Agent sockets whose flows to merge (outside a lab; in a lab every node's agent is
    /// used, or --node's).
    #[arg(long, value_delimiter = ',')]
    pub agents: Vec<PathBuf>,
    /// Keep printing new flows until interrupted.
    #[arg(short = 'f', long)]
    follow: bool,
    /// The last N buffered flows across all agents (default 20; with --follow or --since:
    /// none or all).
    #[arg(long)]
    last: Option<usize>,
    /// Flows from this pod (`namespace/name`; a name alone is in `default`; prefixes match).
    #[arg(long)]
    from_pod: Vec<String>,
    /// Flows to this pod.
    #[arg(long)]
    to_pod: Vec<String>,
    /// Flows from or to this pod.
    #[arg(long)]
    pod: Vec<String>,
    /// Flows from or to pods of this namespace.
    #[arg(long)]
    namespace: Vec<String>,
    /// Flows from or to an identity with this label (`key=value` or `key`).
    #[arg(long)]
    label: Vec<String>,
    #[arg(long, value_enum, ignore_case = true)]
    verdict: Vec<VerdictArg>,
    /// Event type.
    #[arg(short = 't', long = "type", value_enum)]
    event_type: Vec<EventTypeArg>,
    #[arg(long, value_enum, ignore_case = true)]
    protocol: Vec<ProtocolArg>,
    /// Source or destination port.
    #[arg(long)]
    port: Vec<u16>,
    /// Flows since a time: a duration ago (`30s`, `5m`, `2h`, `1d`) or RFC 3339.
    #[arg(long, value_parser = parse_time)]
    since: Option<Timestamp>,
    /// Flows until a time, written as for --since (a past time: not with --follow).
    #[arg(long, value_parser = parse_time, conflicts_with = "follow")]
    until: Option<Timestamp>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VerdictArg {
    #[value(name = "FORWARDED")]
    Forwarded,
    #[value(name = "DROPPED")]
    Dropped,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EventTypeArg {
    Drop,
    Trace,
    PolicyVerdict,
    Close,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProtocolArg {
    Tcp,
    Udp,
    Sctp,
    Icmp,
}

/// Prints the flows of `agents`, merged: the buffered ones in time order, then (with
/// --follow) new ones as they arrive. `node` keeps the flows of that node only. An agent
/// that cannot be reached is reported on stderr and the others go on; with none, exit 2.
pub fn run(
    agents: &[Agent],
    node: Option<&str>,
    args: &ObserveArgs,
    output: Output,
) -> anyhow::Result<()> {
    let request = request(args);
    let mut printer = Printer {
        out: std::io::stdout().lock(),
        output,
        // One agent's flows are all its node's; several need their node on each line.
        with_node: agents.len() > 1,
        node,
        follow: request.follow,
    };
    // Plain --follow: nothing buffered, only what comes from now on.
    if request.follow && request.last == Some(0) {
        let streams = agents
            .iter()
            .filter_map(|a| reported(a, a.client().observe(&request)).map(|s| (a, s)))
            .map(|(a, stream)| follow_source(a, stream, Vec::new()))
            .collect();
        return follow(streams, &mut printer);
    }
    let buffered_request = ObserveRequest {
        follow: false,
        ..request.clone()
    };
    let mut reachable = Vec::new();
    for agent in agents {
        let flows = agent
            .client()
            .observe(&buffered_request)
            .and_then(|stream| stream.collect::<Result<Vec<_>, _>>());
        if let Some(flows) = reported(agent, flows) {
            reachable.push((agent, flows));
        }
    }
    if reachable.is_empty() {
        no_agent();
    }
    let sources = reachable
        .iter()
        .map(|(agent, flows)| SourceFlows {
            node: agent.node.clone(),
            flows: flows.clone(),
        })
        .collect();
    for flow in sluice_observer::merge_last(sources, request.last) {
        printer.print(&flow)?;
    }
    if !request.follow {
        return Ok(());
    }
    let streams = reachable
        .into_iter()
        .filter_map(|(agent, seen)| followed_after(agent, &request, seen))
        .collect();
    follow(streams, &mut printer)
}

type FlowResults = Box<dyn Iterator<Item = Result<Flow, ApiError>> + Send>;

/// Follows `agent` from the newest flow it already sent (`seen`): asking from that time on
/// leaves no gap between the two calls, and the flows of that very time already sent are
/// skipped, so none is printed twice.
fn followed_after(
    agent: &Agent,
    request: &ObserveRequest,
    seen: Vec<Flow>,
) -> Option<FollowSource<FlowResults>> {
    let newest = seen.iter().map(|f| f.time).max();
    let mut filter = request.filter.clone();
    filter.since = filter.since.max(newest);
    let request = ObserveRequest {
        last: None,
        follow: true,
        filter,
    };
    let stream = reported(agent, agent.client().observe(&request))?;
    let already: Vec<Flow> = seen
        .into_iter()
        .filter(|f| Some(f.time) == newest)
        .collect();
    Some(follow_source(agent, stream, already))
}

fn follow_source(
    agent: &Agent,
    stream: sluice_api::FlowStream,
    already: Vec<Flow>,
) -> FollowSource<FlowResults> {
    let flows = stream.filter(move |f| !matches!(f, Ok(f) if already.contains(f)));
    FollowSource {
        name: agent.name(),
        node: agent.node.clone(),
        flows: Box::new(flows),
    }
}

fn follow(sources: Vec<FollowSource<FlowResults>>, printer: &mut Printer) -> anyhow::Result<()> {
    if sources.is_empty() {
        no_agent();
    }
    for arrival in sluice_observer::interleave(sources) {
        match arrival {
            Arrival::Flow(flow) => printer.print(&flow)?,
            Arrival::Failed { source, error } => eprintln!("{source}: {error}"),
            Arrival::Ended { source } => eprintln!("{source}: the agent ended the stream"),
        }
    }
    Ok(())
}

/// The value, or None after saying on stderr which agent failed and why.
fn reported<T>(agent: &Agent, result: Result<T, ApiError>) -> Option<T> {
    result.map_err(|e| eprintln!("{}: {e}", agent.name())).ok()
}

fn no_agent() -> ! {
    eprintln!("Error: no agent could be reached");
    std::process::exit(EXIT_ERROR.into())
}

struct Printer<'a> {
    out: std::io::StdoutLock<'static>,
    output: Output,
    with_node: bool,
    node: Option<&'a str>,
    follow: bool,
}

impl Printer<'_> {
    fn print(&mut self, flow: &Flow) -> anyhow::Result<()> {
        // Outside a lab --node cannot choose the agent, so it chooses the flows.
        if self.node.is_some_and(|n| n != flow.node_name) {
            return Ok(());
        }
        let line = match (self.output, self.with_node) {
            (Output::Json, _) => json_line(flow)?,
            // A stream of documents: each flow its own, Hubble's shape as in JSON.
            (Output::Yaml, _) => format!("---\n{}", yaml(&hubble_response(flow))?.trim_end()),
            (Output::Table | Output::Wide, false) => {
                verdict_colour(flow, sluice_observer::compact(flow))
            }
            (Output::Table | Output::Wide, true) => {
                verdict_colour(flow, sluice_observer::compact_with_node(flow))
            }
        };
        writeln!(self.out, "{line}").context("writing to stdout")?;
        // Followed flows appear as they come, not when a buffer fills.
        if self.follow {
            self.out.flush().context("writing to stdout")?;
        }
        Ok(())
    }
}

fn request(args: &ObserveArgs) -> ObserveRequest {
    let last = match (args.last, args.since, args.follow) {
        (Some(n), _, _) => Some(n),
        // Every buffered flow since then (the filter keeps the time).
        (None, Some(_), _) => None,
        (None, None, true) => Some(0),
        (None, None, false) => Some(DEFAULT_LAST),
    };
    ObserveRequest {
        last,
        follow: args.follow,
        filter: FlowFilter {
            from_pod: args.from_pod.clone(),
            to_pod: args.to_pod.clone(),
            pod: args.pod.clone(),
            namespace: args.namespace.clone(),
            label: args.label.clone(),
            verdict: args
                .verdict
                .iter()
                .map(|v| match v {
                    VerdictArg::Forwarded => Verdict::Forwarded,
                    VerdictArg::Dropped => Verdict::Dropped,
                })
                .collect(),
            event_type: args
                .event_type
                .iter()
                .map(|t| match t {
                    EventTypeArg::Drop => FlowEventType::Drop,
                    EventTypeArg::Trace => FlowEventType::Trace,
                    EventTypeArg::PolicyVerdict => FlowEventType::PolicyVerdict,
                    EventTypeArg::Close => FlowEventType::Close,
                })
                .collect(),
            protocol: args
                .protocol
                .iter()
                .map(|p| match p {
                    ProtocolArg::Tcp => FlowProtocol::Tcp,
                    ProtocolArg::Udp => FlowProtocol::Udp,
                    ProtocolArg::Sctp => FlowProtocol::Sctp,
                    ProtocolArg::Icmp => FlowProtocol::Icmp,
                })
                .collect(),
            port: args.port.clone(),
            since: args.since,
            until: args.until,
        },
    }
}

/// Hubble's `-o json` line: a GetFlowsResponse, so `hubble observe --input-file` reads it.
fn json_line(flow: &Flow) -> anyhow::Result<String> {
    serde_json::to_string(&hubble_response(flow)).context("encoding flow")
}

fn hubble_response(flow: &Flow) -> serde_json::Value {
    serde_json::json!({
        "flow": flow,
        "node_name": flow.node_name,
        "time": flow.time,
    })
}

/// A dropped flow's line in red, on a terminal.
fn verdict_colour(flow: &Flow, line: String) -> String {
    if flow.verdict == Verdict::Dropped {
        paint(&line, Tone::Bad)
    } else {
        line
    }
}

fn parse_time(s: &str) -> anyhow::Result<Timestamp> {
    if let Some(t) = Timestamp::parse_rfc3339(s) {
        return Ok(t);
    }
    let ago = parse_duration(s)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("system clock before 1970")?;
    let since = now.saturating_sub(ago);
    Ok(Timestamp(
        i64::try_from(since.as_nanos()).unwrap_or(i64::MAX),
    ))
}

/// `30s`, `5m`, `2h`, `1d`, `1h30m`.
fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        bail!("empty duration");
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            bail!("{s:?} is neither RFC 3339 nor a duration like 30s, 5m, 2h or 1d");
        }
        let n: u64 = rest[..digits]
            .parse()
            .with_context(|| format!("duration {s:?}"))?;
        rest = &rest[digits..];
        let unit = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let secs = match &rest[..unit] {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            other => bail!("unknown unit {other:?} in {s:?} (use s, m, h or d)"),
        };
        rest = &rest[unit..];
        total += Duration::from_secs(n.saturating_mul(secs));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ObserveArgs,
    }

    fn request_for(argv: &[&str]) -> ObserveRequest {
        let cli = Cli::try_parse_from(std::iter::once("observe").chain(argv.iter().copied()));
        match cli {
            Ok(cli) => request(&cli.args),
            Err(e) => panic!("{argv:?}: {e}"),
        }
    }

    #[test]
    fn modes_pick_the_buffered_flows_as_hubble_does() {
        assert_eq!(request_for(&[]).last, Some(20));
        assert_eq!(request_for(&["--last", "5"]).last, Some(5));
        let follow = request_for(&["-f"]);
        assert_eq!((follow.last, follow.follow), (Some(0), true));
        assert_eq!(request_for(&["--since", "5m"]).last, None);
        assert_eq!(request_for(&["--follow", "--since", "5m"]).last, None);
        assert_eq!(request_for(&["--follow", "--last", "3"]).last, Some(3));
    }

    #[test]
    fn filters_go_to_the_agent() {
        let r = request_for(&[
            "--from-pod",
            "default/client",
            "--to-pod",
            "nginx",
            "--label",
            "app=nginx",
            "--verdict",
            "dropped",
            "--type",
            "policy-verdict",
            "--protocol",
            "TCP",
            "--port",
            "80",
            "--since",
            "2026-11-30T10:00:00Z",
        ]);
        assert_eq!(
            serde_json::to_value(&r.filter).unwrap_or_default(),
            serde_json::json!({
                "from_pod": ["default/client"],
                "to_pod": ["nginx"],
                "label": ["app=nginx"],
                "verdict": ["DROPPED"],
                "event_type": ["policy-verdict"],
                "protocol": ["tcp"],
                "port": [80],
                "since": "2026-11-30T10:00:00.000000000Z",
            })
        );
        assert!(Cli::try_parse_from(["observe", "--type", "bogus"]).is_err());
        assert!(Cli::try_parse_from(["observe", "--since", "yesterday"]).is_err());
        let until = request_for(&["--since", "1h", "--until", "2026-11-30T10:00:00Z"]);
        assert_eq!(
            until.filter.until,
            Timestamp::parse_rfc3339("2026-11-30T10:00:00Z")
        );
        assert!(Cli::try_parse_from(["observe", "-f", "--until", "5m"]).is_err());
    }

    #[test]
    fn agents_are_a_list_of_sockets() {
        let cli = Cli::try_parse_from(["observe", "--agents", "/run/a.sock,/run/b.sock"]);
        let agents = cli.map(|c| c.args.agents).unwrap_or_default();
        assert_eq!(
            agents,
            [PathBuf::from("/run/a.sock"), PathBuf::from("/run/b.sock")]
        );
    }

    #[test]
    fn durations() {
        let d = |s| parse_duration(s).ok();
        assert_eq!(d("30s"), Some(Duration::from_secs(30)));
        assert_eq!(d("5m"), Some(Duration::from_secs(300)));
        assert_eq!(d("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(d("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(d("5"), None);
        assert_eq!(d("5w"), None);
        assert_eq!(d(""), None);
    }
}
