//! A real agent with `--source kubernetes`, its kubeconfig naming a fake API server on the
//! loopback of the agent's own network namespace: `/readyz` is 503 until every initial
//! list is complete and realized, the maps follow the API's objects, and the time from a
//! watch event to realized maps is measured (needs root and bpffs; never skipped).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test: a failed step must fail the test loudly"
)]

mod fake_api;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fake_api::{FakeApi, service, slice};
use sluice_api::{ApiError, Client};
use sluice_common::{IPPROTO_TCP, Lb4Key};
use sluice_datapath::{PinDir, PinnedMaps};
use sluice_fake_apiserver::Resource;

/// The agent process, stopped on drop; then its files go.
struct Agent {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    dir: PathBuf,
    pins: PinDir,
}

impl Agent {
    fn start(api: &FakeApi, metrics: SocketAddr) -> Self {
        let pins = PinDir::unique("sluice-test-kube-");
        let dir = std::env::temp_dir().join(format!("{}-agent", api.ns.name()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let log = dir.join("agent.log");
        let child = Command::new(env!("CARGO_BIN_EXE_sluice-agent"))
            .args(["--node", "node-1", "--netns", api.ns.name()])
            .args(["--source", "kubernetes", "--reconcile-interval", "10"])
            .arg("--kubeconfig")
            .arg(&api.kubeconfig)
            .arg("--pin-dir")
            .arg(pins.path())
            .arg("--api-socket")
            .arg(&socket)
            .arg("--metrics-address")
            .arg(metrics.to_string())
            // The compile line says what each compile recompiled.
            .env("RUST_LOG", "info,sluice_agent::node=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn sluice-agent");
        Self {
            child,
            socket,
            log,
            dir,
            pins,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `done` holds, failing with the agent's log after 120 s (the first pass
    /// loads the datapath, slow in a debug build).
    fn wait(&mut self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !done(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the agent exited ({status}) waiting for {what}\n{}",
                    self.log_text()
                );
            }
            assert!(Instant::now() < deadline, "{what}\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `/readyz` from inside the namespace: Some(true) 200, Some(false) 503, None no answer.
fn ready(api: &FakeApi, metrics: SocketAddr) -> Option<bool> {
    let answer = api
        .ns
        .run(|| sluice_api::scrape(metrics, "/readyz", Duration::from_secs(2)))
        .unwrap();
    match answer {
        Ok(_) => Some(true),
        Err(ApiError::Agent { status, .. }) if status.as_u16() == 503 => Some(false),
        Err(_) => None,
    }
}

fn frontend(ip: [u8; 4]) -> Lb4Key {
    Lb4Key::new(ip.into(), 80, IPPROTO_TCP, 0)
}

#[test]
fn realizes_the_api_objects_and_is_ready_only_after_the_first_full_sync() {
    let api = FakeApi::start("sk-agent-");
    api.seed();
    // Pods list slowly: the agent serves its probes but has no full sync yet.
    api.server.pause(Resource::Pods);
    let metrics: SocketAddr = "127.0.0.1:9962".parse().unwrap();
    let mut agent = Agent::start(&api, metrics);
    agent.wait("the probes to answer", |_| ready(&api, metrics).is_some());
    assert_eq!(
        ready(&api, metrics),
        Some(false),
        "ready before the pods were listed"
    );
    // The agent realizes nothing from a partial list either.
    let status = Client::new(&agent.socket).status().unwrap();
    assert_eq!(status.realized_generation, 0, "{status:?}");

    api.server.resume(Resource::Pods);
    let resumed = Instant::now();
    agent.wait("/readyz 200", |_| ready(&api, metrics) == Some(true));
    eprintln!(
        "ready {:?} after the pods list was answered",
        resumed.elapsed()
    );
    let maps = PinnedMaps::open(agent.pins.path()).unwrap();
    for ip in [[10, 96, 0, 10], [10, 96, 0, 11]] {
        assert!(
            maps.services.get(&frontend(ip), 0).is_ok(),
            "{ip:?} realized"
        );
    }
    let listed = Client::new(&agent.socket).services().unwrap();
    assert!(
        listed
            .iter()
            .any(|s| s.service.as_deref() == Some("default/svc-a:http") && s.backends.len() == 1),
        "{listed:#?}"
    );

    // Watch event → realized maps, a new Service and its slice each time.
    let log_before = agent.log_text().len();
    let mut samples = Vec::new();
    for i in 0..5u8 {
        let name = format!("new-{i}");
        let ip = [10, 96, 1, 10 + i];
        api.apply(&slice(&name, &[&format!("10.244.1.{}", 100 + i)]));
        let applied = Instant::now();
        api.apply(&service(&name, &format!("10.96.1.{}", 10 + i)));
        agent.wait("the new Service realized", |_| {
            maps.services.get(&frontend(ip), 0).is_ok()
        });
        let in_maps = applied.elapsed();
        agent.wait("the API to list it", |a| {
            Client::new(&a.socket).services().is_ok_and(|l| {
                l.iter()
                    .any(|s| s.service.as_deref() == Some(&format!("default/{name}:http")))
            })
        });
        samples.push((in_maps, applied.elapsed()));
    }
    eprintln!("watch event -> realized maps, listed by the API: {samples:?}");
    // Each reached the maps through the source's change set: the Service compiled alone,
    // the Pods, Namespaces, Nodes and policies not at all.
    let compiles: Vec<String> = agent.log_text()[log_before..]
        .lines()
        .filter(|l| l.contains(" compiled "))
        .map(str::to_string)
        .collect();
    assert!(!compiles.is_empty(), "{}", agent.log_text());
    for line in &compiles {
        assert!(
            line.contains("named")
                && line.contains("workloads_compiled=false")
                && ["services_compiled=0 ", "services_compiled=1 "]
                    .iter()
                    .any(|n| line.contains(n)),
            "a compile of more than the change: {line}"
        );
    }
    assert!(
        compiles.iter().any(|l| l.contains("services_compiled=1 ")),
        "{compiles:#?}"
    );
    eprintln!("compiles of the 5 changes: {compiles:#?}");

    // A burst of 1,000 pod events: events in, snapshots out, compile passes.
    let counter = |name: &str| -> u64 {
        let text = api
            .ns
            .run(|| sluice_api::scrape(metrics, "/metrics", Duration::from_secs(5)))
            .unwrap()
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_total ")))
            .unwrap_or_else(|| panic!("{name} not in {text}"))
            .parse()
            .unwrap()
    };
    let socket = agent.socket.clone();
    let status = || Client::new(&socket).status().unwrap();
    let (events, snapshots) = (
        counter("sluice_kubernetes_watch_events"),
        counter("sluice_kubernetes_snapshots"),
    );
    let (accepted, passes) = (status().desired_generation, status().reconciles);
    let burst = Instant::now();
    for i in 0..1000 {
        api.apply(&fake_api::pod(&format!("burst-{i}"), "10.244.1.200"));
    }
    agent.wait("the burst realized", |_| {
        counter("sluice_kubernetes_watch_events") == events + 1000
            && status().realized_generation == status().desired_generation
            && status().desired_generation > accepted
    });
    let (snapshots, accepted, passes) = (
        counter("sluice_kubernetes_snapshots") - snapshots,
        status().desired_generation - accepted,
        status().reconciles - passes,
    );
    eprintln!(
        "burst: 1000 pod events in, {snapshots} snapshots out, {accepted} taken by the loop, \
         {passes} compile passes, realized after {:?}",
        burst.elapsed()
    );
    assert!(snapshots < 100, "{snapshots} snapshots for 1,000 events");

    // A deletion is realized too.
    api.server.delete(Resource::Services, "default/svc-a");
    agent.wait("svc-a removed", |_| {
        maps.services.get(&frontend([10, 96, 0, 10]), 0).is_err()
    });
    let status = Client::new(&agent.socket).status().unwrap();
    assert!(status.healthy, "{status:?}");
    assert!(
        agent.log_text().contains("initial list complete"),
        "{}",
        agent.log_text()
    );
}
