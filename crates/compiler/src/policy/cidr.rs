//! The CIDRs of ipBlock peers.

use std::collections::BTreeSet;

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;

use super::{Policy, rules};
use crate::{ObjectRef, Problem, problem::Problems};

/// A parsed ipBlock: IPv6 parts are dropped (they never contain an IPv4 address).
pub(super) struct Block {
    pub cidr: Option<Ipv4Net>,
    pub except: Vec<Ipv4Net>,
}

/// Parses an ipBlock; an unparsable part is reported and makes the peer match nothing.
pub(super) fn block(
    policy: &ObjectRef,
    peer: &NetworkPolicyPeer,
    problems: &mut Problems,
) -> Option<Block> {
    let ip_block = peer.ip_block.as_ref()?;
    let mut bad = false;
    let mut parse = |s: &str| match s.parse::<IpNet>() {
        Ok(IpNet::V4(net)) => Some(net.trunc()),
        Ok(IpNet::V6(_)) => None,
        Err(_) => {
            problems.insert(Problem::PolicyCidr {
                policy: policy.clone(),
                cidr: s.to_string(),
            });
            bad = true;
            None
        }
    };
    let cidr = parse(&ip_block.cidr);
    let except = ip_block
        .except
        .iter()
        .flatten()
        .filter_map(|e| parse(e))
        .collect();
    Some(Block {
        cidr: if bad { None } else { cidr },
        except,
    })
}

/// Every ipBlock of `policy`'s rules, parsed, in rule order.
pub(super) fn blocks<'p>(
    policy: &'p Policy<'_>,
    problems: &'p mut Problems,
) -> impl Iterator<Item = Block> + 'p {
    rules(policy.policy)
        .flat_map(|(_, peers, _)| peers.into_iter().flatten())
        .filter_map(move |peer| block(&policy.object, peer, problems))
}

/// Every ipBlock of `policy` with an IPv4 CIDR, parsed; unparsable ones are not reported.
pub(super) fn ipv4_blocks<'p>(
    policy: &'p Policy<'_>,
    ignored: &'p mut Problems,
) -> impl Iterator<Item = (Ipv4Net, Vec<Ipv4Net>)> + 'p {
    blocks(policy, ignored).filter_map(|b| Some((b.cidr?, b.except)))
}

/// Every IPv4 prefix named by an ipBlock, as cidr or except.
pub(super) fn policy_cidrs(policies: &[Policy<'_>], problems: &mut Problems) -> BTreeSet<Ipv4Net> {
    let mut out = BTreeSet::new();
    for p in policies {
        for b in blocks(p, problems) {
            out.extend(b.cidr);
            out.extend(b.except);
        }
    }
    out
}
