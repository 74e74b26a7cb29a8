//! `masquerade:` in the lab file: the agents' egress masquerading (`--masquerade`,
//! `--non-masquerade-cidr`), like GKE's ip-masq-agent ConfigMap.

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::LabSpec;
use crate::LabError;

/// Egress masquerading of pod traffic leaving the cluster, on every agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MasqueradeSpec {
    /// The prefixes pod traffic keeps its address to; empty: the agents' defaults
    /// (ip-masq-agent's on GKE).
    #[serde(rename = "nonMasqueradeCIDRs")]
    pub non_masquerade_cidrs: Vec<Ipv4Net>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMasquerade {
    #[serde(rename = "nonMasqueradeCIDRs")]
    non_masquerade_cidrs: Option<Vec<String>>,
}

/// Checks `masquerade:`; the agents masquerade on the underlay device, so a lab without
/// one cannot.
pub(super) fn parse_masquerade(
    raw: RawMasquerade,
    spec: &LabSpec,
    err: &impl Fn(&str, String) -> LabError,
) -> Result<MasqueradeSpec, LabError> {
    if spec.underlay.is_none() {
        return Err(err(
            "masquerade",
            "needs an underlay (routingMode tunnel or native)".into(),
        ));
    }
    let mut cidrs = Vec::new();
    for (i, text) in raw
        .non_masquerade_cidrs
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let field = format!("masquerade.nonMasqueradeCIDRs[{i}]");
        let net: Ipv4Net = text.parse().map_err(|_| {
            err(
                &field,
                format!("{text:?} is not an IPv4 CIDR such as 10.0.0.0/8"),
            )
        })?;
        if net.trunc() != net {
            return Err(err(
                &field,
                format!("{text:?} has host bits set (the prefix is {})", net.trunc()),
            ));
        }
        cidrs.push(net);
    }
    Ok(MasqueradeSpec {
        non_masquerade_cidrs: cidrs,
    })
}
