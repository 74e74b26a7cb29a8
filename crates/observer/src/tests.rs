use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

use sluice_api::flow::{FlowFilter, Timestamp, Verdict};
use sluice_common::{
    EVENT_CLOSE, EVENT_DROP, EVENT_F_DENIED, EVENT_F_REPLY, EVENT_F_SERVICE, EVENT_POLICY_VERDICT,
    EVENT_TRACE, FlowEvent, IDENTITY_ANY, IDENTITY_HOST, IDENTITY_WORLD, IPPROTO_TCP, IPPROTO_UDP,
    POLICY_EGRESS, POLICY_INGRESS, PolicyKey, addr_be,
    kinds::{RuleOrigin, ServiceKind},
};
use sluice_compiler::{DesiredState, EndpointDetails, EndpointPolicy, Frontend, Identity};
use sluice_store::Snapshot;

use crate::{FlowBuffer, PodNames, Resolver, compact, drop_reason_desc, matches};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const NGINX: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 7);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WORLD: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const CLIENT_ID: u32 = 1234;
const NGINX_ID: u32 = 5678;
const NGINX_IF: u32 = 7;
const CLIENT_IF: u32 = 5;
/// 2026-11-30T10:00:01.123Z, as a monotonic 1000 s after boot.
const BOOT_OFFSET: i64 = 1_796_032_801_123_000_000 - 1_000_000_000_000;
const EVENT_TIME: u64 = 1_000_000_000_000;

fn identity(id: u32, labels: &[&str]) -> (u32, Identity) {
    let labels = labels.iter().map(|l| l.to_string()).collect();
    (id, Identity { id, labels })
}

fn details(pod: &str, interface: &str, ip: Ipv4Addr, identity: u32) -> EndpointDetails {
    EndpointDetails {
        namespace: "default".into(),
        pod: pod.into(),
        interface: interface.into(),
        ipv4: ip,
        identity,
        ingress_enforced: true,
        egress_enforced: false,
        policy_rows: 1,
        overflow: false,
        policies: vec!["default/allow-frontend".into()],
    }
}

fn origins(names: &[&str]) -> BTreeSet<RuleOrigin> {
    names
        .iter()
        .map(|n| RuleOrigin::from(n.to_string()))
        .collect()
}

fn resolver() -> Resolver {
    let mut desired = DesiredState {
        identities: [
            identity(IDENTITY_HOST, &["reserved:host"]),
            identity(IDENTITY_WORLD, &["reserved:world"]),
            identity(
                CLIENT_ID,
                &[
                    "k8s:io.kubernetes.pod.namespace=default",
                    "k8s:role=frontend",
                ],
            ),
            identity(
                NGINX_ID,
                &["k8s:app=nginx", "k8s:io.kubernetes.pod.namespace=default"],
            ),
        ]
        .into_iter()
        .collect(),
        ..DesiredState::default()
    };
    desired.frontends = vec![Frontend {
        service: "default/nginx".into(),
        port_name: String::new(),
        kind: ServiceKind::ClusterIP,
        frontend: sluice_common::kinds::FrontendKind::ClusterIP,
        local: false,
        address: VIP,
        port: 80,
        protocol: IPPROTO_TCP,
        backends: vec![(NGINX, 8080)],
    }];
    desired.endpoint_details = [
        (NGINX_IF, details("nginx-x", "lxc-nginx", NGINX, NGINX_ID)),
        (
            CLIENT_IF,
            details("client", "lxc-client", CLIENT, CLIENT_ID),
        ),
    ]
    .into_iter()
    .collect();
    let mut policy = EndpointPolicy::default();
    policy.rows.insert(
        PolicyKey::ports(CLIENT_ID, POLICY_INGRESS, IPPROTO_TCP, 8080, 16),
        origins(&["default/allow-frontend", "default/also-frontend"]),
    );
    policy.rows.insert(
        PolicyKey::any(IDENTITY_HOST, POLICY_INGRESS),
        origins(&["reserved:host"]),
    );
    desired.policies.insert(NGINX_IF, policy);
    let snapshot: Snapshot = serde_json::from_value(serde_json::json!({
        "revision": 1,
        "pods": [
            {"metadata": {"name": "client", "namespace": "default"},
             "status": {"podIP": CLIENT.to_string()}},
        ],
        "endpoints": [
            {"node": "node-1", "namespace": "default", "pod": "nginx-x",
             "interface": "lxc-nginx", "addresses": [NGINX.to_string()]},
        ],
    }))
    .unwrap_or_default();
    let pods = PodNames::of(&snapshot, &[]);
    Resolver::new("node-1", BOOT_OFFSET, Arc::new(desired), Arc::new(pods))
}

