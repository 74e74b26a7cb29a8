//! Local endpoints attached or detached (`policy::local_endpoints`).

use std::collections::BTreeSet;

use sluice_store::LocalEndpoint;

use super::{Attached, LocalPod, PodLabels, PolicyIndex};
use crate::{Delta, DesiredState, changes::touched};

impl PolicyIndex {
    /// How many local endpoints were admitted.
    pub(crate) fn local_count(&self) -> usize {
        self.local.len()
    }

    /// The ifindex the local endpoint `endpoint` was admitted under, if it was.
    pub(crate) fn ifindex_of(&self, endpoint: &LocalEndpoint) -> Option<u32> {
        self.local
            .iter()
            .find(|(_, l)| l.endpoint == *endpoint)
            .map(|(&ifindex, _)| ifindex)
    }

    /// The identity of the pod of the local endpoint `ifindex`.
    pub(crate) fn identity_of(&self, ifindex: u32) -> Option<u32> {
        self.local.get(&ifindex)?.pod.as_ref().map(|p| p.identity)
    }

    /// Takes out the local endpoint `ifindex`: its entries, interface and rows.
    pub(crate) fn detach(&mut self, ifindex: u32, state: &mut DesiredState, delta: &mut Delta) {
        if let Some(local) = self.local.remove(&ifindex) {
            state.interfaces.remove(&local.endpoint.interface);
        }
        touched(
            &mut delta.endpoints,
            ifindex,
            state.endpoints.remove(&ifindex),
        );
        touched(
            &mut delta.policies,
            ifindex,
            state.policies.remove(&ifindex),
        );
        state.endpoint_details.remove(&ifindex);
        self.endpoint_problems.remove(&ifindex);
        // Whether the host identity is still named.
        self.write(Vec::new(), state, delta);
    }

    /// Puts in the local endpoint `endpoint` as `ifindex`, its pod `pod`, and compiles
    /// its rows.
    pub(crate) fn attach(
        &mut self,
        ifindex: u32,
        endpoint: LocalEndpoint,
        pod: Attached,
        state: &mut DesiredState,
        delta: &mut Delta,
    ) {
        state.interfaces.insert(endpoint.interface.clone());
        let pod = PodLabels {
            labels: pod.labels,
            ports: pod.ports,
            identity: pod.identity,
        };
        let local = LocalPod {
            endpoint,
            pod: Some(pod),
        };
        self.local.insert(ifindex, local);
        self.rows_again(&BTreeSet::new(), &[ifindex].into(), state, delta);
    }
}
