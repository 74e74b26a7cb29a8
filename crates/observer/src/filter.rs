//! Flow filters with Hubble's semantics: fields ANDed, the values of one field ORed.

use sluice_api::flow::{Endpoint, Flow, FlowFilter};

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
            t.code() == flow.event_type.event_type
        })
        && any_or_empty(&filter.protocol, |p| {
            flow.l4.as_ref().is_some_and(|l4| p.carries(l4))
        })
        && any_or_empty(&filter.port, |port| {
            flow.ports().is_some_and(|(s, d)| s == *port || d == *port)
        })
        && filter.since.is_none_or(|since| flow.time >= since)
        && filter.until.is_none_or(|until| flow.time <= until)
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
