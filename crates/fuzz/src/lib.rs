//! Seeded mutation of structured inputs, for the campaigns in `tests/`.
//!
//! Coverage-guided fuzzers (cargo-fuzz, bolero's libFuzzer engine) need a nightly
//! compiler, which this project does not build with; so inputs are grown from valid ones:
//! a [`Mutator`] takes a document (as a JSON value), picks one node of its tree at random
//! and bends it (removes it, changes its type, gives it a boundary or a wrong-kind value,
//! splices in a subtree taken from another valid input, empties or repeats a list, adds an
//! unknown field), and says which field it bent, so a campaign can check that a refusal
//! names it. [`Mutator::mutate_text`] bends the serialized text instead, for the parsers.

use serde_json::{Map, Value};

/// The name of the field [`MutationKind::UnknownField`] adds.
pub const UNKNOWN_FIELD: &str = "sluiceFuzzUnknown";

/// One step of a field path: an object's key or a list's index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// What a mutation did, and where.
#[derive(Clone, Debug)]
pub struct Mutation {
    pub path: Vec<Step>,
    pub kind: MutationKind,
}

impl Mutation {
    /// The path as Kubernetes messages write it: `spec.ports[0].port`.
    pub fn field(&self) -> String {
        field_path(&self.path)
    }
}

