//! The lab on the real kernel, without agents (bare routing): namespaces, veths, pod servers
//! and real packets between them. Needs root; fails (never skips) without it.

// Helpers outside #[test] functions are test code too.
#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeSet,
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use sluice_lab::{
    Lab, LabBinaries, LabError, LabOptions, ProbeOptions, ProbeRequest, Protocol, Via,
};
use sluice_netns::NetNs;
use sluice_store::Snapshot;

mod support;

use support::{agent_bin, examples, netns_of, script, sluice_bin, unique};

/// A lab with a unique name and a unique temporary state root, torn down on drop (also when
/// the test fails).
struct TestLab {
    lab: Lab,
    name: String,
    opts: LabOptions,
    tmp: PathBuf,
}

fn options(tmp: &Path) -> LabOptions {
    LabOptions {
        binaries: LabBinaries {
            sluice: sluice_bin(),
            agent: None,
        },
        state_root: tmp.join("state"),
    }
}

fn test_dir(name: &str) -> PathBuf {
    let tmp = std::env::temp_dir().join(format!("sluice-lab-test-{name}"));
    fs::create_dir_all(&tmp).unwrap();
    tmp
}

impl TestLab {
    /// Without agents: bare routing.
    fn up(name: &str) -> Self {
        let tmp = test_dir(name);
        let opts = options(&tmp);
        Self::start(name, tmp, opts)
    }

    /// With [`FAKE_AGENT`] as every node's agent.
    fn up_with_fake_agent(name: &str) -> Self {
        let tmp = test_dir(name);
        let handler = script(&tmp.join("handler.sh"), FAKE_AGENT_HANDLER);
        let agent = FAKE_AGENT.replace("HANDLER", &handler.display().to_string());
        let mut opts = options(&tmp);
        opts.binaries.agent = Some(script(&tmp.join("agent.sh"), &agent));
        Self::start(name, tmp, opts)
    }

    /// Bare routing, from another lab file.
    fn up_from(name: &str, lab_file: &str) -> Self {
        let tmp = test_dir(name);
        let opts = options(&tmp);
        Self::start_from(name, tmp, opts, lab_file)
    }

    /// With the real sluice-agent on every node: the dataplane that makes ClusterIPs work.
    fn up_with_agent(name: &str, lab_file: &str) -> Self {
        let tmp = test_dir(name);
        let mut opts = options(&tmp);
        opts.binaries.agent = Some(agent_bin());
        Self::start_from(name, tmp, opts, lab_file)
    }

    fn start(name: &str, tmp: PathBuf, opts: LabOptions) -> Self {
        Self::start_from(name, tmp, opts, "lab.yaml")
    }

    fn start_from(name: &str, tmp: PathBuf, opts: LabOptions, lab_file: &str) -> Self {
        Self::start_at(name, tmp, opts, &examples().join(lab_file))
    }

    fn start_at(name: &str, tmp: PathBuf, opts: LabOptions, lab_file: &Path) -> Self {
        let lab = match Lab::up(name, lab_file, &opts) {
            Ok(lab) => lab,
            Err(e) => {
                let _ = Lab::down(name, &opts);
                let _ = fs::remove_dir_all(&tmp);
                panic!("lab up {name}: {e}");
            }
        };
        Self {
            lab,
            name: name.to_string(),
            opts,
            tmp,
        }
    }

    fn write(&self, file: &str, yaml: &str) -> PathBuf {
        let path = self.tmp.join(file);
        fs::write(&path, yaml).unwrap();
        path
    }

    fn apply(&mut self, paths: &[PathBuf]) -> sluice_lab::ApplyReport {
        self.lab
            .apply(paths)
            .unwrap_or_else(|e| panic!("apply {paths:?}: {e}"))
    }

    fn nginx_pods(&self) -> Vec<(String, Ipv4Addr)> {
        self.lab
            .pods()
            .into_iter()
            .filter(|p| p.name.starts_with("nginx-deployment-"))
            .map(|p| (p.name, p.ip.unwrap()))
            .collect()
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot::read_file(&self.lab.cluster_file()).unwrap()
    }

    /// `curl` from a pod: the body, or the error.
    fn curl(&self, pod: &str, url: &str) -> Result<String, String> {
        let out = self
            .lab
            .pod_command(pod, "curl")
            .unwrap()
            .args(["-sS", "--max-time", "3", url])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if let Err(e) = Lab::down(&self.name, &self.opts) {
            eprintln!("lab down {}: {e}", self.name);
        }
        let _ = fs::remove_dir_all(&self.tmp);
    }
}

/// Runs `f` on a thread of its own inside `/run/netns/<netns>`.
fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    NetNs::named(netns).run(f).unwrap()
}

fn netns_list() -> BTreeSet<String> {
    NetNs::list().into_iter().collect()
}

/// Pids of the processes whose network namespace is `/run/netns/<netns>`.
fn pids_in(netns: &str) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Some(target) = NetNs::named(netns).id() else {
        return Vec::new();
    };
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == target)
        })
        .collect()
}

const ECHO_POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: echo
  labels: {app: echo}
spec:
  containers:
  - name: echo
    image: registry.k8s.io/e2e-test-images/agnhost:2.53
    ports:
    - {name: http, containerPort: 80}
    - {name: dns, containerPort: 53, protocol: UDP}
    - {name: dns-tcp, containerPort: 53, protocol: TCP}
";

