//! ClusterIP end to end: a lab with a real agent, the eBPF datapath on every pod's veth, and
//! real TCP and UDP between pod namespaces (checksum offload off on the veths).

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use sluice_integration::{ONE_NODE_LAB, TestLab, examples, http_get, udp_ask};

const ECHO: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
spec:
  replicas: 2
  selector:
    matchLabels: {app: echo}
  template:
    metadata:
      labels: {app: echo}
    spec:
      containers:
      - name: echo
        image: agnhost
        ports:
        - {name: dns, containerPort: 5353, protocol: UDP}
        - {name: http, containerPort: 8080}
---
apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  selector: {app: echo}
  ports:
  - {name: dns, port: 53, targetPort: dns, protocol: UDP}
  - {name: http, port: 80, targetPort: http}
---
apiVersion: v1
kind: Service
metadata:
  name: nobody
spec:
  selector: {app: nobody}
  ports:
  - {name: http, port: 80}
  - {name: dns, port: 53, protocol: UDP}
";

fn nginx_lab(prefix: &str) -> TestLab {
    let mut lab = TestLab::up(prefix, ONE_NODE_LAB);
    lab.lab
        .apply(&[
            examples().join("nginx.yaml"),
            examples().join("client.yaml"),
        ])
        .unwrap_or_else(|e| panic!("apply nginx + client: {e}"));
    lab
}

#[test]
fn tcp_requests_to_the_cluster_ip_are_spread_over_both_backends() {
    let lab = nginx_lab("tcp");
    let vip = SocketAddr::from((lab.cluster_ip("nginx-service"), 80));
    let answers = lab.in_pod("default/client", move || {
        (0..40).map(|_| http_get(vip)).collect::<Vec<_>>()
    });
    let mut per_backend = BTreeMap::<String, usize>::new();
    for a in answers {
        *per_backend
            .entry(a.expect("request through the VIP"))
            .or_default() += 1;
    }
    eprintln!("requests per backend: {per_backend:?}");
    let nginx = lab.pods_named("nginx-deployment");
    assert_eq!(
        per_backend.len(),
        2,
        "both backends answered: {per_backend:?}"
    );
    for pod in nginx {
        let name = pod.split_once('/').unwrap().1;
        assert!(
            per_backend.contains_key(name),
            "{name} never answered: {per_backend:?}"
        );
    }

    let services = lab.client().services().unwrap();
    let nginx = services
        .iter()
        .find(|s| {
            s.port == 80 && s.address == vip.ip().to_string().parse::<std::net::Ipv4Addr>().unwrap()
        })
        .unwrap();
    assert_eq!(nginx.backends.len(), 2);
    assert_eq!(nginx.service.as_deref(), Some("default/nginx-service"));
}

#[test]
fn udp_and_named_target_ports_work_and_replies_come_from_the_vip() {
    let mut lab = nginx_lab("udp");
    lab.apply_yaml("echo.yaml", ECHO);
    let dns = SocketAddr::from((lab.cluster_ip("echo"), 53));
    let http = SocketAddr::from((lab.cluster_ip("echo"), 80));
    let (names, big) = lab.in_pod("default/client", move || {
        let names: Vec<_> = (0..30)
            .map(|_| udp_ask(dns, b"hostname").expect("UDP through the VIP"))
            .collect();
        // A payload larger than one segment, echoed back over TCP through the VIP.
        let big = {
            use std::io::{Read, Write};
            let mut s = TcpStream::connect_timeout(&http, Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
            let mut writer = s.try_clone().unwrap();
            let p = payload.clone();
            let t = std::thread::spawn(move || writer.write_all(&p).unwrap());
            let mut got = vec![0u8; payload.len()];
            s.read_exact(&mut got).unwrap();
            t.join().unwrap();
            got == payload
        };
        (names, big)
    });
    for (_, from) in &names {
        assert_eq!(*from, dns, "the reply must come from the VIP (reverse NAT)");
    }
    let distinct: std::collections::BTreeSet<_> = names.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        distinct.len(),
        2,
        "both UDP backends answered: {distinct:?}"
    );
    assert!(big, "200 kB echoed intact through the VIP");
}

#[test]
fn a_service_without_ready_backends_refuses_at_once() {
    let mut lab = nginx_lab("refuse");
    lab.apply_yaml("echo.yaml", ECHO);
    let vip = lab.cluster_ip("nobody");
    let (tcp, tcp_took, udp) = lab.in_pod("default/client", move || {
        let started = Instant::now();
        let tcp = TcpStream::connect_timeout(&SocketAddr::from((vip, 80)), Duration::from_secs(3))
            .map(|_| ());
        let took = started.elapsed();
        let udp = udp_ask(SocketAddr::from((vip, 53)), b"hostname").map(|_| ());
        (tcp, took, udp)
    });
    eprintln!("TCP connect to a service without backends refused after {tcp_took:?}");
    assert_eq!(tcp.unwrap_err().kind(), ErrorKind::ConnectionRefused);
    assert_eq!(udp.unwrap_err().kind(), ErrorKind::ConnectionRefused);
}

