//! containerd itself calls the CNI plugins, driven through its CRI as a kubelet drives it:
//! RunPodSandbox makes the pod's network namespace and runs ADD, PodSandboxStatus reports
//! the address the plugins gave, StopPodSandbox and RemovePodSandbox run DEL. containerd
//! runs in a network namespace the test owns (the node), with a root, sockets and CNI
//! directories of its own; with `sluice-cni`, next to a real agent in that namespace.
//! Prints the RunPodSandbox latencies (needs root and bpffs; never skipped).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "end-to-end tests: a failed step must fail the test loudly"
)]

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use serde_json::json;
use sluice_integration::{
    cri::{Containerd, Sandbox},
    node::{AgentNode, POD_CIDR, pod, sluice_cni, snapshot},
};
use sluice_netns::OwnedNetNs;

/// Where Debian's containernetworking-plugins installs the reference plugins.
const CNI_PLUGINS: &str = "/usr/lib/cni";

fn reference_plugin(name: &str) -> PathBuf {
    let path = Path::new(CNI_PLUGINS).join(name);
    assert!(
        path.exists(),
        "{} missing: scripts/setup.sh installs containernetworking-plugins",
        path.display()
    );
    path
}

/// A server on `port` in the pod that answers `connections` connections with `reply`; the
/// listening socket it returns keeps the port open after that, so a connection that fails
/// later fails for another reason than a closed port.
fn serve(
    pod: &Sandbox,
    port: u16,
    connections: usize,
    reply: &'static str,
) -> (TcpListener, thread::JoinHandle<()>) {
    let bind = || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port));
    let listener = pod.netns.run(bind).unwrap().unwrap();
    let accepting = listener.try_clone().unwrap();
    let server = thread::spawn(move || {
        for _ in 0..connections {
            let (mut stream, _) = accepting.accept().unwrap();
            stream.write_all(reply.as_bytes()).unwrap();
        }
    });
    (listener, server)
}

/// Connects to `addr` and reads what the server says.
fn fetch(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// Development baseline without sluice: the reference `ptp` plugin with `host-local` IPAM,
/// so what this shows is containerd's part (sandbox, CNI ADD and DEL, status).
#[test]
fn containerd_runs_pod_sandboxes_through_reference_cni_plugins() {
    let started = Instant::now();
    let node = OwnedNetNs::unique("cri-node-").unwrap();
    let plugins = ["loopback", "ptp", "host-local"].map(reference_plugin);
    let plugins: Vec<&Path> = plugins.iter().map(PathBuf::as_path).collect();
    let mut containerd = Containerd::start(&node, &plugins, |dir| {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"cri-test","plugins":[{{"type":"ptp",
              "ipam":{{"type":"host-local","ranges":[[{{"subnet":"10.250.0.0/24"}}]],
              "dataDir":"{}/ipam"}}}}]}}"#,
            dir.display()
        )
    });
    let version = containerd.cri.version().unwrap();
    println!(
        "runtime {} {} (CRI {}), snapshotter {}",
        version.runtime_name,
        version.runtime_version,
        version.runtime_api_version,
        containerd.snapshotter()
    );

    let begin = Instant::now();
    let web = containerd
        .run_pod("default", "web")
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", containerd.log_tail()));
    let run_latency = begin.elapsed();
    let client = containerd.run_pod("default", "client").unwrap();
    println!(
        "RunPodSandbox with ptp: {run_latency:?}; web {}, client {}",
        web.ip, client.ip
    );

    assert!(web.ready && client.ready, "{web:?} {client:?}");
    let web_ip: Ipv4Addr = web.ip.parse().unwrap();
    assert!(web_ip.octets()[..3] == [10, 250, 0], "web got {web_ip}");
    assert_ne!(web.ip, client.ip);
    // host-local records each address it gave under the network's name.
    let lease = containerd.dir().join("ipam/cri-test").join(&web.ip);
    assert!(lease.exists(), "no lease {}", lease.display());

    // One connection from the node, one from the other pod.
    let (_listening, server) = serve(&web, 8080, 2, "web");
    let addr = SocketAddr::from((web_ip, 8080));
    assert_eq!(node.run(move || fetch(addr)).unwrap(), "web");
    assert_eq!(client.netns.run(move || fetch(addr)).unwrap(), "web");
    server.join().unwrap();

    // Stop and remove run DEL: the lease is released and the sandbox is gone.
    let begin = Instant::now();
    containerd.remove_pod(&web.id).unwrap();
    println!("StopPodSandbox + RemovePodSandbox: {:?}", begin.elapsed());
    assert!(!lease.exists(), "lease {} kept after DEL", lease.display());
    let left: Vec<String> = containerd
        .cri
        .list_pod_sandbox()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(left, [client.id.as_str()]);
    // Dropping the harness with `client` still running is what a failed test does: it
    // removes the sandbox, then the daemon and all it made.
    let footprint = containerd.footprint();
    drop(containerd);
    assert_eq!(footprint.remaining(), Vec::<String>::new());
    println!("test took {:?}", started.elapsed());
}

/// RunPodSandbox through `containerd`, timed; panics with the runtime's and agent's logs.
fn run_pod(containerd: &mut Containerd, node: &AgentNode, name: &str) -> (Sandbox, Duration) {
    let begin = Instant::now();
    let sandbox = containerd.run_pod("default", name).unwrap_or_else(|e| {
        panic!(
            "RunPodSandbox {name}: {e}\n{}\nagent log:\n{}",
            containerd.log_tail(),
            node.log_text()
        )
    });
    (sandbox, begin.elapsed())
}

