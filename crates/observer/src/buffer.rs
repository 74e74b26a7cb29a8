//! The last N flows, and a broadcast of every new one.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use sluice_api::flow::Flow;
use tokio::sync::{Notify, broadcast, watch};

/// Flows the buffer keeps unless configured otherwise: Hubble's default.
pub const DEFAULT_FLOWS_MAX: usize = 4095;

/// Flows a slow subscriber may fall behind by before it loses the oldest ones (it is told
/// how many with `RecvError::Lagged`).
const SUBSCRIBER_QUEUE: usize = 8192;

/// The last `capacity` flows and a broadcast of new ones, shared by the event reader (which
/// pushes) and the API and policy log (which read and subscribe).
pub struct FlowBuffer {
    capacity: usize,
    flows: Mutex<VecDeque<Arc<Flow>>>,
    /// Flows pushed since the agent started, kept or not.
    seen: std::sync::atomic::AtomicU64,
    sender: broadcast::Sender<Arc<Flow>>,
    /// A reader of the buffer asks the event reader to drain the ring now ...
    drain_wanted: Notify,
    /// ... and waits for this count of drains to move past the one it saw.
    drains: watch::Sender<u64>,
}

impl FlowBuffer {
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(SUBSCRIBER_QUEUE);
        Self {
            capacity,
            flows: Mutex::new(VecDeque::with_capacity(capacity.min(65_536))),
            seen: std::sync::atomic::AtomicU64::new(0),
            sender,
            drain_wanted: Notify::new(),
            drains: watch::Sender::new(0),
        }
    }

    /// Waits until the event reader has drained the ring once more, so flows the datapath
    /// already emitted are in the buffer, or `patience` has passed (no reader, or a stuck
    /// one, must not hang a request). The datapath wakes the reader only in batches.
    pub async fn catch_up(&self, patience: std::time::Duration) {
        let mut drains = self.drains.subscribe();
        let seen = *drains.borrow_and_update();
        self.drain_wanted.notify_one();
        let _ = tokio::time::timeout(patience, drains.wait_for(|n| *n > seen)).await;
    }

    /// Resolves when a reader of the buffer has asked for a drain ([`Self::catch_up`]).
    pub async fn drain_wanted(&self) {
        self.drain_wanted.notified().await;
    }

    /// The event reader has drained the ring: wakes every [`Self::catch_up`] waiting.
    pub fn drained(&self) {
        self.drains.send_modify(|n| *n += 1);
    }

    /// Every flow pushed from now on. A receiver that falls more than 8192 flows behind
    /// loses the oldest and is told how many.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Flow>> {
        self.sender.subscribe()
    }

    /// Receivers of new flows: the policy log and every `observe --follow` in progress.
    pub fn subscribers(&self) -> usize {
        self.sender.receiver_count()
    }

    pub fn push(&self, flow: Flow) {
        let flow = Arc::new(flow);
        self.seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut flows = self.lock();
        if self.capacity > 0 {
            if flows.len() == self.capacity {
                flows.pop_front();
            }
            flows.push_back(Arc::clone(&flow));
        }
        // Sent under the lock, so snapshot() sees each flow either buffered or broadcast,
        // never both. No receiver is not an error: nobody is following.
        let _ = self.sender.send(flow);
    }

    /// The last `last` buffered flows that `keep` accepts (all of them if None), oldest
    /// first, and a receiver subscribed at that same instant, so a follower misses no
    /// flow between the two and sees none twice.
    pub fn snapshot(
        &self,
        last: Option<usize>,
        keep: impl Fn(&Flow) -> bool,
    ) -> (Vec<Arc<Flow>>, broadcast::Receiver<Arc<Flow>>) {
        let flows = self.lock();
        // Subscribing under the lock that push() takes first orders it against every push.
        let receiver = self.sender.subscribe();
        let limit = last.unwrap_or(usize::MAX);
        let mut out: Vec<Arc<Flow>> = flows
            .iter()
            .rev()
            .filter(|f| keep(f))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        (out, receiver)
    }

    /// Flows held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Flows pushed since start.
    pub fn seen(&self) -> u64 {
        self.seen.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Flow>>> {
        // A panic while holding the lock leaves a consistent deque: keep using it.
        self.flows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
