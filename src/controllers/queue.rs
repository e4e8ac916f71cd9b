//! A de-duplicating, rate-limited work queue (client-go's workqueue): a key is queued at most
//! once, never processed by two workers at once, and re-queued with exponential back-off after
//! failures.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

const BASE_DELAY: Duration = Duration::from_millis(5);
const MAX_DELAY: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Inner {
    queue: VecDeque<String>,
    dirty: HashSet<String>,
    processing: HashSet<String>,
    failures: HashMap<String, u32>,
}

#[derive(Default)]
pub struct Queue {
    inner: Mutex<Inner>,
    notify: Notify,
}

impl Queue {
    pub fn new() -> Arc<Queue> {
        Arc::new(Queue::default())
    }

    /// Queues `key` unless it is already waiting.
    pub fn add(&self, key: impl Into<String>) {
        let key = key.into();
        let mut g = self.inner.lock();
        if !g.dirty.insert(key.clone()) {
            return;
        }
        if !g.processing.contains(&key) {
            g.queue.push_back(key);
            drop(g);
            self.notify.notify_one();
        }
    }

    /// Queues `key` after `delay`.
    pub fn add_after(self: &Arc<Self>, key: impl Into<String>, delay: Duration) {
        let key = key.into();
        if delay.is_zero() {
            self.add(key);
            return;
        }
        let q = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            q.add(key);
        });
    }

    /// Queues `key` after a back-off that doubles with each consecutive failure.
    pub fn add_rate_limited(self: &Arc<Self>, key: &str) {
        let n = {
            let mut g = self.inner.lock();
            let n = g.failures.entry(key.to_string()).or_default();
            *n += 1;
            *n
        };
        self.add_after(key.to_string(), backoff(n));
    }

    /// Clears the failure count of `key`.
    pub fn forget(&self, key: &str) {
        self.inner.lock().failures.remove(key);
    }

    /// The next key to process (waits for one).
    pub async fn get(&self) -> String {
        loop {
            let notified = self.notify.notified();
            {
                let mut g = self.inner.lock();
                if let Some(k) = g.queue.pop_front() {
                    g.dirty.remove(&k);
                    g.processing.insert(k.clone());
                    if !g.queue.is_empty() {
                        self.notify.notify_one();
                    }
                    return k;
                }
            }
            notified.await;
        }
    }

    /// Marks `key` processed; it is queued again if it was added meanwhile.
    pub fn done(&self, key: &str) {
        let mut g = self.inner.lock();
        g.processing.remove(key);
        if g.dirty.contains(key) {
            g.queue.push_back(key.to_string());
            drop(g);
            self.notify.notify_one();
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.lock().queue.len()
    }
}

/// 5 ms, 10 ms, 20 ms, … capped at 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    (BASE_DELAY * 2u32.pow(exp)).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_are_deduplicated_and_never_processed_twice_at_once() {
        let q = Queue::new();
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.len(), 2);
        let k = q.get().await;
        assert_eq!(k, "a");
        // Added while processing: waits until done.
        q.add("a");
        assert_eq!(q.get().await, "b");
        assert_eq!(q.len(), 0);
        q.done("a");
        assert_eq!(q.get().await, "a");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(5));
        assert_eq!(backoff(3), Duration::from_millis(20));
        assert_eq!(backoff(40), MAX_DELAY);
    }
}
