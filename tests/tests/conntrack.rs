//! Conntrack end to end: a UDP client on a loop from one source port keeps its backend
//! until that backend's pod is deleted, then moves to the other at once, and the agent of
//! the client's node has purged the removed backend's service conntrack entries; on one
//! node, and with the client and the two backends on three nodes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test: a failed step must fail the test loudly"
)]

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use sluice_common::{CT_EGRESS, CT_SERVICE, IPPROTO_UDP};
use sluice_integration::{
    ONE_NODE_LAB, TestLab, in_netns,
    multinode::{Mode, pod_on, three_nodes},
};

const CLIENT_PORT: u16 = 40123;

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: default
spec:
  selector: {app: echo}
  ports:
  - {name: dns, port: 53, targetPort: 80, protocol: UDP}
";

/// One answer of the loop: when the datagram it answers was sent, and which pod answered.
struct Answer {
    sent: Instant,
    pod: String,
}

/// Asks `vip` for its hostname from `CLIENT_PORT` on one connected socket, again and again,
/// until `stop`; every answer goes to `answers`. Lost datagrams and the ICMP errors of a
/// vanishing pod are the loop's business, not failures.
fn ask_on_a_loop(vip: SocketAddr, stop: Arc<AtomicBool>, answers: mpsc::Sender<Answer>) {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, CLIENT_PORT)).expect("bind");
    socket.connect(vip).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let _ = socket.send(b"hostname");
        if let Ok(n) = socket.recv(&mut buf) {
            let pod = String::from_utf8_lossy(&buf[..n]).trim().to_string();
            if answers.send(Answer { sent, pod }).is_err() {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops the loop however the test ends.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The client on `nodes[0]`, backends echo-a and echo-b on `nodes[1]` and `nodes[2]`: the
/// loop keeps one backend, that backend's pod is deleted, the loop moves at once.
fn a_udp_loop_moves_when_its_backend_is_deleted(lab: &mut TestLab, nodes: [&str; 3]) {
    let pods = [
        pod_on("default", "client", nodes[0], "app: client"),
        pod_on("default", "echo-a", nodes[1], "app: echo"),
        pod_on("default", "echo-b", nodes[2], "app: echo"),
    ];
    lab.apply_yaml(
        "echo.yaml",
        &format!("{}---\n{SERVICE}", pods.join("---\n")),
    );
    let vip = SocketAddr::from((lab.cluster_ip("echo"), 53));

    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(Arc::clone(&stop));
    let (tx, answers) = mpsc::channel();
    let netns = lab.lab.pod_netns("default/client").unwrap();
    let client = std::thread::spawn({
        let stop = Arc::clone(&stop);
        move || in_netns(&netns, move || ask_on_a_loop(vip, stop, tx))
    });

    // The first answers: one source port, one connection, one backend.
    let first: Vec<Answer> = (0..10)
        .map(|_| {
            answers
                .recv_timeout(Duration::from_secs(5))
                .expect("an answer")
        })
        .collect();
    let chosen = first[0].pod.clone();
    assert!(
        first.iter().all(|a| a.pod == chosen),
        "one source port stays on one backend: {:?}",
        first.iter().map(|a| &a.pod).collect::<Vec<_>>()
    );
    let (gone, other) = if chosen == "echo-a" {
        (&pods[1], "echo-b")
    } else {
        (&pods[2], "echo-a")
    };
    let chosen_ip = lab.pod_ip(&format!("default/{chosen}"));

    let deleting = Instant::now();
    lab.delete_yaml("gone.yaml", gone);
    let deleted = Instant::now();

    // No conntrack entry of the client's node leads to the deleted backend any more.
    let maps = sluice_datapath::PinnedMaps::open(&lab.lab.pin_dir(nodes[0])).unwrap();
    let stale: Vec<_> = maps
        .conntrack
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, entry)| {
            key.proto == IPPROTO_UDP
                && match key.scope {
                    CT_SERVICE => entry.nat().is_some_and(|(a, _)| a == chosen_ip),
                    CT_EGRESS => entry.nat().is_some() && key.dst().0 == chosen_ip,
                    _ => false,
                }
        })
        .collect();
    assert!(stale.is_empty(), "entries left for {chosen}: {stale:?}");

    // Every datagram sent once the delete returned (every agent realized it) reaches the
    // other backend, the first one included.
    let mut moved = None;
    loop {
        let answer = answers
            .recv_timeout(Duration::from_secs(5))
            .expect("answers go on after the delete");
        if answer.pod == other {
            moved.get_or_insert(answer.sent);
        }
        if answer.sent >= deleted {
            assert_eq!(
                answer.pod, other,
                "after the delete the loop reaches the remaining backend"
            );
            break;
        }
    }
    let moved = moved.expect("the other backend answered");
    stop.store(true, Ordering::Relaxed);
    drop(answers);
    client.join().expect("the client loop");
    let took = moved.saturating_duration_since(deleting);
    eprintln!(
        "{nodes:?}: UDP loop moved from {chosen} to {other} {took:?} after the delete began \
         (the delete took {:?})",
        deleted - deleting
    );
    // The agents' reconcile interval in the lab (their default): the requirement's bound.
    assert!(
        took < Duration::from_secs(2),
        "moved within one reconcile interval: {took:?}"
    );
}

#[test]
fn a_udp_client_on_a_loop_moves_to_another_backend_when_its_backend_is_deleted() {
    let mut lab = TestLab::up("ct-udp", ONE_NODE_LAB);
    a_udp_loop_moves_when_its_backend_is_deleted(&mut lab, ["node-1"; 3]);
}

#[test]
fn across_nodes_too() {
    let mut lab = three_nodes("ct-udp-3", Mode::Tunnel);
    a_udp_loop_moves_when_its_backend_is_deleted(&mut lab, ["node-1", "node-2", "node-3"]);
}

/// A Service whose target port its backend does not serve: the backend's kernel answers
/// port unreachable, which crosses the tunnel and reaches the client's socket only
/// because to_container names the frontend again in it.
#[test]
fn a_backend_port_nobody_serves_is_refused_through_the_frontend_across_nodes() {
    let mut lab = three_nodes("ct-icmp-3", Mode::Tunnel);
    let closed = "apiVersion: v1
kind: Service
metadata:
  name: closed
  namespace: default
spec:
  selector: {app: echo}
  ports:
  - {name: dns, port: 54, targetPort: 81, protocol: UDP}
";
    let pods = [
        pod_on("default", "client", "node-1", "app: client"),
        pod_on("default", "echo-a", "node-2", "app: echo"),
    ];
    lab.apply_yaml(
        "closed.yaml",
        &format!("{}---\n{closed}", pods.join("---\n")),
    );
    let vip = SocketAddr::from((lab.cluster_ip("closed"), 54));
    let refused = lab.in_pod("default/client", move || {
        sluice_integration::udp_ask(vip, b"hostname").map(|_| ())
    });
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
}
