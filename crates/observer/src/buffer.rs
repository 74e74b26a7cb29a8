//! The last N flow events, raw, and a broadcast of every new one; named only when read.
//!
//! At thousands of new connections per second the datapath sends tens of thousands of
//! events, and almost none is ever read. So the buffer keeps the datapath's fixed-size
//! records in a ring allocated once, the broadcast carries them as they are (its slots
//! are allocated once too), and a flow with its names and labels is made only for a
//! reader: `observe`, a follower, the policy log. Pushing allocates nothing.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use sluice_api::flow::Flow;
use sluice_common::FlowEvent;
use tokio::sync::{
    Notify,
    broadcast::{self, error::RecvError, error::TryRecvError},
    watch,
};

use crate::Resolver;

/// Flows the buffer keeps unless configured otherwise: Hubble's default.
pub const DEFAULT_FLOWS_MAX: usize = 4095;

/// Events a slow subscriber may fall behind by before it loses the oldest ones (it is told
/// how many with `RecvError::Lagged`).
const SUBSCRIBER_QUEUE: usize = 8192;

/// Events kept in a ring allocated at once; a larger configured buffer grows to its
/// capacity as events come, then stays.
const PREALLOCATED: usize = 65_536;

/// The resolver events are named with when read, replaced whole when the desired state
/// changes. Events are named by the state current when they are read, not when they
/// happened: a pod deleted since shows its address only, as it would in the state's maps.
type Names = Arc<RwLock<Arc<Resolver>>>;

fn current(names: &Names) -> Arc<Resolver> {
    // A panicked writer leaves a whole Arc behind: keep using it.
    Arc::clone(
        &names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

/// The last `capacity` events and a broadcast of new ones, shared by the event reader
/// (which pushes) and the API and policy log (which read and subscribe).
pub struct FlowBuffer {
    capacity: usize,
    events: Mutex<VecDeque<FlowEvent>>,
    /// Events pushed since the agent started, kept or not.
    seen: AtomicU64,
    sender: broadcast::Sender<FlowEvent>,
    names: Names,
    /// A reader of the buffer asks the event reader to drain the ring now ...
    drain_wanted: Notify,
    /// ... and waits for this count of drains to move past the one it saw.
    drains: watch::Sender<u64>,
}

impl FlowBuffer {
    /// A buffer of `capacity` events, named by `resolver` until [`Self::set_resolver`].
    pub fn new(capacity: usize, resolver: Resolver) -> Self {
        let (sender, _) = broadcast::channel(SUBSCRIBER_QUEUE);
        Self {
            capacity,
            events: Mutex::new(VecDeque::with_capacity(capacity.min(PREALLOCATED))),
            seen: AtomicU64::new(0),
            sender,
            names: Arc::new(RwLock::new(Arc::new(resolver))),
            drain_wanted: Notify::new(),
            drains: watch::Sender::new(0),
        }
    }

    /// Names events read from now on with `resolver`.
    pub fn set_resolver(&self, resolver: Arc<Resolver>) {
        *self
            .names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = resolver;
    }

    /// The resolver events are named with now.
    pub fn resolver(&self) -> Arc<Resolver> {
        current(&self.names)
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

    /// Every event pushed from now on. A receiver that falls more than 8192 events behind
    /// loses the oldest and is told how many.
    pub fn subscribe(&self) -> FlowReceiver {
        FlowReceiver {
            events: self.sender.subscribe(),
            names: Arc::clone(&self.names),
        }
    }

    /// Receivers of new flows: the policy log and every `observe --follow` in progress.
    pub fn subscribers(&self) -> usize {
        self.sender.receiver_count()
    }

    pub fn push(&self, event: FlowEvent) {
        self.push_all(std::slice::from_ref(&event));
    }

    /// Keeps and broadcasts a batch of events under one lock, in order.
    pub fn push_all(&self, events: &[FlowEvent]) {
        self.seen.fetch_add(events.len() as u64, Ordering::Relaxed);
        let mut kept = self.lock();
        let following = self.sender.receiver_count() > 0;
        for event in events {
            if self.capacity > 0 {
                if kept.len() == self.capacity {
                    kept.pop_front();
                }
                kept.push_back(*event);
            }
            // Sent under the lock, so snapshot() sees each event either buffered or
            // broadcast, never both.
            if following {
                let _ = self.sender.send(*event);
            }
        }
    }

    /// The last `last` buffered flows that `keep` accepts (all of them if None), oldest
    /// first, and a receiver subscribed at that same instant, so a follower misses no
    /// flow between the two and sees none twice. Named here, outside the lock.
    pub fn snapshot(
        &self,
        last: Option<usize>,
        keep: impl Fn(&Flow) -> bool,
    ) -> (Vec<Flow>, FlowReceiver) {
        let (events, receiver) = {
            let kept = self.lock();
            // Subscribing under the lock that push_all() takes first orders it against
            // every push.
            (kept.iter().copied().collect::<Vec<_>>(), self.subscribe())
        };
        let resolver = self.resolver();
        let limit = last.unwrap_or(usize::MAX);
        let mut out: Vec<Flow> = events
            .iter()
            .rev()
            .map(|event| resolver.flow(event))
            .filter(|f| keep(f))
            .take(limit)
            .collect();
        out.reverse();
        (out, receiver)
    }

    /// Events held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Events pushed since start.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<FlowEvent>> {
        // A panic while holding the lock leaves a consistent deque: keep using it.
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// New events from a [`FlowBuffer`], raw or named.
pub struct FlowReceiver {
    events: broadcast::Receiver<FlowEvent>,
    names: Names,
}

impl FlowReceiver {
    /// The next event as the datapath sent it: a subscriber that wants only some events
    /// (the policy log: verdicts) names only those.
    pub async fn recv_event(&mut self) -> Result<FlowEvent, RecvError> {
        self.events.recv().await
    }

    /// The next flow, named.
    pub async fn recv(&mut self) -> Result<Flow, RecvError> {
        let event = self.events.recv().await?;
        Ok(self.name(&event))
    }

    /// The next flow if one is waiting.
    pub fn try_recv(&mut self) -> Result<Flow, TryRecvError> {
        let event = self.events.try_recv()?;
        Ok(self.name(&event))
    }

    /// The flow `event` describes, named by the current state.
    pub fn name(&self, event: &FlowEvent) -> Flow {
        current(&self.names).flow(event)
    }
}
