//! The Kubernetes source against a fake API server that speaks the list and watch protocol
//! over HTTP, in a network namespace of the test's own: it converges through every fault a
//! real server shows its clients (410 Gone in the stream and on a watch start, dropped
//! connections, 500 and 429), with nothing lost or doubled, resumes from bookmarks, and
//! gathers bursts into few snapshots (needs root for the namespace; never skipped).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test: a failed step must fail the test loudly"
)]

mod fake_api;

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use fake_api::{FakeApi, names, pod, pod_names, service};
use sluice_agent::{
    AgentError,
    source::{Kubernetes, KubernetesConfig, Source, Updates, kubernetes::SourceStats},
};
use sluice_fake_apiserver::{Fault, Resource};
use sluice_netns::NsThread;
use sluice_store::Snapshot;
use tokio::sync::watch;

/// The source on a thread inside the fake's namespace, and the agent's end of it.
struct Running {
    rx: watch::Receiver<Arc<Snapshot>>,
    stats: SourceStats,
    runtime: tokio::runtime::Runtime,
    /// Ends once `rx` is dropped.
    _thread: NsThread<Result<(), AgentError>>,
}

fn start_source(api: &FakeApi) -> Running {
    let stats = SourceStats::default();
    let source = Kubernetes::open(
        KubernetesConfig {
            kubeconfig: Some(api.kubeconfig.clone()),
            ..KubernetesConfig::default()
        },
        stats.clone(),
    )
    .expect("read the kubeconfig");
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let updates = Updates::new(tx, Default::default());
    let thread = api
        .ns
        .spawn(move || Box::new(source).run(&updates))
        .expect("start the source in the namespace");
    Running {
        rx,
        stats,
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap(),
        _thread: thread,
    }
}

impl Running {
    /// The first snapshot the source sends that satisfies `done`.
    fn wait(&mut self, what: &str, done: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
        let deadline = Instant::now() + Duration::from_secs(25);
        loop {
            {
                let current = self.rx.borrow_and_update();
                if current.revision > 0 && done(&current) {
                    return Arc::clone(&current);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let rx = &mut self.rx;
            let changed = self
                .runtime
                .block_on(async { tokio::time::timeout(left, rx.changed()).await });
            match changed {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("the source ended waiting for {what}"),
                Err(_) => panic!(
                    "{what}: not within 25 s; last snapshot {:#?}",
                    names(&self.rx.borrow().services)
                ),
            }
        }
    }

    /// The next snapshot the source sends.
    fn next(&mut self, what: &str) -> Arc<Snapshot> {
        let rx = &mut self.rx;
        let changed = self
            .runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(25), rx.changed()).await });
        match changed {
            Ok(Ok(())) => Arc::clone(&self.rx.borrow_and_update()),
            Ok(Err(_)) => panic!("the source ended waiting for {what}"),
            Err(_) => panic!("{what}: no snapshot within 25 s"),
        }
    }

    fn snapshots(&self) -> u64 {
        self.stats.snapshots.get()
    }
}

/// Services as `name=clusterIP`, failing on any name seen twice.
fn services(snapshot: &Snapshot) -> Vec<String> {
    let all = names(&snapshot.services);
    let unique: BTreeSet<_> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "a Service twice: {all:?}");
    snapshot
        .services
        .iter()
        .map(|s| {
            format!(
                "{}={}",
                s.metadata.name.as_deref().unwrap_or_default(),
                s.spec
                    .as_ref()
                    .and_then(|s| s.cluster_ip.as_deref())
                    .unwrap_or_default()
            )
        })
        .collect()
}

fn has_services(expected: &[&str]) -> impl Fn(&Snapshot) -> bool {
    let expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    move |s| services(s) == expected
}

/// Waits until `done` holds, failing after 25 s.
fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(25);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 25 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lists(api: &FakeApi, resource: Resource) -> usize {
    api.server
        .requests()
        .iter()
        .filter(|r| r.resource == resource && !r.watch && r.status == 200)
        .count()
}

