//! Watches: ordered, gap-free, duplicate-free streams of changes to a key range.
//!
//! As in etcd, a watcher is either *synced* (registered with the hub; the apply path pushes each
//! new revision's matching events into its bounded channel) or *catching up* (it reads history
//! from the store itself). A watcher starts catching up from its start revision and registers
//! only when the hub's revision is exactly the last one it read, under the hub lock, so no
//! revision is missed or seen twice. A synced watcher whose channel is full is dropped back to
//! catching up (from the first revision it missed) instead of blocking writes or buffering
//! without bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::codec::Record;
use crate::error::Error;
use crate::mvcc::Mvcc;
use crate::types::*;

/// Revisions a synced watcher may have queued before it is moved back to catching up.
const CHANNEL_CAPACITY: usize = 256;
/// Records read from history per catch-up step.
const CATCH_UP_BATCH: usize = 512;

type Batch = Arc<[Arc<Record>]>;

struct Synced {
    range: KeyRange,
    tx: mpsc::Sender<(Revision, Batch)>,
    /// Set to the first revision this watcher missed when it is dropped for being slow.
    lagged_from: Arc<AtomicI64>,
}

struct HubInner {
    current: Revision,
    compact: Revision,
    next_id: u64,
    synced: HashMap<u64, Synced>,
}

/// Registry of synced watchers, fed by the apply path.
pub(crate) struct Hub {
    inner: Mutex<HubInner>,
}

impl Hub {
    pub fn new(current: Revision, compact: Revision) -> Hub {
        Hub {
            inner: Mutex::new(HubInner {
                current,
                compact,
                next_id: 1,
                synced: HashMap::new(),
            }),
        }
    }

    pub fn revisions(&self) -> (Revision, Revision) {
        let g = self.inner.lock();
        (g.current, g.compact)
    }

    /// Called by the apply path after a revision's records are stored and indexed.
    pub fn publish(&self, revision: Revision, records: &[Arc<Record>]) {
        let mut g = self.inner.lock();
        let mut drop_ids = Vec::new();
        let all: Option<Batch> = None;
        let mut all = all;
        for (id, w) in g.synced.iter() {
            let matched: Batch = if records.iter().all(|r| w.range.contains(&r.key)) {
                all.get_or_insert_with(|| records.iter().cloned().collect())
                    .clone()
            } else {
                let v: Vec<Arc<Record>> = records
                    .iter()
                    .filter(|r| w.range.contains(&r.key))
                    .cloned()
                    .collect();
                if v.is_empty() {
                    continue;
                }
                v.into()
            };
            match w.tx.try_send((revision, matched)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    w.lagged_from.store(revision, Ordering::SeqCst);
                    drop_ids.push(*id);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => drop_ids.push(*id),
            }
        }
        for id in drop_ids {
            g.synced.remove(&id);
        }
        g.current = revision;
    }

    pub fn set_compact(&self, compact: Revision) {
        self.inner.lock().compact = compact;
    }

    /// The state machine was replaced (snapshot install): every synced watcher catches up from
    /// the store again.
    pub fn reset(&self, current: Revision, compact: Revision) {
        let mut g = self.inner.lock();
        let resume = g.current + 1;
        for (_, w) in g.synced.drain() {
            w.lagged_from.store(resume, Ordering::SeqCst);
        }
        g.current = current;
        g.compact = compact;
    }

    /// Registers a watcher that has read everything up to `read_up_to`, if that is still the
    /// hub's revision.
    fn try_register(
        &self,
        read_up_to: Revision,
        range: &KeyRange,
        lagged_from: &Arc<AtomicI64>,
    ) -> Option<(u64, mpsc::Receiver<(Revision, Batch)>)> {
        let mut g = self.inner.lock();
        if g.current != read_up_to {
            return None;
        }
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let id = g.next_id;
        g.next_id += 1;
        lagged_from.store(0, Ordering::SeqCst);
        g.synced.insert(
            id,
            Synced {
                range: range.clone(),
                tx,
                lagged_from: lagged_from.clone(),
            },
        );
        Some((id, rx))
    }

