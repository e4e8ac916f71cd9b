//! The watch cache: per resource, one store watch feeds an in-memory copy of every object and a
//! window of recent events. LISTs (consistent: the cache first catches up with the store's
//! revision at the time of the request) and WATCHes are served from it, so N clients cost one
//! store watch. Objects are kept as the JSON bytes the store holds; lists are assembled by
//! splicing `resourceVersion` into those bytes instead of decoding them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use k3rs_storage::{EventKind, KeyRange, RangeRequest, Store, WatchMessage, WatchRequest};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{broadcast, Notify};

/// Events kept for watches that resume from a recent resourceVersion: at most this many, and
/// no more than `EVENT_WINDOW_BYTES` of objects beyond the first `EVENT_WINDOW_MIN` (a burst of
/// large objects would otherwise pin hundreds of MiB). Older resourceVersions get 410 Gone and
/// clients relist, as against kube-apiserver's watch cache.
const EVENT_WINDOW: usize = 4096;
const EVENT_WINDOW_MIN: usize = 128;
const EVENT_WINDOW_BYTES: usize = 16 << 20;
/// Live events queued per watcher before it must replay from the window.
const FANOUT_CAPACITY: usize = 1024;

#[derive(Clone, Debug)]
pub struct CachedObject {
    pub key: Bytes,
    pub value: Bytes,
    pub mod_revision: i64,
}

#[derive(Clone, Debug)]
pub struct CachedEvent {
    /// Position in the cache's event sequence (dense, increasing).
    pub seq: u64,
    pub revision: i64,
    pub kind: EventKind,
    pub object: CachedObject,
    /// For deletes: the object as it was; for puts: the previous version, if any.
    pub prev: Option<CachedObject>,
}

struct State {
    objects: BTreeMap<Bytes, CachedObject>,
    /// Everything up to this revision is reflected.
    revision: i64,
    events: VecDeque<Arc<CachedEvent>>,
    /// Object bytes the window's events hold (a previous version shared with the object map
    /// or an earlier event is counted again: an upper bound).
    events_bytes: usize,
    next_seq: u64,
    /// Bumped whenever the cache was rebuilt from scratch (watchers must restart).
    epoch: u64,
    ready: bool,
}

/// The cache of one resource (one key prefix).
pub struct ResourceCache {
    prefix: String,
    state: RwLock<State>,
    fanout: broadcast::Sender<Arc<CachedEvent>>,
    /// Revision advances (for consistent reads).
    rev_tx: tokio::sync::watch::Sender<i64>,
    /// Readers ask the feeding task to confirm progress now.
    want_progress: Notify,
}

/// What a cached list returns.
pub struct Snapshot {
    pub revision: i64,
    pub objects: Vec<CachedObject>,
}

impl ResourceCache {
    fn new(prefix: String) -> Arc<ResourceCache> {
        let (fanout, _) = broadcast::channel(FANOUT_CAPACITY);
        let (rev_tx, _) = tokio::sync::watch::channel(0);
        Arc::new(ResourceCache {
            prefix,
            state: RwLock::new(State {
                objects: BTreeMap::new(),
                revision: 0,
                events: VecDeque::new(),
                events_bytes: 0,
                next_seq: 1,
                epoch: 0,
                ready: false,
            }),
            fanout,
            rev_tx,
            want_progress: Notify::new(),
        })
    }

    pub fn revision(&self) -> i64 {
        self.state.read().revision
    }

