//! `--host-cgroup` of a real agent process: the socket programs go on a cgroup holding
//! only the node's processes, and a cgroup that would load-balance anyone else's sockets
//! is refused before anything attaches (needs root, bpffs and cgroup v2; never skipped).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test: a failed step must fail the test loudly"
)]

mod support;

use std::{fs, path::Path, process::Command, time::Duration};

use sluice_api::{Client, VerifyRequest};
use sluice_netns::{OwnedCgroup, cgroup2_root};
use support::{Agent, NODE, NetNs, snapshot, write};

const EXIT: Duration = Duration::from_secs(60);

/// An agent of its own namespace, on `snapshot(1, 1)`, with `--host-cgroup cgroup`.
fn start(name: &str, netns: &NetNs, dir: &Path, cgroup: &Path) -> Agent {
    let cluster_file = dir.join(format!("{name}.json"));
    write(&cluster_file, &snapshot(1, 1));
    let cgroup = cgroup.to_str().unwrap();
    Agent::start_node(
        name,
        NODE,
        &netns.0,
        &cluster_file,
        &["--host-cgroup", cgroup],
    )
}

/// The test's cluster files, removed on drop.
struct TestDir(std::path::PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-test-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn attaches_to_a_cgroup_of_its_own_namespace_only() {
    let dir = TestDir::new("host-cgroup");
    let dir = &dir.0;
    let netns = NetNs::new("sluice-test-hostcg-");

    // The root holds every process of the machine.
    let root = cgroup2_root().unwrap();
    let mut agent = start("root", &netns, dir, &root);
    assert!(!agent.exit(EXIT).success());
    let log = agent.log_text();
    assert!(log.contains("root of the cgroup v2 hierarchy"), "{log}");
    assert!(!agent.pins.path().join("links/cgroup").exists());
    drop(agent);

    // A process of the root namespace in the cgroup: not the node's.
    let cgroup = OwnedCgroup::unique("sluice-test-hostcg-").unwrap();
    let mut command = Command::new("sleep");
    command.arg("60");
    cgroup.enter_on_exec(&mut command).unwrap();
    let mut sleeper = command.spawn().unwrap();
    let mut agent = start("foreign", &netns, dir, cgroup.path());
    assert!(!agent.exit(EXIT).success());
    let log = agent.log_text();
    assert!(log.contains("another network namespace"), "{log}");
    assert!(!agent.pins.path().join("links/cgroup").exists());
    drop(agent);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();

    // Empty (or the node's own processes only): attached, links pinned.
    let mut agent = start("own", &netns, dir, cgroup.path());
    agent.wait_realized(1);
    let pins = |agent: &Agent| {
        ["connect4", "sendmsg4", "recvmsg4", "getpeername4"]
            .map(|hook| agent.pins.path().join(format!("links/cgroup/host_{hook}")))
    };
    for pin in pins(&agent) {
        assert!(
            pin.exists(),
            "{} missing\n{}",
            pin.display(),
            agent.log_text()
        );
    }

    // A link taken off behind the agent's back: verify names it, a pass puts it back. A
    // periodic pass may repair it before verify asks: then take it off again.
    let connect = pins(&agent)[0].clone();
    let mut named = Vec::new();
    for _ in 0..5 {
        agent.wait("connect4 attached", EXIT, |_| connect.exists());
        let link = sluice_datapath::sys::obj_get(&connect).unwrap();
        sluice_datapath::sys::link_detach(std::os::fd::AsFd::as_fd(&link)).unwrap();
        fs::remove_file(&connect).unwrap();
        let report = Client::new(&agent.socket)
            .verify(VerifyRequest { repair: false })
            .unwrap();
        named = report.drift;
        if named
            .iter()
            .any(|d| d.map == "cgroup" && d.key.ends_with("connect4"))
        {
            break;
        }
    }
    assert!(
        named
            .iter()
            .any(|d| d.map == "cgroup" && d.key.ends_with("connect4")),
        "{named:?}"
    );
    agent.wait("connect4 attached again", EXIT, |_| connect.exists());

    // A process of another namespace moved in later: the programs come off, the pass fails.
    let mut command = Command::new("sleep");
    command.arg("60");
    cgroup.enter_on_exec(&mut command).unwrap();
    let mut sleeper = command.spawn().unwrap();
    agent.wait("socket programs detached", EXIT, |a| {
        pins(a).iter().all(|pin| !pin.exists())
    });
    agent.wait("the refusal reported", EXIT, |a| {
        a.status()
            .last_error
            .is_some_and(|e| e.contains("another network namespace"))
    });
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// A `sleep` in `cgroup`, entered into network namespace `netns` first; killed on drop.
struct Sleeper(std::process::Child);

impl Sleeper {
    fn start(cgroup: &OwnedCgroup, netns: &str) -> Self {
        let mut command = sluice_netns::NetNs::named(netns).command("sleep").unwrap();
        command.arg("60");
        cgroup.enter_on_exec(&mut command).unwrap();
        Self(command.spawn().unwrap())
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_pods_cgroup_holds_only_processes_of_other_namespaces() {
    let dir = TestDir::new("pod-cgroup");
    let dir = &dir.0;
    let node = NetNs::new("sluice-test-podcg-");
    let pod = NetNs::new("sluice-test-podcg-pod-");
    let cgroup = OwnedCgroup::unique("sluice-test-podcg-").unwrap();
    let start = |name: &str| {
        let cluster_file = dir.join(format!("{name}.json"));
        write(&cluster_file, &snapshot(1, 1));
        Agent::start_node(
            name,
            NODE,
            &node.0,
            &cluster_file,
            &["--pod-cgroup", cgroup.path().to_str().unwrap()],
        )
    };

    // A process of the node's own namespace: no pod, refused before anything attaches.
    let sleeper = Sleeper::start(&cgroup, &node.0);
    let mut agent = start("node");
    assert!(!agent.exit(EXIT).success());
    let log = agent.log_text();
    assert!(log.contains("it is no pod"), "{log}");
    assert!(!agent.pins.path().join("links/cgroup").exists());
    drop(agent);
    drop(sleeper);

    // A pod's process: the pods' programs attach.
    let _pod = Sleeper::start(&cgroup, &pod.0);
    let mut agent = start("pod");
    agent.wait_realized(1);
    for hook in ["connect4", "sendmsg4", "recvmsg4", "getpeername4"] {
        let pin = agent.pins.path().join(format!("links/cgroup/pods_{hook}"));
        assert!(
            pin.exists(),
            "{} missing\n{}",
            pin.display(),
            agent.log_text()
        );
    }
    assert!(
        !agent
            .pins
            .path()
            .join("links/cgroup/host_connect4")
            .exists()
    );
}
