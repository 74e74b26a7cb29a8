//! What the lab plays the cloud with: `loadBalancer:` (the pool VIPs come from and the health
//! check of the router in front of the nodes).

use std::{net::Ipv4Addr, time::Duration};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{LabSpec, parse_cidr};
use crate::{
    LabError,
    topology::{self, overlaps},
};

/// `loadBalancer:` in the lab file: the lab's cloud load balancer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    /// LoadBalancer Services get their VIP (`status.loadBalancer.ingress[].ip`) from here.
    pub pool: Ipv4Net,
    /// With it, the router drops a node from the next hops of an externalTrafficPolicy=Local
    /// Service's VIP once its healthCheckNodePort has failed for this long, as a cloud target
    /// pool's health check does; without it, every node stays a next hop.
    pub health_check: Option<HealthCheckSpec>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckSpec {
    /// How long a node's health check must fail before the router stops sending it traffic.
    pub delay: Duration,
    /// How often the router asks every node.
    pub interval: Duration,
}

/// How often the router's health check asks, unless the lab file says.
pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RawLoadBalancer {
    pool: Option<String>,
    health_check: Option<RawHealthCheck>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    delay: Option<String>,
    interval: Option<String>,
}

/// `loadBalancer:` once the nodes and the underlay are known: the pool stays clear of the
/// cluster's ranges, and the router it needs sits on the underlay.
pub(super) fn parse_load_balancer(
    raw: RawLoadBalancer,
    spec: &LabSpec,
    err: &impl Fn(&str, String) -> LabError,
) -> Result<LoadBalancerSpec, LabError> {
    if spec.underlay.is_none() {
        return Err(err(
            "loadBalancer",
            "the router in front of the nodes needs an underlay (`underlay:` or several nodes)"
                .into(),
        ));
    }
    let text = raw
        .pool
        .ok_or_else(|| err("loadBalancer.pool", "required".into()))?;
    let pool = parse_cidr(&text, 30).map_err(|m| err("loadBalancer.pool", m))?;
    let ranges = [
        ("serviceCIDR", Some(spec.service_cidr)),
        ("clusterCIDR", Some(spec.cluster_cidr)),
        ("underlay.cidr", spec.underlay.map(|u| u.cidr)),
    ];
    for (name, range) in ranges {
        if let Some(range) = range.filter(|r| overlaps(*r, pool)) {
            return Err(err(
                "loadBalancer.pool",
                format!("{pool} overlaps {name} {range}"),
            ));
        }
    }
    let health_check = raw
        .health_check
        .map(|h| {
            let delay = h
                .delay
                .ok_or_else(|| err("loadBalancer.healthCheck.delay", "required".into()))
                .and_then(|d| {
                    parse_duration(&d).map_err(|m| err("loadBalancer.healthCheck.delay", m))
                })?;
            let interval = match h.interval {
                None => DEFAULT_HEALTH_CHECK_INTERVAL,
                Some(i) => parse_duration(&i)
                    .ok()
                    .filter(|i| !i.is_zero())
                    .ok_or_else(|| {
                        err(
                            "loadBalancer.healthCheck.interval",
                            format!("{i:?} is not a positive duration like 500ms or 1s"),
                        )
                    })?,
            };
            Ok::<_, LabError>(HealthCheckSpec { delay, interval })
        })
        .transpose()?;
    Ok(LoadBalancerSpec { pool, health_check })
}

/// `6s`, `500ms`, `1.5s`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, scale) = match text.strip_suffix("ms") {
        Some(ms) => (ms, 1e-3),
        None => (
            text.strip_suffix('s')
                .ok_or_else(|| format!("{text:?} is not a duration like 6s or 500ms"))?,
            1.0,
        ),
    };
    number
        .parse::<f64>()
        .ok()
        .and_then(|n| Duration::try_from_secs_f64(n * scale).ok())
        .ok_or_else(|| format!("{text:?} is not a duration like 6s or 500ms"))
}

/// The router's address on the underlay: its network + 1, as a segment's gateway.
pub fn router_address(spec: &LabSpec) -> Option<Ipv4Addr> {
    let underlay = spec.underlay?;
    Some(Ipv4Addr::from(
        u32::from(underlay.cidr.network()) + topology::ROUTER_OFFSET,
    ))
}

/// The router's address is nobody else's.
pub(super) fn check_router_address(
    spec: &LabSpec,
    err: &impl Fn(&str, String) -> LabError,
) -> Result<(), LabError> {
    let Some(router) = router_address(spec).filter(|_| spec.has_router()) else {
        return Ok(());
    };
    if let Some(i) = spec
        .nodes
        .iter()
        .position(|n| n.underlay_address == Some(router))
    {
        return Err(err(
            &format!("nodes[{i}].underlayAddress"),
            format!("{router} is the load balancer router's address (underlay network + 1)"),
        ));
    }
    if let Some(i) = spec.world.iter().position(|w| w.address == router) {
        return Err(err(
            &format!("world[{i}].address"),
            format!("{router} is the load balancer router's address (underlay network + 1)"),
        ));
    }
    if let Some(lb) = &spec.load_balancer
        && let Some(i) = spec.world.iter().position(|w| lb.pool.contains(&w.address))
    {
        return Err(err(
            &format!("world[{i}].address"),
            format!(
                "{} is in loadBalancer.pool {}",
                spec.world[i].address, lb.pool
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
