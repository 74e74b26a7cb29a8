//! Flow filters with Hubble's semantics: fields ANDed, the values of one field ORed.

use sluice_api::flow::{
    EVENT_TYPE_CLOSE, EVENT_TYPE_DROP, EVENT_TYPE_POLICY_VERDICT, EVENT_TYPE_TRACE, Endpoint, Flow,
    FlowFilter, Layer4,
};

/// The `event_type.type` a `--type` name selects; None for an unknown name.
pub fn event_type_code(name: &str) -> Option<i32> {
    match name.to_ascii_lowercase().as_str() {
        "drop" => Some(EVENT_TYPE_DROP),
        "trace" => Some(EVENT_TYPE_TRACE),
        "policy-verdict" => Some(EVENT_TYPE_POLICY_VERDICT),
        "close" => Some(EVENT_TYPE_CLOSE),
        _ => None,
    }
}

/// Whether `flow` passes every field of `filter`.
pub fn matches(filter: &FlowFilter, flow: &Flow) -> bool {
    any_or_empty(&filter.from_pod, |p| pod_matches(p, &flow.source))
        && any_or_empty(&filter.to_pod, |p| pod_matches(p, &flow.destination))
        && any_or_empty(&filter.pod, |p| {
            pod_matches(p, &flow.source) || pod_matches(p, &flow.destination)
        })
        && any_or_empty(&filter.namespace, |ns| {
            flow.source.namespace == *ns || flow.destination.namespace == *ns
        })
        && any_or_empty(&filter.label, |l| {
            label_matches(l, &flow.source) || label_matches(l, &flow.destination)
        })
        && any_or_empty(&filter.verdict, |v| flow.verdict == *v)
        && any_or_empty(&filter.event_type, |t| {
            event_type_code(t) == Some(flow.event_type.event_type)
        })
        && any_or_empty(&filter.protocol, |p| protocol_matches(p, flow))
        && any_or_empty(&filter.port, |port| {
            flow.ports().is_some_and(|(s, d)| s == *port || d == *port)
        })
        && filter.since.is_none_or(|since| flow.time >= since)
}

fn any_or_empty<T>(values: &[T], f: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(f)
}

/// `ns/name` matches pods of `ns` whose name starts with `name` (Hubble matches pod name
/// prefixes, so a Deployment's name matches its pods); a pattern without `/` is in
/// `default`.
fn pod_matches(pattern: &str, endpoint: &Endpoint) -> bool {
    if endpoint.pod_name.is_empty() {
        return false;
    }
    let (ns, name) = pattern.split_once('/').unwrap_or(("default", pattern));
    endpoint.namespace == ns && endpoint.pod_name.starts_with(name)
}

/// `k=v` or `k`, with an optional source (`k8s:app=web`, `reserved:world`), against the
/// identity's `source:key=value` labels.
fn label_matches(pattern: &str, endpoint: &Endpoint) -> bool {
    let (want_source, want) = match pattern.split_once(':') {
        Some((source, rest)) if !source.contains('=') => (Some(source), rest),
        _ => (None, pattern),
    };
    let (want_key, want_value) = match want.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (want, None),
    };
    endpoint.labels.iter().any(|label| {
        let (source, rest) = label.split_once(':').unwrap_or(("", label));
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        want_source.is_none_or(|s| s == source)
            && key == want_key
            && want_value.is_none_or(|v| v == value)
    })
}

fn protocol_matches(name: &str, flow: &Flow) -> bool {
    let Some(l4) = &flow.l4 else {
        return false;
    };
    let actual = match l4 {
        Layer4::Tcp(_) => "tcp",
        Layer4::Udp(_) => "udp",
        Layer4::Sctp(_) => "sctp",
        Layer4::Icmpv4(_) => "icmp",
    };
    let name = name.to_ascii_lowercase();
    name == actual || (actual == "icmp" && name == "icmpv4")
}