#[test]
fn pods_serve_http_tcp_echo_and_udp_over_real_routes() {
    let mut t = TestLab::up(&unique("lt"));
    let report = t.apply(&[
        examples().join("nginx.yaml"),
        examples().join("client.yaml"),
    ]);
    assert_eq!(
        report.lines(),
        [
            "deployment.apps/nginx-deployment created",
            "service/nginx-service created",
            "pod/client created"
        ]
    );
    eprintln!("apply of nginx + client took {:?}", report.realized_in);
    let pods = t.lab.pods();
    assert_eq!(pods.len(), 3);
    assert!(
        pods.iter()
            .all(|p| p.ready && p.status == "Running" && p.node == "node-1"),
        "{pods:?}"
    );
    let svc = &t.lab.services()[0];
    assert_eq!(
        (
            svc.name.as_str(),
            svc.kind.as_str(),
            svc.cluster_ip.as_str(),
            svc.ports.as_str()
        ),
        ("nginx-service", "ClusterIP", "10.96.0.10", "80/TCP")
    );

    let nginx = t.nginx_pods();
    assert_eq!(nginx.len(), 2);
    let mut expect_endpoints: Vec<String> =
        nginx.iter().map(|(_, ip)| format!("{ip}:80")).collect();
    expect_endpoints.sort();
    assert_eq!(t.lab.endpoints()[0].endpoints, expect_endpoints.join(","));
    for (name, ip) in &nginx {
        assert_eq!(
            t.curl("default/client", &format!("http://{ip}/")).unwrap(),
            format!("{name}\n")
        );
        assert_eq!(
            t.curl("client", &format!("http://{ip}/any/path")).unwrap(),
            format!("{name}\n")
        );
    }

    // What the agents would read.
    let snapshot = t.snapshot();
    assert_eq!(snapshot.revision, t.lab.generation());
    assert_eq!(snapshot.pods.len(), 3);
    assert_eq!(snapshot.endpoints.len(), 3);
    let slice = &snapshot.endpoint_slices[0];
    assert_eq!(slice.endpoints.len(), 2);
    assert!(
        slice
            .endpoints
            .iter()
            .all(|e| e.conditions.as_ref().unwrap().ready == Some(true))
    );

    // tx checksum offload is off on the host side, as the lab file asks.
    let lxc = &snapshot.endpoints[0].interface;
    let node = NetNs::named(t.lab.node_netns("node-1"));
    // `ethtool -k`'s "tx-checksumming: off".
    assert!(!node.tx_checksum(lxc).unwrap());
    let node_sysctl = |key: &str| node.sysctl(key).unwrap();
    assert_eq!(node_sysctl("net.ipv4.ip_forward"), "1");
    assert_eq!(node_sysctl(&format!("net.ipv4.conf.{lxc}.rp_filter")), "0");
    assert_eq!(node_sysctl("net.ipv4.conf.all.rp_filter"), "0");

    // UDP and TCP echo, from a thread inside the client pod.
    t.apply(&[t.write("echo.yaml", ECHO_POD)]);
    let echo_ip = t
        .lab
        .pods()
        .into_iter()
        .find(|p| p.name == "echo")
        .unwrap()
        .ip
        .unwrap();
    let client_netns = t.lab.pod_netns("default/client").unwrap();
    let (hostname, echoed, tcp_echo, keep_alive) = in_netns(&client_netns, move || {
        let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        udp.connect(SocketAddr::from((echo_ip, 53))).unwrap();
        let mut buf = [0u8; 2048];
        udp.send(b"hostname\n").unwrap();
        let n = udp.recv(&mut buf).unwrap();
        let hostname = String::from_utf8_lossy(&buf[..n]).into_owned();
        udp.send(b"ping 123").unwrap();
        let n = udp.recv(&mut buf).unwrap();
        let echoed = String::from_utf8_lossy(&buf[..n]).into_owned();

        let mut tcp =
            TcpStream::connect_timeout(&SocketAddr::from((echo_ip, 53)), Duration::from_secs(2))
                .unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        tcp.write_all(b"hello over tcp").unwrap();
        let mut got = vec![0u8; 14];
        tcp.read_exact(&mut got).unwrap();

        // Two requests on one connection, then Connection: close ends it.
        let mut http =
            TcpStream::connect_timeout(&SocketAddr::from((echo_ip, 80)), Duration::from_secs(2))
                .unwrap();
        http.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut all = String::new();
        http.read_to_string(&mut all).unwrap();
        (
            hostname,
            echoed,
            String::from_utf8_lossy(&got).into_owned(),
            all,
        )
    });
    assert_eq!(hostname, "echo");
    assert_eq!(echoed, "ping 123");
    assert_eq!(tcp_echo, "hello over tcp");
    assert_eq!(
        keep_alive.matches("HTTP/1.1 200 OK").count(),
        2,
        "{keep_alive}"
    );
    assert!(
        keep_alive.ends_with("Connection: close\r\n\r\necho\n"),
        "{keep_alive}"
    );

    // Deleting the Deployment removes its pods, their namespaces and their servers.
    let netns_before = netns_of(&t.name);
    let report = t.lab.delete(&[examples().join("nginx.yaml")]).unwrap();
    assert_eq!(
        report.lines(),
        [
            "deployment.apps \"nginx-deployment\" deleted",
            "service \"nginx-service\" deleted"
        ]
    );
    assert!(t.nginx_pods().is_empty());
    let gone: Vec<_> = netns_before
        .difference(&netns_of(&t.name))
        .cloned()
        .collect();
    assert_eq!(gone.len(), 2, "{gone:?}");
    assert!(
        t.curl("client", &format!("http://{}/", nginx[0].1))
            .is_err()
    );
}