/// A TCP SYN from the client to nginx:8080 seen at nginx's to_container.
fn ingress_syn(type_: u8, flags: u8, reason: u8) -> FlowEvent {
    FlowEvent {
        time_ns: EVENT_TIME,
        type_,
        direction: 1,
        reason,
        proto: IPPROTO_TCP,
        tcp_flags: 0x02,
        flags,
        ifindex: NGINX_IF,
        src_identity: CLIENT_ID,
        dst_identity: NGINX_ID,
        saddr: addr_be(CLIENT),
        daddr: addr_be(NGINX),
        sport: 43210u16.to_be(),
        dport: 8080u16.to_be(),
        len: 60,
        ..FlowEvent::default()
    }
}

#[test]
fn a_denied_verdict_has_hubbles_field_names_and_resolved_identities() {
    let flow = resolver().flow(&ingress_syn(EVENT_POLICY_VERDICT, EVENT_F_DENIED, 133));
    let json = serde_json::to_value(&flow).unwrap_or_default();
    assert_eq!(
        json,
        serde_json::json!({
            "time": "2026-11-30T10:00:01.123000000Z",
            "verdict": "DROPPED",
            "drop_reason": 133,
            "drop_reason_desc": "POLICY_DENIED",
            "IP": {"source": "10.244.0.5", "destination": "10.244.0.7", "ipVersion": "IPv4"},
            "l4": {"TCP": {"source_port": 43210, "destination_port": 8080,
                           "flags": {"SYN": true}}},
            "source": {"identity": 1234, "namespace": "default", "pod_name": "client",
                       "labels": ["k8s:io.kubernetes.pod.namespace=default",
                                  "k8s:role=frontend"]},
            "destination": {"identity": 5678, "namespace": "default", "pod_name": "nginx-x",
                            "labels": ["k8s:app=nginx",
                                       "k8s:io.kubernetes.pod.namespace=default"]},
            "Type": "L3_L4",
            "node_name": "node-1",
            "event_type": {"type": 5, "sub_type": 0},
            "traffic_direction": "INGRESS",
            "is_reply": false,
            "interface": {"index": 7, "name": "lxc-nginx"},
            "Summary": "TCP Flags: SYN",
        })
    );
    assert_eq!(
        compact(&flow),
        "Nov 30 10:00:01.123: default/client:43210 (ID:1234) -> default/nginx-x:8080 \
         (ID:5678) policy-verdict:none INGRESS DENIED (TCP Flags: SYN)"
    );
    assert_eq!(
        crate::compact_with_node(&flow),
        "Nov 30 10:00:01.123 [node-1]: default/client:43210 (ID:1234) -> default/nginx-x:8080 \
         (ID:5678) policy-verdict:none INGRESS DENIED (TCP Flags: SYN)"
    );
    // The JSON reads back to the same flow: the CLI decodes what the agent sends.
    let back: sluice_api::flow::Flow = serde_json::from_value(json).unwrap_or(flow.clone());
    assert_eq!(back, flow);
}