    fn unregister(&self, id: u64) {
        self.inner.lock().synced.remove(&id);
    }

    /// For progress notifications: if nothing is queued for this watcher, the hub's revision
    /// has been fully delivered.
    fn progress_or_pending(
        &self,
        rx: &mut mpsc::Receiver<(Revision, Batch)>,
    ) -> Result<(Revision, Batch), Option<Revision>> {
        let g = self.inner.lock();
        match rx.try_recv() {
            Ok(b) => Ok(b),
            Err(mpsc::error::TryRecvError::Empty) => Err(Some(g.current)),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(None),
        }
    }

    pub fn watcher_count(&self) -> usize {
        self.inner.lock().synced.len()
    }
}

enum Mode {
    CatchingUp,
    Live {
        id: u64,
        rx: mpsc::Receiver<(Revision, Batch)>,
    },
    Done,
}

/// One watch. Obtain with [`crate::Store::watch`]; read with [`WatchStream::next`] or as a
/// `futures::Stream` via [`WatchStream::into_stream`].
pub struct WatchStream {
    mvcc: Arc<Mvcc>,
    req: WatchRequest,
    /// The first revision not yet delivered.
    next_rev: Revision,
    mode: Mode,
    lagged_from: Arc<AtomicI64>,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream")
            .field("range", &self.req.range)
            .field("next_rev", &self.next_rev)
            .finish()
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        if let Mode::Live { id, .. } = self.mode {
            self.mvcc.hub.unregister(id);
        }
    }
}

impl WatchStream {
    pub(crate) fn new(mvcc: Arc<Mvcc>, req: WatchRequest) -> Result<WatchStream, Error> {
        let (current, compact) = mvcc.hub.revisions();
        let next_rev = if req.start_revision <= 0 {
            current + 1
        } else {
            req.start_revision
        };
        if next_rev < compact {
            return Err(Error::Compacted {
                requested: next_rev,
                compact_revision: compact,
            });
        }
        Ok(WatchStream {
            mvcc,
            req,
            next_rev,
            mode: Mode::CatchingUp,
            lagged_from: Arc::new(AtomicI64::new(0)),
        })
    }

    /// The first revision this watch has not delivered yet (resume a new watch from here).
    pub fn next_revision(&self) -> Revision {
        self.next_rev
    }

    /// Without waiting: the next queued events, or, when nothing is queued and the watch is
    /// caught up, a progress message with the store's current revision (everything up to it has
    /// been delivered). `None` while the watch is still catching up or has ended.
    pub fn poll_progress(&mut self) -> Option<Result<WatchMessage, Error>> {
        let Mode::Live { rx, .. } = &mut self.mode else {
            return None;
        };
        match self.mvcc.hub.progress_or_pending(rx) {
            Ok((rev, batch)) => {
                self.next_rev = rev + 1;
                match self.to_events(batch.iter().map(|r| &**r)) {
                    Ok(ev) if ev.is_empty() => Some(Ok(WatchMessage::Progress { revision: rev })),
                    Ok(ev) => Some(Ok(WatchMessage::Events(ev))),
                    Err(e) => Some(Err(e)),
                }
            }
            Err(Some(rev)) => {
                self.next_rev = self.next_rev.max(rev + 1);
                Some(Ok(WatchMessage::Progress { revision: rev }))
            }
            Err(None) => None,
        }
    }

