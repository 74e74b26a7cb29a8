//! The Kubernetes API as a source: one kube-rs watcher per kind (Nodes, Namespaces, Pods,
//! Services, EndpointSlices, NetworkPolicies), all cluster-wide, feeding one snapshot that
//! the source keeps and patches with each change (no reflector stores beside it).
//!
//! The watcher lists, watches from the list's resourceVersion, follows bookmarks, and
//! relists when the server says 410 Gone; its stream backs off with jitter after errors.
//! A relist replaces a kind whole only once the new list is complete (as the difference
//! from what the snapshot holds), so no object is lost or doubled across a reconnect. The first snapshot goes out only once every kind
//! has completed its initial list; after that, changes are gathered by [`Debounce`] into
//! one snapshot per burst, sent with the change set its watch events name (a relist names
//! none: the agent then compares every object). Snapshots carry no local endpoints: on a node those come from
//! the CNI plugin. Each object is slimmed to the fields the agent reads before it is
//! stored (`slim.rs`; Pods become the compact [`sluice_store::Pod`]), and stored objects
//! are shared, not copied, where their type allows it.

use std::{fmt::Debug, path::PathBuf, sync::Arc};

use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    serde::de::DeserializeOwned,
};
use kube::{
    Api, Client, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        watcher::{self, DefaultBackoff, Event},
    },
};
use prometheus_client::metrics::counter::Counter;
use sluice_compiler::Changes;
use sluice_store::Snapshot;
use tokio::sync::mpsc;
use tracing::{info, warn};

pub use super::debounce::Debounce;
use super::{Source, Updates, changes, slim::Keep};
use crate::AgentError;

/// How the agent reaches the API server and shapes what it reads.
#[derive(Clone, Debug, Default)]
pub struct KubernetesConfig {
    /// A kubeconfig file; None: the pod's service account (in-cluster), else
    /// $KUBECONFIG or ~/.kube/config.
    pub kubeconfig: Option<PathBuf>,
    /// The cluster's pod network, which no API object states (kubeadm's
    /// `networking.podSubnet`): every Node's podCIDR must lie inside. None: not checked.
    pub cluster_cidr: Option<Ipv4Net>,
    pub debounce: Debounce,
}

/// What the source has done, counted for the metrics (`sluice_kubernetes_*`); clones
/// share the counts.
#[derive(Clone, Debug, Default)]
pub struct SourceStats {
    /// Watch events applied to the stores (objects of initial lists included).
    pub events: Counter,
    /// Snapshots handed to the agent.
    pub snapshots: Counter,
    /// Lists after the first of their kind: the server said 410 Gone, in the stream or
    /// to a watch start.
    pub relists: Counter,
}

pub struct Kubernetes {
    config: KubernetesConfig,
    /// `config.kubeconfig`, read.
    kubeconfig: Option<Kubeconfig>,
    stats: SourceStats,
}

/// What a watcher tells the snapshot maker.
enum Touch {
    /// An object written or deleted (None: one without a name, which no change names).
    Changed(Option<Changes>),
    /// A complete list of one kind (the first, or one after a relist): sets that kind's
    /// changes to the difference between the snapshot sent last and the list.
    Listed(&'static str, Listed),
}

type Listed = Box<dyn FnOnce(&Snapshot, &mut Changes) + Send>;

/// The snapshot the source sends, patched with each change set. The agent reads the one
/// sent last; the one before it, once the agent has let go of it, is caught up with the
/// last two change sets rather than copied whole.
#[derive(Default)]
struct Buffered {
    current: Arc<Snapshot>,
    previous: Option<(Arc<Snapshot>, Changes)>,
}

impl Buffered {
    fn advance(&mut self, changes: &Changes, revision: u64, cluster_cidr: Option<Ipv4Net>) {
        // A change of a large part (the lists at start) is merged into a copy, and copied
        // once more as the spare the next change catches up.
        let current = &self.current;
        let objects = current.services.len()
            + current.endpoint_slices.len()
            + current.pods.len()
            + current.namespaces.len()
            + current.nodes.len()
            + current.network_policies.len();
        let large = count(changes) > objects / 4;
        let mut next = match self.previous.take() {
            Some((previous, lag)) if !large => match Arc::try_unwrap(previous) {
                Ok(mut spare) => {
                    changes::apply(&mut spare, &lag);
                    spare
                }
                // Still held by the agent: copied.
                Err(_) => Snapshot::clone(&self.current),
            },
            _ => Snapshot::clone(&self.current),
        };
        changes::apply(&mut next, changes);
        next.revision = revision;
        next.cluster_cidr = cluster_cidr;
        let sent = std::mem::replace(&mut self.current, Arc::new(next));
        self.previous = Some(if large {
            (Arc::new(Snapshot::clone(&self.current)), Changes::default())
        } else {
            (sent, changes.clone())
        });
    }
}

/// Objects a change set names.
fn count(changes: &Changes) -> usize {
    changes.services.len()
        + changes.endpoint_slices.len()
        + changes.pods.len()
        + changes.namespaces.len()
        + changes.nodes.len()
        + changes.network_policies.len()
}

const KINDS: usize = 6;

impl Kubernetes {
    /// Reads the kubeconfig file now, so a missing or malformed one stops the agent at
    /// start, naming the file.
    pub fn open(config: KubernetesConfig, stats: SourceStats) -> Result<Self, AgentError> {
        let kubeconfig = config
            .kubeconfig
            .as_ref()
            .map(|path| {
                Kubeconfig::read_from(path).map_err(|source| AgentError::Kubeconfig {
                    path: path.clone(),
                    source,
                })
            })
            .transpose()?;
        Ok(Self {
            config,
            kubeconfig,
            stats,
        })
    }

