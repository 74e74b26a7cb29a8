//! Conntrack housekeeping: the garbage collector, which removes expired entries by the
//! datapath's own rule (`ct_config`) and, when the table fills past a threshold, closed and
//! half-open connections before the LRU evicts established ones; and the purge of a
//! removed backend's service connections right after the pass that removed it. Both walk
//! `ct4` on the blocking pool through handles of their own, so neither waits for the other
//! or for the reconcile loop.
//!
//! A walk is batched: a few `BPF_MAP_LOOKUP_BATCH` calls of 4,096 entries read the table,
//! one pass judges every entry, and one `BPF_MAP_DELETE_BATCH` removes what it picked.
//! Walking entry by entry (a `get_next_key` and a lookup per entry, a lookup and a delete
//! per removal) took some 200,000 syscalls a second under churn at 10k connections/s.

use std::{os::fd::AsFd, path::Path, time::Duration, time::Instant};

use aya::maps::{Array, HashMap, IterableMap, MapData};
use nix::time::{ClockId, clock_gettime};
use sluice_common::{
    CT_EGRESS, CT_FLAG_CLOSING, CT_FLAG_SEEN_REPLY, CT_NODEPORT, CT_SERVICE, CT_SNAT, Ct4Entry,
    Ct4Key, CtConfig, IPPROTO_TCP, Lb4BackendKey, MapId, names,
};
use sluice_datapath::{DatapathError, ElemCount, MapInventory, PinnedMaps, sys};
use tracing::{info, warn};

use crate::{AgentError, metrics::Metrics};

/// Why an entry was removed, as the metrics label it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Removal {
    /// Idle for longer than the lifetime of its state.
    Expired,
    /// It led to a backend that left `lb4_backends`.
    BackendRemoved,
    /// A closed or half-open TCP connection, removed early because the table passed its
    /// pressure threshold ([`churned`]).
    Pressure,
}

impl Removal {
    pub const ALL: [Removal; 3] = [Removal::Expired, Removal::BackendRemoved, Removal::Pressure];

    pub fn as_str(self) -> &'static str {
        match self {
            Removal::Expired => "expired",
            Removal::BackendRemoved => "backend_removed",
            Removal::Pressure => "pressure",
        }
    }
}

/// When the garbage collector runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GcConfig {
    /// Between two runs that remove expired entries.
    pub interval: Duration,
    /// The fill (entries over capacity, above 0 and at most 1: the agent's flag refuses
    /// others) from which a run also removes closed and half-open connections, and runs
    /// without waiting for `interval`.
    pub pressure_threshold: f64,
    /// Between two looks at the fill.
    pub pressure_interval: Duration,
}

/// An entry idle for at least this long may go under pressure: a handshake or a close
/// still in flight keeps its entry for its next packet.
const PRESSURE_MIN_IDLE_NS: u64 = 1_000_000_000;

/// Whether an entry is one that churns, which pressure removes before the LRU would evict
/// an established connection: a TCP connection that saw a FIN or RST (closed), or no reply
/// yet (half-open), idle for at least [`PRESSURE_MIN_IDLE_NS`]. Established TCP entries
/// and every other protocol's (which shows no state) are left to their lifetimes.
pub fn churned(key: &Ct4Key, entry: &Ct4Entry, now_ns: u64) -> bool {
    key.proto == IPPROTO_TCP
        && (entry.flags & CT_FLAG_CLOSING != 0 || entry.flags & CT_FLAG_SEEN_REPLY == 0)
        && now_ns.saturating_sub(entry.last_seen_ns) >= PRESSURE_MIN_IDLE_NS
}

/// What one run of the garbage collector found and removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcRun {
    /// Entries in the table when the run began, as the kernel counts them.
    pub entries: u64,
    pub expired: u64,
    /// Closed and half-open entries removed under pressure.
    pub pressure: u64,
}

/// The pinned conntrack table and its lifetimes.
pub struct Conntrack {
    table: HashMap<MapData, Ct4Key, Ct4Entry>,
    config: Array<MapData, CtConfig>,
    /// The table's fill as the kernel counts it: a look costs a microsecond, so the fill
    /// is known every `pressure_interval` without walking the table. Loaded by the
    /// collector's handle when it opens the table ([`Self::counting`]; the backend
    /// purge's never needs it).
    count: Option<ElemCount>,
    inventory: MapInventory,
    /// One batched read's keys and values, allocated once.
    keys: Vec<Ct4Key>,
    values: Vec<Ct4Entry>,
}

