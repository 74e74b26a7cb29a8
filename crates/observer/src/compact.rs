//! `hubble observe`'s compact one-line format.

use sluice_api::flow::{
    EVENT_TYPE_CLOSE, EVENT_TYPE_DROP, EVENT_TYPE_POLICY_VERDICT, EVENT_TYPE_TRACE, Endpoint, Flow,
    POLICY_MATCH_ALL, POLICY_MATCH_L3_L4, POLICY_MATCH_L3_ONLY, POLICY_MATCH_L4_ONLY,
    TRACE_FROM_ENDPOINT, TRACE_TO_ENDPOINT, Timestamp, Verdict,
};
use sluice_common::{DropReason, IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD};

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `Nov 30 10:00:01.123: default/client:43210 (ID:1234) -> default/nginx-x:80 (ID:5678)
/// policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)`. Replies are printed as Hubble
/// does: from the connection's initiator's point of view, with `<-`.
pub fn compact(flow: &Flow) -> String {
    line(flow, None)
}

/// [`compact`] with the node after the time, as `hubble observe --print-node-name` prints
/// flows merged from several nodes: `Nov 30 10:00:01.123 [node-1]: ...`.
pub fn compact_with_node(flow: &Flow) -> String {
    line(flow, Some(&flow.node_name))
}

fn line(flow: &Flow, node: Option<&str>) -> String {
    let ports = flow.ports();
    let mut src = side(
        &flow.source,
        &flow.ip.source.to_string(),
        ports.map(|p| p.0),
    );
    let mut dst = side(
        &flow.destination,
        &flow.ip.destination.to_string(),
        ports.map(|p| p.1),
    );
    let mut arrow = "->";
    if flow.is_reply {
        std::mem::swap(&mut src, &mut dst);
        arrow = "<-";
    }
    let node = node.map(|n| format!(" [{n}]")).unwrap_or_default();
    format!(
        "{}{node}: {src} {arrow} {dst} {} {} ({})",
        time(flow.time),
        kind(flow),
        verdict(flow),
        flow.summary
    )
}

/// Go's `Jan _2 15:04:05.000`, in UTC.
fn time(t: Timestamp) -> String {
    let (_, month, day, h, m, s) = t.civil();
    let month = MONTHS
        .get(usize::try_from(month.saturating_sub(1)).unwrap_or(0))
        .copied()
        .unwrap_or("???");
    format!(
        "{month} {day:>2} {h:02}:{m:02}:{s:02}.{:03}",
        t.subsec_nanos() / 1_000_000
    )
}

fn side(endpoint: &Endpoint, ip: &str, port: Option<u16>) -> String {
    let host = if endpoint.pod_name.is_empty() {
        ip.to_string()
    } else {
        format!("{}/{}", endpoint.namespace, endpoint.pod_name)
    };
    let host = match port {
        Some(port) => format!("{host}:{port}"),
        None => host,
    };
    let identity = match endpoint.identity {
        IDENTITY_HOST => "host".to_string(),
        IDENTITY_WORLD => "world".to_string(),
        IDENTITY_REMOTE_NODE => "remote-node".to_string(),
        id => format!("ID:{id}"),
    };
    format!("{host} ({identity})")
}

/// Hubble's type column.
fn kind(flow: &Flow) -> String {
    let sub_type = flow.event_type.sub_type;
    match flow.event_type.event_type {
        EVENT_TYPE_DROP => u8::try_from(sub_type)
            .ok()
            .and_then(DropReason::from_code)
            .map_or_else(
                || format!("drop reason {sub_type}"),
                |r| r.description().to_string(),
            ),
        EVENT_TYPE_TRACE if sub_type == TRACE_TO_ENDPOINT => "to-endpoint".into(),
        EVENT_TYPE_TRACE if sub_type == TRACE_FROM_ENDPOINT => "from-endpoint".into(),
        EVENT_TYPE_TRACE => format!("trace:{sub_type}"),
        EVENT_TYPE_POLICY_VERDICT => {
            let matched = match flow.policy_match_type {
                POLICY_MATCH_L3_ONLY => "L3-Only",
                POLICY_MATCH_L3_L4 => "L3-L4",
                POLICY_MATCH_L4_ONLY => "L4-Only",
                POLICY_MATCH_ALL => "all",
                _ => "none",
            };
            format!("policy-verdict:{matched} {}", flow.traffic_direction.name())
        }
        EVENT_TYPE_CLOSE => "close".into(),
        other => format!("event:{other}"),
    }
}

/// Policy verdicts say ALLOWED or DENIED, as Hubble prints them; other flows their verdict.
fn verdict(flow: &Flow) -> &'static str {
    match (flow.is_policy_verdict(), flow.verdict) {
        (true, Verdict::Forwarded) => "ALLOWED",
        (true, Verdict::Dropped) => "DENIED",
        (false, v) => v.name(),
    }
}