#[test]
fn scaling_two_three_one_changes_pods_and_slices() {
    let mut t = TestLab::up(&unique("ls"));
    let nginx = fs::read_to_string(examples().join("nginx.yaml")).unwrap();
    t.apply(&[
        examples().join("nginx.yaml"),
        examples().join("client.yaml"),
    ]);
    let two: BTreeSet<_> = t.nginx_pods().into_iter().collect();
    let generation = t.lab.generation();

    let report = t.apply(&[t.write("nginx.yaml", &nginx.replace("replicas: 2", "replicas: 3"))]);
    eprintln!(
        "scale 2→3: {:?} in {:?}",
        report.lines(),
        report.realized_in
    );
    assert_eq!(
        report.lines()[0],
        "deployment.apps/nginx-deployment configured"
    );
    assert_eq!(report.lines()[1], "service/nginx-service unchanged");
    assert_eq!(report.generation, generation + 1);
    let three: BTreeSet<_> = t.nginx_pods().into_iter().collect();
    assert_eq!(three.len(), 3);
    assert!(two.is_subset(&three));
    let (new_name, new_ip) = three.difference(&two).next().unwrap().clone();
    assert_eq!(
        t.curl("client", &format!("http://{new_ip}/")).unwrap(),
        format!("{new_name}\n")
    );
    assert_eq!(t.snapshot().endpoint_slices[0].endpoints.len(), 3);
    assert_eq!(t.lab.endpoints()[0].endpoints.split(',').count(), 3);

    let report = t.apply(&[t.write("nginx.yaml", &nginx.replace("replicas: 2", "replicas: 1"))]);
    eprintln!(
        "scale 3→1: {:?} in {:?}",
        report.lines(),
        report.realized_in
    );
    // Terminating first, then removed: two generations.
    assert_eq!(report.generation, generation + 3);
    let one = t.nginx_pods();
    assert_eq!(one.len(), 1);
    let slice = &t.snapshot().endpoint_slices[0];
    assert_eq!(slice.endpoints.len(), 1);
    assert_eq!(slice.endpoints[0].addresses, [one[0].1.to_string()]);
    for (name, ip) in three.iter().filter(|(n, _)| *n != one[0].0) {
        let netns = format!("sluice-{}-default-{name}", t.name);
        assert!(!netns_list().contains(&netns), "{netns} was removed");
        assert!(
            t.curl("client", &format!("http://{ip}/")).is_err(),
            "{name} no longer answers"
        );
    }
    assert_eq!(
        t.curl("client", &format!("http://{}/", one[0].1)).unwrap(),
        format!("{}\n", one[0].0)
    );
}

#[test]
fn two_labs_with_related_names_coexist_and_go_down_separately() {
    let first = unique("lc");
    // `<first>-2` shares the netns prefix of `<first>`: down of one must not touch the other.
    let mut a = TestLab::up(&first);
    let mut b = TestLab::up(&format!("{first}-2"));
    for t in [&mut a, &mut b] {
        t.apply(&[
            examples().join("nginx.yaml"),
            examples().join("client.yaml"),
        ]);
    }
    // Same addresses in both labs, each answering with its own pod names.
    for t in [&a, &b] {
        let (name, ip) = t.nginx_pods()[0].clone();
        assert_eq!(
            t.curl("client", &format!("http://{ip}/")).unwrap(),
            format!("{name}\n")
        );
    }
    assert_eq!(Lab::list(&a.opts).unwrap(), [a.name.clone()]);

    let b_netns = netns_of(&b.name);
    assert_eq!(b_netns.len(), 4);
    Lab::down(&a.name, &a.opts).unwrap();
    assert!(
        netns_list().is_superset(&b_netns),
        "lab {} kept its namespaces",
        b.name
    );
    let (name, ip) = b.nginx_pods()[0].clone();
    assert_eq!(
        b.curl("client", &format!("http://{ip}/")).unwrap(),
        format!("{name}\n")
    );
}

#[test]
fn down_removes_everything_even_with_damaged_state() {
    let t = TestLab::up(&unique("ld"));
    let mut lab = Lab::open(&t.name, &t.opts).unwrap();
    lab.apply(&[
        examples().join("nginx.yaml"),
        examples().join("client.yaml"),
    ])
    .unwrap();
    let netns = netns_of(&t.name);
    assert_eq!(netns.len(), 4, "{netns:?}");
    let pids: Vec<u32> = netns.iter().flat_map(|n| pids_in(n)).collect();
    assert_eq!(pids.len(), 3, "one server per pod");
    // What an agent would have pinned.
    let pins = lab.pin_dir("node-1");
    fs::create_dir_all(&pins).unwrap();
    let state_dir = t.opts.state_root.join(&t.name);
    fs::write(state_dir.join("lab.json"), b"{ damaged").unwrap();
    assert!(matches!(
        Lab::open(&t.name, &t.opts),
        Err(LabError::State { .. })
    ));

    Lab::down(&t.name, &t.opts).unwrap();
    assert!(netns_of(&t.name).is_empty(), "{:?}", netns_of(&t.name));
    for pid in pids {
        // Reaped by the lab's reaper thread right after it died.
        let proc = PathBuf::from(format!("/proc/{pid}"));
        for _ in 0..100 {
            if !proc.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!proc.exists(), "process {pid} is gone");
    }
    assert!(!pins.exists() && !pins.parent().unwrap().exists());
    assert!(!state_dir.exists());
    assert!(Lab::list(&t.opts).unwrap().is_empty());
    // Idempotent.
    Lab::down(&t.name, &t.opts).unwrap();
}

