//! Lease expiry bookkeeping on the leader (etcd's lessor).
//!
//! Grants and revocations are replicated commands; deadlines are not: they live in the leader's
//! memory, as in etcd. A new leader (or a restarted single server) gives every lease a fresh
//! full TTL, so a lease never expires early because of a restart, only possibly late.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::types::LeaseId;

/// Largest TTL accepted (as etcd's `MaxLeaseTTL`).
pub const MAX_TTL_SECONDS: i64 = 9_000_000_000;

/// Time source for lease deadlines, so that tests can move time by hand.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic milliseconds since an arbitrary origin.
    fn now_millis(&self) -> u64;
}

/// The machine's monotonic clock.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now_millis(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }
}

/// A clock that only moves when told to (tests, data-driven scripts).
#[derive(Debug, Default)]
pub struct ManualClock {
    millis: AtomicU64,
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        self.millis
            .fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> u64 {
        self.millis.load(Ordering::SeqCst)
    }
}

pub(crate) struct Lessor {
    clock: Arc<dyn Clock>,
    deadlines: Mutex<HashMap<LeaseId, u64>>,
}

impl Lessor {
    pub fn new(clock: Arc<dyn Clock>) -> Lessor {
        Lessor {
            clock,
            deadlines: Mutex::new(HashMap::new()),
        }
    }

    /// (Re)starts the countdown of a lease.
    pub fn renew(&self, id: LeaseId, ttl_seconds: i64) {
        let deadline = self
            .clock
            .now_millis()
            .saturating_add((ttl_seconds.max(0) as u64).saturating_mul(1000));
        self.deadlines.lock().insert(id, deadline);
    }

    pub fn forget(&self, id: LeaseId) {
        self.deadlines.lock().remove(&id);
    }

    /// Gives every known lease a full TTL from now; drops deadlines of leases that are gone.
    pub fn promote(&self, leases: &[(LeaseId, i64)]) {
        let now = self.clock.now_millis();
        let mut d = self.deadlines.lock();
        d.clear();
        for &(id, ttl) in leases {
            d.insert(
                id,
                now.saturating_add((ttl.max(0) as u64).saturating_mul(1000)),
            );
        }
    }

    /// Leases whose deadline has passed, oldest first.
    pub fn expired(&self) -> Vec<LeaseId> {
        let now = self.clock.now_millis();
        let d = self.deadlines.lock();
        let mut v: Vec<(u64, LeaseId)> = d
            .iter()
            .filter(|(_, &t)| t <= now)
            .map(|(&id, &t)| (t, id))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, id)| id).collect()
    }

    /// Milliseconds left before the lease expires, if this lessor tracks it.
    pub fn remaining_millis(&self, id: LeaseId) -> Option<u64> {
        let now = self.clock.now_millis();
        self.deadlines
            .lock()
            .get(&id)
            .map(|&t| t.saturating_sub(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_expire_in_deadline_order_and_renewal_postpones() {
        let clock = Arc::new(ManualClock::default());
        let l = Lessor::new(clock.clone());
        l.renew(1, 10);
        l.renew(2, 5);
        clock.advance(Duration::from_secs(6));
        assert_eq!(l.expired(), vec![2]);
        l.renew(2, 5);
        assert!(l.expired().is_empty());
        clock.advance(Duration::from_secs(5));
        assert_eq!(l.expired(), vec![1, 2]);
        l.forget(1);
        assert_eq!(l.expired(), vec![2]);
    }

    #[test]
    fn promotion_gives_every_lease_a_full_ttl() {
        let clock = Arc::new(ManualClock::default());
        let l = Lessor::new(clock.clone());
        l.renew(1, 1);
        clock.advance(Duration::from_secs(2));
        l.promote(&[(1, 3), (7, 4)]);
        assert!(l.expired().is_empty());
        assert_eq!(l.remaining_millis(7), Some(4000));
    }
}
