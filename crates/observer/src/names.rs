//! Pod names by address, for every pod of the cluster. At 200,000 pods the index is too
//! large to build again per change, so it is kept and changed in place by the pods a
//! change set names; the resolvers the agent swaps in share it.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, PoisonError, RwLock},
};

use sluice_compiler::{ObjectKey, pod_key};
use sluice_store::{LocalEndpoint, Pod, Snapshot};

/// Pod names by address, shared by every resolver of one agent and changed in place.
#[derive(Debug, Default)]
pub struct PodNames {
    index: RwLock<Index>,
}

#[derive(Debug, Default)]
struct Index {
    /// Pod -> its address.
    addresses: HashMap<Arc<ObjectKey>, Ipv4Addr>,
    /// Address -> the pod it names and how many pods claim it: of two pods with one
    /// address (a problem the compiler reports), the one written last names it.
    claims: HashMap<Ipv4Addr, Claim>,
    /// Local endpoints name their pod first, even before its status carries the address.
    local: HashMap<Ipv4Addr, ObjectKey>,
}

#[derive(Debug)]
struct Claim {
    pod: Arc<ObjectKey>,
    count: u32,
}

/// The address a Pod object gives its pod.
pub fn pod_address(pod: &Pod) -> Option<Ipv4Addr> {
    match pod.pod_ip()? {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }
}

impl PodNames {
    /// Every pod of `snapshot` and the local endpoints of `snapshot` and `endpoints`.
    pub fn of(snapshot: &Snapshot, endpoints: &[LocalEndpoint]) -> Self {
        let names = Self::default();
        names.replace(snapshot);
        names.set_local(snapshot, endpoints);
        names
    }

    /// Forgets every pod and takes those of `snapshot`.
    pub fn replace(&self, snapshot: &Snapshot) {
        let mut index = Index {
            local: std::mem::take(&mut self.write().local),
            ..Index::default()
        };
        for pod in &snapshot.pods {
            if let Some(key) = pod_key(pod) {
                index.put(key, pod_address(pod));
            }
        }
        *self.write() = index;
    }

    /// Pods changed: each by key, with its address now (None: deleted or without one).
    pub fn apply<'a>(&self, pods: impl IntoIterator<Item = (&'a ObjectKey, Option<Ipv4Addr>)>) {
        let mut index = self.write();
        for (key, address) in pods {
            index.put(key.clone(), address);
        }
    }

    /// The local endpoints, the snapshot's (a cluster file's) and the CNI plugin's.
    pub fn set_local(&self, snapshot: &Snapshot, endpoints: &[LocalEndpoint]) {
        let local = snapshot
            .endpoints
            .iter()
            .chain(endpoints)
            .filter_map(|e| Some((e.ipv4()?, (e.namespace.clone(), e.pod.clone()))))
            .collect();
        self.write().local = local;
    }

    /// The (namespace, name) of the pod at `address`.
    pub fn name(&self, address: Ipv4Addr) -> Option<ObjectKey> {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        index
            .local
            .get(&address)
            .or_else(|| Some(&*index.claims.get(&address)?.pod))
            .cloned()
    }

    /// Pods named.
    pub fn len(&self) -> usize {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .addresses
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Index {
    fn put(&mut self, key: ObjectKey, address: Option<Ipv4Addr>) {
        if let Some(was) = self.addresses.get(&key).copied() {
            if Some(was) == address {
                return;
            }
            self.unclaim(&key, was);
        }
        let Some(address) = address else {
            self.addresses.remove(&key);
            return;
        };
        let key = match self.addresses.remove_entry(&key) {
            Some((key, _)) => key,
            None => Arc::new(key),
        };
        self.addresses.insert(Arc::clone(&key), address);
        self.claims
            .entry(address)
            .and_modify(|c| {
                c.count += 1;
                c.pod = Arc::clone(&key);
            })
            .or_insert(Claim { pod: key, count: 1 });
    }

    /// `key` no longer claims `address`; another pod that does names it then.
    fn unclaim(&mut self, key: &ObjectKey, address: Ipv4Addr) {
        let Some(claim) = self.claims.get_mut(&address) else {
            return;
        };
        claim.count -= 1;
        if claim.count == 0 {
            self.claims.remove(&address);
        } else if *claim.pod == *key {
            // Rare (a contested address): found by a walk over every pod.
            if let Some((other, _)) = self
                .addresses
                .iter()
                .find(|(k, a)| **a == address && ***k != *key)
            {
                claim.pod = Arc::clone(other);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test")]

    use super::*;

    fn key(name: &str) -> ObjectKey {
        ("default".into(), name.into())
    }

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 6);

    /// Written, moved, contested and deleted pods leave the index as a rebuild would.
    #[test]
    fn changes_in_place_name_as_a_rebuild_would() {
        let names = PodNames::default();
        names.apply([(&key("x"), Some(A)), (&key("y"), Some(B))]);
        assert_eq!(names.name(A), Some(key("x")));
        names.apply([(&key("x"), Some(B))]);
        assert_eq!(names.name(A), None);
        assert_eq!(names.name(B), Some(key("x")), "written last");
        names.apply([(&key("x"), None)]);
        assert_eq!(names.name(B), Some(key("y")), "the other claimant");
        names.apply([(&key("y"), None)]);
        assert_eq!(names.name(B), None);
        assert!(names.is_empty());

        let snapshot: Snapshot = serde_json::from_value(serde_json::json!({
            "pods": [{"metadata": {"name": "p", "namespace": "n"},
                      "status": {"podIP": A.to_string()}}],
            "endpoints": [{"node": "node-1", "namespace": "n", "pod": "local",
                           "interface": "lxc1", "addresses": [A.to_string()]}],
        }))
        .unwrap();
        let names = PodNames::of(&snapshot, &[]);
        assert_eq!(
            names.name(A),
            Some(("n".into(), "local".into())),
            "local first"
        );
        names.set_local(&Snapshot::default(), &[]);
        assert_eq!(names.name(A), Some(("n".into(), "p".into())));
        assert_eq!(names.len(), 1);
    }
}
