//! Egress masquerading, as GKE's ip-masq-agent: with `--masquerade`, pod traffic leaving
//! the cluster is SNATed to the node's address by to_netdev, except toward the
//! nonMasqueradeCIDRs (`--non-masquerade-cidr`, ip-masq-agent's GKE defaults when none is
//! given). The cluster itself (pods, nodes, pod CIDRs in the ipcache) is never
//! masqueraded. The agent writes the flag into `node_config` and the prefixes into
//! `non_masq_cidrs`, and puts back what drifted on every pass.

use std::collections::BTreeSet;

use aya::maps::{LpmTrie, MapData, lpm_trie::Key};
use ipnet::Ipv4Net;
use sluice_api::Drift;
use sluice_common::{addr_be, addr_from_be, kinds::DriftKind, registry::names};
use tracing::info;

use crate::AgentError;

/// ip-masq-agent's nonMasqueradeCIDRs on GKE when its ConfigMap names none: the private
/// and reserved ranges, and link-local (masqLinkLocal false).
pub const DEFAULT_NON_MASQUERADE_CIDRS: [&str; 12] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "240.0.0.0/4",
    "169.254.0.0/16",
];

/// The agent's masquerade flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MasqueradeConfig {
    pub enabled: bool,
    /// `--non-masquerade-cidr`; empty: [`DEFAULT_NON_MASQUERADE_CIDRS`].
    pub non_masquerade_cidrs: Vec<Ipv4Net>,
}

impl MasqueradeConfig {
    /// The prefixes pod traffic keeps its address to; none when masquerading is off.
    pub fn effective_cidrs(&self) -> BTreeSet<Ipv4Net> {
        if !self.enabled {
            return BTreeSet::new();
        }
        if self.non_masquerade_cidrs.is_empty() {
            return DEFAULT_NON_MASQUERADE_CIDRS
                .iter()
                .filter_map(|cidr| cidr.parse().ok())
                .collect();
        }
        self.non_masquerade_cidrs.iter().copied().collect()
    }

    /// What `status` shows: the nonMasqueradeCIDRs when masquerading is on.
    pub fn status(&self) -> Option<Vec<Ipv4Net>> {
        self.enabled
            .then(|| self.effective_cidrs().into_iter().collect())
    }
}

/// A `--non-masquerade-cidr` value: a prefix without host bits, so what is written is what
/// was meant.
pub fn parse_cidr(value: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = value
        .parse()
        .map_err(|_| format!("{value:?} is not an IPv4 CIDR such as 10.0.0.0/8"))?;
    if net.trunc() != net {
        return Err(format!(
            "{value:?} has host bits set (the prefix is {})",
            net.trunc()
        ));
    }
    Ok(net)
}

/// The pinned `non_masq_cidrs` map against the flags.
pub struct NonMasqueradeCidrs {
    map: LpmTrie<MapData, u32, u32>,
}

/// What differs between the map and the flags.
#[derive(Debug, Default)]
pub struct CidrPlan {
    missing: Vec<Ipv4Net>,
    unexpected: Vec<Ipv4Net>,
}

impl NonMasqueradeCidrs {
    pub fn new(map: LpmTrie<MapData, u32, u32>) -> Self {
        Self { map }
    }

    pub fn plan(&self, config: &MasqueradeConfig) -> Result<CidrPlan, AgentError> {
        let desired = config.effective_cidrs();
        let mut actual = BTreeSet::new();
        for key in self.map.keys() {
            let key = key.map_err(|source| AgentError::Map {
                map: names::NON_MASQ_CIDRS,
                source,
            })?;
            let prefix_len = u8::try_from(key.prefix_len()).unwrap_or(u8::MAX);
            if let Ok(net) = Ipv4Net::new(addr_from_be(key.data()), prefix_len) {
                actual.insert(net);
            }
        }
        Ok(CidrPlan {
            missing: desired.difference(&actual).copied().collect(),
            unexpected: actual.difference(&desired).copied().collect(),
        })
    }

    /// Writes `plan`; returns whether anything changed.
    pub fn apply(&mut self, plan: &CidrPlan) -> Result<bool, AgentError> {
        let map_error = |source| AgentError::Map {
            map: names::NON_MASQ_CIDRS,
            source,
        };
        for net in &plan.unexpected {
            info!(%net, "removing a nonMasqueradeCIDR");
            self.map.remove(&key(net)).map_err(map_error)?;
        }
        for net in &plan.missing {
            info!(%net, "adding a nonMasqueradeCIDR");
            self.map.insert(&key(net), 1, 0).map_err(map_error)?;
        }
        Ok(!plan.missing.is_empty() || !plan.unexpected.is_empty())
    }
}

impl CidrPlan {
    /// The plan as `verify` reports it.
    pub fn drift(&self) -> impl Iterator<Item = Drift> + '_ {
        let missing = self.missing.iter().map(|net| Drift {
            map: names::NON_MASQ_CIDRS.into(),
            kind: DriftKind::Missing,
            key: net.to_string(),
            desired: Some("exempt".into()),
            actual: None,
        });
        let unexpected = self.unexpected.iter().map(|net| Drift {
            map: names::NON_MASQ_CIDRS.into(),
            kind: DriftKind::Unexpected,
            key: net.to_string(),
            desired: None,
            actual: Some("exempt".into()),
        });
        missing.chain(unexpected)
    }
}

fn key(net: &Ipv4Net) -> Key<u32> {
    Key::new(u32::from(net.prefix_len()), addr_be(net.network()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_only_when_on_and_none_given() {
        assert!(MasqueradeConfig::default().effective_cidrs().is_empty());
        let on = MasqueradeConfig {
            enabled: true,
            non_masquerade_cidrs: Vec::new(),
        };
        assert_eq!(
            on.effective_cidrs().len(),
            DEFAULT_NON_MASQUERADE_CIDRS.len()
        );
        let given = MasqueradeConfig {
            enabled: true,
            non_masquerade_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
        };
        assert_eq!(given.status(), Some(vec!["10.0.0.0/8".parse().unwrap()]));
    }

    #[test]
    fn bad_cidrs_are_refused() {
        assert!(parse_cidr("10.0.0.0/8").is_ok());
        assert!(parse_cidr("10.0.0.1/8").unwrap_err().contains("host bits"));
        assert!(
            parse_cidr("ten/8")
                .unwrap_err()
                .contains("not an IPv4 CIDR")
        );
        assert!(parse_cidr("10.0.0.0/33").is_err());
    }
}
