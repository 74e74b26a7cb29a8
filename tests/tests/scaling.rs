//! Scaling a Deployment behind a ClusterIP while a client keeps sending requests, and bad
//! input that must change nothing.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sluice_integration::{ONE_NODE_LAB, TestLab, examples, http_get};

struct Sample {
    started: Instant,
    answer: Result<String, String>,
}

#[test]
fn scaling_two_three_one_under_load_fails_no_request_once_realized() {
    let mut lab = TestLab::up("scale", ONE_NODE_LAB);
    let nginx = std::fs::read_to_string(examples().join("nginx.yaml")).unwrap();
    assert!(nginx.contains("replicas: 2"));
    lab.apply_yaml("nginx.yaml", &nginx);
    lab.lab.apply(&[examples().join("client.yaml")]).unwrap();
    let vip = SocketAddr::from((lab.cluster_ip("nginx-service"), 80));

    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let netns = lab.lab.pod_netns("default/client").unwrap();
    let loop_thread = {
        let (stop, samples) = (Arc::clone(&stop), Arc::clone(&samples));
        std::thread::spawn(move || {
            sluice_integration::in_netns(&netns, move || {
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let answer = http_get(vip).map_err(|e| e.to_string());
                    samples.lock().unwrap().push(Sample { started, answer });
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
    };
    std::thread::sleep(Duration::from_millis(300));

    let before: BTreeSet<String> = lab.pods_named("nginx-deployment").into_iter().collect();
    let up_started = Instant::now();
    let report = lab.apply_yaml("nginx.yaml", &nginx.replace("replicas: 2", "replicas: 3"));
    let up_realized = Instant::now();
    eprintln!(
        "scale to 3: {:?}, realized in {:?}",
        report.lines(),
        report.realized_in
    );
    let three: BTreeSet<String> = lab.pods_named("nginx-deployment").into_iter().collect();
    assert_eq!(three.len(), 3);
    let new_pod = three
        .difference(&before)
        .next()
        .unwrap()
        .split_once('/')
        .unwrap()
        .1
        .to_string();
    std::thread::sleep(Duration::from_millis(800));

    let down_started = Instant::now();
    lab.apply_yaml("nginx.yaml", &nginx.replace("replicas: 2", "replicas: 1"));
    let down_realized = Instant::now();
    let one: BTreeSet<String> = lab
        .pods_named("nginx-deployment")
        .into_iter()
        .map(|p| p.split_once('/').unwrap().1.to_string())
        .collect();
    assert_eq!(one.len(), 1);
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    loop_thread.join().unwrap();

    let samples = samples.lock().unwrap();
    let first_on_new = samples
        .iter()
        .find(|s| s.answer.as_deref() == Ok(new_pod.as_str()));
    let first_on_new = first_on_new.expect("the new backend received traffic");
    eprintln!(
        "{} requests; apply → first request answered by the new backend: {:?} (apply call took {:?})",
        samples.len(),
        first_on_new.started.saturating_duration_since(up_started),
        up_realized - up_started,
    );
    eprintln!(
        "scale down apply call took {:?}",
        down_realized - down_started
    );
    let failed: Vec<_> = samples
        .iter()
        .filter(|s| s.answer.is_err())
        .map(|s| (s.started, s.answer.clone()))
        .collect();
    eprintln!("failed requests over the whole run: {}", failed.len());
    for s in samples
        .iter()
        .filter(|s| s.started >= up_realized && s.started < down_started)
    {
        assert!(
            s.answer.is_ok(),
            "request after scale-up was realized failed: {:?}",
            s.answer
        );
    }
    for s in samples.iter().filter(|s| s.started >= down_realized) {
        let answer = s
            .answer
            .as_ref()
            .expect("request after scale-down was realized failed");
        assert!(
            one.contains(answer),
            "removed backend {answer} got a new connection"
        );
    }
}

#[test]
fn bad_manifests_are_refused_with_file_object_and_field_and_change_nothing() {
    // The full catalogue of refused input is in sluice-lab's tests; this one shows that the
    // real dataplane does not move either.
    let mut lab = TestLab::up("bad", ONE_NODE_LAB);
    lab.lab.apply(&[examples().join("nginx.yaml")]).unwrap();
    let pods_before = lab.lab.pods().len();
    let generation_before = lab.client().status().unwrap().realized_generation;
    let cases = [
        (
            "bad-port.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports:\n  - port: 70000\n",
            "spec.ports[0].port",
        ),
        // A valid Deployment next to a broken Service: neither may be applied.
        (
            "half.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: extra}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: extra}}\n  template:\n    metadata: {labels: {app: extra}}\n    spec: {containers: [{name: c, image: x}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: extra}\nspec:\n  selector: {app: extra}\n  ports:\n  - {port: 80, protocol: ICMP}\n",
            "spec.ports[0].protocol",
        ),
    ];
    for (file, yaml, expect) in cases {
        let err = lab.try_apply_yaml(file, yaml).expect_err(file).to_string();
        eprintln!("{file}: {err}");
        assert!(err.contains(file), "error names the file: {err}");
        assert!(err.contains(expect), "error names {expect}: {err}");
    }
    assert_eq!(lab.lab.pods().len(), pods_before, "no pod was created");
    assert!(
        lab.lab
            .services()
            .iter()
            .all(|s| s.name != "extra" && s.name != "web")
    );
    assert_eq!(
        lab.client().status().unwrap().realized_generation,
        generation_before,
        "the dataplane did not change"
    );
}
