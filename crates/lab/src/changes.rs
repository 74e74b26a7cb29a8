//! What `lab apply` and `lab delete` changed (or, with a dry run, would change): one
//! [`Change`] per object, kubectl's line for each, and how long every agent took to realize
//! the result.

use std::{collections::BTreeSet, time::Duration};

use serde::{Serialize, Serializer};
use serde_json::Value;

/// What happened to one object, in kubectl's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Configured,
    Unchanged,
    Deleted,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Configured => "configured",
            Self::Unchanged => "unchanged",
            Self::Deleted => "deleted",
        }
    }
}

/// One object an apply or delete touched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub action: Action,
    /// `Deployment`, `Service`, ...
    pub kind: &'static str,
    /// None for a Namespace, which has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// For `configured`: the paths of the fields whose applied value changed
    /// (`spec.replicas`, `metadata.labels.app`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
    /// For a pod a controller made or removes: its owner (`Deployment default/web`). kubectl
    /// prints no line for these; the JSON document and a dry run list them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl Change {
    /// kubectl's line: `deployment.apps/web configured`, `service "web" deleted`.
    pub fn line(&self) -> String {
        let resource = resource_type(self.kind);
        match self.action {
            Action::Deleted => format!("{resource} {:?} deleted", self.name),
            action => format!("{resource}/{} {}", self.name, action.as_str()),
        }
    }
}

/// kubectl's resource name of a kind, as its output lines name objects.
fn resource_type(kind: &str) -> &'static str {
    match kind {
        "Namespace" => "namespace",
        "Pod" => "pod",
        "Deployment" => "deployment.apps",
        "Service" => "service",
        "EndpointSlice" => "endpointslice.discovery.k8s.io",
        "NetworkPolicy" => "networkpolicy.networking.k8s.io",
        _ => "object",
    }
}

/// When one agent had realized the report's generation.
#[derive(Clone, Debug, Serialize)]
pub struct AgentRealized {
    pub node: String,
    /// From the start of the call until this agent reported the generation realized.
    #[serde(rename = "realized_ms", serialize_with = "millis")]
    pub realized_in: Duration,
}

/// What `lab apply` / `lab delete` did.
#[derive(Clone, Debug, Serialize)]
pub struct ApplyReport {
    /// Every object of the input, in input order, then the pods controllers create or remove.
    pub changes: Vec<Change>,
    /// Events worth a line: a LoadBalancer left pending, with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Nothing was changed: the report says what would have been.
    pub dry_run: bool,
    /// Generation of `cluster.json` after the call.
    pub generation: u64,
    /// From the start of the call until every agent had realized the final generation: for a
    /// new backend, the time from `lab apply` until it can receive traffic.
    #[serde(rename = "realized_ms", serialize_with = "millis")]
    pub realized_in: Duration,
    /// Each node's agent, in node order (empty for a dry run or a lab without agents).
    pub agents: Vec<AgentRealized>,
}

impl ApplyReport {
    /// kubectl's output: a line per object of the input, then the warnings.
    pub fn lines(&self) -> Vec<String> {
        self.changes
            .iter()
            .filter(|c| c.owner.is_none())
            .map(Change::line)
            .chain(self.warnings.iter().map(|w| format!("Warning: {w}")))
            .collect()
    }
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3)
}

/// The paths of the leaves that differ between two applied objects, in path order.
pub fn changed_fields(before: &Value, after: &Value) -> Vec<String> {
    let mut out = BTreeSet::new();
    diff(before, after, String::new(), &mut out);
    out.into_iter().collect()
}

fn diff(before: &Value, after: &Value, path: String, out: &mut BTreeSet<String>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            let keys: BTreeSet<&String> = b.keys().chain(a.keys()).collect();
            for k in keys {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff(
                    b.get(k).unwrap_or(&Value::Null),
                    a.get(k).unwrap_or(&Value::Null),
                    child,
                    out,
                );
            }
        }
        (Value::Array(b), Value::Array(a)) if b.len() == a.len() => {
            for (i, (b, a)) in b.iter().zip(a).enumerate() {
                diff(b, a, format!("{path}[{i}]"), out);
            }
        }
        (b, a) if b != a => {
            out.insert(path);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn changed_fields_name_the_leaves() {
        let before = json!({"spec": {"replicas": 2, "ports": [{"port": 80}], "a": [1]},
                            "metadata": {"labels": {"app": "web"}}});
        let after = json!({"spec": {"replicas": 3, "ports": [{"port": 81}], "a": [1, 2]},
                           "metadata": {"labels": {"app": "web", "tier": "x"}}});
        assert_eq!(
            changed_fields(&before, &after),
            [
                "metadata.labels.tier",
                "spec.a",
                "spec.ports[0].port",
                "spec.replicas"
            ]
        );
        assert!(changed_fields(&before, &before).is_empty());
    }

    #[test]
    fn lines_are_kubectls() {
        let change = |action, owner: Option<&str>| Change {
            action,
            kind: "Deployment",
            namespace: Some("default".into()),
            name: "web".into(),
            fields: Vec::new(),
            owner: owner.map(String::from),
        };
        let report = ApplyReport {
            changes: vec![
                change(Action::Configured, None),
                change(Action::Deleted, None),
                change(Action::Created, Some("x")),
            ],
            warnings: vec!["service/default/lb: LoadBalancer pending: pool".into()],
            dry_run: false,
            generation: 3,
            realized_in: Duration::from_micros(1500),
            agents: Vec::new(),
        };
        assert_eq!(
            report.lines(),
            [
                "deployment.apps/web configured",
                "deployment.apps \"web\" deleted",
                "Warning: service/default/lb: LoadBalancer pending: pool"
            ]
        );
        let json = serde_json::to_value(&report).unwrap_or_default();
        assert_eq!(json["realized_ms"], 1.5);
        assert_eq!(json["changes"][0]["kind"], "Deployment");
        assert_eq!(json["changes"][0]["action"], "configured");
    }
}