    async fn client(&self) -> Result<Client, AgentError> {
        let options = KubeConfigOptions::default();
        let config = match (&self.kubeconfig, &self.config.kubeconfig) {
            (Some(file), Some(path)) => {
                kube::Config::from_custom_kubeconfig(file.clone(), &options)
                    .await
                    .map_err(|source| AgentError::Kubeconfig {
                        path: path.clone(),
                        source,
                    })?
            }
            _ => match kube::Config::incluster() {
                Ok(config) => config,
                Err(incluster) => {
                    kube::Config::from_kubeconfig(&options)
                        .await
                        .map_err(|kubeconfig| AgentError::NoKubeConfig {
                            incluster,
                            kubeconfig,
                        })?
                }
            },
        };
        Client::try_from(config).map_err(AgentError::KubeClient)
    }

    async fn run_async(&self, updates: &Updates) -> Result<(), AgentError> {
        let client = self.client().await?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        spawn_watch::<Node>(&client, &tx, &self.stats);
        spawn_watch::<Namespace>(&client, &tx, &self.stats);
        spawn_watch::<Pod>(&client, &tx, &self.stats);
        spawn_watch::<Service>(&client, &tx, &self.stats);
        spawn_watch::<EndpointSlice>(&client, &tx, &self.stats);
        spawn_watch::<NetworkPolicy>(&client, &tx, &self.stats);
        drop(tx);
        let mut listed = std::collections::BTreeSet::new();
        let mut revision = 0;
        let mut snapshot = Buffered::default();
        // What changed since the snapshot sent last.
        let mut pending = Changes::default();
        loop {
            let mut changed = false;
            let gather = self.config.debounce.gather(&mut rx, |touch| match touch {
                Touch::Changed(Some(change)) => {
                    changed = true;
                    changes::extend(&mut pending, change);
                }
                Touch::Changed(None) => warn!("ignoring an object without a name"),
                Touch::Listed(kind, list) => {
                    changed = true;
                    list(&snapshot.current, &mut pending);
                    if listed.insert(kind) {
                        info!(kind, "initial list complete");
                    }
                }
            });
            let open = tokio::select! {
                open = gather => open,
                () = updates.closed() => false,
            };
            if !open {
                return Ok(());
            }
            // The first snapshot waits for every kind: a partial one would have the agent
            // remove what it programmed for the kinds still listing.
            if !changed || listed.len() < KINDS {
                continue;
            }
            revision += 1;
            let changes = std::mem::take(&mut pending);
            snapshot.advance(&changes, revision, self.config.cluster_cidr);
            if !updates.send(Arc::clone(&snapshot.current), Some(changes)) {
                return Ok(());
            }
            self.stats.snapshots.inc();
        }
    }
}

impl Source for Kubernetes {
    fn describe(&self) -> String {
        match &self.config.kubeconfig {
            Some(path) => format!("kubernetes API ({})", path.display()),
            None => "kubernetes API".into(),
        }
    }

