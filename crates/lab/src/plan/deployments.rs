//! Deployments: the ReplicaSet controller's part, one template's pods at a time.

use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
};
use serde_json::Value;
use sluice_sources::Manifest;

use super::{
    Apply, Plan, new_uid,
    pods::{POD_IP_ANNOTATION, add_pod, mark_deleting},
};
use crate::{
    LabError, names,
    state::{LabState, Owner, Stored, key, now},
};

impl Apply<'_> {
    /// Stores a Deployment and reconciles its pods.
    pub(super) fn deployment(&mut self, m: &Manifest, deployment: &Deployment, applied: Value) {
        let k = key(m.namespace(), m.name());
        let template = deployment
            .spec
            .as_ref()
            .map(|s| s.template.clone())
            .unwrap_or_default();
        self.check_pod_spec(m, template.spec.as_ref(), "spec.template.");
        if template
            .metadata
            .as_ref()
            .and_then(|meta| meta.annotations.as_ref())
            .is_some_and(|a| a.contains_key(POD_IP_ANNOTATION))
        {
            self.violation(
                m,
                &format!("spec.template.metadata.annotations[{POD_IP_ANNOTATION}]"),
                "a fixed pod address is for a bare Pod: every replica would ask for it",
            );
        }
        let previous = self.st.deployments.get(&k).map(|s| s.applied.clone());
        self.line(m, previous.as_ref(), &applied);
        let mut stored = deployment.clone();
        stored.metadata.uid = self
            .st
            .deployments
            .get(&k)
            .and_then(|d| d.object.metadata.uid.clone())
            .or_else(|| Some(new_uid()));
        self.st.deployments.insert(
            k.clone(),
            Stored {
                applied: Some(applied),
                object: stored.clone(),
            },
        );
        match reconcile_deployment(&mut self.st, &k, &stored, &self.when) {
            Ok(new) => self.create.extend(new),
            Err(message) => self.violation(m, "", message),
        }
    }
}

/// Every Deployment's pods reconciled again, as the ReplicaSet controller does once a
/// removed node's pods are gone: the replacements go to the remaining nodes. A Deployment
/// whose template names a node the lab no longer has keeps its missing pods missing, as
/// Kubernetes leaves them pending.
pub fn reconcile_deployments(current: &LabState) -> Result<Plan, LabError> {
    let mut st = current.clone();
    let when = now();
    let mut create = Vec::new();
    let deployments: Vec<(String, Deployment)> = st
        .deployments
        .iter()
        .map(|(k, d)| (k.clone(), d.object.clone()))
        .collect();
    for (k, deployment) in deployments {
        let pinned = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.node_name.as_deref());
        if pinned.is_some_and(|node| st.spec.node(node).is_none()) {
            continue;
        }
        let created = reconcile_deployment(&mut st, &k, &deployment, &when).map_err(|message| {
            LabError::Reschedule {
                deployment: k.clone(),
                message,
            }
        })?;
        create.extend(created);
    }
    Ok(Plan::finish(st, create, Vec::new(), Vec::new()))
}

/// The ReplicaSet part of a Deployment: `replicas` pods of the current template; pods of an
/// older template, and the newest surplus ones, terminate. Returns the pods to create.
fn reconcile_deployment(
    st: &mut LabState,
    deployment_key: &str,
    deployment: &Deployment,
    when: &Time,
) -> Result<Vec<String>, String> {
    let spec = deployment.spec.clone().unwrap_or_default();
    let replicas = usize::try_from(spec.replicas.unwrap_or(1)).unwrap_or(0);
    let hash = names::template_hash(&spec.template).map_err(|e| e.to_string())?;
    let namespace = deployment
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());

    let mut current: Vec<(u64, String)> = Vec::new();
    let mut outdated = Vec::new();
    for (k, p) in &st.pods {
        match &p.owner {
            Some(o) if o.deployment == deployment_key && p.deleting.is_none() => {
                if o.template_hash == hash {
                    current.push((p.seq, k.clone()));
                } else {
                    outdated.push(k.clone());
                }
            }
            _ => {}
        }
    }
    current.sort();
    for k in outdated {
        mark_deleting(st, &k, when);
    }
    while current.len() > replicas {
        if let Some((_, k)) = current.pop() {
            mark_deleting(st, &k, when);
        }
    }

    let owner = Owner {
        deployment: deployment_key.to_string(),
        template_hash: hash,
    };
    let mut created = Vec::new();
    for _ in current.len()..replicas {
        let pod = replica(st, deployment, &namespace, &owner.template_hash);
        created.push(add_pod(st, pod, Some(owner.clone()), None, None)?);
    }
    Ok(created)
}

/// A new pod of the Deployment's current template, with a name no pod has.
fn replica(st: &LabState, deployment: &Deployment, namespace: &str, hash: &str) -> Pod {
    let spec = deployment.spec.clone().unwrap_or_default();
    let template_meta = spec.template.metadata.clone().unwrap_or_default();
    let name = deployment.metadata.name.as_deref().unwrap_or_default();
    let replica_set = format!("{name}-{hash}");
    let pod_name = loop {
        let candidate = format!("{replica_set}-{}", names::random_suffix());
        if !st.pods.contains_key(&key(namespace, &candidate)) {
            break candidate;
        }
    };
    let mut labels = template_meta.labels.clone().unwrap_or_default();
    labels.insert("pod-template-hash".into(), hash.to_string());
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            annotations: template_meta.annotations.clone(),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "ReplicaSet".into(),
                name: replica_set,
                uid: deployment.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: spec.template.spec.clone(),
        status: None,
    }
}