#[test]
fn the_first_snapshot_waits_for_every_initial_list() {
    let api = FakeApi::start("sk-first-");
    api.seed();
    // Pods and policies fail their lists first: a snapshot without them would have the
    // agent remove their endpoints' policy.
    api.server.inject(Resource::Pods, Fault::Status(500));
    api.server.inject(Resource::Pods, Fault::Status(500));
    api.server
        .inject(Resource::NetworkPolicies, Fault::Status(429));
    let started = Instant::now();
    let mut source = start_source(&api);
    let first = source.wait("the first snapshot", |_| true);
    eprintln!(
        "first snapshot after {:?} (two 500s and a 429 retried with backoff)",
        started.elapsed()
    );
    assert_eq!(first.revision, 1, "the first snapshot the source sent");
    assert_eq!(pod_names(&first.pods), ["default/web-0", "default/web-1"]);
    assert_eq!(names(&first.network_policies), ["default/web"]);
    assert_eq!(services(&first), ["svc-a=10.96.0.10", "svc-b=10.96.0.11"]);
    assert_eq!(first.nodes.len(), 1);
    assert_eq!(first.namespaces.len(), 1);
    assert_eq!(first.endpoint_slices.len(), 2);
    assert!(first.endpoints.is_empty(), "local endpoints come from CNI");
    let mut failed: Vec<_> = api
        .server
        .requests()
        .into_iter()
        .filter(|r| r.status != 200)
        .map(|r| (r.resource, r.status))
        .collect();
    failed.sort();
    assert_eq!(
        failed,
        [
            (Resource::Pods, 500),
            (Resource::Pods, 500),
            (Resource::NetworkPolicies, 429)
        ]
    );
}

#[test]
fn gone_relists_in_the_stream_and_on_a_watch_start() {
    let api = FakeApi::start("sk-gone-");
    api.seed();
    let mut source = start_source(&api);
    source.wait(
        "the first snapshot",
        has_services(&["svc-a=10.96.0.10", "svc-b=10.96.0.11"]),
    );
    assert_eq!(lists(&api, Resource::Services), 1);

    // The server forgets its history: every watch gets an ERROR event with a 410 Status,
    // and resuming from an older version would get the same. Changes made meanwhile must
    // arrive through the relist.
    api.server.compact();
    api.apply(&service("svc-c", "10.96.0.12"));
    api.server.delete(Resource::Services, "default/svc-a");
    source.wait(
        "the relisted Services",
        has_services(&["svc-b=10.96.0.11", "svc-c=10.96.0.12"]),
    );
    assert!(lists(&api, Resource::Services) >= 2, "relisted after 410");
    until("every kind to relist", || {
        Resource::ALL.into_iter().all(|r| lists(&api, r) >= 2)
    });

    // A watch start refused with HTTP 410: kube-rs would retry it from the same expired
    // version forever; the source relists instead.
    let lists_before = lists(&api, Resource::Services);
    api.server
        .inject(Resource::Services, Fault::GoneOnWatchStart);
    api.server.drop_watches(Resource::Services);
    api.apply(&service("svc-d", "10.96.0.13"));
    source.wait(
        "svc-d after the refused watch",
        has_services(&["svc-b=10.96.0.11", "svc-c=10.96.0.12", "svc-d=10.96.0.13"]),
    );
    assert!(
        api.server
            .requests()
            .iter()
            .any(|r| r.resource == Resource::Services && r.watch && r.status == 410),
        "the refused watch was asked"
    );
    // svc-d may have come through a watch before the refusal: wait for the relist itself.
    until("a relist after the 410 watch start", || {
        lists(&api, Resource::Services) > lists_before
    });
    // Six kinds after the compaction, Services once more after the refused watch.
    assert_eq!(source.stats.relists.get(), 7);
    api.apply(&service("svc-e", "10.96.0.14"));
    source.wait(
        "svc-e after the relist",
        has_services(&[
            "svc-b=10.96.0.11",
            "svc-c=10.96.0.12",
            "svc-d=10.96.0.13",
            "svc-e=10.96.0.14",
        ]),
    );
}