#[test]
fn a_known_vip_on_an_unknown_port_is_dropped_with_a_reason() {
    let lab = nginx_lab("port");
    let vip = lab.cluster_ip("nginx-service");
    let maps = sluice_datapath::PinnedMaps::open(&lab.lab.pin_dir(&lab.node())).unwrap();
    let reason = sluice_common::DropReason::ServicePortUnknown;
    let index = sluice_common::metrics_index(reason.code(), sluice_common::METRIC_DIR_EGRESS);
    let dropped = || {
        maps.metrics
            .get(&index, 0)
            .unwrap()
            .iter()
            .map(|v| v.packets)
            .sum::<u64>()
    };
    let before = dropped();
    let err = lab.in_pod("default/client", move || {
        TcpStream::connect_timeout(&SocketAddr::from((vip, 8080)), Duration::from_millis(500))
            .unwrap_err()
    });
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    assert!(
        dropped() > before,
        "the SYN was counted under {}",
        reason.name()
    );
}

#[test]
fn a_pod_reaches_a_service_backed_by_itself_and_pods_reach_each_other() {
    let lab = nginx_lab("hairpin");
    let vip = SocketAddr::from((lab.cluster_ip("nginx-service"), 80));
    for pod in lab.pods_named("nginx-deployment") {
        let me = pod.split_once('/').unwrap().1.to_string();
        let answers = lab.in_pod(&pod, move || {
            (0..20).map(|_| http_get(vip).unwrap()).collect::<Vec<_>>()
        });
        assert!(
            answers.contains(&me),
            "{me} reached itself through the VIP (hairpin): {answers:?}"
        );
        let direct = SocketAddr::from((lab.pod_ip(&pod), 80));
        let answer = lab.in_pod("default/client", move || http_get(direct).unwrap());
        assert_eq!(answer, me, "pod to pod on one node");
    }
}

#[test]
fn verify_reports_drift_and_the_periodic_reconcile_repairs_it() {
    let lab = nginx_lab("drift");
    let api = lab.client();
    let clean: sluice_api::VerifyReport = api.verify(sluice_api::VerifyRequest::default()).unwrap();
    assert!(
        clean.drift.is_empty(),
        "fresh lab has no drift: {:?}",
        clean.drift
    );

    // Point slot 1 of the frontend at an address that serves nothing, behind the agent's back.
    let vip = lab.cluster_ip("nginx-service");
    let mut maps = sluice_datapath::PinnedMaps::open(&lab.lab.pin_dir(&lab.node())).unwrap();
    let key = sluice_common::Lb4Key::new(vip, 80, sluice_common::IPPROTO_TCP, 1);
    maps.services
        .insert(
            key,
            sluice_common::Lb4Service::slot("10.244.1.250".parse().unwrap(), 80),
            0,
        )
        .unwrap();

    let report: sluice_api::VerifyReport =
        api.verify(sluice_api::VerifyRequest::default()).unwrap();
    assert_eq!(report.drift.len(), 1, "{:?}", report.drift);
    assert_eq!(report.drift[0].kind, "differs");
    assert!(report.drift[0].key.contains("slot 1"));

    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let r: sluice_api::VerifyReport = api.verify(sluice_api::VerifyRequest::default()).unwrap();
        if r.drift.is_empty() {
            eprintln!(
                "periodic reconcile repaired the drift after {:?}",
                started.elapsed()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("drift not repaired within 10 s");
}

#[test]
fn traffic_keeps_flowing_while_the_agent_is_stopped() {
    let lab = nginx_lab("restart");
    let vip = SocketAddr::from((lab.cluster_ip("nginx-service"), 80));
    let pids = lab.agent_pids();
    assert_eq!(pids.len(), 1, "one agent: {pids:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let started = Instant::now();
    while !lab.agent_pids().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "agent did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Pinned maps and tcx links keep the datapath in the kernel without its agent.
    let answers = lab.in_pod("default/client", move || {
        (0..20).map(|_| http_get(vip)).collect::<Vec<_>>()
    });
    let distinct: std::collections::BTreeSet<_> = answers
        .into_iter()
        .map(|a| a.expect("request while the agent is down"))
        .collect();
    assert_eq!(distinct.len(), 2, "both backends still serve: {distinct:?}");
}
