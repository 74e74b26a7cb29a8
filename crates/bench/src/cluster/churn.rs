//! The churn: pods replaced on other nodes at a fixed rate, Services rolled a window at a
//! time, then a node leaving and joining; each change handed to the [`Poller`] with what
//! it must make true in the maps.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use sluice_common::IpcacheEntry;
use sluice_fake_apiserver::{
    FakeApiServer, Resource,
    cluster::{self, Shape},
};

use super::{
    Change, ClusterConfig, fake,
    poller::{Expect, Poller, ipcache_at},
};
use crate::BenchError;

/// A pod's replacement and a Service's rolling step, applied at their rates for the
/// churn's duration; returns how many watch events they made.
pub(super) fn churn(
    server: &FakeApiServer,
    config: &ClusterConfig,
    poller: &Poller,
) -> Result<usize, BenchError> {
    let shape = &config.shape;
    let remote_pods = shape.pods - shape.local_pods;
    let pod_interval = Duration::from_secs_f64(1.0 / config.pod_events_per_second.max(0.1));
    let step_interval = Duration::from_secs_f64(1.0 / config.rolling_services.max(1) as f64);
    // Rolled: the Services after the LoadBalancers (Service 0 is the largest).
    let rollable = shape.services - shape.load_balancers - 1;
    let first_rolled = shape.load_balancers + 1;
    let mut generations: BTreeMap<usize, u32> = BTreeMap::new();
    let mut surged: BTreeMap<usize, bool> = BTreeMap::new();
    // A replacement in progress: the pod deleted, to be added back next.
    let mut deleted: Option<usize> = None;
    let (mut pod_turn, mut step_turn) = (0_usize, 0_usize);
    let start = Instant::now();
    let (mut next_pod, mut next_step) = (start, start);
    let mut events = 0;
    while start.elapsed() < config.churn {
        let now = Instant::now();
        if now >= next_pod {
            next_pod += pod_interval;
            events += pod_event(
                server,
                shape,
                poller,
                &mut deleted,
                &mut generations,
                || {
                    pod_turn += 1;
                    shape.local_pods + (pod_turn * 7_919) % remote_pods
                },
            )?;
        }
        if now >= next_step {
            next_step += step_interval;
            // Each Service of the window gets ten steps, then the window moves on.
            let window = step_turn / (config.rolling_services * 10);
            let s = first_rolled
                + (window * config.rolling_services + step_turn % config.rolling_services)
                    % rollable.max(1);
            step_turn += 1;
            let surge = !surged.get(&s).copied().unwrap_or(false);
            surged.insert(s, surge);
            events += roll(server, shape, poller, s, surge)?;
        }
        let wake = next_pod.min(next_step);
        if let Some(wait) = wake.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    // Leave no Service surged and no pod missing.
    if let Some(p) = deleted {
        let generation = generations.get(&p).copied().unwrap_or(0);
        server
            .apply_json(Resource::Pods, cluster::pod(shape, p, generation))
            .map_err(fake)?;
        events += 1;
    }
    for (s, surge) in surged {
        if surge {
            events += roll(server, shape, poller, s, false)?;
        }
    }
    Ok(events)
}

/// The ipcache's answer for an address inside `node`'s pod CIDR that no pod has: the pod
/// CIDR's own entry.
fn pod_cidr_entry(poller: &Poller, node: usize) -> Option<IpcacheEntry> {
    let unused = Ipv4Addr::from(u32::from(Shape::pod_cidr(node)) + 255);
    ipcache_at(&poller.maps, unused)
}

/// One pod event: the pod of the replacement in progress is added back with a new
/// address, or the next pod is deleted.
fn pod_event(
    server: &FakeApiServer,
    shape: &Shape,
    poller: &Poller,
    deleted: &mut Option<usize>,
    generations: &mut BTreeMap<usize, u32>,
    next: impl FnOnce() -> usize,
) -> Result<usize, BenchError> {
    if let Some(p) = deleted.take() {
        let generation = generations.entry(p).or_default();
        *generation += 1;
        let address = shape.pod_address(p, *generation);
        let was = ipcache_at(&poller.maps, address);
        let since = Instant::now();
        server
            .apply_json(Resource::Pods, cluster::pod(shape, p, *generation))
            .map_err(fake)?;
        if let Some(was) = was {
            poller.expect(
                Change::PodAdded,
                since,
                Expect::IpcacheChanges { address, was },
            );
        }
        return Ok(1);
    }
    let p = next();
    let address = shape.pod_address(p, generations.get(&p).copied().unwrap_or(0));
    let node = cluster_node_of(shape, address);
    let since = Instant::now();
    if server.delete(Resource::Pods, &shape.pod_key(p)).is_none() {
        return Ok(0);
    }
    *deleted = Some(p);
    if let Some(is) = node.and_then(|n| pod_cidr_entry(poller, n)) {
        poller.expect(Change::PodDeleted, since, Expect::IpcacheIs { address, is });
    }
    Ok(1)
}

/// The node whose pod CIDR holds `address`.
fn cluster_node_of(shape: &Shape, address: Ipv4Addr) -> Option<usize> {
    let [_, b, c, _] = address.octets();
    let n = usize::from(b.checked_sub(64)?) * 256 + usize::from(c);
    (n < shape.nodes).then_some(n)
}

/// A rolling step of Service `s`: one endpoint more (`surge`), or back to its own.
fn roll(
    server: &FakeApiServer,
    shape: &Shape,
    poller: &Poller,
    s: usize,
    surge: bool,
) -> Result<usize, BenchError> {
    let slices = cluster::endpoint_slices(shape, s, surge);
    let count = shape.endpoint_count(s) + usize::from(surge);
    let since = Instant::now();
    let mut events = 0;
    let kept = slices.len();
    for slice in slices {
        server
            .apply_json(Resource::EndpointSlices, slice)
            .map_err(fake)?;
        events += 1;
    }
    // The surge's own slice goes when it is empty again.
    if !surge
        && server
            .delete(
                Resource::EndpointSlices,
                &cluster::slice_key(shape, s, kept),
            )
            .is_some()
    {
        events += 1;
    }
    let count = u16::try_from(count).unwrap_or(u16::MAX);
    poller.expect(
        Change::ServiceRolled,
        since,
        Expect::Backends {
            vip: Shape::cluster_ip(s),
            count,
        },
    );
    Ok(events)
}

/// The last node is deleted, then created again.
pub(super) fn node_leaves_and_joins(
    server: &FakeApiServer,
    shape: &Shape,
    poller: &Poller,
) -> Result<(), BenchError> {
    let n = shape.nodes - 1;
    let unused = Ipv4Addr::from(u32::from(Shape::pod_cidr(n)) + 255);
    let Some(was) = ipcache_at(&poller.maps, unused) else {
        return Err(BenchError::Failed(format!(
            "node {n}'s pod CIDR is not in the ipcache"
        )));
    };
    let since = Instant::now();
    server
        .delete(Resource::Nodes, &Shape::node_name(n))
        .ok_or_else(|| BenchError::Failed(format!("node {n} was not served")))?;
    poller.expect(
        Change::NodeLeft,
        since,
        Expect::IpcacheChanges {
            address: unused,
            was,
        },
    );
    poller.drain();
    // A join is only measured after a leave was seen: else its entry is there already.
    if ipcache_at(&poller.maps, unused) == Some(was) {
        return Ok(());
    }
    let since = Instant::now();
    server
        .apply_json(Resource::Nodes, cluster::node(n))
        .map_err(fake)?;
    poller.expect(
        Change::NodeJoined,
        since,
        Expect::IpcacheIs {
            address: unused,
            is: was,
        },
    );
    poller.drain();
    Ok(())
}
