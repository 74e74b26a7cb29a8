//! The upstream NetworkPolicy conformance model spread over three nodes (issue 10), in both
//! routing modes: every probe equals the reference evaluator and every node's kernel equals
//! its compiler, for the upstream policies and for the property test's random steps.
// A test binary: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sluice_integration::{
    TestLab,
    multinode::{Mode, NODES, three_nodes},
    netpol::{self, Change, Created, Probe, random_change, upstream_cases},
};

fn check(lab: &TestLab, probes: &[Probe], what: &str) {
    let snapshot = netpol::snapshot(lab);
    let expected = netpol::expected(&snapshot, probes);
    let actual = netpol::probe_all(lab, probes, &expected);
    let report = netpol::mismatches(&expected, &actual);
    assert!(report.is_empty(), "{what}: verdicts differ:\n{report}");
    lab.verify_every_node(what);
}

/// The upstream model with its nine pods spread over three nodes: every probe, for every
/// upstream policy, equals the reference, and every node's kernel equals its compiler.
fn conformance(mode: Mode) {
    let mut lab = three_nodes(&format!("mnc-{}", mode.as_str()), mode);
    lab.apply_yaml("model.yaml", &netpol::model_yaml_on(&NODES));
    for pod in netpol::model_pods() {
        let (ns, name) = pod.split_once('/').unwrap();
        assert_eq!(lab.node_of(&pod), netpol::node_for(ns, name, &NODES));
    }
    let probes = netpol::full_matrix();
    check(&lab, &probes, &format!("{mode:?}: no policy"));
    let except = lab.pod_ip("y/b").to_string();
    for (name, yaml) in upstream_cases() {
        let yaml = yaml.replace("EXCEPT", &except);
        let file = format!("{name}.yaml");
        lab.apply_yaml(&file, &yaml);
        check(&lab, &probes, &format!("{mode:?}: {name}"));
        lab.delete_yaml(&file, &yaml);
    }
    check(&lab, &probes, &format!("{mode:?}: all policies deleted"));
}

#[test]
fn tunnel_conformance_model_spread_over_three_nodes() {
    conformance(Mode::Tunnel);
}

#[test]
fn native_conformance_model_spread_over_three_nodes() {
    conformance(Mode::Native);
}

/// The property test's random steps on the model spread over three nodes: after every step
/// each node's kernel equals its compiler (`verify` on every node) and sampled probes,
/// most of them between nodes, get the reference's verdicts.
fn random_changes(mode: Mode) {
    eprintln!("{mode:?}");
    let (seed, steps) = sluice_integration::netpol::property_seed_and_steps(8);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut lab = three_nodes(&format!("mnp-{}", mode.as_str()), mode);
    lab.apply_yaml("model.yaml", &netpol::model_yaml_on(&NODES));
    let mut created = Created::default();
    for step in 0..steps {
        let what = match random_change(&mut rng, step, &mut created, &NODES) {
            Change::Apply(what, yaml) => {
                lab.apply_yaml(&format!("step-{step}.yaml"), &yaml);
                what
            }
            Change::Delete(what, yaml) => {
                lab.delete_yaml(&format!("delete-{step}.yaml"), &yaml);
                what
            }
        };
        let mut pods = netpol::model_pods();
        pods.extend(created.pods.iter().map(|(pod, _)| pod.clone()));
        let all = netpol::matrix(&pods);
        let sample: Vec<Probe> = (0..24)
            .map(|_| all[rng.usize(..all.len())].clone())
            .collect();
        check(
            &lab,
            &sample,
            &format!("{mode:?} seed {seed} step {step} ({what})"),
        );
    }
}

#[test]
fn tunnel_random_changes_keep_every_node_equal_to_the_reference() {
    random_changes(Mode::Tunnel);
}

#[test]
fn native_random_changes_keep_every_node_equal_to_the_reference() {
    random_changes(Mode::Native);
}