#[test]
fn down_finds_namespaces_without_any_state() {
    let t = TestLab::up(&unique("lz"));
    let mut lab = Lab::open(&t.name, &t.opts).unwrap();
    lab.apply(&[examples().join("client.yaml")]).unwrap();
    // The whole state directory is gone: only the interfaces' aliases are left.
    fs::remove_dir_all(t.opts.state_root.join(&t.name)).unwrap();
    assert_eq!(netns_of(&t.name).len(), 2);
    Lab::down(&t.name, &t.opts).unwrap();
    assert!(netns_of(&t.name).is_empty());
}

#[test]
fn a_failing_apply_changes_nothing() {
    let mut t = TestLab::up(&unique("lf"));
    t.apply(&[examples().join("nginx.yaml")]);
    let dir = t.opts.state_root.join(&t.name);
    let files = || {
        (
            fs::read(dir.join("lab.json")).unwrap(),
            fs::read(dir.join("cluster.json")).unwrap(),
        )
    };
    let before = (files(), netns_of(&t.name), t.lab.generation());
    let cases = [
        (
            "bad-yaml.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n",
            "bad-yaml.yaml",
        ),
        (
            "no-selector.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: lonely}\nspec:\n  ports:\n  - port: 80\n",
            "spec.selector",
        ),
        (
            "half.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: extra}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: extra}}\n  template:\n    metadata: {labels: {app: extra}}\n    spec: {containers: [{name: c, image: x}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: nowhere}\nspec: {containers: [{name: c, image: x}]}\n",
            "metadata.namespace",
        ),
        (
            "taken.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: c, image: x}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: a}\n  ports: [{port: 80}]\n",
            "spec.clusterIP",
        ),
    ];
    for (file, yaml, expect) in cases {
        let err = t
            .lab
            .apply(&[t.write(file, yaml)])
            .expect_err(file)
            .to_string();
        eprintln!("{err}");
        assert!(err.contains(file) && err.contains(expect), "{file}: {err}");
        assert_eq!(
            (files(), netns_of(&t.name), t.lab.generation()),
            before,
            "{file} changed nothing"
        );
    }
    assert_eq!(t.lab.pods().len(), 2);
    assert_eq!(t.lab.services().len(), 1);
}

#[test]
fn up_refuses_an_existing_lab_and_a_bad_lab_file() {
    let t = TestLab::up(&unique("le"));
    let err = Lab::up(&t.name, &examples().join("lab.yaml"), &t.opts)
        .err()
        .unwrap();
    assert!(matches!(err, LabError::Exists { .. }), "{err}");
    // The refused `up` left the existing lab alone.
    assert_eq!(netns_of(&t.name).len(), 1);

    let other = unique("lb");
    let bad = t.tmp.join("bad-lab.yaml");
    fs::write(&bad, "apiVersion: sluice.dev/v1alpha1\nkind: Lab\nnodes:\n- {name: a, podCIDR: 10.244.1.0/24}\n- {name: a, podCIDR: 10.244.2.0/24}\n").unwrap();
    let err = Lab::up(&other, &bad, &options(&t.tmp))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nodes[1].name: duplicate node name"), "{err}");
    assert!(netns_of(&other).is_empty());
}

/// A stand-in for sluice-agent with the same arguments: it serves `status` on the API socket
/// from inside the node's network namespace, where the lab starts agents (so `lab down`
/// must find it there), through socat and [`FAKE_AGENT_HANDLER`].
const FAKE_AGENT: &str = r#"#!/bin/sh
while [ $# -gt 1 ]; do
  case "$1" in
    --netns) netns=$2 ;;
    --cluster-file) cluster=$2 ;;
    --api-socket) sock=$2 ;;
  esac
  shift 2
done
record_dir=$(dirname "$sock")
export cluster record_dir
echo "fake agent for $netns"
exec socat UNIX-LISTEN:"$sock",fork EXEC:HANDLER
"#;

/// Answers one status request (`GET /v1/status`, HTTP/1.1): the revision in cluster.json
/// counts as realized at once. The first time it reports a generation it keeps that
/// snapshot (`gen-N.json`) and the network namespaces that existed at that moment
/// (`gen-N.netns`).
const FAKE_AGENT_HANDLER: &str = r#"#!/bin/sh
cr=$(printf '\r')
while IFS= read -r line && [ "${line%"$cr"}" != "" ]; do :; done
copy="$record_dir/now.$$"
cp "$cluster" "$copy"
gen=$(sed -n 's/^  "revision": \([0-9]*\),$/\1/p' "$copy")
if [ -e "$record_dir/gen-$gen.json" ]; then
  rm -f "$copy"
else
  ls /run/netns > "$record_dir/gen-$gen.netns"
  mv "$copy" "$record_dir/gen-$gen.json"
fi
body=$(printf '{"node":"fake","version":"0","healthy":true,"desired_generation":%s,"realized_generation":%s,"desired_revision":%s,"realized_revision":%s,"last_error":null,"reconciles":0,"endpoints":0,"maps":[]}' "$gen" "$gen" "$gen" "$gen")
printf 'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' "${#body}" "$body"
"#;

