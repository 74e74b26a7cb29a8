//! The CNI endpoint registry: every pod interface the plugin attached on this node, with
//! the address IPAM gave it. Persisted under `--state-dir` through a temporary file and a
//! rename, so an agent restart keeps every allocation and never hands an address out twice.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::Arc,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use sluice_api::cni::{CniAddRequest, CniAttachment, CniEndpoint};
use sluice_store::LocalEndpoint;
use tokio::sync::watch;

use crate::AgentError;

/// The file under `--state-dir`.
pub const STATE_FILE: &str = "cni-endpoints.json";
/// What the file's `version` says; another version is refused, not guessed at.
const STATE_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    endpoints: Vec<CniEndpoint>,
}

/// The endpoints the loop compiles beside every snapshot, as the store names them.
pub type LocalEndpoints = Arc<Vec<LocalEndpoint>>;

pub struct Registry {
    node: String,
    path: PathBuf,
    endpoints: BTreeMap<CniAttachment, CniEndpoint>,
    /// Whether the file exists as far as the registry knows (read at start or written
    /// since): if it is then gone, it was removed behind the agent's back.
    persisted: bool,
    /// The reconcile loop's copy: sent on every change (and on [`Registry::republish`]).
    published: watch::Sender<LocalEndpoints>,
}

impl Registry {
    /// Reads the registry `state_dir` holds (none yet: empty). A file that cannot be read
    /// is refused: starting empty would hand its addresses out again.
    pub fn open(
        node: &str,
        state_dir: &Path,
    ) -> Result<(Self, watch::Receiver<LocalEndpoints>), AgentError> {
        let path = state_dir.join(STATE_FILE);
        let (endpoints, persisted) = match fs::read(&path) {
            Ok(data) => (parse(&path, &data)?, true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), false),
            Err(source) => {
                return Err(AgentError::Io {
                    call: "read",
                    path,
                    source,
                });
            }
        };
        let endpoints: BTreeMap<_, _> = endpoints
            .into_iter()
            .map(|e| (e.attachment.clone(), e))
            .collect();
        let (published, rx) = watch::channel(local(node, &endpoints));
        Ok((
            Self {
                node: node.to_string(),
                path,
                endpoints,
                persisted,
                published,
            },
            rx,
        ))
    }

    pub fn get(&self, attachment: &CniAttachment) -> Option<&CniEndpoint> {
        self.endpoints.get(attachment)
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &CniEndpoint> {
        self.endpoints.values()
    }

    /// Addresses allocated: one per recorded attachment.
    pub fn allocated(&self) -> usize {
        self.endpoints.len()
    }

    /// Records `request` with the lowest free address of `pod_cidr` (from its third: the
    /// first host is the router), skipping `taken` (addresses the snapshot gives other pods).
    /// An attachment recorded already keeps its address: a runtime retrying an ADD gets the
    /// same answer.
    pub fn add(
        &mut self,
        request: &CniAddRequest,
        pod_cidr: Ipv4Net,
        taken: &BTreeSet<Ipv4Addr>,
    ) -> Result<CniEndpoint, AgentError> {
        if let Some(existing) = self.endpoints.get(&request.attachment) {
            if (&existing.namespace, &existing.pod) != (&request.namespace, &request.pod) {
                return Err(AgentError::CniRefused(format!(
                    "container {} interface {} is attached already, to pod {}/{}",
                    request.attachment.container_id,
                    request.attachment.ifname,
                    existing.namespace,
                    existing.pod
                )));
            }
            return Ok(existing.clone());
        }
        if let Some(holder) = self
            .endpoints
            .values()
            .find(|e| e.interface == request.interface)
        {
            return Err(AgentError::CniRefused(format!(
                "host interface {} is taken by container {}",
                request.interface, holder.attachment.container_id
            )));
        }
        let used: BTreeSet<Ipv4Addr> = self
            .endpoints
            .values()
            .map(|e| e.address)
            .chain(taken.iter().copied())
            .collect();
        let address =
            lowest_free(pod_cidr, &used).ok_or(AgentError::CniPoolExhausted { pod_cidr })?;
        let endpoint = CniEndpoint {
            attachment: request.attachment.clone(),
            netns: request.netns.clone(),
            namespace: request.namespace.clone(),
            pod: request.pod.clone(),
            interface: request.interface.clone(),
            address,
        };
        let mut next = self.endpoints.clone();
        next.insert(endpoint.attachment.clone(), endpoint.clone());
        self.commit(next)?;
        Ok(endpoint)
    }

    /// Removes the attachment and frees its address; None if it was not recorded.
    pub fn remove(
        &mut self,
        attachment: &CniAttachment,
    ) -> Result<Option<CniEndpoint>, AgentError> {
        let mut next = self.endpoints.clone();
        let Some(removed) = next.remove(attachment) else {
            return Ok(None);
        };
        self.commit(next)?;
        Ok(Some(removed))
    }

    /// Hands the loop the same endpoints again, so it compiles anew: an interface that did
    /// not exist at the last compile (the plugin has just wired it) gets its ifindex.
    pub fn republish(&self) {
        self.published
            .send_replace(local(&self.node, &self.endpoints));
    }

    /// Writes the file again if it was there and is gone (removed with its directory
    /// behind the agent's back), so a restart still knows every allocation; returns its
    /// path then.
    pub fn restore(&self) -> Result<Option<PathBuf>, AgentError> {
        if !self.persisted || self.path.exists() {
            return Ok(None);
        }
        write(&self.path, &self.endpoints)?;
        Ok(Some(self.path.clone()))
    }

    /// Persists `next`, then makes it current: a failed write changes nothing.
    fn commit(&mut self, next: BTreeMap<CniAttachment, CniEndpoint>) -> Result<(), AgentError> {
        write(&self.path, &next)?;
        self.persisted = true;
        self.endpoints = next;
        self.republish();
        Ok(())
    }
}