#[test]
fn dropped_connections_resume_without_loss_or_duplicates() {
    let api = FakeApi::start("sk-drop-");
    api.seed();
    let mut source = start_source(&api);
    source.wait(
        "the first snapshot",
        has_services(&["svc-a=10.96.0.10", "svc-b=10.96.0.11"]),
    );
    let list_version = api.server.revision();

    // Cut half way through svc-c's ADDED event; svc-d goes to no open watch.
    api.server.drop_watches_mid_event(Resource::Services);
    api.apply(&service("svc-c", "10.96.0.12"));
    api.apply(&service("svc-d", "10.96.0.13"));
    source.wait(
        "svc-c and svc-d after the cut",
        has_services(&[
            "svc-a=10.96.0.10",
            "svc-b=10.96.0.11",
            "svc-c=10.96.0.12",
            "svc-d=10.96.0.13",
        ]),
    );

    // Dropped at once, then the watch is refused twice (500, then 429) before it resumes.
    api.server.drop_watches(Resource::Services);
    api.server.inject(Resource::Services, Fault::Status(500));
    api.server.inject(Resource::Services, Fault::Status(429));
    api.apply(&service("svc-b", "10.96.0.21"));
    api.server.delete(Resource::Services, "default/svc-c");
    source.wait(
        "the changes made while the watch was down",
        has_services(&["svc-a=10.96.0.10", "svc-b=10.96.0.21", "svc-d=10.96.0.13"]),
    );
    assert_eq!(
        lists(&api, Resource::Services),
        1,
        "resumed by resourceVersion, never relisted"
    );
    let resumed: Vec<u64> = api
        .server
        .requests()
        .iter()
        .filter(|r| r.resource == Resource::Services && r.watch && r.status == 200)
        .map(|r| r.resource_version.as_deref().unwrap().parse().unwrap())
        .collect();
    assert!(resumed.len() >= 3, "{resumed:?}");
    assert_eq!(
        resumed[0], list_version,
        "the first watch from the list's version"
    );
    assert!(
        resumed.windows(2).all(|w| w[0] <= w[1]),
        "each watch resumed from the last version seen: {resumed:?}"
    );
}

#[test]
fn bookmarks_advance_the_resource_version() {
    let api = FakeApi::start("sk-bookmark-");
    api.seed();
    let mut source = start_source(&api);
    source.wait("the first snapshot", |s| s.services.len() == 2);
    // Changes to pods move the global version; the Services watch sees none of them.
    for i in 0..5 {
        api.apply(&pod(&format!("extra-{i}"), &format!("10.244.1.{}", 50 + i)));
    }
    let services_version = api
        .server
        .requests()
        .iter()
        .rfind(|r| r.resource == Resource::Services && r.watch)
        .and_then(|r| r.resource_version.clone())
        .unwrap();
    let bookmark = api.server.revision();
    assert!(bookmark > services_version.parse().unwrap());
    api.server.bookmark();
    // The bookmark precedes the drop on the same connection.
    api.server.drop_watches(Resource::Services);
    let watches = || {
        api.server
            .requests()
            .into_iter()
            .filter(|r| r.resource == Resource::Services && r.watch)
            .collect::<Vec<_>>()
    };
    until("a watch after the drop", || watches().len() >= 2);
    let resumed = watches().swap_remove(1);
    eprintln!(
        "watch resumed from {:?}: the bookmark's {bookmark}, not the list's {services_version}",
        resumed.resource_version
    );
    assert_eq!(resumed.resource_version, Some(bookmark.to_string()));
}

