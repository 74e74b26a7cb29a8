//! The upstream NetworkPolicy conformance model in the lab: real traffic between the pods of
//! namespaces x, y and z on ports 80 and 81 over TCP and UDP must get exactly the verdicts
//! of the reference evaluator (a separate reading of the spec), for the upstream suite's
//! policies and for random sequences of policy, pod-label and namespace-label changes.

use std::time::Instant;

use sluice_integration::{
    ONE_NODE_LAB, TestLab,
    netpol::{self, Probe, policy, upstream_cases},
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
    let except = lab.pod_ip("y/b").to_string();
    for (name, yaml) in upstream_cases() {
        let yaml = yaml.replace("EXCEPT", &except);
        let file = format!("{name}.yaml");
        lab.apply_yaml(&file, &yaml);
        check(&lab, &probes, name);
        lab.delete_yaml(&file, &yaml);
    }
    check(&lab, &probes, "all policies deleted");
}

/// What the random sequence has created so far, to delete later.
#[derive(Default)]
struct Created {
    policies: Vec<String>,
    /// `(ns/pod, yaml)` of pods added to the model.
    pods: Vec<(String, String)>,
}

/// One random change to the model: a policy applied or deleted, a pod added, deleted or
/// relabelled, a namespace relabelled.
fn random_change(rng: &mut fastrand::Rng, step: usize, created: &mut Created) -> Change {
    let ns = netpol::NAMESPACES[rng.usize(..3)];
    let value = |rng: &mut fastrand::Rng| ["a", "b", "c"][rng.usize(..3)];
    match rng.u8(..12) {
        0..=4 => {
            let name = format!("p{step}");
            let peer = match rng.u8(..5) {
                0 => format!("    - podSelector:\n        matchLabels: {{pod: {}}}\n", value(rng)),
                1 => format!(
                    "    - namespaceSelector:\n        matchLabels: {{ns: \"{}\"}}\n",
                    netpol::NAMESPACES[rng.usize(..3)]
                ),
                2 => format!(
                    "    - namespaceSelector:\n        matchExpressions:\n        - {{key: ns, operator: NotIn, values: [\"{}\"]}}\n      podSelector:\n        matchLabels: {{pod: {}}}\n",
                    netpol::NAMESPACES[rng.usize(..3)],
                    value(rng)
                ),
                3 => "    - podSelector:\n        matchExpressions:\n        - {key: tier, operator: Exists}\n".to_string(),
                _ => "    - ipBlock: {cidr: 10.244.1.0/25}\n".to_string(),
            };
            let ports = match rng.u8(..4) {
                0 => String::new(),
                1 => format!("    ports:\n    - {{port: {}}}\n", 80 + rng.u16(..2)),
                2 => "    ports:\n    - {port: serve-81-udp, protocol: UDP}\n".to_string(),
                _ => "    ports:\n    - {port: 80, endPort: 81, protocol: UDP}\n".to_string(),
            };
            let (direction, peers) = if rng.bool() {
                ("ingress", "from")
            } else {
                ("egress", "to")
            };
            let spec = format!(
                "  podSelector:\n    matchLabels: {{pod: {}}}\n  {direction}:\n  - {peers}:\n{peer}{ports}",
                value(rng)
            );
            let yaml = policy(&name, ns, &spec);
            created.policies.push(yaml.clone());
            Change::Apply(format!("policy {ns}/{name}"), yaml)
        }
        5..=6 if !created.policies.is_empty() => {
            let yaml = created.policies.remove(rng.usize(..created.policies.len()));
            Change::Delete("delete a policy".into(), yaml)
        }
        7 => {
            // A new pod that shares a label with the model's pods, so policies select it.
            let name = format!("d{step}");
            let yaml = netpol::pod_yaml(ns, &name, &format!("pod: {}", value(rng)));
            created.pods.push((format!("{ns}/{name}"), yaml.clone()));
            Change::Apply(format!("add pod {ns}/{name}"), yaml)
        }
        8 if !created.pods.is_empty() => {
            let (pod, yaml) = created.pods.remove(rng.usize(..created.pods.len()));
            Change::Delete(format!("delete pod {pod}"), yaml)
        }
        8..=9 => {
            let pod = value(rng);
            let tier = if rng.bool() { "tier: web, " } else { "" };
            Change::Apply(
                format!("relabel pod {ns}/{pod}"),
                netpol::pod_yaml(ns, pod, &format!("{tier}pod: {pod}")),
            )
        }
        _ => {
            let team = ["red", "blue"][rng.usize(..2)];
            Change::Apply(
                format!("relabel namespace {ns}"),
                format!(
                    "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"{ns}\"\n  labels: {{ns: \"{ns}\", team: {team}}}\n"
                ),
            )
        }
    }
}

enum Change {
    /// What it does, and the YAML to apply.
    Apply(String, String),
    /// What it does, and the YAML of what to delete.
    Delete(String, String),
}

/// Random sequences of changes; after every step the kernel's maps equal the compiler's
/// output (`sluice verify`) and sampled real probes get the reference's verdicts.
#[test]
fn random_changes_keep_the_kernel_and_the_traffic_equal_to_the_reference() {
    let seed = std::env::var("SLUICE_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let steps: usize = std::env::var("SLUICE_PROPERTY_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    eprintln!("property seed {seed} ({steps} steps; rerun with SLUICE_PROPERTY_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut lab = model_lab("property");
    let mut created = Created::default();
    for step in 0..steps {
        let what = match random_change(&mut rng, step, &mut created) {
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