#[test]
fn before_the_first_desired_state_flows_still_carry_their_node_and_time() {
    let flow = Resolver::for_node("node-2", BOOT_OFFSET).flow(&ingress_syn(EVENT_TRACE, 0, 0));
    assert_eq!(flow.node_name, "node-2");
    assert_eq!(
        flow.time,
        Timestamp::parse_rfc3339("2026-11-30T10:00:01.123Z").unwrap_or_default()
    );
    assert_eq!(flow.destination.pod_name, "");
}

#[test]
fn an_allowed_verdict_names_the_policies_of_the_admitting_row() {
    let flow = resolver().flow(&ingress_syn(EVENT_POLICY_VERDICT, 0, 0));
    assert_eq!(flow.verdict, Verdict::Forwarded);
    assert_eq!(flow.drop_reason_desc, None);
    let json = serde_json::to_value(&flow).unwrap_or_default();
    assert_eq!(
        json["ingress_allowed_by"],
        serde_json::json!([
            {"name": "allow-frontend", "namespace": "default", "kind": "NetworkPolicy"},
            {"name": "also-frontend", "namespace": "default", "kind": "NetworkPolicy"},
        ])
    );
    assert!(json.get("egress_allowed_by").is_none());
    assert_eq!(json["policy_match_type"], 2);
    assert!(
        compact(&flow).ends_with("policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)"),
        "{}",
        compact(&flow)
    );

    // The node's own row allows without a NetworkPolicy.
    let mut event = ingress_syn(EVENT_POLICY_VERDICT, 0, 0);
    event.src_identity = IDENTITY_HOST;
    let flow = resolver().flow(&event);
    assert!(flow.ingress_allowed_by.is_empty());
    assert!(
        compact(&flow).contains("(host) -> default/nginx-x:8080 (ID:5678) policy-verdict:L3-Only")
    );
}

#[test]
fn drops_carry_hubbles_reason_names_and_cilium_texts() {
    for (code, desc, text) in [
        (133, "POLICY_DENIED", "Policy denied"),
        (132, "INVALID_SOURCE_IP", "Invalid source ip"),
        (134, "INVALID_PACKET_DROPPED", "Invalid packet"),
        (
            158,
            "SERVICE_BACKEND_NOT_FOUND",
            "Service has no ready backend (rejected)",
        ),
        (
            175,
            "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND",
            "First logical datagram fragment not found",
        ),
        (
            212,
            "POLICY_UNAVAILABLE",
            "Endpoint policy not realized (fails closed)",
        ),
    ] {
        let flow = resolver().flow(&ingress_syn(EVENT_DROP, 0, code));
        assert_eq!(flow.verdict, Verdict::Dropped);
        assert_eq!(flow.drop_reason_desc.as_deref(), Some(desc));
        assert_eq!(flow.event_type.event_type, 1);
        assert_eq!(flow.event_type.sub_type, i32::from(code));
        assert!(
            compact(&flow).ends_with(&format!(" {text} DROPPED (TCP Flags: SYN)")),
            "{}",
            compact(&flow)
        );
    }
    assert_eq!(drop_reason_desc(99), "DROP_REASON_UNKNOWN");
}