#[test]
fn ten_thousand_changes_converge_and_bursts_are_debounced() {
    let api = FakeApi::start("sk-10k-");
    api.seed();
    let mut source = start_source(&api);
    source.wait("the first snapshot", |s| s.pods.len() == 2);

    // A burst of 1,000 pod events: a handful of snapshots, and the agent's end (a watch
    // channel keeping only the newest) compiles fewer still.
    let before = source.snapshots();
    let events_before = source.stats.events.get();
    for i in 0..1000 {
        api.apply(&pod(&format!("burst-{i}"), "10.244.1.200"));
    }
    let mut compiles = 0;
    loop {
        // The agent's loop: take the newest snapshot, compile it, take the next.
        let snapshot = source.next("the burst");
        let _ = sluice_compiler::compile(&snapshot, &sluice_compiler::NodeContext::default());
        compiles += 1;
        if snapshot.pods.len() == 1002 {
            break;
        }
    }
    let burst_snapshots = source.snapshots() - before;
    let events = source.stats.events.get() - events_before;
    eprintln!(
        "debounce: {events} pod events in, {burst_snapshots} snapshots out, {compiles} compile passes"
    );
    assert_eq!(events, 1000);
    assert!(
        burst_snapshots < 100,
        "{burst_snapshots} snapshots for 1,000 events"
    );

    // 10,000 changes: 4,000 pods created, 4,000 relabelled, 2,000 deleted, with the pod
    // watch dropped half way through.
    let before = source.snapshots();
    let started = Instant::now();
    for i in 0..4000 {
        api.apply(&pod(&format!("p-{i}"), "10.244.1.201"));
    }
    for i in 0..4000 {
        let mut p = pod(&format!("p-{i}"), "10.244.1.201");
        p.metadata
            .labels
            .get_or_insert_default()
            .insert("step".into(), "2".into());
        api.apply(&p);
        if i == 1000 {
            api.server.drop_watches(Resource::Pods);
        }
    }
    for i in 0..2000 {
        api.server
            .delete(Resource::Pods, &format!("default/p-{i}"))
            .unwrap();
    }
    let done = source.wait("10,000 changes", |s| {
        s.pods
            .iter()
            .filter(|p| p.name().unwrap().starts_with("p-"))
            .count()
            == 2000
            && s.pods.iter().all(|p| {
                !p.name().unwrap().starts_with("p-")
                    || p.labels().unwrap().get("step").map(String::as_str) == Some("2")
            })
    });
    let elapsed = started.elapsed();
    let all = pod_names(&done.pods);
    let unique: BTreeSet<_> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "no pod twice");
    assert_eq!(all.len(), 2000 + 1002);
    let expected: BTreeSet<String> = (2000..4000).map(|i| format!("default/p-{i}")).collect();
    let got: BTreeSet<String> = all
        .into_iter()
        .filter(|n| n.starts_with("default/p-"))
        .collect();
    assert_eq!(got, expected);
    eprintln!(
        "10,000 changes converged in {elapsed:?} ({:.0} events/s) with {} snapshots",
        10_000.0 / elapsed.as_secs_f64(),
        source.snapshots() - before
    );
}

#[test]
fn ten_thousand_services_listed_and_compiled() {
    const SERVICES: u32 = 10_000;
    let api = FakeApi::start("sk-svc10k-");
    api.seed();
    for i in 0..SERVICES {
        let name = format!("s-{i}");
        let [_, _, hi, lo] = (u32::from_be_bytes([10, 97, 0, 0]) + i).to_be_bytes();
        let [_, _, bhi, blo] = (u32::from_be_bytes([10, 244, 0, 0]) + i).to_be_bytes();
        api.apply(&service(&name, &format!("10.97.{hi}.{lo}")));
        api.apply(&fake_api::slice(&name, &[&format!("10.244.{bhi}.{blo}")]));
    }
    let started = Instant::now();
    let mut source = start_source(&api);
    let snapshot = source.wait("10,000 Services", |s| {
        s.services.len() == 10_002 && s.endpoint_slices.len() == 10_002
    });
    let listed = started.elapsed();
    // kube-rs asks 500 a page: 21 pages, all read at the first page's version.
    assert!(lists(&api, Resource::Services) >= 21);
    let context = sluice_compiler::NodeContext {
        node: "node-1".into(),
        ..Default::default()
    };
    let started = Instant::now();
    let desired = sluice_compiler::compile(&snapshot, &context);
    let compiled = started.elapsed();
    assert!(
        desired.services.len() >= 2 * 10_002,
        "a frontend and a slot each"
    );
    eprintln!(
        "10,002 Services and slices: listed into a snapshot in {listed:?}, one compile {compiled:?} \
         ({} service entries; {} build)",
        desired.services.len(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
}
