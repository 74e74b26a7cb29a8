//! A thread that reads the pinned maps every millisecond and times each pending change
//! from the moment it was applied to the fake API server to the entry it makes.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::lpm_trie::Key;
use sluice_common::{IPPROTO_TCP, IpcacheEntry, Lb4Key, addr_be};
use sluice_datapath::PinnedMaps;
use sluice_fake_apiserver::cluster::SERVICE_PORT;

use super::Change;
use crate::BenchError;

/// What a change must make true in the maps.
#[derive(Clone, Copy, Debug)]
pub(super) enum Expect {
    /// The ipcache's answer for `address` is not `was` any more.
    IpcacheChanges {
        address: Ipv4Addr,
        was: IpcacheEntry,
    },
    /// The ipcache answers `is` for `address`.
    IpcacheIs { address: Ipv4Addr, is: IpcacheEntry },
    /// The frontend `vip:80/TCP` has `count` backends.
    Backends { vip: Ipv4Addr, count: u16 },
}

struct Pending {
    change: Change,
    since: Instant,
    expect: Expect,
}

#[derive(Default)]
struct Observed {
    pending: Vec<Pending>,
    latencies: BTreeMap<Change, Vec<f64>>,
    missed: BTreeMap<Change, usize>,
}

/// A thread that reads the pinned maps every millisecond and times each pending change.
pub(super) struct Poller {
    observed: Arc<Mutex<Observed>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The bench's own handle, for the values a change starts from.
    pub(super) maps: PinnedMaps,
}

pub(super) fn ipcache_at(maps: &PinnedMaps, address: Ipv4Addr) -> Option<IpcacheEntry> {
    maps.ipcache.get(&Key::new(32, addr_be(address)), 0).ok()
}

fn holds(maps: &PinnedMaps, expect: &Expect) -> bool {
    match *expect {
        Expect::IpcacheChanges { address, was } => ipcache_at(maps, address) != Some(was),
        Expect::IpcacheIs { address, is } => ipcache_at(maps, address) == Some(is),
        Expect::Backends { vip, count } => maps
            .services
            .get(&Lb4Key::new(vip, SERVICE_PORT, IPPROTO_TCP, 0), 0)
            .is_ok_and(|s| s.count == count),
    }
}

impl Poller {
    pub(super) fn start(pins: &Path, timeout: Duration) -> Result<Self, BenchError> {
        let open = || PinnedMaps::open(pins).map_err(|e| BenchError::Failed(e.to_string()));
        let (maps, own) = (open()?, open()?);
        let observed = Arc::new(Mutex::new(Observed::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (o, s) = (Arc::clone(&observed), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                {
                    let mut o = o.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let now = Instant::now();
                    let Observed {
                        pending,
                        latencies,
                        missed,
                    } = &mut *o;
                    pending.retain(|p| {
                        if holds(&maps, &p.expect) {
                            let seconds = now.duration_since(p.since).as_secs_f64();
                            latencies.entry(p.change).or_default().push(seconds);
                            return false;
                        }
                        if now.duration_since(p.since) > timeout {
                            *missed.entry(p.change).or_default() += 1;
                            return false;
                        }
                        true
                    });
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Ok(Self {
            observed,
            stop,
            thread: Some(thread),
            maps: own,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Observed> {
        self.observed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn expect(&self, change: Change, since: Instant, expect: Expect) {
        self.lock().pending.push(Pending {
            change,
            since,
            expect,
        });
    }

    /// Waits until every pending change is seen or has timed out.
    pub(super) fn drain(&self) {
        while !self.lock().pending.is_empty() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(super) fn finish(mut self) -> (BTreeMap<Change, Vec<f64>>, BTreeMap<Change, usize>) {
        self.drain();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let mut o = self.lock();
        (
            std::mem::take(&mut o.latencies),
            std::mem::take(&mut o.missed),
        )
    }
}