#[test]
fn an_egress_trace_through_a_service_names_the_service_and_the_world_by_name() {
    let event = FlowEvent {
        time_ns: EVENT_TIME,
        type_: EVENT_TRACE,
        direction: 0,
        proto: IPPROTO_TCP,
        tcp_flags: 0x02,
        flags: EVENT_F_SERVICE,
        ifindex: CLIENT_IF,
        src_identity: CLIENT_ID,
        dst_identity: NGINX_ID,
        saddr: addr_be(CLIENT),
        daddr: addr_be(NGINX),
        sport: 43210u16.to_be(),
        dport: 8080u16.to_be(),
        orig_daddr: addr_be(VIP),
        orig_dport: 80u16.to_be(),
        ..FlowEvent::default()
    };
    let flow = resolver().flow(&event);
    let json = serde_json::to_value(&flow).unwrap_or_default();
    assert_eq!(
        json["destination_service"],
        serde_json::json!({"name": "nginx", "namespace": "default"})
    );
    assert_eq!(json["traffic_direction"], "EGRESS");
    assert_eq!(json["trace_observation_point"], "FROM_ENDPOINT");
    assert_eq!(
        json["event_type"],
        serde_json::json!({"type": 4, "sub_type": 5})
    );
    assert!(compact(&flow).ends_with(
        "default/client:43210 (ID:1234) -> default/nginx-x:8080 (ID:5678) from-endpoint FORWARDED (TCP Flags: SYN)"
    ));

    let world = FlowEvent {
        type_: EVENT_DROP,
        reason: 133,
        proto: IPPROTO_UDP,
        tcp_flags: 0,
        flags: 0,
        direction: 1,
        ifindex: NGINX_IF,
        src_identity: IDENTITY_WORLD,
        dst_identity: NGINX_ID,
        saddr: addr_be(WORLD),
        daddr: addr_be(NGINX),
        sport: 5353u16.to_be(),
        dport: 53u16.to_be(),
        ..event
    };
    let flow = resolver().flow(&world);
    assert_eq!(flow.source.labels, ["reserved:world"]);
    assert!(flow.source.pod_name.is_empty());
    assert_eq!(
        serde_json::to_value(&flow).unwrap_or_default()["l4"],
        serde_json::json!({"UDP": {"source_port": 5353, "destination_port": 53}})
    );
    assert!(
        compact(&flow).contains(
            ": 203.0.113.9:5353 (world) -> default/nginx-x:53 (ID:5678) Policy denied DROPPED (UDP)"
        ),
        "{}",
        compact(&flow)
    );
}

#[test]
fn replies_print_from_the_initiator_with_a_left_arrow() {
    let mut event = ingress_syn(EVENT_CLOSE, EVENT_F_REPLY, 0);
    event.tcp_flags = 0x11;
    // nginx's FIN back to the client, seen leaving nginx.
    event.direction = 0;
    (event.saddr, event.daddr) = (event.daddr, event.saddr);
    (event.sport, event.dport) = (event.dport, event.sport);
    (event.src_identity, event.dst_identity) = (event.dst_identity, event.src_identity);
    let flow = resolver().flow(&event);
    assert!(flow.is_reply);
    assert!(
        compact(&flow).ends_with(
            "default/client:43210 (ID:1234) <- default/nginx-x:8080 (ID:5678) close FORWARDED (TCP Flags: ACK, FIN)"
        ),
        "{}",
        compact(&flow)
    );
}

#[test]
fn the_admitting_row_is_found_as_the_datapath_finds_it() {
    let mut policy = EndpointPolicy::default();
    let row = |key: PolicyKey, name: &str| (key, origins(&[name]));
    policy.rows.extend([
        row(PolicyKey::any(CLIENT_ID, POLICY_INGRESS), "ns/l3"),
        row(
            PolicyKey::ports(CLIENT_ID, POLICY_INGRESS, IPPROTO_TCP, 8080, 16),
            "ns/exact",
        ),
        // 8000-8063 as one prefix.
        row(
            PolicyKey::ports(IDENTITY_ANY, POLICY_INGRESS, IPPROTO_TCP, 8000, 10),
            "ns/range",
        ),
        row(
            PolicyKey::any_port(IDENTITY_ANY, POLICY_EGRESS, IPPROTO_UDP),
            "ns/udp",
        ),
    ]);
    let find = |id, dir, proto, port| {
        policy
            .admitting(id, dir, proto, port)
            .map(|(_, o)| o.iter().next().map(ToString::to_string).unwrap_or_default())
    };
    // The peer's own rows come first, longest prefix among them.
    assert_eq!(
        find(CLIENT_ID, POLICY_INGRESS, IPPROTO_TCP, 8080).as_deref(),
        Some("ns/exact")
    );
    assert_eq!(
        find(CLIENT_ID, POLICY_INGRESS, IPPROTO_TCP, 8001).as_deref(),
        Some("ns/l3")
    );
    // Other peers fall back to identity 0.
    assert_eq!(
        find(NGINX_ID, POLICY_INGRESS, IPPROTO_TCP, 8063).as_deref(),
        Some("ns/range")
    );
    assert_eq!(find(NGINX_ID, POLICY_INGRESS, IPPROTO_TCP, 8064), None);
    assert_eq!(find(NGINX_ID, POLICY_INGRESS, IPPROTO_UDP, 8001), None);
    assert_eq!(
        find(NGINX_ID, POLICY_EGRESS, IPPROTO_UDP, 53).as_deref(),
        Some("ns/udp")
    );
    assert_eq!(find(NGINX_ID, POLICY_EGRESS, IPPROTO_TCP, 53), None);
}

