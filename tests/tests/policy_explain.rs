//! `sluice policy explain` on the upstream conformance model: for the model without policy
//! and with each of the upstream suite's policies, every probe the conformance test sends
//! (pairs x ports x protocols) is explained by the agent, whose verdict must equal the
//! reference evaluator's, and whose kernel check (the flow's key looked up in the real
//! maps, as the datapath does) must agree with it. Then the CLI's prose names the policy
//! and rule that allow a flow, and its exit status tells allowed, denied and an error
//! apart. Spread over three nodes, each agent explains with the same verdicts, checks its
//! own pods' maps and says the others are not on its node; the CLI asks both ends' agents.

use std::time::Instant;

use sluice_api::{
    Protocol,
    explain::{ExplainRequest, ExplainVerdict, KernelCheck, PolicyExplanation},
};
use sluice_integration::{
    ONE_NODE_LAB, TestLab,
    multinode::{Mode, NODES, three_nodes},
    netpol::{self, Probe, upstream_cases},
};

/// The explanation of `probe` by the agent of the source's node.
fn explain(lab: &TestLab, probe: &Probe) -> PolicyExplanation {
    let protocol = match probe.protocol {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        other => panic!("the model probes no {other}"),
    };
    lab.agent(&lab.node_of(&probe.from))
        .explain(&ExplainRequest {
            from: probe.from.clone(),
            to: probe.to.clone(),
            port: probe.port,
            protocol,
        })
        .unwrap_or_else(|e| panic!("explain {probe:?}: {e}"))
}

/// Explains every probe; panics with each one whose verdict differs from the reference or
/// whose kernel check disagrees.
fn check(lab: &TestLab, probes: &[Probe], what: &str) {
    let expected = netpol::expected(&netpol::snapshot(lab), probes);
    let start = Instant::now();
    let mut report = String::new();
    let mut allowed = 0;
    for probe in probes {
        let e = explain(lab, probe);
        allowed += usize::from(e.allowed);
        if Some(&e.allowed) != expected.get(probe) {
            report += &format!(
                "{} -> {} {}/{}: reference {:?}, explain {} (egress {}, ingress {})\n",
                probe.from,
                probe.to,
                probe.port,
                probe.protocol,
                expected.get(probe),
                e.allowed,
                e.egress.verdict.as_str(),
                e.ingress.verdict.as_str()
            );
        }
        for (d, end) in [(&e.egress, &probe.from), (&e.ingress, &probe.to)] {
            let here = lab.node_of(end) == e.node;
            let fine = match &d.kernel {
                KernelCheck::Checked { agrees, .. } => here && *agrees,
                KernelCheck::NotOnThisNode { node } => {
                    !here && node.as_deref() == Some(lab.node_of(end).as_str())
                }
                KernelCheck::NotAPod => false,
            };
            if !fine {
                report += &format!(
                    "{} -> {} {}/{} {}: kernel {:?}\n",
                    probe.from, probe.to, probe.port, probe.protocol, d.direction, d.kernel
                );
            }
        }
    }
    eprintln!(
        "{what}: {} probes explained, {allowed} allowed, in {:?}",
        probes.len(),
        start.elapsed()
    );
    assert!(report.is_empty(), "{what}: explanations differ:\n{report}");
}

#[test]
fn policy_explain_agrees_with_the_reference_on_the_conformance_model() {
    let started = Instant::now();
    let mut lab = TestLab::up("explain", ONE_NODE_LAB);
    lab.apply_yaml("model.yaml", &netpol::model_yaml());
    let probes = netpol::full_matrix();
    check(&lab, &probes, "no policy");
    let except = lab.pod_ip("y/b").to_string();
    for (name, yaml) in upstream_cases() {
        let yaml = yaml.replace("EXCEPT", &except);
        let file = format!("{name}.yaml");
        lab.apply_yaml(&file, &yaml);
        check(&lab, &probes, name);
        if name == "allow-from-namespace-y-to-x-a" {
            readable_output_and_exit_codes(&lab);
        }
        lab.delete_yaml(&file, &yaml);
    }
    eprintln!(
        "{} cases of {} probes explained in {:?}",
        upstream_cases().len() + 1,
        probes.len(),
        started.elapsed()
    );
}

/// With x/allow-ns-y applied: the prose names the policy, rule and peer that allow y/b ->
/// x/a and exits 0; a denied flow exits 1 naming the isolating policy; an unknown pod
/// exits 2 naming it.
fn readable_output_and_exit_codes(lab: &TestLab) {
    let args = ["policy", "explain", "--from", "y/b", "--to", "x/a"];
    let allowed = lab.cli_output(&[&args[..], &["--port", "80", "--protocol", "UDP"]].concat());
    let text = String::from_utf8_lossy(&allowed.stdout);
    eprintln!("{text}");
    assert_eq!(allowed.status.code(), Some(0), "{text}");
    assert!(text.contains("Verdict:  ALLOWED"), "{text}");
    assert!(
        text.contains("x/allow-ns-y spec.ingress[0].from[0]"),
        "the rule and peer are named:\n{text}"
    );
    assert!(text.contains("agrees"), "{text}");

    let denied = lab.cli_output(&[
        "policy", "explain", "--from", "x/b", "--to", "x/a", "--port", "81", "-o", "json",
    ]);
    let json: PolicyExplanation = serde_json::from_slice(&denied.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&denied.stdout)));
    assert_eq!(denied.status.code(), Some(1));
    assert_eq!(json.ingress.verdict, ExplainVerdict::Denied);
    assert_eq!(json.ingress.isolated_by, ["x/allow-ns-y"]);
    assert_eq!(json.egress.verdict, ExplainVerdict::NotIsolated);

    let unknown = lab.cli_output(&[
        "policy", "explain", "--from", "x/nope", "--to", "x/a", "--port", "80",
    ]);
    let unknown_err = String::from_utf8_lossy(&unknown.stderr);
    assert!(unknown.status.code() == Some(2), "{unknown_err}");
    assert!(unknown_err.contains("x/nope"), "{unknown_err}");
}

/// The model over three nodes with x/allow-ns-y: every probe explained by the source's
/// agent gets the reference's verdict, its side checked in its maps and the other side
/// named as on its node; the CLI merges both agents' checks into one answer.
#[test]
fn policy_explain_across_nodes_checks_each_side_on_its_own_node() {
    let mut lab = three_nodes("explainx", Mode::Native);
    lab.apply_yaml("model.yaml", &netpol::model_yaml_on(&NODES));
    let (name, yaml) = upstream_cases()
        .into_iter()
        .find(|(name, _)| *name == "allow-from-namespace-y-to-x-a")
        .expect("the upstream case");
    lab.apply_yaml("policy.yaml", &yaml);
    check(&lab, &netpol::full_matrix(), name);

    let (from, to) = ("y/b", "x/a");
    assert_ne!(lab.node_of(from), lab.node_of(to), "the model spreads them");
    let out = lab.cli_output(&[
        "policy", "explain", "--from", from, "--to", to, "--port", "80", "-o", "json",
    ]);
    let json: PolicyExplanation = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json.ingress.verdict, ExplainVerdict::Allowed);
    for d in [&json.egress, &json.ingress] {
        assert!(
            matches!(d.kernel, KernelCheck::Checked { agrees: true, .. }),
            "{}: {:?}",
            d.direction,
            d.kernel
        );
    }
}
