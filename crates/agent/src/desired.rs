//! The compiler's output as the realizer, the views and `verify` share it: one
//! `Arc<DesiredState>` per compile, made without copying the whole state.
//!
//! The compile cache keeps its state and changes it in place, while the API may still read
//! the one published before; so two published states alternate. Once nobody reads the
//! older one any more, it is brought up to date with the entries the compiler's deltas
//! name since (values read from the cache's state) rather than copied whole: at 100k
//! Services a whole copy costs some 150 ms, catching up a few entries microseconds.

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

use sluice_common::{IpcacheKey, Lb4BackendKey, Lb4Key, Lb4SourceRangeKey};
use sluice_compiler::{Delta, DesiredState, Frontend};

/// The newest published state, and the one before it with what leads from it to the newest.
#[derive(Default)]
pub struct SharedDesired {
    current: Arc<DesiredState>,
    previous: Option<(Arc<DesiredState>, Keys)>,
}

/// The keys a [`Delta`] names, without the values before it keeps.
#[derive(Default)]
struct Keys {
    services: Vec<Lb4Key>,
    backends: Vec<Lb4BackendKey>,
    maglev: Vec<Lb4Key>,
    source_ranges: Vec<Lb4SourceRangeKey>,
    endpoints: Vec<u32>,
    ipcache: Vec<IpcacheKey>,
    policies: Vec<u32>,
}

impl Keys {
    fn of(delta: &Delta) -> Self {
        Self {
            services: delta.services.keys().copied().collect(),
            backends: delta.backends.keys().copied().collect(),
            maglev: delta.maglev.keys().copied().collect(),
            source_ranges: delta.source_ranges.keys().copied().collect(),
            endpoints: delta.endpoints.keys().copied().collect(),
            ipcache: delta.ipcache.keys().copied().collect(),
            policies: delta.policies.keys().copied().collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.backends.is_empty()
            && self.maglev.is_empty()
            && self.source_ranges.is_empty()
            && self.endpoints.is_empty()
            && self.ipcache.is_empty()
            && self.policies.is_empty()
    }
}

impl SharedDesired {
    pub fn current(&self) -> &Arc<DesiredState> {
        &self.current
    }