#[test]
fn filters_follow_hubbles_semantics() {
    let resolver = resolver();
    let denied = resolver.flow(&ingress_syn(EVENT_POLICY_VERDICT, EVENT_F_DENIED, 133));
    let dropped = resolver.flow(&ingress_syn(EVENT_DROP, 0, 133));
    let filter = |f: FlowFilter| (matches(&f, &denied), matches(&f, &dropped));
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    assert_eq!(filter(FlowFilter::default()), (true, true));
    // A pod without namespace is in default; names match as prefixes.
    for (from, to, pod, expect) in [
        (&["client"][..], &[][..], &[][..], true),
        (&["default/client"], &[], &[], true),
        (&["kube-system/client"], &[], &[], false),
        (&[], &["default/nginx"], &[], true),
        (&["default/nginx"], &[], &[], false),
        (&[], &[], &["nginx-x"], true),
        (&[], &[], &["other", "client"], true),
    ] {
        let f = FlowFilter {
            from_pod: strings(from),
            to_pod: strings(to),
            pod: strings(pod),
            ..FlowFilter::default()
        };
        assert_eq!(matches(&f, &denied), expect, "{f:?}");
    }
    let f = |label: &str| FlowFilter {
        label: vec![label.into()],
        ..FlowFilter::default()
    };
    assert!(matches(&f("role=frontend"), &denied));
    assert!(matches(&f("k8s:app=nginx"), &denied));
    assert!(matches(&f("app"), &denied));
    assert!(!matches(&f("app=web"), &denied));
    assert!(!matches(&f("reserved:world"), &denied));

    let by_type = |t: &str| FlowFilter {
        event_type: vec![serde_json::from_value(serde_json::json!(t)).expect("an event type")],
        ..FlowFilter::default()
    };
    assert_eq!(filter(by_type("policy-verdict")), (true, false));
    assert_eq!(filter(by_type("drop")), (false, true));
    assert_eq!(filter(by_type("trace")), (false, false));
    let verdict = FlowFilter {
        verdict: vec![Verdict::Dropped],
        ..FlowFilter::default()
    };
    assert_eq!(filter(verdict), (true, true));
    let proto = |p: &str, port: u16| FlowFilter {
        protocol: vec![p.parse().expect("a protocol")],
        port: vec![port],
        ..FlowFilter::default()
    };
    assert_eq!(filter(proto("TCP", 8080)), (true, true));
    assert_eq!(filter(proto("tcp", 43210)), (true, true));
    assert_eq!(filter(proto("udp", 8080)), (false, false));
    assert_eq!(filter(proto("tcp", 80)), (false, false));
    let ns = |n: &str| FlowFilter {
        namespace: vec![n.into()],
        ..FlowFilter::default()
    };
    assert_eq!(filter(ns("default")), (true, true));
    assert_eq!(filter(ns("kube-system")), (false, false));
    let since = |t: i64| FlowFilter {
        since: Some(Timestamp(t)),
        ..FlowFilter::default()
    };
    assert_eq!(filter(since(denied.time.0)), (true, true));
    assert_eq!(filter(since(denied.time.0 + 1)), (false, false));
    let until = |t: i64| FlowFilter {
        until: Some(Timestamp(t)),
        ..FlowFilter::default()
    };
    assert_eq!(filter(until(denied.time.0)), (true, true));
    assert_eq!(filter(until(denied.time.0 - 1)), (false, false));
}

