//! Gathers a burst of changes into one snapshot: a snapshot is made once no change came
//! for `quiet`, or `max_delay` after the first change it holds, whichever is first, so a
//! steady stream of changes still yields a snapshot every `max_delay`.

use std::time::Duration;

use tokio::{sync::mpsc, time::Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Debounce {
    pub quiet: Duration,
    pub max_delay: Duration,
}

impl Default for Debounce {
    /// Short enough to add little to a single change's latency, long enough to gather a
    /// burst that arrives on one watch connection. The max delay bounds a change's wait in
    /// a steady stream (100 pod events/s seldom leave 10 ms quiet): with a pass of a few
    /// ms it keeps the time from watch event to maps under 50 ms, at no more than one
    /// snapshot per 30 ms.
    fn default() -> Self {
        Self {
            quiet: Duration::from_millis(10),
            max_delay: Duration::from_millis(30),
        }
    }
}

impl Debounce {
    /// Waits for the next burst on `rx` and hands each item to `take`; returns false once
    /// every sender is gone and nothing arrived.
    pub async fn gather<T>(
        &self,
        rx: &mut mpsc::UnboundedReceiver<T>,
        mut take: impl FnMut(T),
    ) -> bool {
        let Some(first) = rx.recv().await else {
            return false;
        };
        take(first);
        let end = Instant::now() + self.max_delay;
        loop {
            let deadline = (Instant::now() + self.quiet).min(end);
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(item)) => take(item),
                // The burst ends with its senders: what came is handed over.
                Ok(None) | Err(_) => return true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test")]

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_one_batch_and_a_stream_is_cut_at_the_max_delay() {
        let debounce = Debounce {
            quiet: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        for i in 0..1000 {
            tx.send(i).unwrap();
        }
        let mut batch = Vec::new();
        assert!(debounce.gather(&mut rx, |i| batch.push(i)).await);
        assert_eq!(batch.len(), 1000);

        // One change every 10 ms for 300 ms: never quiet, cut every 100 ms.
        let sender = tokio::spawn(async move {
            for i in 0..30 {
                tx.send(i).unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let mut batches = Vec::new();
        loop {
            let mut n = 0;
            if !debounce.gather(&mut rx, |_| n += 1).await {
                break;
            }
            batches.push(n);
        }
        sender.await.unwrap();
        assert_eq!(batches.iter().sum::<i32>(), 30);
        assert!(batches.len() >= 3 && batches.len() <= 4, "{batches:?}");
    }
}
