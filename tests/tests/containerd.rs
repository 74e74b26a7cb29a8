//! containerd itself calls the CNI plugins, driven through its CRI as a kubelet drives it:
//! RunPodSandbox makes the pod's network namespace and runs ADD, PodSandboxStatus reports
//! the address the plugins gave, StopPodSandbox and RemovePodSandbox run DEL. containerd
//! runs in a network namespace the test owns (the node), with a root, sockets and CNI
//! directories of its own.

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

use sluice_integration::cri::{Containerd, Sandbox};
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

/// A server on `port` in the pod that answers each connection with `reply`.
fn serve(pod: &Sandbox, port: u16, reply: &'static str) -> thread::JoinHandle<()> {
    let listener = pod.run_in(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap());
    thread::spawn(move || {
        // One connection from the node, one from the other pod.
        for _ in 0..2 {
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(reply.as_bytes()).unwrap();
        }
    })
}

fn fetch(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
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

    let web_ip: Ipv4Addr = web.ip.parse().unwrap();
    assert!(web_ip.octets()[..3] == [10, 250, 0], "web got {web_ip}");
    assert_ne!(web.ip, client.ip);
    // host-local records each address it gave under the network's name.
    let lease = containerd.dir().join("ipam/cri-test").join(&web.ip);
    assert!(lease.exists(), "no lease {}", lease.display());

    let server = serve(&web, 8080, "web");
    let addr = SocketAddr::from((web_ip, 8080));
    assert_eq!(node.run(move || fetch(addr)).unwrap(), "web");
    assert_eq!(client.run_in(move || fetch(addr)), "web");
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
    drop(containerd);
    println!("test took {:?}", started.elapsed());
}
