//! Connected UDP sockets that socket load balancing pointed at a backend since removed.
//!
//! connect() of a UDP socket to a frontend is translated once, so the socket keeps sending
//! to the backend it was given, and no conntrack entry of a frontend exists for the agent
//! to purge. Such sockets are destroyed instead (sock_diag's `SOCK_DESTROY`, as `ss -K`
//! does; Cilium uses the `bpf_sock_destroy` kfunc from a socket iterator, which aya 0.14
//! cannot load): the application's next receive fails with `ECONNABORTED`, the socket is
//! disconnected, and its next connect() to the frontend reaches a live backend.
//!
//! Only sockets the socket programs translated are touched: a socket's cookie and peer
//! must be in `lb4_reverse_nat_sk`. They are looked for in every network namespace a
//! process of the socket programs' cgroups lives in (the pods', found through the pods'
//! cgroup, and the node's own), each through a thread entered into it, as a sock_diag
//! socket serves the namespace it was made in.

use std::path::Path;

use aya::maps::{HashMap, MapData};
use sluice_common::{IPPROTO_UDP, Lb4BackendKey, Lb4RevnatSk, Lb4RevnatSkKey};
use sluice_datapath::PinnedMaps;
use sluice_netns::{Cgroup, ConnectedUdp, NetNs, connected_udp4, destroy_udp4};
use tracing::{info, warn};

use crate::{AgentError, host_cgroup::SocketCgroups};

pub struct SocketPurge {
    revnat: HashMap<MapData, Lb4RevnatSkKey, Lb4RevnatSk>,
}

impl SocketPurge {
    pub fn open(pin_dir: &Path) -> Result<Self, AgentError> {
        Ok(Self {
            revnat: PinnedMaps::open(pin_dir)?.revnat_sockets,
        })
    }

    /// Destroys the connected UDP sockets of `cgroups`' processes that the socket programs
    /// sent to a backend `gone` says is removed. Returns how many. A namespace that
    /// vanished meanwhile (its processes exited) held no socket any more.
    pub fn purge(
        &self,
        cgroups: &SocketCgroups,
        gone: impl Fn(&Lb4BackendKey) -> bool,
    ) -> Result<u64, AgentError> {
        let mut namespaces = Vec::new();
        if cgroups.host().is_some() {
            // The node's own processes share this thread's namespace.
            namespaces.push(Path::new("/proc/thread-self/ns/net").to_owned());
        }
        if let Some(pods) = cgroups.pods() {
            namespaces.extend(Cgroup::at(pods).netns_of_processes()?);
        }
        let mut destroyed = 0;
        for path in namespaces {
            let Ok(netns) = NetNs::at_path(&path) else {
                continue;
            };
            let sockets = match netns.run(connected_udp4) {
                Ok(listed) => listed?,
                Err(err) => {
                    warn!(netns = %path.display(), error = %err, "cannot list the sockets of a namespace");
                    continue;
                }
            };
            let doomed: Vec<ConnectedUdp> = sockets
                .into_iter()
                .filter(|socket| self.translated_to_gone(socket, &gone))
                .collect();
            if doomed.is_empty() {
                continue;
            }
            let count = doomed.len() as u64;
            netns.run(move || doomed.iter().try_for_each(destroy_udp4))??;
            info!(netns = %path.display(), sockets = count, "destroyed connected UDP sockets of removed backends");
            destroyed += count;
        }
        Ok(destroyed)
    }

    /// Whether the socket programs sent `socket` to its peer, a backend now gone.
    fn translated_to_gone(
        &self,
        socket: &ConnectedUdp,
        gone: &impl Fn(&Lb4BackendKey) -> bool,
    ) -> bool {
        let (address, port) = (*socket.peer.ip(), socket.peer.port());
        gone(&Lb4BackendKey::new(address, port, IPPROTO_UDP))
            && self
                .revnat
                .get(&Lb4RevnatSkKey::new(socket.cookie, address, port), 0)
                .is_ok()
    }
}
