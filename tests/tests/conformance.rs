//! The upstream NetworkPolicy conformance model in the lab: real traffic between the pods of
//! namespaces x, y and z on ports 80 and 81 over TCP and UDP must get exactly the verdicts
//! of the reference evaluator (a separate reading of the spec), for the upstream suite's
//! policies and for random sequences of policy, pod-label and namespace-label changes.

use std::time::Instant;

use sluice_integration::{
    ONE_NODE_LAB, TestLab,
    netpol::{self, Change, Created, Probe, random_change, upstream_cases},
};

fn model_lab(prefix: &str) -> TestLab {
    let mut lab = TestLab::up(prefix, ONE_NODE_LAB);
    lab.apply_yaml("model.yaml", &netpol::model_yaml());
    lab
}

/// Probes every pair and compares with the reference; panics with the differences.
fn check(lab: &TestLab, probes: &[Probe], what: &str) {
    let snapshot = netpol::snapshot(lab);
    let expected = netpol::expected(&snapshot, probes);
    let start = Instant::now();
    let actual = netpol::probe_all(lab, probes, &expected);
    let report = netpol::mismatches(&expected, &actual);
    let allowed = actual.values().filter(|a| **a).count();
    eprintln!(
        "{what}: {} probes, {allowed} allowed, in {:?}",
        probes.len(),
        start.elapsed()
    );
    assert!(report.is_empty(), "{what}: verdicts differ:\n{report}");
}

#[test]
fn the_upstream_conformance_model_matches_the_reference() {
    let mut lab = model_lab("model");
    let probes = netpol::full_matrix();
    check(&lab, &probes, "no policy");
    // The model pins y/b's address: the ipBlock case's `except` can name it up front.
    assert_eq!(lab.pod_ip("y/b"), netpol::FIXED_Y_B);
    let except = netpol::FIXED_Y_B.to_string();
    for (name, yaml) in upstream_cases() {
        let yaml = yaml.replace("EXCEPT", &except);
        let file = format!("{name}.yaml");
        lab.apply_yaml(&file, &yaml);
        check(&lab, &probes, name);
        lab.delete_yaml(&file, &yaml);
    }
    check(&lab, &probes, "all policies deleted");
}

/// Random sequences of changes; after every step the kernel's maps equal the compiler's
/// output (`sluice verify`) and sampled real probes get the reference's verdicts.
#[test]
fn random_changes_keep_the_kernel_and_the_traffic_equal_to_the_reference() {
    let (seed, steps) = sluice_integration::netpol::property_seed_and_steps(12);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut lab = model_lab("property");
    let mut created = Created::default();
    for step in 0..steps {
        let what = match random_change(&mut rng, step, &mut created, &[]) {
            Change::Apply(what, yaml) => {
                lab.apply_yaml(&format!("step-{step}.yaml"), &yaml);
                what
            }
            Change::Delete(what, yaml) => {
                lab.delete_yaml(&format!("delete-{step}.yaml"), &yaml);
                what
            }
        };
        let verify = lab.cli(&["verify"]);
        assert!(
            verify.contains("every map matches"),
            "seed {seed} step {step} ({what}): kernel differs from the compiler:\n{verify}"
        );
        let mut pods = netpol::model_pods();
        pods.extend(created.pods.iter().map(|(pod, _)| pod.clone()));
        let all = netpol::matrix(&pods);
        let sample: Vec<Probe> = (0..24)
            .map(|_| all[rng.usize(..all.len())].clone())
            .collect();
        check(&lab, &sample, &format!("seed {seed} step {step} ({what})"));
    }
}