#[test]
fn pods_are_removed_only_after_agents_realized_their_termination() {
    let mut t = TestLab::up_with_fake_agent(&unique("la"));
    let node_dir = t.opts.state_root.join(&t.name).join("nodes/node-1");
    assert!(
        node_dir.join("gen-1.json").exists(),
        "up waited for the agent's first status"
    );
    let agent_pids = pids_in(&t.lab.node_netns("node-1"));
    assert!(
        !agent_pids.is_empty(),
        "the agent runs in the node's namespace"
    );

    let nginx = fs::read_to_string(examples().join("nginx.yaml")).unwrap();
    let report = t.apply(&[
        t.write("nginx.yaml", &nginx),
        examples().join("client.yaml"),
    ]);
    assert_eq!(report.generation, 2);
    let three = t.apply(&[t.write("nginx.yaml", &nginx.replace("replicas: 2", "replicas: 3"))]);
    assert_eq!(three.generation, 3);
    let before: BTreeSet<_> = t.nginx_pods().into_iter().map(|(n, _)| n).collect();
    let report = t.apply(&[t.write("nginx.yaml", &nginx.replace("replicas: 2", "replicas: 1"))]);
    eprintln!("scale 3→1 with a (fake) agent: {:?}", report.realized_in);
    assert_eq!(
        report.generation, 5,
        "one generation to terminate, one to remove"
    );
    let after: BTreeSet<_> = t.nginx_pods().into_iter().map(|(n, _)| n).collect();
    let removed: Vec<_> = before.difference(&after).cloned().collect();
    assert_eq!(removed.len(), 2);

    // Generation 4: the two pods terminating, out of the slice's ready endpoints, and still
    // there when the agent reported it realized.
    let terminating = Snapshot::read_file(&node_dir.join("gen-4.json")).unwrap();
    let netns_then = fs::read_to_string(node_dir.join("gen-4.netns")).unwrap();
    for name in &removed {
        let pod = terminating
            .pods
            .iter()
            .find(|p| p.name() == Some(name.as_str()))
            .unwrap();
        assert!(
            pod.deletion_timestamp().is_some(),
            "{name} terminating in generation 4"
        );
        let netns = format!("sluice-{}-default-{name}", t.name);
        assert!(
            netns_then.lines().any(|l| l.starts_with(&netns)),
            "{netns} existed when generation 4 was realized"
        );
        assert!(!netns_list().contains(&netns), "{netns} is gone now");
    }
    let slice = &terminating.endpoint_slices[0];
    let ready = slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().unwrap().ready == Some(true))
        .count();
    let ending = slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().unwrap().terminating == Some(true))
        .count();
    assert_eq!((slice.endpoints.len(), ready, ending), (3, 1, 2));
    // Generation 5: gone from pods, endpoints and slices.
    let last = Snapshot::read_file(&node_dir.join("gen-5.json")).unwrap();
    assert_eq!(last.endpoint_slices[0].endpoints.len(), 1);
    assert_eq!(last.pods.len(), 2);
    assert_eq!(last.endpoints.len(), 2);

    Lab::down(&t.name, &t.opts).unwrap();
    for pid in agent_pids {
        assert!(
            !Path::new(&format!("/proc/{pid}/ns/net")).exists(),
            "agent {pid} stopped by down"
        );
    }
}

#[test]
fn up_fails_with_the_log_of_an_agent_that_exits_and_leaves_nothing() {
    let name = unique("lx");
    let tmp = test_dir(&name);
    let mut opts = options(&tmp);
    opts.binaries.agent = Some(script(
        &tmp.join("agent.sh"),
        "#!/bin/sh\necho 'fake agent: cannot load the datapath' >&2\nexit 3\n",
    ));
    let err = Lab::up(&name, &examples().join("lab.yaml"), &opts)
        .err()
        .unwrap();
    let text = err.to_string();
    let _ = fs::remove_dir_all(&tmp);
    assert!(matches!(err, LabError::AgentExited { .. }), "{text}");
    assert!(
        text.contains("agent of node node-1 exited") && text.contains("cannot load the datapath"),
        "{text}"
    );
    assert!(netns_of(&name).is_empty());
    assert!(!opts.state_root.join(&name).exists());
}

const WORLD_ADDRESS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

fn pod_ip(lab: &Lab, name: &str) -> Ipv4Addr {
    lab.pods()
        .into_iter()
        .find(|p| p.name == name)
        .and_then(|p| p.ip)
        .unwrap()
}

/// The conformance model's shape, in one namespace: pods a, b, c with their own Services.
fn probe_pods() -> PathBuf {
    examples().join("probe-pods.yaml")
}

fn all_ports() -> ProbeRequest {
    ProbeRequest {
        ports: vec![80, 81],
        protocols: vec![Protocol::Tcp, Protocol::Udp],
        ..Default::default()
    }
}

