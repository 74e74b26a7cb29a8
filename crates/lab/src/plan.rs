//! What an apply or a delete means for the lab, decided before anything on the machine
//! changes: the API server's admission (lab-level checks), the controllers (ClusterIPs,
//! Deployment pods), the scheduler and IPAM. Pure: it only computes the next [`LabState`].
//!
//! An apply goes in steps: Namespaces (the other objects may live in them), the checks that
//! look across objects (every object's namespace exists, requested ClusterIPs are free),
//! then each object's write in input order, with its own checks. Every violation is
//! collected, so one apply reports them all. Services and their ClusterIPs are in
//! [`services`], Pods and their scheduling in [`pods`], Deployments in [`deployments`].

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::Value;
use sluice_sources::{Manifest, ManifestError, Object};

use crate::{
    LabError,
    changes::{Action, Change, changed_fields},
    loadbalancer,
    state::{self, LabState, Stored, key, now},
};

mod deployments;
mod nodeports;
mod pods;
mod services;

pub use self::{deployments::reconcile_deployments, services::cluster_ip};
use self::{nodeports::NodePorts, pods::mark_deleting, services::ClusterIps};
// The tests name pod records through `super::*`.
#[cfg(test)]
use crate::state::PodRecord;

/// The lab after the change, and the pods to start and to stop to get there.
pub struct Plan {
    /// New pods are in it (not ready yet); pods to remove are marked terminating.
    pub state: LabState,
    /// Keys of the pods to create.
    pub create: Vec<String>,
    /// Keys of the terminating pods, to remove once every agent has realized that.
    pub remove: Vec<String>,
    /// Every object of the input, in input order.
    pub changes: Vec<Change>,
    /// What a cloud's events would say: a LoadBalancer left pending.
    pub warnings: Vec<String>,
}

impl Plan {
    fn finish(
        state: LabState,
        create: Vec<String>,
        changes: Vec<Change>,
        warnings: Vec<String>,
    ) -> Self {
        // Includes pods a failed earlier call left terminating.
        let remove = state
            .pods
            .iter()
            .filter(|(_, p)| p.deleting.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        Plan {
            state,
            create,
            remove,
            changes,
            warnings,
        }
    }

    /// kubectl's output lines.
    #[cfg(test)]
    pub fn lines(&self) -> Vec<String> {
        self.changes
            .iter()
            .map(Change::line)
            .chain(self.warnings.iter().map(|w| format!("Warning: {w}")))
            .collect()
    }
}

/// An apply in progress: the state being changed and what it has to say.
struct Apply<'a> {
    st: LabState,
    /// The whole input, for checks that look at the other objects of the apply.
    manifests: &'a [Manifest],
    errors: Vec<ManifestError>,
    changes: Vec<Change>,
    warnings: Vec<String>,
    create: Vec<String>,
    when: Time,
    /// nodePorts and healthCheckNodePorts taken, so allocation steps around them.
    claimed_node_ports: NodePorts,
}