/// Entries one BPF_MAP_LOOKUP_BATCH reads (whole buckets: a few fewer).
const BATCH: usize = 4096;

impl Conntrack {
    pub fn open(pin_dir: &Path) -> Result<Self, AgentError> {
        let maps = PinnedMaps::open(pin_dir)?;
        Ok(Self {
            table: maps.conntrack,
            config: maps.ct_config,
            count: None,
            inventory: maps.inventory,
            keys: vec![Ct4Key::default(); BATCH],
            values: vec![Ct4Entry::default(); BATCH],
        })
    }

    /// Loads the counting program now, so that the agent holds every BPF object it will
    /// hold from its start on (a program loaded at the first run would look like a
    /// descriptor leaked by the churn after it).
    pub fn counting(mut self) -> Result<Self, AgentError> {
        self.entries()?;
        Ok(self)
    }

    /// Runs the collector if `due` or if the table is at `threshold` fill or above; None
    /// when neither holds. Under pressure, expired entries go first, then (if the fill is
    /// still at the threshold) the closed and half-open ones, both picked by one batched
    /// walk. The fill is the kernel's count, so a table that churns without filling (the
    /// datapath removes a cleanly closed connection at its last ACK) is never walked
    /// between two due runs.
    pub fn run(&mut self, due: bool, threshold: f64) -> Result<Option<GcRun>, AgentError> {
        let limit = threshold * f64::from(self.inventory.capacity(MapId::Conntrack));
        let entries = self.entries()?;
        let pressure = entries as f64 >= limit;
        if !due && !pressure {
            return Ok(None);
        }
        let config = self.config()?;
        let now = monotonic_coarse_ns()?;
        let (mut expired, mut churning) = (Vec::new(), Vec::new());
        self.walk(|key, entry| {
            if entry.expired(key.proto, now, &config) {
                expired.push(*key);
            } else if churned(key, entry, now) {
                churning.push(*key);
            }
        })?;
        let mut run = GcRun {
            entries,
            expired: self.remove(&expired)?,
            pressure: 0,
        };
        if pressure && (entries.saturating_sub(run.expired)) as f64 >= limit {
            run.pressure = self.remove(&churning)?;
        }
        Ok(Some(run))
    }

    /// The entries in the table now, as the kernel counts them.
    fn entries(&mut self) -> Result<u64, AgentError> {
        let count = match &mut self.count {
            Some(count) => count,
            None => self.count.insert(ElemCount::new(
                names::CONNTRACK,
                self.table.map().fd().as_fd(),
            )?),
        };
        Ok(count.get()?)
    }

    fn config(&self) -> Result<CtConfig, AgentError> {
        self.config.get(&0, 0).map_err(|source| AgentError::Map {
            map: names::CT_CONFIG,
            source,
        })
    }

    /// Removes the service conntrack entries of connections to backends that are `gone`:
    /// the CT_SERVICE entries that chose one, the CT_EGRESS entries of connections to
    /// one through a frontend, and the CT_NODEPORT and CT_SNAT entries of connections to
    /// one from outside the node. The next packet of such a connection chooses again.
    pub fn purge_backends(
        &mut self,
        gone: impl Fn(&Lb4BackendKey) -> bool,
    ) -> Result<u64, AgentError> {
        self.remove_where(|key, entry| {
            let backend = match key.scope {
                CT_SERVICE => entry.nat(),
                CT_EGRESS if entry.nat().is_some() => Some(key.dst()),
                // Connections from outside the node: the translated tuple names the backend.
                CT_NODEPORT | CT_SNAT => Some(key.dst()),
                _ => None,
            };
            backend
                .is_some_and(|(address, port)| gone(&Lb4BackendKey::new(address, port, key.proto)))
        })
    }

    /// Deletes the entries `doomed` picks in one walk and one batched delete.
    fn remove_where(
        &mut self,
        doomed: impl Fn(&Ct4Key, &Ct4Entry) -> bool,
    ) -> Result<u64, AgentError> {
        let mut picked = Vec::new();
        self.walk(|key, entry| {
            if doomed(key, entry) {
                picked.push(*key);
            }
        })?;
        self.remove(&picked)
    }