/// The path `steps` as Kubernetes messages write it.
pub fn field_path(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MutationKind {
    /// The field (or list item) is gone.
    Removed,
    /// A boundary or wrong-kind scalar in its place.
    Scalar,
    /// A subtree of another valid input in its place.
    Spliced,
    /// An empty list or object in its place.
    Emptied,
    /// A list item repeated.
    Repeated,
    /// A field no schema has, added beside it.
    UnknownField,
}

/// Scalars that sit on boundaries or belong to other fields: numbers around ports,
/// counts and integer widths, strings that are almost addresses, CIDRs, enum values,
/// names and labels.
fn interesting(rng: &mut fastrand::Rng) -> Value {
    const NUMBERS: [i64; 14] = [
        0,
        -1,
        1,
        2,
        80,
        65535,
        65536,
        30000,
        32767,
        2_147_483_647,
        2_147_483_648,
        4_294_967_296,
        i64::MIN,
        i64::MAX,
    ];
    const STRINGS: [&str; 40] = [
        "",
        " ",
        "0",
        "-1",
        "80",
        "65536",
        "http",
        "dns-tcp",
        "a-b",
        "-a",
        "a-",
        "A",
        "a.b",
        "a/b",
        "é",
        "名前",
        "10.0.0.1",
        "10.0.0.256",
        "10.0.0.0/8",
        "10.0.0.0/33",
        "0.0.0.0/0",
        "::1",
        "fd00::/64",
        "1.2.3",
        "None",
        "TCP",
        "UDP",
        "SCTP",
        "tcp",
        "ICMP",
        "ClusterIP",
        "NodePort",
        "LoadBalancer",
        "ExternalName",
        "Local",
        "Cluster",
        "ClientIP",
        "Ingress",
        "Egress",
        "NotIn",
    ];
    match rng.u8(..10) {
        0..=3 => Value::from(NUMBERS[rng.usize(..NUMBERS.len())]),
        4 => serde_json::Number::from_f64([0.5, -0.0, 1e300, 80.0][rng.usize(..4)])
            .map_or(Value::Null, Value::Number),
        5 => Value::Bool(rng.bool()),
        6 => Value::Null,
        7 => Value::String("a".repeat(rng.usize(60..300))),
        _ => Value::String(STRINGS[rng.usize(..STRINGS.len())].to_string()),
    }
}

/// Every node's path in `value`, root first.
fn paths(value: &Value, at: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(at.clone());
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                at.push(Step::Key(key.clone()));
                paths(child, at, out);
                at.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                at.push(Step::Index(i));
                paths(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn node_mut<'a>(value: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter()
        .try_fold(value, |node, step| match (node, step) {
            (Value::Object(map), Step::Key(key)) => map.get_mut(key),
            (Value::Array(items), Step::Index(i)) => items.get_mut(*i),
            _ => None,
        })
}

/// The seeded mutator, with subtrees of valid inputs to splice from.
pub struct Mutator {
    rng: fastrand::Rng,
    donors: Vec<Value>,
}

impl Mutator {
    /// A mutator drawing from `seed`, splicing subtrees of `corpus`.
    pub fn new(seed: u64, corpus: &[Value]) -> Self {
        let mut donors = Vec::new();
        for value in corpus {
            let mut all = Vec::new();
            paths(value, &mut Vec::new(), &mut all);
            let mut copy = value.clone();
            for path in all.iter().skip(1) {
                if let Some(node) = node_mut(&mut copy, path) {
                    donors.push(node.clone());
                }
            }
        }
        Self {
            rng: fastrand::Rng::with_seed(seed),
            donors,
        }
    }

    pub fn rng(&mut self) -> &mut fastrand::Rng {
        &mut self.rng
    }

    /// Bends one node of `value` (never the root itself), and says which and how.
    pub fn mutate(&mut self, value: &mut Value) -> Mutation {
        let mut all = Vec::new();
        paths(value, &mut Vec::new(), &mut all);
        if all.len() < 2 {
            *value = Value::Object(Map::new());
            return Mutation {
                path: Vec::new(),
                kind: MutationKind::Emptied,
            };
        }
        let path = all[self.rng.usize(1..all.len())].clone();
        let kind = match self.rng.u8(..12) {
            0..=2 => MutationKind::Removed,
            3..=6 => MutationKind::Scalar,
            7..=8 if !self.donors.is_empty() => MutationKind::Spliced,
            9 => MutationKind::Emptied,
            10 => MutationKind::Repeated,
            _ => MutationKind::UnknownField,
        };
        let (parent_path, last) = path.split_at(path.len() - 1);
        let replacement = match kind {
            MutationKind::Scalar => Some(interesting(&mut self.rng)),
            MutationKind::Spliced => Some(self.donors[self.rng.usize(..self.donors.len())].clone()),
            MutationKind::Emptied => Some(if self.rng.bool() {
                Value::Array(Vec::new())
            } else {
                Value::Object(Map::new())
            }),
            _ => None,
        };
        let Some(parent) = node_mut(value, parent_path) else {
            return Mutation { path, kind };
        };
        // Where the input differs now, when it is not the chosen node itself.
        let mut path = path.clone();
        match (parent, &last[0], replacement) {
            (parent, step, Some(new)) => {
                if let Some(node) = node_mut(parent, std::slice::from_ref(step)) {
                    *node = new;
                }
            }
            (Value::Object(map), Step::Key(key), None) => match kind {
                MutationKind::Removed => {
                    map.remove(key);
                }
                MutationKind::UnknownField => {
                    map.insert(UNKNOWN_FIELD.into(), interesting(&mut self.rng));
                    path = [parent_path, &[Step::Key(UNKNOWN_FIELD.into())]].concat();
                }
                _ => {
                    // Repeating applies to list items; elsewhere the key is emptied.
                    map.insert(key.clone(), Value::Null);
                }
            },
            (Value::Array(items), Step::Index(i), None) => match kind {
                MutationKind::Removed => {
                    items.remove(*i);
                }
                MutationKind::Repeated => {
                    let item = items[*i].clone();
                    items.insert(*i, item);
                    path = [parent_path, &[Step::Index(i + 1)]].concat();
                }
                _ => {
                    items.push(interesting(&mut self.rng));
                    path = [parent_path, &[Step::Index(items.len() - 1)]].concat();
                }
            },
            _ => {}
        }
        Mutation { path, kind }
    }

    /// Bends `text` itself: cuts it, repeats or drops a line, or inserts a character the
    /// YAML and JSON grammars give meaning to.
    pub fn mutate_text(&mut self, text: &str) -> String {
        let mut bytes = text.as_bytes().to_vec();
        if bytes.is_empty() {
            return String::new();
        }
        let at = self.rng.usize(..bytes.len());
        match self.rng.u8(..6) {
            0 => bytes.truncate(at),
            1 => {
                const INSERTS: [&str; 14] = [
                    ":",
                    "-",
                    "\t",
                    "{",
                    "}",
                    "[",
                    "\"",
                    "'",
                    "&a ",
                    "*a",
                    "!!binary ",
                    "#",
                    "\n---\n",
                    "\0",
                ];
                let insert = INSERTS[self.rng.usize(..INSERTS.len())];
                bytes.splice(at..at, insert.bytes());
            }
            2 => {
                let lines: Vec<&str> = text.split_inclusive('\n').collect();
                let i = self.rng.usize(..lines.len());
                let mut out: Vec<&str> = lines.clone();
                out.insert(i, lines[i]);
                return out.concat();
            }
            3 => {
                let lines: Vec<&str> = text.split_inclusive('\n').collect();
                let i = self.rng.usize(..lines.len());
                return lines
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, l)| *l)
                    .collect();
            }
            4 => bytes[at] = self.rng.u8(..),
            _ => {
                // Indentation is structure in YAML.
                bytes.splice(at..at, *b"  ");
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mutation_names_the_field_it_bent() {
        let doc: Value = serde_json::json!({"spec": {"ports": [{"port": 80}]}});
        let mut mutator = Mutator::new(1, std::slice::from_ref(&doc));
        for _ in 0..200 {
            let mut copy = doc.clone();
            let mutation = mutator.mutate(&mut copy);
            let field = mutation.field();
            let expected: &[&str] = match mutation.kind {
                MutationKind::UnknownField => &[
                    "sluiceFuzzUnknown",
                    "spec.sluiceFuzzUnknown",
                    "spec.ports[1]",
                    "spec.ports[0].sluiceFuzzUnknown",
                ],
                MutationKind::Repeated => {
                    &["spec.ports[1]", "spec", "spec.ports", "spec.ports[0].port"]
                }
                _ => &["spec", "spec.ports", "spec.ports[0]", "spec.ports[0].port"],
            };
            assert!(expected.contains(&field.as_str()), "{mutation:?}");
        }
    }
}