impl Apply<'_> {
    fn violation(&mut self, m: &Manifest, field: &str, message: impl Into<String>) {
        self.errors.push(violation(m, field, message));
    }

    /// `m` created, configured or unchanged against what was applied before.
    fn line(&mut self, m: &Manifest, previous: Option<&Option<Value>>, applied: &Value) {
        let (action, fields) = match previous {
            None => (Action::Created, Vec::new()),
            Some(Some(p)) if p == applied => (Action::Unchanged, Vec::new()),
            Some(Some(p)) => (Action::Configured, changed_fields(p, applied)),
            Some(None) => (Action::Configured, Vec::new()),
        };
        self.changes.push(change(m, action, fields));
    }

    /// Stores an object that needs no controller: an EndpointSlice or a NetworkPolicy.
    fn store<T>(
        &mut self,
        m: &Manifest,
        object: &T,
        applied: Value,
        objects: fn(&mut LabState) -> &mut BTreeMap<String, Stored<T>>,
    ) where
        T: Clone,
    {
        let k = key(m.namespace(), m.name());
        let previous = objects(&mut self.st).get(&k).map(|s| s.applied.clone());
        self.line(m, previous.as_ref(), &applied);
        objects(&mut self.st).insert(
            k,
            Stored {
                applied: Some(applied),
                object: object.clone(),
            },
        );
    }

    /// Namespaces first: the other objects of the same apply may live in them.
    fn namespaces(&mut self) {
        for m in self.manifests {
            let Object::Namespace(ns) = &m.object else {
                continue;
            };
            let applied = applied_json(m);
            let previous = self.st.namespaces.get(m.name()).map(|s| s.applied.clone());
            self.line(m, previous.as_ref(), &applied);
            self.st.namespaces.insert(
                m.name().to_string(),
                Stored {
                    applied: Some(applied),
                    object: state::namespace_object(m.name(), &ns.metadata),
                },
            );
        }
        for m in self.manifests {
            if !matches!(m.object, Object::Namespace(_))
                && !self.st.namespaces.contains_key(m.namespace())
            {
                self.violation(
                    m,
                    "metadata.namespace",
                    format!(
                        "namespace {:?} does not exist (apply a Namespace named so first, or with it)",
                        m.namespace()
                    ),
                );
            }
        }
    }

    /// Writes one object, with what its controller does about it.
    /// The Services as they would be after the apply, checked together as the agents will
    /// check them: node ports in range and not used twice. Those this apply leaves alone
    /// go first, so a fault is named at the manifest that brings it.
    fn node_ports(&mut self) {
        let applied = |namespace: &str, name: &str| {
            self.manifests.iter().find(|m| {
                matches!(m.object, Object::Service(_))
                    && m.namespace() == namespace
                    && m.name() == name
            })
        };
        let (new, kept): (Vec<_>, Vec<_>) = self.st.services.values().partition(|s| {
            let meta = &s.object.metadata;
            applied(
                meta.namespace.as_deref().unwrap_or("default"),
                meta.name.as_deref().unwrap_or(""),
            )
            .is_some()
        });
        let services: Vec<_> = kept
            .into_iter()
            .chain(new)
            .map(|s| s.object.clone())
            .collect();
        let range = self.st.spec.node_port_range.unwrap_or_default();
        let Err(e) = sluice_sources::validate_services(&services, range) else {
            return;
        };
        let (namespace, name) = e.name.split_once('/').unwrap_or(("", &e.name));
        match applied(namespace, name) {
            Some(m) => {
                let error = violation(m, &e.field, e.message);
                self.errors.push(error);
            }
            // Only when the lab already held an invalid set (a narrower range, say).
            None => self.errors.push(ManifestError {
                file: Default::default(),
                document: None,
                object: Some(format!("Service {}", e.name)),
                field: Some(e.field),
                message: e.message,
            }),
        }
    }

    fn object(&mut self, m: &Manifest, cluster_ips: &mut ClusterIps) {
        let applied = applied_json(m);
        match &m.object {
            Object::Namespace(_) => {}
            Object::Service(svc) => self.service(m, svc, applied, cluster_ips),
            Object::EndpointSlice(slice) => {
                self.store(m, slice, applied, |st| &mut st.endpoint_slices);
            }
            Object::NetworkPolicy(policy) => {
                self.store(m, policy, applied, |st| &mut st.network_policies);
            }
            Object::Pod(pod) => self.pod(m, pod, applied),
            Object::Deployment(deployment) => self.deployment(m, deployment, applied),
        }
    }
}

/// `kubectl apply -f`: validates the whole input against the lab, then computes the result.
pub fn apply(current: &LabState, manifests: &[Manifest]) -> Result<Plan, LabError> {
    let mut apply = Apply {
        st: current.clone(),
        manifests,
        errors: Vec::new(),
        changes: Vec::new(),
        warnings: Vec::new(),
        create: Vec::new(),
        when: now(),
        claimed_node_ports: nodeports::claimed(current, manifests),
    };
    apply.namespaces();
    let mut cluster_ips = apply.requested_cluster_ips();
    for m in manifests {
        apply.object(m, &mut cluster_ips);
    }
    if apply.errors.is_empty() {
        apply.node_ports();
    }
    if !apply.errors.is_empty() {
        return Err(LabError::Invalid(apply.errors));
    }
    let pending = loadbalancer::assign(&mut apply.st);
    // What a cloud's events would say, for the Services of this apply.
    for (k, message) in pending {
        if manifests
            .iter()
            .any(|m| matches!(m.object, Object::Service(_)) && key(m.namespace(), m.name()) == k)
        {
            apply
                .warnings
                .push(format!("service/{k}: LoadBalancer pending: {message}"));
        }
    }
    Ok(Plan::finish(
        apply.st,
        apply.create,
        apply.changes,
        apply.warnings,
    ))
}