    /// The next message; `None` once the stream has ended (after an error, or at shutdown).
    pub async fn next(&mut self) -> Option<Result<WatchMessage, Error>> {
        loop {
            match &mut self.mode {
                Mode::Done => return None,
                Mode::CatchingUp => match self.catch_up_step() {
                    Ok(Some(events)) => return Some(Ok(WatchMessage::Events(events))),
                    Ok(None) => continue,
                    Err(e) => {
                        self.mode = Mode::Done;
                        return Some(Err(e));
                    }
                },
                Mode::Live { rx, .. } => {
                    let got = match self.req.progress_notify_interval {
                        None => rx.recv().await,
                        Some(every) => match tokio::time::timeout(every, rx.recv()).await {
                            Ok(got) => got,
                            Err(_) => match self.mvcc.hub.progress_or_pending(rx) {
                                Ok(b) => Some(b),
                                Err(Some(rev)) => {
                                    self.next_rev = self.next_rev.max(rev + 1);
                                    return Some(Ok(WatchMessage::Progress { revision: rev }));
                                }
                                Err(None) => None,
                            },
                        },
                    };
                    match got {
                        Some((rev, batch)) => {
                            self.next_rev = rev + 1;
                            match self.to_events(batch.iter().map(|r| &**r)) {
                                Ok(ev) if ev.is_empty() => continue,
                                Ok(ev) => return Some(Ok(WatchMessage::Events(ev))),
                                Err(e) => {
                                    self.mode = Mode::Done;
                                    return Some(Err(e));
                                }
                            }
                        }
                        None => {
                            // Dropped by the hub: too slow, or the state was replaced.
                            let lagged = self.lagged_from.load(Ordering::SeqCst);
                            if lagged > 0 {
                                self.next_rev = self.next_rev.min(lagged);
                                self.mode = Mode::CatchingUp;
                            } else {
                                self.mode = Mode::Done;
                                return None;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Turns the watch into a `futures::Stream`.
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = Result<WatchMessage, Error>> + Send + 'static {
        futures::stream::unfold(self, |mut w| async move { w.next().await.map(|m| (m, w)) })
    }

    /// Reads the next part of history, or registers as synced when there is none left.
    /// `Ok(None)` means "switched to live" (or read only non-matching records); call again.
    fn catch_up_step(&mut self) -> Result<Option<Vec<Event>>, Error> {
        let (current, compact) = self.mvcc.hub.revisions();
        if self.next_rev < compact {
            return Err(Error::Compacted {
                requested: self.next_rev,
                compact_revision: compact,
            });
        }
        if self.next_rev > current {
            if let Some((id, rx)) =
                self.mvcc
                    .hub
                    .try_register(current, &self.req.range, &self.lagged_from)
            {
                self.mode = Mode::Live { id, rx };
            }
            return Ok(None);
        }
        let from = self.next_rev;
        let records = self.mvcc.scan_records(from, current, CATCH_UP_BATCH)?;
        // Compaction may have removed records between the check above and the scan.
        let (_, compact_after) = self.mvcc.hub.revisions();
        if compact_after > from {
            return Err(Error::Compacted {
                requested: from,
                compact_revision: compact_after,
            });
        }
        self.next_rev = match records.last() {
            Some(last) if records.len() >= CATCH_UP_BATCH => last.rev.main + 1,
            _ => current + 1,
        };
        let events = self.to_events(records.iter().filter(|r| self.req.range.contains(&r.key)))?;
        Ok(if events.is_empty() {
            None
        } else {
            Some(events)
        })
    }

    fn to_events<'a>(
        &self,
        records: impl Iterator<Item = &'a Record>,
    ) -> Result<Vec<Event>, Error> {
        let mut out = Vec::new();
        for rec in records {
            let kind = if rec.tombstone {
                EventKind::Delete
            } else {
                EventKind::Put
            };
            if (kind == EventKind::Put && self.req.filter_put)
                || (kind == EventKind::Delete && self.req.filter_delete)
            {
                continue;
            }
            let prev_kv = if self.req.prev_kv {
                self.mvcc.prev_of(rec)?
            } else {
                None
            };
            out.push(Event {
                kind,
                kv: rec.to_key_value(),
                prev_kv,
            });
        }
        Ok(out)
    }
}