fn parse(path: &Path, data: &[u8]) -> Result<Vec<CniEndpoint>, AgentError> {
    let state: StateFile = serde_json::from_slice(data).map_err(|e| AgentError::CniState {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    if state.version != STATE_VERSION {
        return Err(AgentError::CniState {
            path: path.to_path_buf(),
            detail: format!(
                "version {} (this agent reads {STATE_VERSION})",
                state.version
            ),
        });
    }
    Ok(state.endpoints)
}

/// Writes through a temporary file, fsync and a rename, so a crash leaves the old file or
/// the new one, never half of one.
fn write(path: &Path, endpoints: &BTreeMap<CniAttachment, CniEndpoint>) -> Result<(), AgentError> {
    let state = StateFile {
        version: STATE_VERSION,
        endpoints: endpoints.values().cloned().collect(),
    };
    let data = serde_json::to_vec_pretty(&state).map_err(|e| AgentError::CniState {
        path: path.to_path_buf(),
        detail: format!("encoding: {e}"),
    })?;
    let tmp = path.with_extension("tmp");
    let io = |call: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| AgentError::Io { call, path, source }
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io("mkdir", dir))?;
    }
    let mut file = fs::File::create(&tmp).map_err(io("create", &tmp))?;
    file.write_all(&data).map_err(io("write", &tmp))?;
    file.sync_all().map_err(io("fsync", &tmp))?;
    fs::rename(&tmp, path).map_err(io("rename", path))
}

fn local(node: &str, endpoints: &BTreeMap<CniAttachment, CniEndpoint>) -> LocalEndpoints {
    Arc::new(
        endpoints
            .values()
            .map(|e| LocalEndpoint {
                node: node.to_string(),
                namespace: e.namespace.clone(),
                pod: e.pod.clone(),
                interface: e.interface.clone(),
                addresses: BTreeSet::from([IpAddr::V4(e.address)]),
            })
            .collect(),
    )
}

/// The first host of a pod CIDR is the node's router; pods get the others.
const FIRST_POD_OFFSET: u32 = 2;

/// The lowest address of `cidr` from its third on that `used` lacks, never the broadcast.
fn lowest_free(cidr: Ipv4Net, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let first = u32::from(cidr.network()).checked_add(FIRST_POD_OFFSET)?;
    let last = u32::from(cidr.broadcast()).checked_sub(1)?;
    (first..=last)
        .map(Ipv4Addr::from)
        .find(|ip| !used.contains(ip))
}

/// Addresses of `cidr` pods may get.
pub fn capacity(cidr: Ipv4Net) -> usize {
    let hosts = u64::from(u32::from(cidr.broadcast()) - u32::from(cidr.network()));
    usize::try_from(hosts.saturating_sub(u64::from(FIRST_POD_OFFSET))).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test")]

    use super::*;

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn request(container: &str, pod: &str) -> CniAddRequest {
        CniAddRequest {
            attachment: CniAttachment {
                container_id: container.into(),
                ifname: "eth0".into(),
            },
            netns: format!("/run/netns/{container}"),
            namespace: "default".into(),
            pod: pod.into(),
            interface: format!("lxc{container}"),
        }
    }

    /// Lowest free first, never the router or the broadcast address; a released address
    /// is reused; the registry survives a reopen; a retried ADD keeps its address.
    #[test]
    fn allocates_persists_and_releases() {
        let dir =
            Dir(std::env::temp_dir().join(format!("sluice-cni-registry-{}", std::process::id())));
        let cidr: Ipv4Net = "10.244.9.0/29".parse().unwrap();
        assert_eq!(capacity(cidr), 5);
        let (mut registry, rx) = Registry::open("node-1", &dir.0).unwrap();
        let taken = BTreeSet::from([Ipv4Addr::new(10, 244, 9, 3)]);
        let a = registry.add(&request("a", "pa"), cidr, &taken).unwrap();
        assert_eq!(a.address, Ipv4Addr::new(10, 244, 9, 2));
        let b = registry.add(&request("b", "pb"), cidr, &taken).unwrap();
        assert_eq!(b.address, Ipv4Addr::new(10, 244, 9, 4));
        assert_eq!(registry.add(&request("a", "pa"), cidr, &taken).unwrap(), a);
        assert!(registry.add(&request("a", "other"), cidr, &taken).is_err());
        assert_eq!(rx.borrow().len(), 2);
        drop(registry);

        let (mut registry, rx) = Registry::open("node-1", &dir.0).unwrap();
        assert_eq!(rx.borrow().len(), 2);
        assert_eq!(registry.remove(&a.attachment).unwrap(), Some(a.clone()));
        assert_eq!(registry.remove(&a.attachment).unwrap(), None);
        let c = registry.add(&request("c", "pc"), cidr, &taken).unwrap();
        assert_eq!(c.address, a.address);
        registry.add(&request("d", "pd"), cidr, &taken).unwrap();
        registry.add(&request("e", "pe"), cidr, &taken).unwrap();
        // .2 .4 .5 .6 are used, .3 is taken, .7 is the broadcast address.
        assert!(matches!(
            registry.add(&request("f", "pf"), cidr, &taken),
            Err(AgentError::CniPoolExhausted { .. })
        ));
        fs::write(dir.0.join(STATE_FILE), b"{not json").unwrap();
        assert!(matches!(
            Registry::open("node-1", &dir.0),
            Err(AgentError::CniState { .. })
        ));
    }
}