fn violation(m: &Manifest, field: &str, message: impl Into<String>) -> ManifestError {
    ManifestError {
        file: m.file.clone(),
        document: Some(m.document),
        object: Some(m.describe()),
        field: (!field.is_empty()).then(|| field.to_string()),
        message: message.into(),
    }
}

/// What happened to the object of `m`.
fn change(m: &Manifest, action: Action, fields: Vec<String>) -> Change {
    Change {
        action,
        kind: m.kind(),
        namespace: (!m.namespace().is_empty()).then(|| m.namespace().to_string()),
        name: m.name().to_string(),
        fields,
        owner: None,
    }
}

fn applied_json(m: &Manifest) -> Value {
    let value = match &m.object {
        Object::Namespace(o) => serde_json::to_value(o),
        Object::Pod(o) => serde_json::to_value(o),
        Object::Deployment(o) => serde_json::to_value(o),
        Object::Service(o) => serde_json::to_value(o),
        Object::EndpointSlice(o) => serde_json::to_value(o),
        Object::NetworkPolicy(o) => serde_json::to_value(o),
    };
    // The k8s-openapi types always serialize; Null would only make the object "configured".
    value.unwrap_or(Value::Null)
}

fn new_uid() -> String {
    let hex = |n: usize| -> String {
        (0..n)
            .map(|_| char::from_digit(fastrand::u32(..16), 16).unwrap_or('0'))
            .collect()
    };
    format!("{}-{}-{}-{}-{}", hex(8), hex(4), hex(4), hex(4), hex(12))
}
/// `kubectl delete -f`: every object named must exist, unless `ignore_not_found`.
pub fn delete(
    current: &LabState,
    manifests: &[Manifest],
    ignore_not_found: bool,
) -> Result<Plan, LabError> {
    let mut st = current.clone();
    let mut errors = Vec::new();
    let mut changes = Vec::new();
    let when = now();
    for m in manifests {
        let k = key(m.namespace(), m.name());
        let found = match &m.object {
            Object::Namespace(_) => {
                if state::BUILTIN_NAMESPACES.contains(&m.name()) {
                    errors.push(violation(
                        m,
                        "metadata.name",
                        format!("namespace {:?} may not be deleted", m.name()),
                    ));
                    continue;
                }
                let found = st.namespaces.remove(m.name()).is_some();
                if found {
                    delete_namespace_content(&mut st, m.name(), &when);
                }
                found
            }
            Object::Pod(_) => {
                let found = st.pods.get(&k).is_some_and(|p| p.deleting.is_none());
                mark_deleting(&mut st, &k, &when);
                found
            }
            Object::Deployment(_) => {
                let found = st.deployments.remove(&k).is_some();
                let owned: Vec<String> = st
                    .pods
                    .iter()
                    .filter(|(_, p)| p.owner.as_ref().is_some_and(|o| o.deployment == k))
                    .map(|(pk, _)| pk.clone())
                    .collect();
                for pk in owned {
                    mark_deleting(&mut st, &pk, &when);
                }
                found
            }
            Object::Service(_) => st.services.remove(&k).is_some(),
            Object::EndpointSlice(_) => st.endpoint_slices.remove(&k).is_some(),
            Object::NetworkPolicy(_) => st.network_policies.remove(&k).is_some(),
        };
        if found {
            changes.push(change(m, Action::Deleted, Vec::new()));
        } else if !ignore_not_found {
            errors.push(violation(
                m,
                "metadata.name",
                "not found in the lab (--ignore-not-found skips it)",
            ));
        }
    }
    if !errors.is_empty() {
        return Err(LabError::Invalid(errors));
    }
    // A deleted Service's VIP goes back to the pool, perhaps to a pending Service.
    loadbalancer::assign(&mut st);
    Ok(Plan::finish(st, Vec::new(), changes, Vec::new()))
}

/// Deleting a namespace deletes everything in it, as the namespace controller does.
fn delete_namespace_content(st: &mut LabState, namespace: &str, when: &Time) {
    let prefix = format!("{namespace}/");
    st.deployments.retain(|k, _| !k.starts_with(&prefix));
    st.services.retain(|k, _| !k.starts_with(&prefix));
    st.endpoint_slices.retain(|k, _| !k.starts_with(&prefix));
    st.network_policies.retain(|k, _| !k.starts_with(&prefix));
    let pods: Vec<String> = st
        .pods
        .keys()
        .filter(|k| k.starts_with(&prefix))
        .cloned()
        .collect();
    for k in pods {
        mark_deleting(st, &k, when);
    }
}

#[cfg(test)]
mod tests;
