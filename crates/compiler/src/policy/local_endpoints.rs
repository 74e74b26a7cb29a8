//! Local endpoints added or removed (the CNI plugin attached or detached a pod here),
//! compiled in place: the pod was, or becomes again, an addressed pod of the index with
//! the same address and identity, so only the endpoint's entries, its interface, its
//! rows and its ipcache entry's tunnel endpoint move. An endpoint left out (no address,
//! interface unknown or taken, no Pod object, a pod without its own address) before or
//! after is compiled whole.

use std::collections::BTreeMap;

use sluice_store::{LocalEndpoint, Pod, Snapshot};

use super::{NotInPlace, WorkloadIndex};
use crate::{Delta, DesiredState, NodeContext, changes::ObjectKey, namespace_or_default};

impl WorkloadIndex {
    /// Brings the local endpoints to those of `snapshot` and the CNI plugin's (in `node`)
    /// on `node`, whose interfaces `node` names, recording what changed in `delta`.
    pub(crate) fn put_endpoints(
        &mut self,
        snapshot: &Snapshot,
        node: &NodeContext,
        state: &mut DesiredState,
        delta: &mut Delta,
    ) -> Result<(), NotInPlace> {
        if self.local_endpoints.len() != self.policies.local_count() {
            return Err(NotInPlace);
        }
        let now: Vec<&LocalEndpoint> = snapshot
            .endpoints
            .iter()
            .chain(node.endpoints.iter())
            .filter(|e| e.node == node.node)
            .collect();
        // Two claiming one interface or one pod: one is left out, compiled whole.
        let interfaces: std::collections::BTreeSet<&str> =
            now.iter().map(|e| e.interface.as_str()).collect();
        let pods: std::collections::BTreeSet<ObjectKey> = now.iter().map(|e| key_of(e)).collect();
        if interfaces.len() != now.len() || pods.len() != now.len() {
            return Err(NotInPlace);
        }
        let (gone, kept): (Vec<&LocalEndpoint>, Vec<&LocalEndpoint>) =
            self.local_endpoints.iter().partition(|e| !now.contains(e));
        let added: Vec<&LocalEndpoint> = now
            .iter()
            .filter(|e| !self.local_endpoints.contains(e))
            .copied()
            .collect();
        // The kept ones keep their interfaces' numbers.
        for e in &kept {
            let ifindex = self.policies.ifindex_of(e).ok_or(NotInPlace)?;
            if node.interfaces.get(&e.interface) != Some(&ifindex) {
                return Err(NotInPlace);
            }
        }
        let keys: Vec<ObjectKey> = gone.iter().chain(&added).map(|e| key_of(e)).collect();
        let pods = pods_named(snapshot, &keys)?;
        let gone: Vec<LocalEndpoint> = gone.into_iter().cloned().collect();
        for e in &gone {
            let key = key_of(e);
            let pod = pods.get(&key).ok_or(NotInPlace)?;
            let ifindex = self.policies.ifindex_of(e).ok_or(NotInPlace)?;
            let identity = self.policies.identity_of(ifindex).ok_or(NotInPlace)?;
            let (ipcache, delta_ipcache) = (&mut state.ipcache, &mut delta.ipcache);
            self.pods
                .detach(&key, pod, identity, &state.nodes, ipcache, delta_ipcache)?;
            self.policies.detach(ifindex, state, delta);
        }
        for e in added {
            let key = key_of(e);
            let pod = pods.get(&key).ok_or(NotInPlace)?;
            let ifindex = *node.interfaces.get(&e.interface).ok_or(NotInPlace)?;
            if e.ipv4().is_none() || state.endpoints.contains_key(&ifindex) {
                return Err(NotInPlace);
            }
            let attached =
                self.pods
                    .attach(&key, pod, e, &mut state.ipcache, &mut delta.ipcache)?;
            self.policies
                .attach(ifindex, e.clone(), attached, state, delta);
        }
        self.local_endpoints = now.into_iter().cloned().collect();
        Ok(())
    }
}

fn key_of(endpoint: &LocalEndpoint) -> ObjectKey {
    (endpoint.namespace.clone(), endpoint.pod.clone())
}

/// The Pod objects named `keys`, each defined once.
fn pods_named<'s>(
    snapshot: &'s Snapshot,
    keys: &[ObjectKey],
) -> Result<BTreeMap<ObjectKey, &'s Pod>, NotInPlace> {
    let mut found = BTreeMap::new();
    if keys.is_empty() {
        return Ok(found);
    }
    for pod in &snapshot.pods {
        let name = pod.name().unwrap_or("");
        let namespace = namespace_or_default(pod.namespace());
        let Some(key) = keys.iter().find(|k| k.0 == namespace && k.1 == name) else {
            continue;
        };
        if found.insert(key.clone(), pod).is_some() {
            return Err(NotInPlace);
        }
    }
    Ok(found)
}
