//! Other nodes' changes in the policies (`policy::remote_nodes`): ipBlock peers judged
//! by the prefixes of the identities node entries carry, and the node faults.

use std::collections::BTreeSet;

use sluice_common::IDENTITY_REMOTE_NODE;

use super::{PolicyIndex, PrefixMove, block, identities, identity_rules};
use crate::{Delta, DesiredState, problem::Problems};

impl PolicyIndex {
    /// Follows other nodes' changes (`remote_nodes`): the identity prefixes of `moves`,
    /// the ipBlock peers of the identities they move, whether the remote-node identity
    /// is in use, and the node `faults`; then the rows of the endpoints a policy whose
    /// peers changed selects.
    pub(crate) fn put_nodes(
        &mut self,
        moves: Vec<PrefixMove>,
        remote_node: bool,
        faults: Problems,
        state: &mut DesiredState,
        delta: &mut Delta,
    ) {
        let mut moved = BTreeSet::new();
        for (prefix, from, to) in moves {
            if from != to {
                self.matching.prefixes.move_prefix(prefix, from, to);
                moved.extend(from);
                moved.extend(to);
            }
        }
        identities::keep_reserved(&mut state.identities, IDENTITY_REMOTE_NODE, remote_node);
        self.base_problems
            .retain(|p| !matches!(p, crate::Problem::Node(_)));
        self.base_problems.extend(&faults);
        let mut changed = BTreeSet::new();
        if let Some(objects) = &self.objects {
            let prefixes = &self.matching.prefixes;
            for rule in identity_rules(objects, &mut self.peers) {
                let object = rule.object();
                let blocks: Vec<_> = rule
                    .list
                    .iter()
                    .filter_map(|peer| block(&object, peer, &mut Problems::default()))
                    .filter_map(|b| Some((b.cidr?, b.except)))
                    .collect();
                if blocks.is_empty() {
                    continue;
                }
                for &id in &moved {
                    let selects = blocks.iter().any(|(c, e)| prefixes.in_block(id, *c, e));
                    let flipped = if selects {
                        rule.ids.insert(id)
                    } else {
                        rule.ids.remove(&id)
                    };
                    if flipped {
                        changed.insert(rule.key.clone());
                    }
                }
            }
        }
        self.rows_again(&changed, &BTreeSet::new(), state, delta);
    }
}