#[test]
fn world_hosts_reach_pods_and_pods_reach_them() {
    let mut t = TestLab::up_from(&unique("lw"), "lab-world.yaml");
    let world_netns = format!("sluice-{}-world-internet", t.name);
    assert!(netns_list().contains(&world_netns));
    let hosts = t.lab.world_hosts();
    assert_eq!(hosts.len(), 1);
    assert_eq!(
        (
            hosts[0].name.as_str(),
            hosts[0].address,
            hosts[0].node.as_str(),
            hosts[0].ports.as_str(),
            hosts[0].netns.as_str()
        ),
        (
            "internet",
            WORLD_ADDRESS,
            "node-1",
            "80/TCP,81/TCP,80/UDP,81/UDP",
            world_netns.as_str()
        )
    );
    assert_eq!(t.lab.netns_of("world/internet").unwrap(), world_netns);
    let server_pids = pids_in(&world_netns);
    assert_eq!(server_pids.len(), 1, "one server in the world host");

    t.apply(&[examples().join("client.yaml"), probe_pods()]);
    // Pod to world: the world host's server answers HTTP with its name.
    assert_eq!(
        t.curl("default/client", &format!("http://{WORLD_ADDRESS}/"))
            .unwrap(),
        "internet\n"
    );
    // World to pod, through `lab exec world/internet`'s way into the namespace.
    let a = pod_ip(&t.lab, "a");
    let out = t
        .lab
        .command_in("world/internet", "curl")
        .unwrap()
        .args(["-sS", "--max-time", "3", &format!("http://{a}:81/")])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "a\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The world host's source address is its own: it is outside the cluster, not NATed.
    let seen = in_netns(&world_netns, move || {
        let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        udp.connect(SocketAddr::from((a, 80))).unwrap();
        udp.send(b"hostname").unwrap();
        let mut buf = [0u8; 64];
        let n = udp.recv(&mut buf).unwrap();
        (
            String::from_utf8_lossy(&buf[..n]).into_owned(),
            udp.local_addr().unwrap(),
        )
    });
    assert_eq!(seen.0, "a");
    assert_eq!(seen.1.ip(), std::net::IpAddr::V4(WORLD_ADDRESS));
    // Both probe directions through the library.
    let options = ProbeOptions::default();
    for (from, to) in [
        ("default/a", "world/internet"),
        ("world/internet", "default/a"),
    ] {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let p = t.lab.probe_one(from, to, 80, protocol, &options).unwrap();
            assert!(p.allowed, "{p:?}");
        }
    }

    // `lab down` takes the world host and its server too.
    Lab::down(&t.name, &t.opts).unwrap();
    assert!(!netns_list().contains(&world_netns));
    for pid in server_pids {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        for _ in 0..100 {
            if !proc.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!proc.exists(), "world server {pid} is gone");
    }
}

