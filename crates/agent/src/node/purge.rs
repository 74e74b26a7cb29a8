//! The service connections of removed backends, purged right after the maps lose them.

use std::collections::BTreeSet;

use sluice_compiler::{Delta, DesiredState};
use tracing::info;

use super::Node;
use crate::AgentError;

impl Node {
    /// Right after the realizer removed backends, removes their service connections from
    /// conntrack, so their clients choose again with their next packet (a UDP client on
    /// one source port would otherwise keep its entry for as long as it sends). After a
    /// start, what was removed while no agent ran is unknown: the first pass removes the
    /// service connections of every backend the desired state does not have. Connected
    /// UDP sockets the socket programs sent to such a backend are destroyed (`sock_purge`).
    /// `delta`, when the maps held `self.desired`: what the compiler changed since, so
    /// the removed backends are found without walking every backend.
    pub(super) fn purge_removed_backends(
        &mut self,
        desired: &DesiredState,
        delta: Option<&Delta>,
    ) -> Result<(), AgentError> {
        let (backends, purged) = if self.backends_checked {
            let gone: BTreeSet<_> = match delta {
                // The backends the compiler took out since `self.desired`.
                Some(delta) => delta
                    .backends
                    .iter()
                    .filter(|(key, before)| before.is_some() && !desired.backends.contains_key(key))
                    .map(|(key, _)| *key)
                    .collect(),
                None => self
                    .desired
                    .backends
                    .keys()
                    .filter(|key| !desired.backends.contains_key(key))
                    .copied()
                    .collect(),
            };
            if gone.is_empty() {
                return Ok(());
            }
            // Sockets first: they are logged apart from the conntrack entries.
            self.sockets.purge(&self.cgroups, |b| gone.contains(b))?;
            let purged = self.conntrack.purge_backends(|b| gone.contains(b))?;
            (gone.len(), purged)
        } else {
            let gone = |b: &_| !desired.backends.contains_key(b);
            self.sockets.purge(&self.cgroups, gone)?;
            let purged = self.conntrack.purge_backends(gone)?;
            self.backends_checked = true;
            if purged == 0 {
                return Ok(());
            }
            (0, purged)
        };
        info!(
            backends,
            purged, "purged the conntrack entries of removed backends"
        );
        self.purged += purged;
        Ok(())
    }
}