    fn run(self: Box<Self>, updates: &Updates) -> Result<(), AgentError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| AgentError::Io {
                call: "tokio runtime",
                path: PathBuf::from("source"),
                source,
            })?
            .block_on(self.run_async(updates))
    }
}

/// Starts the watcher of kind `K` on the current runtime.
fn spawn_watch<K>(client: &Client, tx: &mpsc::UnboundedSender<Touch>, stats: &SourceStats)
where
    K: Resource<DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + DeserializeOwned
        + Debug
        + Keep
        + Send
        + Sync
        + 'static,
    K::Kept: changes::Kind + Send + 'static,
{
    tokio::spawn(watch(
        Api::<K>::all(client.clone()),
        tx.clone(),
        stats.clone(),
    ));
}

/// Feeds one kind's changes from its watcher for as long as the snapshot maker listens.
async fn watch<K>(api: Api<K>, tx: mpsc::UnboundedSender<Touch>, stats: SourceStats)
where
    K: Resource<DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + DeserializeOwned
        + Debug
        + Keep
        + Send
        + Sync
        + 'static,
    K::Kept: changes::Kind + Send + 'static,
{
    let kind = <K as k8s_openapi::Resource>::KIND;
    // Paces relists forced by a watch refused with 410 (the watcher's own backoff covers
    // the errors it retries itself); reset by any event.
    let mut relist_backoff = DefaultBackoff::default();
    // Every list after the first is a relist (410 Gone, in the stream or on a watch start).
    let mut listed_once = false;
    // The objects of the list in progress.
    let mut list: Vec<K::Kept> = Vec::new();
    loop {
        let mut events = watcher::watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(item) = events.next().await {
            let event = match item {
                Ok(event) => event,
                // kube-rs relists after a 410 in the stream, but retries a watch the
                // server refused with 410 from the same, expired resourceVersion: a new
                // watcher lists again. The store keeps its objects until that list is
                // complete.
                Err(watcher::Error::WatchStartFailed(kube::Error::Api(status)))
                    if status.code == 410 =>
                {
                    warn!(kind, "watch refused with 410 Gone; relisting");
                    break;
                }
                Err(e) => {
                    warn!(kind, error = %e, "watch failed; retrying after a backoff");
                    continue;
                }
            };
            relist_backoff = DefaultBackoff::default();
            // Only what the agent reads is stored (managedFields, container specs,
            // conditions and the like are not).
            let touch = match event {
                Event::Init => {
                    if listed_once {
                        stats.relists.inc();
                    }
                    listed_once = true;
                    list.clear();
                    continue;
                }
                Event::InitApply(object) => {
                    stats.events.inc();
                    list.push(object.keep());
                    continue;
                }
                Event::Apply(object) => {
                    stats.events.inc();
                    Touch::Changed(changes::one(&object.keep(), true))
                }
                Event::Delete(object) => {
                    stats.events.inc();
                    Touch::Changed(changes::one(&object.keep(), false))
                }
                Event::InitDone => {
                    let list = std::mem::take(&mut list);
                    let replace: Listed = Box::new(move |current, pending| {
                        *<K::Kept as changes::Kind>::changes(pending) =
                            changes::listed(<K::Kept as changes::Kind>::of(current), &list);
                    });
                    Touch::Listed(kind, replace)
                }
            };
            if tx.send(touch).is_err() {
                return;
            }
        }
        if let Some(delay) = std::iter::Iterator::next(&mut relist_backoff) {
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_malformed_kubeconfig_is_refused_naming_the_file() {
        let missing = PathBuf::from("/nonexistent/kubeconfig");
        let config = |path: &PathBuf| KubernetesConfig {
            kubeconfig: Some(path.clone()),
            ..KubernetesConfig::default()
        };
        let Err(e) = Kubernetes::open(config(&missing), SourceStats::default()) else {
            panic!("a missing kubeconfig was accepted");
        };
        assert!(
            e.to_string()
                .starts_with("kubeconfig /nonexistent/kubeconfig: "),
            "{e}"
        );

        let bad =
            std::env::temp_dir().join(format!("sluice-bad-kubeconfig-{}", std::process::id()));
        std::fs::write(&bad, "clusters: [").expect("write");
        let refused = Kubernetes::open(config(&bad), SourceStats::default());
        let _ = std::fs::remove_file(&bad);
        let Err(e) = refused else {
            panic!("a malformed kubeconfig was accepted");
        };
        assert!(e.to_string().contains(&bad.display().to_string()), "{e}");
    }
}