    /// Hands every entry of the table to `visit`, read in batches; returns how many there
    /// were. An entry the datapath changes during the walk is seen as it was when its
    /// bucket was read, or not at all if it was created in a bucket already passed.
    fn walk(&mut self, mut visit: impl FnMut(&Ct4Key, &Ct4Entry)) -> Result<u64, AgentError> {
        let fd = self.table.map().fd().as_fd();
        let mut cursor = None;
        let mut entries = 0;
        loop {
            let (read, next) = sys::hash_lookup_batch(fd, cursor, &mut self.keys, &mut self.values)
                .map_err(sys_err)?;
            for (key, entry) in self.keys.iter().zip(&self.values).take(read) {
                visit(key, entry);
            }
            entries += read as u64;
            match next {
                Some(next) => cursor = Some(next),
                None => return Ok(entries),
            }
        }
    }

    /// Deletes `keys` in one batch; returns how many were there to delete (the LRU may
    /// have evicted some since the walk). Each was judged by the walk just before: one that
    /// a packet refreshed in between loses its entry, which its next packet writes again,
    /// judged as a new connection, as after an expiry.
    fn remove(&mut self, keys: &[Ct4Key]) -> Result<u64, AgentError> {
        sys::map_delete_batch_counted(self.table.map().fd().as_fd(), keys)
            .map_err(|e| sys_err(e).into())
    }
}

fn sys_err(source: aya::sys::SyscallError) -> DatapathError {
    DatapathError::Sys {
        map: names::CONNTRACK,
        source,
    }
}

/// The datapath's conntrack clock (`ct_now`: bpf_ktime_get_coarse_ns).
fn monotonic_coarse_ns() -> Result<u64, AgentError> {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).map_err(|source| AgentError::Sys {
        call: "clock_gettime",
        source,
    })?;
    Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

/// Runs the garbage collector until the runtime stops: every `config.interval`, and sooner
/// whenever a look at the fill (every `config.pressure_interval`) finds the table at its
/// pressure threshold. Each run walks the table on the blocking pool, then logs and counts
/// what it removed.
pub async fn collect_garbage(
    pin_dir: std::path::PathBuf,
    config: GcConfig,
    metrics: Metrics,
) -> Result<(), AgentError> {
    let mut conntrack =
        Some(tokio::task::spawn_blocking(move || Conntrack::open(&pin_dir)?.counting()).await??);
    let mut tick = tokio::time::interval(config.pressure_interval.min(config.interval));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick fires at once; the first run waits one interval.
    tick.tick().await;
    let mut last_run = Instant::now();
    loop {
        tick.tick().await;
        let Some(mut table) = conntrack.take() else {
            return Ok(());
        };
        let due = last_run.elapsed() >= config.interval;
        let threshold = config.pressure_threshold;
        let (table, outcome, elapsed) = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let outcome = table.run(due, threshold);
            (table, outcome, started.elapsed())
        })
        .await?;
        conntrack = Some(table);
        match outcome {
            Ok(None) => {}
            Ok(Some(run)) => {
                last_run = Instant::now();
                metrics.observe_ct_gc(elapsed, Removal::Expired, run.expired);
                metrics.count_ct_removed(Removal::Pressure, run.pressure);
                if run.pressure > 0 {
                    info!(entries = run.entries, expired = run.expired, closed_or_half_open = run.pressure,
                          elapsed = ?elapsed, "conntrack under pressure: GC removed closed and half-open entries");
                } else if run.expired > 0 {
                    info!(removed = run.expired, elapsed = ?elapsed, "conntrack GC removed expired entries");
                }
            }
            Err(e) => warn!(error = %e, "conntrack GC failed; retrying on the next run"),
        }
    }
}

/// The capacity the conntrack table was created with differs from the configured one:
/// a pinned table keeps its size (its live connections with it), so say so once.
pub fn check_capacity(pin_dir: &Path, configured: u32) -> Result<(), AgentError> {
    let maps = PinnedMaps::open(pin_dir)?;
    let actual = maps.inventory.capacity(MapId::Conntrack);
    if actual != configured {
        warn!(
            pinned = actual,
            configured,
            "the pinned conntrack table keeps its capacity; remove {} to resize it (its \
             connections are then judged again)",
            pin_dir.join(names::CONNTRACK).display()
        );
    }
    Ok(())
}
