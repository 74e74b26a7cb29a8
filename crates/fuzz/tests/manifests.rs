//! Manifests and the Kubernetes fixtures, mutated from the valid ones the project keeps
//! (the compiler's table tests and `examples/`): every input is read as `sluice lab apply`
//! reads it (`sluice_sources::parse_str`): it must never panic; a refusal names the file,
//! the document, and, when the bent document is still an object of a supported kind
//! with a name, the object and a field; an acceptance holds every object of the input
//! (never part of it) and compiles. The same objects are also fed to the compiler as the
//! Kubernetes source hands them over, decoded but not validated by sluice (an API server
//! validates by its own rules): compiling must never panic either.
//!
//! `manifests_smoke` runs 2,000 inputs in CI; `SLUICE_FUZZ_INPUTS=1000000 cargo test -p
//! sluice-fuzz --test manifests -- --ignored --nocapture` is the long run.
// A test binary: a panic in a fixture helper is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use common::{Campaign, Tally, inputs_from_env, seed_from_env};
use serde_json::Value;
use sluice_compiler::{NodeContext, compile};
use sluice_fuzz::{Mutation, Mutator, Step};
use sluice_sources::{Object, parse_str};
use sluice_store::{LocalEndpoint, Snapshot};

const SUPPORTED: &[(&str, &str)] = &[
    ("v1", "Namespace"),
    ("v1", "Pod"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The valid inputs: each a file's documents.
fn corpus() -> Vec<Vec<Value>> {
    let mut texts = Vec::new();
    let testdata = repo().join("crates/compiler/testdata");
    for entry in std::fs::read_dir(&testdata).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path().join("input.yaml")).unwrap();
        // The first document is the table test's own header.
        texts.push(text.split_once("\n---\n").unwrap().1.to_string());
    }
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        texts.push(std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    let mut corpus: Vec<Vec<Value>> = texts
        .iter()
        .filter(|text| parse_str(Path::new("seed.yaml"), text).is_ok_and(|m| !m.is_empty()))
        .map(|text| {
            text.split("\n---\n")
                .filter_map(|doc| serde_saphyr::from_str::<Value>(doc).ok())
                .filter(|v| !v.is_null())
                .collect()
        })
        .collect();
    corpus.sort_by_key(|docs| serde_json::to_string(docs).unwrap());
    assert!(corpus.len() >= 20, "only {} valid seed files", corpus.len());
    corpus
}

/// Whether `doc` is still an object of a supported kind with a name: then a refusal
/// must name it and a field.
fn identifiable(doc: &Value) -> bool {
    let str_at = |key: &str| doc.get(key).and_then(Value::as_str);
    let kind = (str_at("apiVersion"), str_at("kind"));
    SUPPORTED.iter().any(|&(v, k)| kind == (Some(v), Some(k)))
        && doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty())
}

/// The documents as one file: each as JSON (a YAML flow mapping) on its own line.
fn render(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_json::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// How the refusal's field relates to the bent one.
fn agreement(error_field: &str, mutated: &str) -> &'static str {
    if error_field == mutated {
        "refusal names the bent field"
    } else if mutated.starts_with(error_field) || error_field.starts_with(mutated) {
        "refusal names a field around it"
    } else {
        "refusal names another field"
    }
}

/// Reads one structured input; a failure description if a property does not hold.
fn check_structured(
    docs: &[Value],
    bent: usize,
    mutation: &Mutation,
    single: Option<&Mutation>,
    t: &mut Tally,
) -> Option<String> {
    let text = render(docs);
    let file = Path::new("fuzz.yaml");
    match parse_str(file, &text) {
        Ok(manifests) => {
            t.count("accepted");
            let objects: usize = docs.iter().map(count_objects).sum();
            if manifests.len() != objects {
                return Some(format!(
                    "accepted {} objects of {objects}: {text}",
                    manifests.len()
                ));
            }
            compile_all(manifests.into_iter().map(|m| m.object), t);
            None
        }
        Err(e) => {
            t.count("refused");
            let names_object = e.object.is_some() && e.field.is_some();
            if e.message.is_empty() || e.document.is_none() {
                return Some(format!("refusal without message or document: {e}"));
            }
            if e.document == Some(bent + 1) && identifiable(&docs[bent]) && mutation.path.len() > 1
            {
                if !names_object && !e.message.starts_with("defined twice") {
                    return Some(format!(
                        "refusal of an identifiable object names no object and field \
                         (bent {}): {e}\n{text}",
                        mutation.field()
                    ));
                }
                if let (Some(field), Some(single)) = (&e.field, single) {
                    t.count(agreement(field, &single.field()));
                }
            }
            None
        }
    }
}

fn count_objects(doc: &Value) -> usize {
    match doc.get("kind").and_then(Value::as_str) {
        Some("List") => doc
            .get("items")
            .and_then(Value::as_array)
            .map_or(0, |items| items.iter().map(count_objects).sum()),
        _ => 1,
    }
}

