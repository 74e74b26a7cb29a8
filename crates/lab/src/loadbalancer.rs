//! The lab's cloud load balancer controller: every LoadBalancer Service gets a VIP from the
//! lab file's `loadBalancer.pool`, written to `status.loadBalancer.ingress[].ip` as a
//! cloud's service controller writes it. Pure and deterministic: a Service keeps the VIP it
//! has, then those that ask for one (`spec.loadBalancerIP`) get it if it is in the pool and
//! free, then the others get the lowest free address, in `namespace/name` order. A VIP is
//! released when its Service goes or stops being a LoadBalancer. A Service that cannot get
//! one stays pending (no ingress), with a condition saying why, as a cloud leaves it with
//! an event; nothing fails.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::{
    api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Service, ServiceStatus},
    apimachinery::pkg::apis::meta::v1::Condition,
};

use crate::{
    ipam,
    state::{LabState, now},
};

/// The condition the controller sets on a LoadBalancer Service it could not give a VIP
/// (cleared once it has one).
pub const PENDING_CONDITION: &str = "sluice.dev/LoadBalancerPending";

pub fn is_load_balancer(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
}

/// The VIPs in `status.loadBalancer.ingress`.
pub fn vips(svc: &Service) -> Vec<Ipv4Addr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

fn requested(svc: &Service) -> Option<&str> {
    svc.spec
        .as_ref()?
        .load_balancer_ip
        .as_deref()
        .filter(|ip| !ip.is_empty())
}

/// Gives every LoadBalancer Service of `st` its VIP, releases those of the others; returns
/// the Services left pending (`namespace/name`) and why.
pub fn assign(st: &mut LabState) -> Vec<(String, String)> {
    let pool = st.spec.load_balancer.as_ref().map(|lb| lb.pool);
    let mut taken: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    let mut decided: BTreeMap<String, Result<Ipv4Addr, String>> = BTreeMap::new();
    let services = &st.services;
    let balanced = || services.iter().filter(|(_, s)| is_load_balancer(&s.object));
    // Those with a VIP keep it while it still fits what they ask for.
    if let Some(pool) = pool {
        for (k, s) in balanced() {
            let keep = vips(&s.object).into_iter().find(|ip| {
                ipam::is_assignable(pool, *ip)
                    && requested(&s.object).is_none_or(|r| r == ip.to_string())
            });
            if let Some(ip) = keep.filter(|ip| !taken.contains_key(ip)) {
                taken.insert(ip, k.clone());
                decided.insert(k.clone(), Ok(ip));
            }
        }
    }
    // Then those that name their VIP.
    let undecided = |decided: &BTreeMap<String, _>| -> Vec<(String, Option<String>)> {
        balanced()
            .filter(|(k, _)| !decided.contains_key(*k))
            .map(|(k, s)| (k.clone(), requested(&s.object).map(str::to_string)))
            .collect()
    };
    for (k, text) in undecided(&decided) {
        let Some(text) = text else {
            continue;
        };
        let outcome = match (text.parse::<Ipv4Addr>(), pool) {
            (_, None) => Err(no_pool()),
            (Err(_), _) => Err(format!(
                "spec.loadBalancerIP {text:?} is not an IPv4 address"
            )),
            (Ok(ip), Some(pool)) if !ipam::is_assignable(pool, ip) => Err(format!(
                "spec.loadBalancerIP {ip} is not in the lab's loadBalancer.pool {pool}"
            )),
            (Ok(ip), Some(_)) => match taken.get(&ip) {
                Some(other) => Err(format!(
                    "spec.loadBalancerIP {ip} is in use by Service {other}"
                )),
                None => {
                    taken.insert(ip, k.clone());
                    Ok(ip)
                }
            },
        };
        decided.insert(k, outcome);
    }
    // Then the rest, lowest free address first.
    for (k, _) in undecided(&decided) {
        let outcome = match pool {
            None => Err(no_pool()),
            Some(pool) => {
                let used: BTreeSet<Ipv4Addr> = taken.keys().copied().collect();
                match ipam::lowest_free(pool, 1, &used) {
                    Some(ip) => {
                        taken.insert(ip, k.clone());
                        Ok(ip)
                    }
                    None => Err(format!(
                        "no free address in the lab's loadBalancer.pool {pool} ({} in use)",
                        used.len()
                    )),
                }
            }
        };
        decided.insert(k, outcome);
    }
    let mut pending = Vec::new();
    for (k, s) in st.services.iter_mut() {
        let outcome = decided.remove(k);
        if let Some(Err(message)) = &outcome {
            pending.push((k.clone(), message.clone()));
        }
        write_status(&mut s.object, outcome);
    }
    pending
}

fn no_pool() -> String {
    "the lab file has no loadBalancer.pool".into()
}

/// The status a cloud controller writes: the VIP, or no ingress and the reason pending;
/// None (not a LoadBalancer) clears both.
fn write_status(svc: &mut Service, outcome: Option<Result<Ipv4Addr, String>>) {
    let status = svc.status.get_or_insert_with(ServiceStatus::default);
    let (mut earlier, mut conditions): (Vec<Condition>, Vec<Condition>) = status
        .conditions
        .take()
        .unwrap_or_default()
        .into_iter()
        .partition(|c| c.type_ == PENDING_CONDITION);
    let ingress = match outcome {
        Some(Ok(ip)) => Some(vec![LoadBalancerIngress {
            ip: Some(ip.to_string()),
            ip_mode: Some("VIP".into()),
            ..Default::default()
        }]),
        Some(Err(message)) => {
            // The same reason keeps its time, so an unchanged lab stays unchanged.
            let condition = match earlier.pop().filter(|c| c.message == message) {
                Some(same) => same,
                None => Condition {
                    type_: PENDING_CONDITION.into(),
                    status: "True".into(),
                    reason: "NoAddress".into(),
                    message,
                    last_transition_time: now(),
                    observed_generation: None,
                },
            };
            conditions.push(condition);
            None
        }
        None => None,
    };
    status.load_balancer = ingress.map(|ingress| LoadBalancerStatus {
        ingress: Some(ingress),
    });
    status.conditions = (!conditions.is_empty()).then_some(conditions);
    if status.load_balancer.is_none() && status.conditions.is_none() {
        svc.status = None;
    }
}

#[cfg(test)]
mod tests;