#[test]
fn a_pod_may_not_take_a_world_hosts_namespace_name() {
    let mut t = TestLab::up_from(&unique("ln"), "lab-world.yaml");
    let clash = "apiVersion: v1\nkind: Namespace\nmetadata: {name: world}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: internet, namespace: world}\nspec: {containers: [{name: c, image: x}]}\n";
    let err = t
        .lab
        .apply(&[t.write("clash.yaml", clash)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is taken by another pod, a node or a world host"),
        "{err}"
    );
}

#[test]
fn probe_matrix_without_policy_is_all_allowed() {
    let mut t = TestLab::up_from(&unique("lp"), "lab-world.yaml");
    t.apply(&[probe_pods(), examples().join("client.yaml")]);
    let started = std::time::Instant::now();
    let mut request = all_ports();
    request.selector = [("pod".to_string(), "b".to_string())].into();
    let only_b = t.lab.probe(&request).unwrap();
    assert_eq!(only_b.sources, ["default/b"]);

    let request = ProbeRequest {
        namespaces: vec!["default".into()],
        world: true,
        ..all_ports()
    };
    let matrix = t.lab.probe(&request).unwrap();
    eprintln!(
        "{} probes in {:?}\n{}",
        matrix.probes.len(),
        started.elapsed(),
        matrix.render()
    );
    let peers = [
        "default/a",
        "default/b",
        "default/c",
        "default/client",
        "world/internet",
    ];
    assert_eq!(matrix.sources, peers);
    assert_eq!(matrix.destinations, peers);
    // The client pod serves no port: every probe to it is refused, as upstream's X.
    for p in &matrix.probes {
        assert_eq!(p.allowed, p.to != "default/client", "{p:?}");
    }
    assert_eq!(matrix.probes.len(), 5 * 5 * 4);
    let text = matrix.render();
    assert!(
        text.starts_with("80/TCP via pod-ip: 20 of 25 allowed\n"),
        "{text}"
    );
    assert_eq!(
        matrix.allowed("world/internet", "default/c", 81, Protocol::Udp),
        Some(true)
    );
    let a = matrix.probes.iter().find(|p| p.to == "default/a").unwrap();
    assert_eq!(a.address, pod_ip(&t.lab, "a"));
    assert_eq!(a.detail, "echoed");
    let refused = matrix
        .probes
        .iter()
        .find(|p| p.to == "default/client" && p.protocol == Protocol::Tcp)
        .unwrap();
    assert_eq!(refused.detail, "refused");
    // Denied probes end at the timeout, and run in parallel: 20 of them in about one.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );

    // SCTP cells are marked not runnable (the matrix still runs); a single probe refuses.
    let sctp = t
        .lab
        .probe(&ProbeRequest {
            protocols: vec![Protocol::Sctp],
            ..all_ports()
        })
        .unwrap();
    assert_eq!(sctp.not_runnable(), sctp.probes.len());
    assert!(sctp.render().contains("not runnable"), "{}", sctp.render());
    let err = t
        .lab
        .probe(&ProbeRequest {
            namespaces: vec!["nowhere".into()],
            ..all_ports()
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("no ready pod matches"), "{err}");
}

#[test]
fn single_probe_answers_with_its_exit_status() {
    let mut t = TestLab::up_from(&unique("lo"), "lab-world.yaml");
    t.apply(&[probe_pods()]);
    let probe = |args: &[&str]| {
        let out = Command::new(sluice_bin())
            .env("SLUICE_LAB_STATE", &t.opts.state_root)
            .args(["--lab", &t.name, "lab", "probe", "--timeout", "300ms"])
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = probe(&["--from", "default/a", "--to", "default/b", "--port", "80"]);
    assert_eq!(code, Some(0), "{text}");
    let b = pod_ip(&t.lab, "b");
    assert_eq!(
        text,
        format!("default/a -> default/b ({b}:80/TCP): allowed (echoed)\n")
    );
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &[
                "--from",
                "a",
                "--to",
                "world/internet",
                "--port",
                "81",
                "--protocol",
                "UDP",
            ],
            0,
            "allowed",
        ),
        (
            &["--from", "world/internet", "--to", "c", "--port", "80"],
            0,
            "allowed",
        ),
        // Nothing listens on 82: refused, the verdict is "denied".
        (
            &["--from", "a", "--to", "b", "--port", "82"],
            1,
            "denied (refused (nothing listens",
        ),
        // No node routes it (the lab has no way out).
        (
            &["--from", "a", "--to", "203.0.113.99", "--port", "80"],
            1,
            "denied (unreachable (no route",
        ),
        (
            &["--from", "a", "--to", "nobody", "--port", "80"],
            2,
            "no pod default/nobody",
        ),
        (
            &["--from", "world/nope", "--to", "a", "--port", "80"],
            2,
            "no world host nope",
        ),
        (
            &[
                "--from",
                "a",
                "--to",
                "b",
                "--port",
                "80",
                "--protocol",
                "SCTP",
            ],
            2,
            "cannot probe SCTP",
        ),
        (
            &["--from", "a", "--to", "b", "--port", "80", "--port", "81"],
            2,
            "one --port",
        ),
        (&["--from", "a", "--port", "80"], 2, "--to"),
    ];
    for (args, want, says) in cases {
        let (code, text) = probe(args);
        assert_eq!(code, Some(*want), "{args:?}: {text}");
        assert!(text.contains(says), "{args:?}: {text}");
    }
    let (code, text) = probe(&["--from", "a", "--to", "c", "--port", "81", "-o", "json"]);
    assert_eq!(code, Some(0), "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["allowed"], true);
    assert_eq!(json["protocol"], "TCP");
    assert_eq!(json["to"], "default/c");
    // The matrix through the CLI, as JSON: every probe with its verdict.
    let (code, text) = probe(&["--port", "80", "-l", "pod=a", "-o", "json"]);
    assert_eq!(code, Some(0), "{text}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["probes"].as_array().unwrap().len(), 1);
    assert_eq!(json["probes"][0]["from"], "default/a");
    assert_eq!(json["probes"][0]["allowed"], true);
}

#[test]
fn probes_via_service_reach_each_pods_own_cluster_ip() {
    let mut t = TestLab::up_with_agent(&unique("lv"), "lab-world.yaml");
    t.apply(&[probe_pods()]);
    let services: std::collections::BTreeMap<String, Ipv4Addr> = t
        .lab
        .services()
        .into_iter()
        .map(|s| (s.name, s.cluster_ip.parse().unwrap()))
        .collect();
    let request = ProbeRequest {
        options: ProbeOptions {
            via: Via::Service,
            ..Default::default()
        },
        ..all_ports()
    };
    let matrix = t.lab.probe(&request).unwrap();
    eprintln!("{}", matrix.render());
    assert_eq!(matrix.probes.len(), 3 * 3 * 4);
    for p in &matrix.probes {
        let pod = p.to.trim_start_matches("default/");
        assert_eq!(p.address, services[&format!("s-{pod}")], "{p:?}");
        assert!(p.allowed, "{p:?}");
    }
    let p = t
        .lab
        .probe_one("a", "default/b", 81, Protocol::Udp, &request.options)
        .unwrap();
    assert!(p.allowed && p.address == services["s-b"], "{p:?}");

    // A Service over two pods names neither; a pod without a Service of its own cannot be
    // probed by ClusterIP, and the error says why.
    let both = "apiVersion: v1\nkind: Pod\nmetadata: {name: d, labels: {app: pair}}\nspec: {containers: [{name: c, image: x, ports: [{containerPort: 80}]}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: e, labels: {app: pair}}\nspec: {containers: [{name: c, image: x, ports: [{containerPort: 80}]}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: pair}\nspec:\n  selector: {app: pair}\n  ports: [{port: 80}]\n";
    t.apply(&[t.write("pair.yaml", both)]);
    let err = t
        .lab
        .probe_one("a", "d", 80, Protocol::Tcp, &request.options)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "no Service in default has exactly default/d as its ready endpoint and a port 80/TCP"
        ),
        "{err}"
    );
    // A port the pod's Service does not have.
    let err = t
        .lab
        .probe_one("a", "b", 82, Protocol::Tcp, &request.options)
        .unwrap_err()
        .to_string();
    assert!(err.contains("a port 82/TCP"), "{err}");
}

#[test]
fn probes_see_an_ipblock_policy_toward_a_world_host() {
    let mut t = TestLab::up_with_agent(&unique("lk"), "lab-world.yaml");
    t.apply(&[probe_pods()]);
    // b may only reach the world's /24, and only on 81; a admits only pods.
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-to-world-81}\nspec:\n  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 203.0.113.0/24}}]\n    ports: [{port: 81}]\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a-from-pods}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {}}]\n";
    t.apply(&[t.write("policy.yaml", policy)]);
    let matrix = t
        .lab
        .probe(&ProbeRequest {
            world: true,
            ports: vec![80, 81],
            protocols: vec![Protocol::Tcp],
            options: ProbeOptions {
                timeout: Duration::from_millis(500),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
    eprintln!("{}", matrix.render());
    let denied: BTreeSet<(&str, &str, u16)> = matrix
        .probes
        .iter()
        .filter(|p| !p.allowed)
        .map(|p| (p.from.as_str(), p.to.as_str(), p.port))
        .collect();
    let expect: BTreeSet<(&str, &str, u16)> = [
        ("default/b", "default/a", 80),
        ("default/b", "default/a", 81),
        ("default/b", "default/c", 80),
        ("default/b", "default/c", 81),
        ("default/b", "world/internet", 80),
        ("world/internet", "default/a", 80),
        ("world/internet", "default/a", 81),
    ]
    .into();
    assert_eq!(denied, expect, "\n{}", matrix.render());
    let denied = matrix
        .probes
        .iter()
        .find(|p| p.from == "default/b" && p.to == "world/internet" && p.port == 80)
        .unwrap();
    assert_eq!(denied.detail, "timed out");
}

/// The value of the sample `series` (name and labels, exactly as exposed) in a scrape.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Seed 003's policy scenario with the observability options on: nginx admits ingress only
/// from role=frontend. The agent's metrics (scraped inside the node's namespace) count the
/// denied packets and both verdicts, and the policy action log has one line per decision.
#[test]
fn metrics_and_policy_log_record_the_seed_scenario() {
    let name = unique("obs");
    let tmp = test_dir(&name);
    let lab_file = tmp.join("lab.yaml");
    fs::write(
        &lab_file,
        "apiVersion: sluice.dev/v1alpha1\nkind: Lab\nnodes:\n  - name: node-1\n    podCIDR: 10.244.1.0/24\nobservability:\n  metrics: true\n  policyLog: all\n",
    )
    .unwrap();
    let mut opts = options(&tmp);
    opts.binaries.agent = Some(agent_bin());
    let mut t = TestLab::start_at(&name, tmp, opts, &lab_file);
    assert_eq!(
        t.lab.metrics_address("node-1").map(|a| a.to_string()),
        Some("10.244.1.1:9962".to_string())
    );
    let before = t.lab.scrape_metrics("node-1").unwrap();
    assert!(before.contains("sluice_build_info{version="), "{before}");

    let examples = examples();
    t.apply(&[
        examples.join("nginx.yaml"),
        examples.join("client.yaml"),
        examples.join("policy.yaml"),
    ]);
    let (nginx, nginx_ip) = t.nginx_pods().into_iter().next().unwrap();
    let url = format!("http://{nginx_ip}/");
    let body = t.curl("frontend", &url).unwrap();
    assert!(body.contains("nginx-deployment-"), "{body}");
    assert!(t.curl("client", &url).is_err(), "client must be denied");

    let text = t.lab.scrape_metrics("node-1").unwrap();
    let denied_packets = sample(
        &text,
        "sluice_drop_packets_total{reason=\"POLICY_DENIED\",direction=\"ingress\"}",
    );
    assert!(denied_packets.is_some_and(|n| n >= 1), "{text}");
    let verdicts = |verdict: &str| {
        sample(
            &text,
            &format!("sluice_policy_verdicts_total{{direction=\"ingress\",verdict=\"{verdict}\"}}"),
        )
    };
    assert_eq!(verdicts("denied"), denied_packets, "{text}");
    assert!(verdicts("allowed").is_some_and(|n| n >= 1), "{text}");
    assert!(
        sample(&text, "sluice_endpoints").is_some_and(|n| n >= 3),
        "{text}"
    );
    assert!(
        sample(&text, "sluice_conntrack_entries").is_some_and(|n| n >= 1),
        "{text}"
    );
    assert!(
        sample(&text, "sluice_map_capacity{map=\"ct4\"}").is_some_and(|n| n > 0),
        "{text}"
    );

    // The observer drains the ring every 100 ms; the writer flushes once its queue is empty.
    let log = t.lab.policy_log("node-1");
    let mut lines: Vec<serde_json::Value> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let decided = |lines: &[serde_json::Value], disposition: &str, pod: &str| {
        lines.iter().any(|l| {
            l["disposition"] == disposition
                && l["src"]["pod_name"] == pod
                && l["dest"]["pod_name"] == nginx.as_str()
        })
    };
    while std::time::Instant::now() < deadline {
        lines = fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if decided(&lines, "deny", "client") && decided(&lines, "allow", "frontend") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let deny = lines
        .iter()
        .find(|l| l["disposition"] == "deny" && l["src"]["pod_name"] == "client")
        .unwrap_or_else(|| panic!("no deny line in {}: {lines:?}", log.display()));
    println!("deny: {deny}");
    assert_eq!(deny["reason"], "default deny");
    assert_eq!(deny["policies"], serde_json::json!([]));
    assert_eq!(deny["connection"]["dest_port"], 80);
    assert_eq!(deny["connection"]["protocol"], "tcp");
    assert_eq!(deny["connection"]["direction"], "ingress");
    assert_eq!(deny["node_name"], "node-1");
    let allow = lines
        .iter()
        .find(|l| l["disposition"] == "allow" && l["src"]["pod_name"] == "frontend")
        .unwrap_or_else(|| panic!("no allow line in {}: {lines:?}", log.display()));
    println!("allow: {allow}");
    assert_eq!(
        allow["policies"],
        serde_json::json!([{"name": "nginx-from-frontend", "namespace": "default"}])
    );
}
