//! A pod that becomes a local endpoint (the CNI plugin attached it here) or stops being
//! one. Its address, labels and named ports stay, so its identity and everything others
//! see of it stay too: only its place in the index and its ipcache entry's tunnel
//! endpoint (none on this node) move.

use std::collections::BTreeMap;

use sluice_common::{IpcacheEntry, IpcacheKey};
use sluice_store::{LocalEndpoint, Pod};

use super::{NotInPlace, PodEntry, PodIndex, Workload, identities, local_view, workload};
use crate::{
    changes::{ObjectKey, touched},
    ipcache::Ipcache,
    nodes::Nodes,
};

/// What the rows of a new local endpoint read of its pod.
pub(crate) struct Attached {
    pub labels: sluice_store::selector::Labels,
    pub ports: Vec<(String, u8, u16)>,
    pub identity: u32,
}

impl PodIndex {
    /// Makes the pod `key` (its object `pod`) the local endpoint `endpoint`, if it was
    /// an addressed pod elsewhere in the index and keeps its address and identity.
    pub(crate) fn attach(
        &mut self,
        key: &ObjectKey,
        pod: &Pod,
        endpoint: &LocalEndpoint,
        ipcache: &mut Ipcache,
        delta: &mut BTreeMap<IpcacheKey, Option<IpcacheEntry>>,
    ) -> Result<Attached, NotInPlace> {
        let held = self.pods.get(key).ok_or(NotInPlace)?;
        let w = workload(&key.0, &key.1, Some(pod), Some(endpoint), &self.namespaces)
            .ok_or(NotInPlace)?;
        if w.claimed != Some(held.address) || !self.same_identity(&w, held.identity) {
            return Err(NotInPlace);
        }
        let (identity, address, node) = (held.identity, held.address, held.node);
        self.retunnel_one(held, 0, ipcache, delta)?;
        self.pods.remove(key);
        self.places.remove(address, node);
        self.whole.insert(key.clone());
        self.local
            .insert(key.clone(), (endpoint.clone(), local_view(&w)));
        Ok(Attached {
            labels: w.labels.into_owned(),
            ports: w.ports,
            identity,
        })
    }

    /// Makes the local endpoint of the pod `key` (its object `pod`) an addressed pod
    /// elsewhere in the index again, if it keeps its address and identity.
    pub(crate) fn detach(
        &mut self,
        key: &ObjectKey,
        pod: &Pod,
        identity: u32,
        nodes: &Nodes,
        ipcache: &mut Ipcache,
        delta: &mut BTreeMap<IpcacheKey, Option<IpcacheEntry>>,
    ) -> Result<(), NotInPlace> {
        let (_, view) = self.local.get(key).ok_or(NotInPlace)?;
        let w = workload(&key.0, &key.1, Some(pod), None, &self.namespaces).ok_or(NotInPlace)?;
        let address = w.claimed.ok_or(NotInPlace)?;
        if view.1 != Some(address) || !self.same_identity(&w, identity) {
            return Err(NotInPlace);
        }
        let mut entry = PodEntry {
            identity,
            address,
            ports: w.ports,
            node: None,
        };
        let tunnel = nodes.pod_tunnel(&self.this, w.node, address);
        self.retunnel_one(&entry, tunnel, ipcache, delta)?;
        entry.node = self.places.add(address, w.node);
        self.local.remove(key);
        self.whole.remove(key);
        self.pods.insert(key.clone(), entry);
        Ok(())
    }

    /// Whether `w`'s label set is that of `identity`.
    fn same_identity(&self, w: &Workload<'_>, identity: u32) -> bool {
        let set = identities::label_set(w, &self.cidrs, &self.selected_keys);
        self.numbers.get(&set) == Some(&identity)
    }

    /// Gives the ipcache entry of `pod`'s address the tunnel endpoint `tunnel`, if the
    /// pod holds the address alone.
    fn retunnel_one(
        &self,
        pod: &PodEntry,
        tunnel: u32,
        ipcache: &mut Ipcache,
        delta: &mut BTreeMap<IpcacheKey, Option<IpcacheEntry>>,
    ) -> Result<(), NotInPlace> {
        let key = IpcacheKey::new(pod.address, 32);
        let alone =
            self.claims.get(&pod.address) == Some(&1) && !self.reserved.contains(&pod.address);
        match ipcache.get_mut(&key) {
            Some(entry) if alone && entry.identity == pod.identity => {
                if entry.tunnel_endpoint != tunnel {
                    touched(delta, key, Some(*entry));
                    entry.tunnel_endpoint = tunnel;
                }
                Ok(())
            }
            _ => Err(NotInPlace),
        }
    }
}