    /// Publishes `state`, the compile cache's state after a compile whose delta (the
    /// entries it touched since the state published last) is `delta`; returns whether
    /// the state changed. The cache's state is read, never copied whole, when the state
    /// published before the last is no longer read by anyone.
    pub fn advance(&mut self, state: &DesiredState, delta: &Delta) -> bool {
        // A change of a large part of the state (the first compile, a relist) is copied
        // whole twice: once to publish, once as the spare the next change catches up.
        let large = delta.len() > entries(state) / 4;
        let delta = if large {
            Keys::default()
        } else {
            Keys::of(delta)
        };
        let next = match self.previous.take() {
            Some((previous, lag)) if !large => match Arc::try_unwrap(previous) {
                Ok(mut spare) => {
                    catch_up(&mut spare, state, &lag);
                    catch_up(&mut spare, state, &delta);
                    // Once: comparing thousands of identities and nodes is most of a
                    // small change's cost.
                    copy_whole_fields(&mut spare, state);
                    spare
                }
                // Still read (an API request holds it): copied once.
                Err(_) => state.clone(),
            },
            _ => state.clone(),
        };
        if !large && delta.is_empty() && same_whole_fields(&next, &self.current) {
            // Nothing a reader sees changed: the published state stays, and `next`
            // (equal to it) is the spare.
            self.previous = Some((Arc::new(next), Keys::default()));
            return false;
        }
        let published = std::mem::replace(&mut self.current, Arc::new(next));
        self.previous = Some(if large {
            (Arc::new(state.clone()), Keys::default())
        } else {
            (published, delta)
        });
        true
    }
}

/// Entries of every realized map.
fn entries(state: &DesiredState) -> usize {
    state.services.len()
        + state.backends.len()
        + state.maglev.len()
        + state.source_ranges.len()
        + state.endpoints.len()
        + state.ipcache.len()
        + state.policies.len()
}

/// Brings `spare` to `state` for the entries `delta` names.
fn catch_up(spare: &mut DesiredState, state: &DesiredState, delta: &Keys) {
    fn entries<K: Ord + Copy, V: Clone>(
        spare: &mut std::collections::BTreeMap<K, V>,
        state: &std::collections::BTreeMap<K, V>,
        keys: &[K],
    ) {
        for key in keys {
            match state.get(key) {
                Some(value) => {
                    spare.insert(*key, value.clone());
                }
                None => {
                    spare.remove(key);
                }
            }
        }
    }
    entries(&mut spare.services, &state.services, &delta.services);
    entries(&mut spare.backends, &state.backends, &delta.backends);
    entries(&mut spare.maglev, &state.maglev, &delta.maglev);
    entries(
        &mut spare.source_ranges,
        &state.source_ranges,
        &delta.source_ranges,
    );
    entries(&mut spare.endpoints, &state.endpoints, &delta.endpoints);
    entries(&mut spare.ipcache, &state.ipcache, &delta.ipcache);
    entries(&mut spare.policies, &state.policies, &delta.policies);
    // A frontend is programmed as service map entries at its address, port and protocol:
    // the frontends there are those of the service entries the delta names.
    let addresses: BTreeSet<(Ipv4Addr, u16, u8)> = delta
        .services
        .iter()
        .map(|k| (k.vip(), k.port(), k.proto))
        .collect();
    for at in addresses {
        let range = |frontends: &[Frontend]| {
            let start = frontends.partition_point(|f| frontend_at(f) < at);
            let end = frontends.partition_point(|f| frontend_at(f) <= at);
            start..end
        };
        let from = range(&state.frontends);
        let into = range(&spare.frontends);
        spare
            .frontends
            .splice(into, state.frontends[from].iter().cloned());
    }
}

fn frontend_at(f: &Frontend) -> (Ipv4Addr, u16, u8) {
    (f.address, f.port, f.protocol)
}

/// Copies the fields no delta covers (a node's endpoints, identities, nodes, problems).
fn copy_whole_fields(spare: &mut DesiredState, state: &DesiredState) {
    // Most changes leave these as they were (a pod of known labels, a Service's backends):
    // comparing allocates nothing, a clone of thousands of identities and problems does.
    fn copy<T: Clone + PartialEq>(into: &mut T, from: &T) {
        if into != from {
            into.clone_from(from);
        }
    }
    copy(&mut spare.interfaces, &state.interfaces);
    copy(&mut spare.health_checks, &state.health_checks);
    copy(&mut spare.node_addresses, &state.node_addresses);
    copy(&mut spare.nodes, &state.nodes);
    copy(&mut spare.identities, &state.identities);
    copy(&mut spare.endpoint_details, &state.endpoint_details);
    copy(&mut spare.problems, &state.problems);
}

fn same_whole_fields(a: &DesiredState, b: &DesiredState) -> bool {
    a.interfaces == b.interfaces
        && a.health_checks == b.health_checks
        && a.node_addresses == b.node_addresses
        && a.nodes == b.nodes
        && a.identities == b.identities
        && a.endpoint_details == b.endpoint_details
        && a.problems == b.problems
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test")]

    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use sluice_compiler::{Changes, CompileCache, NodeContext};
    use sluice_store::Snapshot;

    use super::*;

    fn service(i: u32, port: u16) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("s-{i}"), "namespace": "default"},
            "spec": {"clusterIP": format!("10.96.{}.{}", i / 200, i % 200 + 1),
                     "ports": [{"name": "http", "port": port, "protocol": "TCP"}]},
        }))
        .unwrap()
    }

    fn slice(i: u32, backends: u32) -> std::sync::Arc<EndpointSlice> {
        let endpoints: Vec<_> = (0..backends)
            .map(
                |b| serde_json::json!({"addresses": [format!("10.244.{}.{}", b + 1, i % 250 + 1)]}),
            )
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("s-{i}-x"), "namespace": "default",
                         "labels": {"kubernetes.io/service-name": format!("s-{i}")}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))
        .unwrap()
    }

    /// A pseudo-random walk of Service and slice writes and deletions: after every step the
    /// published state, caught up from the one before the last, equals the compiler's.
    #[test]
    fn caught_up_states_equal_the_compilers() {
        let node = NodeContext {
            node: "node-1".into(),
            ..NodeContext::default()
        };
        let mut snapshot = Snapshot {
            services: (0..40).map(|i| service(i, 80)).collect(),
            endpoint_slices: (0..40).map(|i| slice(i, 2)).collect(),
            ..Snapshot::default()
        };
        let mut cache = CompileCache::new();
        let mut shared = SharedDesired::default();
        cache.refresh(&snapshot, &node);
        let delta = cache.take_delta();
        shared.advance(cache.state(), &delta);
        assert_eq!(**shared.current(), *cache.state());
        let mut seed = 7u32;
        let mut reader = None;
        for step in 0..300 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let i = (seed >> 8) % 60;
            let mut changes = Changes::default();
            let key = ("default".to_string(), format!("s-{i}"));
            match (seed >> 20) % 4 {
                0 => {
                    let s = service(i, 80 + u16::try_from(seed % 3).unwrap());
                    snapshot
                        .services
                        .retain(|o| o.metadata.name != s.metadata.name);
                    snapshot.services.push(s.clone());
                    changes.services.insert(key, Some(s));
                }
                1 => {
                    snapshot
                        .services
                        .retain(|o| o.metadata.name.as_deref() != Some(&key.1));
                    changes.services.insert(key, None);
                }
                2 => {
                    let e = slice(i, seed % 4);
                    snapshot
                        .endpoint_slices
                        .retain(|o| o.metadata.name != e.metadata.name);
                    snapshot.endpoint_slices.push(e.clone());
                    changes
                        .endpoint_slices
                        .insert(("default".into(), format!("s-{i}-x")), Some(e));
                }
                _ => {
                    // Nothing changed.
                }
            }
            cache.update(&snapshot, changes, &node);
            let delta = cache.take_delta();
            shared.advance(cache.state(), &delta);
            assert_eq!(**shared.current(), *cache.state(), "step {step}");
            // Now and then an API request holds a state across a compile.
            reader = (step % 7 == 0).then(|| Arc::clone(shared.current()));
        }
        drop(reader);
    }
}