/// containerd calls `sluice-cni` as under a kubelet: the agent gives each pod an address
/// of the node's podCIDR and polices it from its first packet; a pod reaches another, a
/// NetworkPolicy keeps out the pod it does not admit, a pod the agent cannot admit fails
/// RunPodSandbox with the plugin's reason and leaves nothing, and removal (DEL) takes the
/// endpoint out of the agent.
#[test]
fn containerd_attaches_pods_through_sluice_cni() {
    let started = Instant::now();
    let objects = json!({
        "pods": [pod("web", "web", Some(8080)), pod("client", "client", None),
                 pod("denied", "denied", None)],
        "networkPolicies": [{
            "metadata": {"name": "web-from-client", "namespace": "default"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                  "ports": [{"port": 8080, "protocol": "TCP"}]}]},
        }],
    });
    // A Pod the source does not know is waited for this long before ADD fails.
    let node = AgentNode::start("cri", &snapshot(1, &objects), &["--cni-add-timeout", "1"]);
    let plugins = [reference_plugin("loopback"), sluice_cni()];
    let plugins: Vec<&Path> = plugins.iter().map(PathBuf::as_path).collect();
    // The network configuration of the DaemonSet's conflist, with this node's socket.
    let socket = node.socket.display().to_string();
    let mut containerd = Containerd::start(&node.netns, &plugins, |_| {
        json!({"cniVersion": "1.0.0", "name": "sluice",
               "plugins": [{"type": "sluice-cni", "agentSocket": socket}]})
        .to_string()
    });

    let (web, web_latency) = run_pod(&mut containerd, &node, "web");
    let (client, client_latency) = run_pod(&mut containerd, &node, "client");
    let (denied, denied_latency) = run_pod(&mut containerd, &node, "denied");
    println!(
        "RunPodSandbox with sluice-cni: {web_latency:?}, {client_latency:?}, {denied_latency:?}"
    );

    assert!(web.ready && client.ready && denied.ready);
    let cidr: ipnet::Ipv4Net = POD_CIDR.parse().unwrap();
    let web_ip: Ipv4Addr = web.ip.parse().unwrap();
    assert!(cidr.contains(&web_ip), "web got {web_ip}, not of {cidr}");
    let endpoints = node.client().endpoints().unwrap();
    let endpoint = endpoints
        .iter()
        .find(|e| e.namespace == "default" && e.pod == "web")
        .unwrap_or_else(|| panic!("no endpoint for default/web in {endpoints:?}"));
    assert_eq!(endpoint.ipv4, web_ip);
    assert!(endpoint.ingress_enforced, "{endpoint:?}");
    assert_eq!(endpoint.policies, ["default/web-from-client"]);
    // The plugin ran where containerd runs: the pod's host-side veth is in the node's
    // namespace, not in the root one.
    assert!(
        node.netns
            .netlink()
            .unwrap()
            .index(&endpoint.interface)
            .is_ok()
    );
    let root = sluice_netns::Netlink::current().unwrap();
    assert!(
        root.index(&endpoint.interface).is_err(),
        "{} in the root namespace",
        endpoint.interface
    );

    let (_listening, server) = serve(&web, 8080, 1, "web");
    let addr = SocketAddr::from((web_ip, 8080));
    assert_eq!(client.netns.run(move || fetch(addr)).unwrap(), "web");
    // web still listens: only the policy can keep the handshake from completing.
    let connect = move || TcpStream::connect_timeout(&addr, Duration::from_secs(2));
    let refused = denied.netns.run(connect).unwrap();
    assert!(refused.is_err(), "denied reached web: {refused:?}");
    server.join().unwrap();

    // No Pod object: the plugin's error reaches the CRI caller, as a kubelet would log it,
    // and containerd's own cleanup after the failed ADD (DEL) leaves no endpoint.
    let error = containerd.run_pod("default", "ghost").unwrap_err();
    println!(
        "RunPodSandbox of a pod the agent does not know: {}",
        error.message()
    );
    assert!(error.message().contains("default/ghost"), "{error}");
    let endpoints = node.client().endpoints().unwrap();
    assert!(!endpoints.iter().any(|e| e.pod == "ghost"), "{endpoints:?}");
    let sandboxes = containerd.cri.list_pod_sandbox().unwrap();
    assert_eq!(sandboxes.len(), 3, "{sandboxes:?}");

    let begin = Instant::now();
    containerd.remove_pod(&web.id).unwrap();
    println!("StopPodSandbox + RemovePodSandbox: {:?}", begin.elapsed());
    // DEL returns once the agent dropped its record; the endpoint leaves the published
    // state with the pass that follows, so wait for that pass (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let endpoints = loop {
        let endpoints = node.client().endpoints().unwrap();
        if !endpoints.iter().any(|e| e.pod == "web") || Instant::now() > deadline {
            break endpoints;
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !endpoints.iter().any(|e| e.pod == "web"),
        "default/web still an endpoint 10 s after DEL: {endpoints:?}"
    );
    let footprint = containerd.footprint();
    drop(containerd);
    assert_eq!(footprint.remaining(), Vec::<String>::new());
    // The sandboxes the harness removed on drop went through DEL too.
    assert_eq!(node.client().endpoints().unwrap().len(), 0);
    println!("test took {:?}", started.elapsed());
}