#[test]
fn the_buffer_keeps_the_last_n_and_a_snapshot_and_its_subscription_never_overlap() {
    let buffer = FlowBuffer::new(3, resolver());
    let mut early = buffer.subscribe();
    let events: Vec<FlowEvent> = (1..=5u16)
        .map(|port| {
            let mut event = ingress_syn(EVENT_DROP, 0, 133);
            event.sport = port.to_be();
            event
        })
        .collect();
    buffer.push_all(&events);
    let port = |f: &sluice_api::flow::Flow| f.ports().map_or(0, |p| p.0);
    assert_eq!(buffer.len(), 3);
    assert_eq!(buffer.seen(), 5);
    let (all, mut follower) = buffer.snapshot(None, |_| true);
    assert_eq!(all.iter().map(port).collect::<Vec<_>>(), [3, 4, 5]);
    let (last, _) = buffer.snapshot(Some(2), |f| port(f) != 5);
    assert_eq!(last.iter().map(port).collect::<Vec<_>>(), [3, 4]);
    // Subscribers see every flow pushed after they subscribed, once, named.
    let first = early.try_recv().expect("the first event");
    assert_eq!(port(&first), 1);
    assert_eq!(first.source.pod_name, "client");
    assert!(follower.try_recv().is_err());
    let mut event = ingress_syn(EVENT_DROP, 0, 133);
    event.sport = 6u16.to_be();
    buffer.push(event);
    assert_eq!(follower.try_recv().map(|f| port(&f)).ok(), Some(6));
}

/// Events are kept raw and named when read, by the resolver current then: a flow read
/// after the desired state changed carries the new names.
#[test]
fn events_are_named_when_read_by_the_current_state() {
    let buffer = FlowBuffer::new(4, Resolver::for_node("node-1", BOOT_OFFSET));
    let mut follower = buffer.subscribe();
    buffer.push(ingress_syn(EVENT_TRACE, 0, 0));
    let (before, _) = buffer.snapshot(None, |_| true);
    assert_eq!(before[0].source.pod_name, "");
    buffer.set_resolver(std::sync::Arc::new(resolver()));
    let (after, _) = buffer.snapshot(None, |_| true);
    assert_eq!(after[0].source.pod_name, "client");
    assert_eq!(
        after[0].source.labels,
        resolver()
            .flow(&ingress_syn(EVENT_TRACE, 0, 0))
            .source
            .labels
    );
    assert_eq!(
        follower.try_recv().map(|f| f.source.pod_name).ok(),
        Some("client".into())
    );
}

#[tokio::test]
async fn catching_up_waits_for_the_reader_to_drain_and_no_longer_than_told() {
    use std::{sync::Arc, time::Duration};
    let buffer = Arc::new(FlowBuffer::new(8, resolver()));
    // No reader: the wait ends when patience does.
    let started = std::time::Instant::now();
    buffer.catch_up(Duration::from_millis(50)).await;
    assert!(started.elapsed() >= Duration::from_millis(50));
    // A reader that drains only when asked: the flow it drains is there once catch_up returns.
    let reader = tokio::spawn({
        let buffer = Arc::clone(&buffer);
        async move {
            buffer.drain_wanted().await;
            buffer.push(ingress_syn(EVENT_DROP, 0, 133));
            buffer.drained();
        }
    });
    buffer.catch_up(Duration::from_secs(30)).await;
    assert_eq!(buffer.len(), 1);
    reader.await.unwrap();
}
