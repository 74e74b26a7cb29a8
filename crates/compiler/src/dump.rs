//! [`DesiredState::dump`]: the state as sorted lines, for table tests and people.

use std::fmt::Write;

use sluice_common::names;

use crate::DesiredState;

impl DesiredState {
    /// One line per map entry, then the nodes, interfaces and problems, sorted,
    /// human-readable.
    pub fn dump(&self) -> String {
        // Writing to a String cannot fail, hence the ignored results below.
        let mut out = String::new();
        let mut services: Vec<_> = self.services.iter().collect();
        services.sort_by_key(|(k, _)| (k.vip(), k.port(), k.proto, k.scope, k.slot));
        for (key, value) in services {
            let _ = writeln!(out, "{} {key} -> {value}", names::SERVICES);
        }
        // A table is M positions: its line gives how many each backend slot holds.
        for (key, table) in &self.maglev {
            let mut held = vec![0usize; table.iter().copied().max().map_or(0, usize::from)];
            for &slot in table.iter() {
                if let Some(count) = usize::from(slot)
                    .checked_sub(1)
                    .and_then(|i| held.get_mut(i))
                {
                    *count += 1;
                }
            }
            let held: Vec<String> = (1..).zip(&held).map(|(s, n)| format!("{s}:{n}")).collect();
            let _ = writeln!(
                out,
                "{} {key} -> M={} slots {}",
                names::MAGLEV,
                table.len(),
                held.join(" ")
            );
        }
        let mut backends: Vec<_> = self.backends.iter().collect();
        backends.sort_by_key(|(k, _)| (k.addr(), k.port(), k.proto));
        for (key, value) in backends {
            let _ = writeln!(out, "{} {key} -> {value}", names::BACKENDS);
        }
        let mut ranges: Vec<_> = self.source_ranges.keys().collect();
        ranges.sort_by_key(|k| {
            let port = u16::from_be(k.range.dport);
            (k.frontend(), port, k.range.proto, k.source(), k.prefixlen)
        });
        for key in ranges {
            let _ = writeln!(out, "{} {key}", names::SOURCE_RANGES);
        }
        for (ifindex, value) in &self.endpoints {
            let _ = writeln!(out, "{} ifindex {ifindex} -> {value}", names::ENDPOINTS);
        }
        for (ifindex, d) in &self.endpoint_details {
            let _ = writeln!(
                out,
                "endpoint ifindex {ifindex} {}/{} identity={} ingress={} egress={} rows={}{} policies=[{}]",
                d.namespace,
                d.pod,
                d.identity,
                enforcement(d.ingress_enforced),
                enforcement(d.egress_enforced),
                d.policy_rows,
                if d.overflow { " OVERFLOW" } else { "" },
                d.policies.join(",")
            );
        }
        let mut ipcache: Vec<_> = self.ipcache.iter().collect();
        ipcache.sort_by_key(|(k, _)| (k.addr(), k.prefixlen));
        for (key, value) in ipcache {
            let _ = writeln!(out, "{} {key} -> {value}", names::IPCACHE);
        }
        for identity in self.identities.values() {
            let _ = writeln!(
                out,
                "identity {} {}",
                identity.id,
                identity.labels.join(",")
            );
        }
        for (ifindex, policy) in &self.policies {
            for (row, origins) in &policy.rows {
                let origins: Vec<String> = origins.iter().map(ToString::to_string).collect();
                let _ = writeln!(
                    out,
                    "{} ifindex {ifindex} {row} <- {}",
                    names::POLICY,
                    origins.join(",")
                );
            }
        }
        let local = self.nodes.local.iter().map(|n| ("local", n));
        for (side, n) in local.chain(self.nodes.remote.iter().map(|n| ("remote", n))) {
            let _ = writeln!(
                out,
                "node {side} {} internalIP={} podCIDR={} router={}",
                n.name,
                n.internal_ip,
                n.pod_cidr.map_or("-".into(), |c| c.to_string()),
                n.router().map_or("-".into(), |r| r.to_string()),
            );
        }
        for (port, check) in &self.health_checks {
            let _ = writeln!(
                out,
                "health check :{port} {}/{} local endpoints={}",
                check.namespace, check.name, check.local_endpoints
            );
        }
        for interface in &self.interfaces {
            let _ = writeln!(out, "interface {interface}");
        }
        for problem in &self.problems {
            let _ = writeln!(out, "problem: {problem}");
        }
        out
    }
}

fn enforcement(enforced: bool) -> &'static str {
    if enforced { "enforced" } else { "open" }
}
