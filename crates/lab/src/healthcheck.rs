//! The router's health check, as a cloud target pool's: for every externalTrafficPolicy=Local
//! LoadBalancer Service, each node's healthCheckNodePort is asked over HTTP every
//! `loadBalancer.healthCheck.interval`; a node whose answer is not 200 (refused, 503, no
//! answer) for `delay` leaves that VIP's next hops, and comes back at its first 200. The
//! delay is the window in which the load balancer still sends to a node without a local
//! backend: seed 003's convergence window. Runs as `sluice lab router-health` inside the
//! router's namespace until `lab down` removes it.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use crate::{
    LabError,
    loadbalancer::{is_load_balancer, vips},
    names,
    router::{Unhealthy, next_hops, read_unhealthy, sync_vip_routes, write_unhealthy},
    state::LabState,
};

/// A health check never waits longer than this for an answer.
const MAX_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether `node:port` answers an HTTP GET with 200, as kube-proxy's health check server
/// does for a node with a local endpoint (503 without).
fn healthy(node: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    let ask = || -> std::io::Result<bool> {
        let addr = SocketAddr::from((node, port));
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(
            format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        Ok(head.starts_with(b"HTTP/1.") && &head[8..12] == b" 200")
    };
    ask().unwrap_or(false)
}

/// The checks of one pass: every (VIP, node) of a Local LoadBalancer Service with a
/// healthCheckNodePort, and that port.
fn checks(st: &LabState) -> Vec<(Ipv4Addr, Ipv4Addr, u16)> {
    let nodes = next_hops(&st.spec);
    let mut out = Vec::new();
    for s in st.services.values().filter(|s| is_load_balancer(&s.object)) {
        let Some(spec) = s.object.spec.as_ref() else {
            continue;
        };
        let port = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok());
        let (Some(port), Some("Local")) = (port, spec.external_traffic_policy.as_deref()) else {
            continue;
        };
        for vip in vips(&s.object) {
            out.extend(nodes.iter().map(|node| (vip, *node, port)));
        }
    }
    out
}

/// Checks and steers until the lab goes (or stops asking for health checks). Reads
/// `lab.json` each pass, so Services and nodes that come and go are followed.
pub fn run_router_health(dir: &Path) -> Result<(), LabError> {
    let mut failing: BTreeMap<(Ipv4Addr, Ipv4Addr), Instant> = BTreeMap::new();
    let mut last = read_unhealthy(dir);
    loop {
        let st = LabState::read(&dir.join("lab.json"))?;
        let Some(check) = st
            .spec
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.health_check)
        else {
            return Ok(());
        };
        let timeout = check.interval.min(MAX_CHECK_TIMEOUT);
        let mut unhealthy = Unhealthy::new();
        let mut seen = BTreeSet::new();
        for (vip, node, port) in checks(&st) {
            seen.insert((vip, node));
            if healthy(node, port, timeout) {
                failing.remove(&(vip, node));
                continue;
            }
            let since = *failing.entry((vip, node)).or_insert_with(Instant::now);
            if since.elapsed() >= check.delay {
                unhealthy.entry(vip).or_default().insert(node);
            }
        }
        failing.retain(|k, _| seen.contains(k));
        if unhealthy != last {
            eprintln!("router health: nodes out of their VIP's next hops: {unhealthy:?}");
            write_unhealthy(dir, &unhealthy)?;
            last = unhealthy;
        }
        // Every pass, not only on a change: a `lab apply` may have synced from the file an
        // instant before this pass rewrote it.
        if let Err(e) = sync_vip_routes(&names::router_netns(&st.name), &st, &last) {
            eprintln!("router health: {e}");
        }
        thread::sleep(check.interval);
    }
}
