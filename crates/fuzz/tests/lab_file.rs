//! The lab file (`sluice lab up -f`), mutated from the project's examples and one seed
//! with every section: `LabSpec::parse` must never panic, a refusal names a field of the
//! file (never just the document), and an accepted file holds up: written back and read
//! again it is the same lab.
//!
//! `lab_file_smoke` runs 3,000 inputs in CI; `SLUICE_FUZZ_INPUTS=1000000 cargo test -p
//! sluice-fuzz --test lab_file -- --ignored --nocapture` is the long run.
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{Campaign, Tally, inputs_from_env, seed_from_env};
use serde_json::Value;
use sluice_fuzz::Mutator;
use sluice_lab::{LabError, LabSpec};

/// A lab with every section the file has.
const EVERY_SECTION: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: Lab
serviceCIDR: 10.96.0.0/16
clusterCIDR: 10.244.0.0/16
routingMode: tunnel
underlay: {cidr: 172.30.0.0/24, mtu: 1500}
txChecksumOffload: false
policyMapMax: 4096
nodePortRange: 30000-32767
observability: {metrics: true, policyLog: deny, policyLogRate: 100}
loadBalancer:
  pool: 198.51.100.0/28
  healthCheck: {delay: 6s, interval: 500ms}
masquerade: {}
nodes:
  - {name: node-1, podCIDR: 10.244.1.0/24, zone: a}
  - {name: node-2, podCIDR: 10.244.2.0/24, underlayAddress: 172.30.0.12, zone: b}
world:
  - name: client
    address: 192.0.2.10
    attach: router
  - name: internet
    address: 203.0.113.10
    attach: underlay
    ports: [{port: 80, protocol: TCP}, {port: 53, protocol: UDP}]
"#;

fn corpus() -> Vec<Value> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut texts = vec![EVERY_SECTION.to_string()];
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("lab")
        {
            texts.push(std::fs::read_to_string(path).unwrap());
        }
    }
    let mut corpus: Vec<Value> = texts
        .iter()
        .filter(|text| {
            let parsed = LabSpec::parse(Path::new("seed.yaml"), text);
            assert!(
                parsed.is_ok() || text.as_str() != EVERY_SECTION,
                "{parsed:?}"
            );
            parsed.is_ok()
        })
        .map(|text| serde_saphyr::from_str(text).unwrap())
        .collect();
    corpus.sort_by_key(|v: &Value| v.to_string());
    assert!(corpus.len() >= 5, "only {} valid lab files", corpus.len());
    corpus
}

/// Reads one input; a failure description if a property does not hold.
fn check(text: &str, bent_text: bool, t: &mut Tally) -> Option<String> {
    match LabSpec::parse(Path::new("lab.yaml"), text) {
        Ok(spec) => {
            t.count("accepted");
            // Written back (as the lab keeps it) and read again: the same lab.
            let again: LabSpec = match serde_json::to_string(&spec)
                .map_err(|e| e.to_string())
                .and_then(|json| serde_json::from_str(&json).map_err(|e| e.to_string()))
            {
                Ok(again) => again,
                Err(e) => return Some(format!("accepted lab does not round-trip: {e}: {text}")),
            };
            (again != spec).then(|| format!("accepted lab changed on a round trip: {text}"))
        }
        Err(LabError::LabFile { field, message, .. }) => {
            t.count("refused");
            if message.is_empty() {
                return Some(format!("refusal without a message: {text}"));
            }
            if field == "(document)" {
                t.count("refused as a whole document");
                // A file that is not YAML at all has no field to name; one that is
                // YAML of the wrong shape should say where.
                if !bent_text {
                    return Some(format!("refusal names no field: {message}: {text}"));
                }
            }
            None
        }
        Err(other) => Some(format!("refusal of another kind: {other}: {text}")),
    }
}

fn run(inputs: u64) {
    let corpus = corpus();
    let seed = seed_from_env();
    let mut mutator = Mutator::new(seed, &corpus);
    let campaign = Campaign::run("lab file", seed, inputs, |t| {
        let mut doc = corpus[mutator.rng().usize(..corpus.len())].clone();
        if mutator.rng().u8(..10) == 0 {
            t.count("text bent");
            let text = mutator.mutate_text(&serde_json::to_string_pretty(&doc).unwrap());
            return check(&text, true, t);
        }
        for _ in 0..=mutator.rng().usize(..3) {
            mutator.mutate(&mut doc);
        }
        check(&serde_json::to_string(&doc).unwrap(), false, t)
    });
    campaign.finish();
}

#[test]
fn lab_file_smoke() {
    run(3_000);
}

#[test]
#[ignore = "the long run: SLUICE_FUZZ_INPUTS inputs (default 1,000,000)"]
fn lab_file_long() {
    run(inputs_from_env());
}

/// The lab file's reader refuses YAML that aliases expand past its budget.
#[test]
fn an_alias_bomb_is_refused() {
    let start = std::time::Instant::now();
    let refused =
        LabSpec::parse(Path::new("bomb.yaml"), &common::alias_bomb()).expect_err("a bomb");
    println!("alias bomb refused after {:?}: {refused}", start.elapsed());
}