    /// Waits until the cache reflects at least `revision` (bounded).
    pub async fn wait_for(&self, revision: i64, timeout: Duration) -> bool {
        let mut rx = self.rev_tx.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let st = self.state.read();
                if st.ready && st.revision >= revision {
                    return true;
                }
            }
            self.want_progress.notify_one();
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return false,
            }
        }
    }

    /// Objects under `sub_prefix` (a namespace's keys, or all) from `start` (inclusive), at the
    /// cache's current revision.
    pub fn snapshot(&self, sub_prefix: &str, start: Option<&str>) -> Snapshot {
        let st = self.state.read();
        let lo = start.unwrap_or(sub_prefix).to_string();
        let end = k3rs_storage::prefix_end(sub_prefix.as_bytes());
        let range: Box<dyn Iterator<Item = (&Bytes, &CachedObject)>> = if end.is_empty() {
            Box::new(st.objects.range(Bytes::from(lo)..))
        } else {
            Box::new(st.objects.range(Bytes::from(lo)..end))
        };
        Snapshot {
            revision: st.revision,
            objects: range.map(|(_, o)| o.clone()).collect(),
        }
    }

    /// Subscribes to live events, with the current state for an initial listing, or the events
    /// after `after_revision` when they are still in the window. `None`: that revision is older
    /// than the window (the caller falls back to the store).
    pub fn subscribe(&self, sub_prefix: &str, after_revision: Option<i64>) -> Option<Subscription> {
        let st = self.state.read();
        if !st.ready {
            return None;
        }
        let rx = self.fanout.subscribe();
        let (initial, replay, last_seq) = match after_revision {
            None => {
                let snap: Vec<CachedObject> = st
                    .objects
                    .range(Bytes::from(sub_prefix.to_string())..)
                    .take_while(|(k, _)| k.starts_with(sub_prefix.as_bytes()))
                    .map(|(_, o)| o.clone())
                    .collect();
                (snap, Vec::new(), st.next_seq - 1)
            }
            Some(rev) => {
                if rev > st.revision {
                    // The future: nothing to replay.
                    (Vec::new(), Vec::new(), st.next_seq - 1)
                } else {
                    let oldest = st.events.front().map(|e| e.revision);
                    let covered = match oldest {
                        Some(o) => o <= rev + 1 || st.events.front().is_some_and(|e| e.seq == 1),
                        None => true,
                    };
                    if !covered {
                        return None;
                    }
                    let replay: Vec<Arc<CachedEvent>> = st
                        .events
                        .iter()
                        .filter(|e| {
                            e.revision > rev && e.object.key.starts_with(sub_prefix.as_bytes())
                        })
                        .cloned()
                        .collect();
                    (Vec::new(), replay, st.next_seq - 1)
                }
            }
        };
        Some(Subscription {
            epoch: st.epoch,
            initial,
            replay,
            last_seq,
            rx,
        })
    }

    /// Events after `seq` still in the window (for a watcher that fell behind the fan-out).
    pub fn events_after(&self, seq: u64) -> Option<Vec<Arc<CachedEvent>>> {
        let st = self.state.read();
        match st.events.front() {
            Some(f) if f.seq > seq + 1 => None,
            _ => Some(st.events.iter().filter(|e| e.seq > seq).cloned().collect()),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.state.read().epoch
    }

    fn apply(&self, revision: i64, events: Vec<(EventKind, CachedObject, Option<CachedObject>)>) {
        let mut st = self.state.write();
        for (kind, object, mut prev) in events {
            // The store decodes the previous version anew; share the cache's copy instead.
            match kind {
                EventKind::Put => {
                    let old = st.objects.insert(object.key.clone(), object.clone());
                    if let (Some(p), Some(old)) = (prev.as_mut(), old) {
                        if p.mod_revision == old.mod_revision {
                            *p = old;
                        }
                    }
                }
                EventKind::Delete => {
                    if let Some(old) = st.objects.remove(&object.key) {
                        if let Some(p) =
                            prev.as_mut().filter(|p| p.mod_revision == old.mod_revision)
                        {
                            *p = old;
                        }
                    }
                }
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            let ev = Arc::new(CachedEvent {
                seq,
                revision,
                kind,
                object,
                prev,
            });
            st.events_bytes += event_bytes(&ev);
            st.events.push_back(ev.clone());
            while st.events.len() > EVENT_WINDOW
                || (st.events.len() > EVENT_WINDOW_MIN && st.events_bytes > EVENT_WINDOW_BYTES)
            {
                let Some(old) = st.events.pop_front() else {
                    break;
                };
                st.events_bytes -= event_bytes(&old);
            }
            let _ = self.fanout.send(ev);
        }
        st.revision = st.revision.max(revision);
        let rev = st.revision;
        drop(st);
        self.rev_tx.send_replace(rev);
    }

    fn progress(&self, revision: i64) {
        let mut st = self.state.write();
        if revision > st.revision {
            st.revision = revision;
        }
        let rev = st.revision;
        drop(st);
        self.rev_tx.send_replace(rev);
    }
}

fn event_bytes(e: &CachedEvent) -> usize {
    e.object.value.len() + e.prev.as_ref().map_or(0, |p| p.value.len())
}

/// A watcher's view of the cache.
pub struct Subscription {
    pub epoch: u64,
    pub initial: Vec<CachedObject>,
    pub replay: Vec<Arc<CachedEvent>>,
    pub last_seq: u64,
    pub rx: broadcast::Receiver<Arc<CachedEvent>>,
}

/// Feeds one cache from the store until the store shuts down.
async fn feed(store: Store, cache: Arc<ResourceCache>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        // List, then watch from the list's revision.
        let list = match store
            .range(RangeRequest::new(KeyRange::prefix(cache.prefix.clone())))
            .await
        {
            Ok(l) => l,
            Err(k3rs_storage::Error::ShuttingDown) => return,
            Err(e) => {
                tracing::warn!(prefix = %cache.prefix, error = %e, "watch cache list failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut watch = match store.watch(
            WatchRequest::new(KeyRange::prefix(cache.prefix.clone()))
                .start_revision(list.revision + 1)
                .prev_kv()
                .progress_notify(Duration::from_secs(1)),
        ) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(prefix = %cache.prefix, error = %e, "watch cache watch failed");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        {
            let mut st = cache.state.write();
            st.objects = list
                .kvs
                .into_iter()
                .map(|kv| {
                    (
                        kv.key.clone(),
                        CachedObject {
                            key: kv.key,
                            value: kv.value,
                            mod_revision: kv.mod_revision,
                        },
                    )
                })
                .collect();
            st.revision = list.revision;
            st.events.clear();
            st.events_bytes = 0;
            st.epoch += 1;
            st.ready = true;
        }
        cache.rev_tx.send_replace(list.revision);
        loop {
            let msg = tokio::select! {
                m = watch.next() => m,
                _ = cache.want_progress.notified() => {
                    match watch.poll_progress() {
                        Some(m) => Some(m),
                        None => continue,
                    }
                }
            };
            match msg {
                None => return,
                Some(Err(e)) => {
                    tracing::info!(prefix = %cache.prefix, error = %e, "watch cache restarts");
                    cache.state.write().ready = false;
                    break;
                }
                Some(Ok(WatchMessage::Progress { revision })) => cache.progress(revision),
                Some(Ok(WatchMessage::Events(events))) => {
                    // Group by revision so that each revision is applied at once.
                    let mut by_rev: BTreeMap<
                        i64,
                        Vec<(EventKind, CachedObject, Option<CachedObject>)>,
                    > = BTreeMap::new();
                    for e in events {
                        let prev = e.prev_kv.map(|p| CachedObject {
                            key: p.key,
                            value: p.value,
                            mod_revision: p.mod_revision,
                        });
                        let obj = CachedObject {
                            key: e.kv.key,
                            value: e.kv.value,
                            mod_revision: e.kv.mod_revision,
                        };
                        by_rev
                            .entry(obj.mod_revision)
                            .or_default()
                            .push((e.kind, obj, prev));
                    }
                    for (rev, evs) in by_rev {
                        cache.apply(rev, evs);
                    }
                }
            }
        }
        backoff = Duration::from_millis(50);
    }
}

/// Every resource's cache, created on first use.
pub struct WatchCaches {
    store: Store,
    caches: Mutex<HashMap<String, Arc<ResourceCache>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl WatchCaches {
    pub fn new(store: Store) -> WatchCaches {
        WatchCaches {
            store,
            caches: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// The cache of the resource stored under `prefix` (`/registry/<group>/<plural>/`).
    pub fn get(&self, prefix: &str) -> Arc<ResourceCache> {
        let mut caches = self.caches.lock();
        if let Some(c) = caches.get(prefix) {
            return c.clone();
        }
        let c = ResourceCache::new(prefix.to_string());
        caches.insert(prefix.to_string(), c.clone());
        self.tasks
            .lock()
            .push(tokio::spawn(feed(self.store.clone(), c.clone())));
        c
    }

    pub fn shutdown(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}

/// Inserts `"resourceVersion":"<rev>"` into the top-level `metadata` object of stored JSON
/// (which the store keeps without it), without decoding the document.
pub fn splice_resource_version(json: &[u8], rev: i64) -> Vec<u8> {
    let insert = format!("\"resourceVersion\":\"{rev}\"");
    let mut depth = 0i32;
    let mut in_str = false;
    let mut esc = false;
    let mut i = 0;
    let b = json;
    while i < b.len() {
        let c = b[i];
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        match c {
            b'"' => {
                if depth == 1 && b[i..].starts_with(b"\"metadata\"") {
                    let mut j = i + 10;
                    while j < b.len() && b[j].is_ascii_whitespace() {
                        j += 1;
                    }
                    if j < b.len() && b[j] == b':' {
                        j += 1;
                        while j < b.len() && b[j].is_ascii_whitespace() {
                            j += 1;
                        }
                        if j < b.len() && b[j] == b'{' {
                            let mut out = Vec::with_capacity(b.len() + insert.len() + 1);
                            out.extend_from_slice(&b[..=j]);
                            out.extend_from_slice(insert.as_bytes());
                            let rest = &b[j + 1..];
                            let first = rest.iter().find(|c| !c.is_ascii_whitespace());
                            if first != Some(&b'}') {
                                out.push(b',');
                            }
                            out.extend_from_slice(rest);
                            return out;
                        }
                    }
                }
                in_str = true;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    json.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_versions_are_spliced_into_top_level_metadata_only() {
        let j = br#"{"apiVersion":"v1","items":[{"metadata":{"name":"inner"}}],"metadata":{"name":"x"},"spec":{"template":{"metadata":{}}}}"#;
        let out = splice_resource_version(j, 42);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["metadata"]["resourceVersion"], "42");
        assert_eq!(v["metadata"]["name"], "x");
        assert!(v["items"][0]["metadata"].get("resourceVersion").is_none());
        assert!(v["spec"]["template"]["metadata"]
            .get("resourceVersion")
            .is_none());
        let empty = splice_resource_version(br#"{"metadata":{},"kind":"X"}"#, 7);
        let v: serde_json::Value = serde_json::from_slice(&empty).unwrap();
        assert_eq!(v["metadata"]["resourceVersion"], "7");
        let tricky = splice_resource_version(br#"{"a":"\"metadata\":{","metadata":{"n":1}}"#, 3);
        let v: serde_json::Value = serde_json::from_slice(&tricky).unwrap();
        assert_eq!(v["metadata"]["resourceVersion"], "3");
        assert_eq!(v["a"], "\"metadata\":{");
    }

    fn obj(name: &str, size: usize, rev: i64) -> CachedObject {
        CachedObject {
            key: Bytes::from(format!("/registry/pods/d/{name}")),
            value: Bytes::from(vec![b'x'; size]),
            mod_revision: rev,
        }
    }

    #[test]
    fn event_window_is_bounded_by_bytes_and_shares_previous_versions() {
        let c = ResourceCache::new("/registry/pods/".into());
        // 64 KiB objects, each updated once: 2 × 600 events would be 75 MiB unbounded.
        let mut rev = 1;
        for i in 0..600 {
            c.apply(
                rev,
                vec![(EventKind::Put, obj(&i.to_string(), 64 << 10, rev), None)],
            );
            rev += 1;
        }
        let cached_599 = c.state.read().objects[&Bytes::from("/registry/pods/d/599")]
            .value
            .as_ptr();
        for i in 0..600 {
            let prev = obj(&i.to_string(), 64 << 10, rev - 600);
            c.apply(
                rev,
                vec![(
                    EventKind::Put,
                    obj(&i.to_string(), 64 << 10, rev),
                    Some(prev),
                )],
            );
            rev += 1;
        }
        let st = c.state.read();
        assert!(st.events_bytes <= EVENT_WINDOW_BYTES, "{}", st.events_bytes);
        assert!(st.events.len() >= EVENT_WINDOW_MIN);
        // The previous version is the cached object's own buffer, not a second copy.
        let last = st.events.back().expect("events");
        let prev = last.prev.as_ref().expect("prev");
        let first = st.events.front().expect("events");
        assert_eq!(prev.mod_revision, rev - 601);
        assert_eq!(prev.value.as_ptr(), cached_599);
        assert!(first.seq > 1);
        drop(st);
        // A watcher that fell behind the window is told to relist; a recent one replays.
        assert!(c.events_after(1).is_none());
        assert_eq!(c.events_after(1199).map(|e| e.len()), Some(1));
    }
}