/// Decodes each document as the Kubernetes source does (its type, no validation of
/// sluice's own) and compiles what decodes.
fn compile_as_from_the_api(docs: &[Value], t: &mut Tally) {
    let objects = docs.iter().filter_map(|doc| {
        let kind = doc.get("kind").and_then(Value::as_str)?;
        let doc = doc.clone();
        Some(match kind {
            "Namespace" => Object::Namespace(serde_json::from_value(doc).ok()?),
            "Pod" => Object::Pod(serde_json::from_value(doc).ok()?),
            "Service" => Object::Service(serde_json::from_value(doc).ok()?),
            "EndpointSlice" => Object::EndpointSlice(serde_json::from_value(doc).ok()?),
            "NetworkPolicy" => Object::NetworkPolicy(serde_json::from_value(doc).ok()?),
            _ => return None,
        })
    });
    compile_all(objects, t);
}

/// Compiles `objects` for node-a, every pod with an IPv4 address a local endpoint.
fn compile_all(objects: impl Iterator<Item = Object>, t: &mut Tally) {
    let mut snapshot = Snapshot::default();
    for object in objects {
        match object {
            Object::Namespace(o) => snapshot.namespaces.push(o),
            Object::Pod(o) => snapshot.pods.push(o.into()),
            Object::Service(o) => snapshot.services.push(o),
            Object::EndpointSlice(o) => snapshot.endpoint_slices.push(o.into()),
            Object::NetworkPolicy(o) => snapshot.network_policies.push(o),
            Object::Deployment(_) => {}
        }
    }
    let mut interfaces = BTreeMap::new();
    for (i, pod) in snapshot.pods.iter().enumerate() {
        let Some(address) = pod.pod_ip() else {
            continue;
        };
        let interface = format!("lxc{i}");
        interfaces.insert(interface.clone(), 10 + i as u32);
        snapshot.endpoints.push(LocalEndpoint {
            node: "node-a".into(),
            namespace: pod.namespace().unwrap_or_default().to_owned(),
            pod: pod.name().unwrap_or_default().to_owned(),
            interface,
            addresses: BTreeSet::from([address]),
        });
    }
    let node = NodeContext {
        node: "node-a".into(),
        interfaces,
        ..NodeContext::default()
    };
    let desired = compile(&snapshot, &node);
    t.count("compiled");
    if !desired.problems.is_empty() {
        t.count("compiled with problems reported");
    }
}

/// One input: mostly one bent field of one document, sometimes several, sometimes the
/// text itself bent.
fn one_input(corpus: &[Vec<Value>], mutator: &mut Mutator, t: &mut Tally) -> Option<String> {
    let mut docs = corpus[mutator.rng().usize(..corpus.len())].clone();
    if mutator.rng().u8(..10) == 0 {
        t.count("text bent");
        let text = mutator.mutate_text(&render(&docs));
        return match parse_str(Path::new("fuzz.yaml"), &text) {
            Err(e) if e.message.is_empty() => Some(format!("refusal without a message: {text}")),
            _ => None,
        };
    }
    let bent = mutator.rng().usize(..docs.len());
    let mut mutation = mutator.mutate(&mut docs[bent]);
    let extra = mutator.rng().usize(..3);
    for _ in 0..extra {
        mutation = mutator.mutate(&mut docs[bent]);
    }
    t.count(if extra == 0 {
        "one field bent"
    } else {
        "several fields bent"
    });
    if mutation.path.first() == Some(&Step::Key("kind".into())) {
        t.count("kind bent");
    }
    // Which field a refusal should name is only known when one was bent.
    let single = (extra == 0).then_some(&mutation);
    let failure = check_structured(&docs, bent, &mutation, single, t);
    compile_as_from_the_api(&docs, t);
    failure
}

fn run(inputs: u64) {
    let corpus = corpus();
    let seed = seed_from_env();
    let flat: Vec<Value> = corpus.iter().flatten().cloned().collect();
    let mut mutator = Mutator::new(seed, &flat);
    let campaign = Campaign::run("manifests", seed, inputs, |t| {
        one_input(&corpus, &mut mutator, t)
    });
    campaign.finish();
}

#[test]
fn manifests_smoke() {
    run(2_000);
}

#[test]
#[ignore = "the long run: SLUICE_FUZZ_INPUTS inputs (default 1,000,000)"]
fn manifests_long() {
    run(inputs_from_env());
}

/// YAML's aliases let a few lines stand for billions of nodes ("billion laughs"): the
/// reader must refuse such a file rather than expand it.
#[test]
fn an_alias_bomb_is_refused() {
    let start = std::time::Instant::now();
    let refused = parse_str(Path::new("bomb.yaml"), &common::alias_bomb()).expect_err("a bomb");
    println!("alias bomb refused after {:?}: {refused}", start.elapsed());
}
