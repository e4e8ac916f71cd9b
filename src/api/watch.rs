//! WATCH: a stream of `{"type": …, "object": …}` lines over a store watch, with selectors
//! (objects moving out of a selector are reported DELETED, into it ADDED), the initial state
//! for resourceVersion unset/"0", bookmarks, timeouts and 410 Gone after compaction.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use k3rs_storage::{EventKind, KeyRange, WatchMessage, WatchRequest};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use crate::api::cache::{CachedEvent, CachedObject};

use crate::api::objects::{self, decode_stored, ListOpts};
use crate::api::resources::ResourceDef;
use crate::api::status::{ApiError, ApiResult};
use crate::api::table::{self, IncludeObject};
use crate::api::ApiState;

/// How often a watch with bookmarks enabled reports progress.
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);

pub struct WatchParams {
    pub bookmarks: bool,
    pub timeout: Option<Duration>,
    /// Render events as one-row Tables.
    pub table: Option<IncludeObject>,
}

fn line(kind: &str, object: Value) -> Bytes {
    let mut s = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("JSON");
    s.push(b'\n');
    Bytes::from(s)
}

struct Encoder {
    def: Arc<ResourceDef>,
    table: Option<IncludeObject>,
    first: bool,
}

impl Encoder {
    fn event(&mut self, kind: &str, obj: Value) -> Bytes {
        match self.table {
            None => line(kind, obj),
            Some(include) => {
                let rv = obj
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let mut t = table::table(&self.def, &[obj], &rv, None, None, include);
                if !self.first {
                    t["columnDefinitions"] = Value::Null;
                }
                self.first = false;
                line(kind, t)
            }
        }
    }
}

fn gone(rev: i64, compact: i64) -> Bytes {
    let e = ApiError::gone(format!("too old resource version: {rev} ({compact})"));
    line("ERROR", e.to_status())
}

/// Which watch event (if any) a change is for this watcher: objects entering the selection are
/// ADDED, changing inside it MODIFIED, leaving it (or deleted) DELETED.
fn classify(
    def: &ResourceDef,
    opts: &ListOpts,
    kind: EventKind,
    new: Option<Value>,
    prev: Option<Value>,
    revision: i64,
) -> Option<(&'static str, Value)> {
    match kind {
        EventKind::Put => {
            let new = new?;
            let now = opts.matches(&new);
            let before = prev.as_ref().is_some_and(|p| opts.matches(p));
            match (before, now) {
                (false, true) => Some(("ADDED", new)),
                (true, true) => Some(("MODIFIED", new)),
                (true, false) => Some(("DELETED", new)),
                (false, false) => None,
            }
        }
        EventKind::Delete => {
            let mut p = prev?;
            if !opts.matches(&p) {
                return None;
            }
            objects::stamp(def, &mut p, revision);
            Some(("DELETED", p))
        }
    }
}

fn cached_value(def: &ResourceDef, o: &CachedObject) -> Option<Value> {
    let mut v: Value = serde_json::from_slice(&o.value).ok()?;
    objects::stamp(def, &mut v, o.mod_revision);
    Some(v)
}

/// A watch line for stored JSON, with the resourceVersion spliced in instead of decoding and
/// encoding the object again (`served_bytes`).
fn raw_line(def: &ResourceDef, kind: &str, stored: &[u8], rev: i64) -> Bytes {
    let obj = objects::served_bytes(def, stored, rev);
    let mut s = Vec::with_capacity(obj.len() + 40);
    s.extend_from_slice(b"{\"type\":\"");
    s.extend_from_slice(kind.as_bytes());
    s.extend_from_slice(b"\",\"object\":");
    s.extend_from_slice(&obj);
    s.extend_from_slice(b"}\n");
    Bytes::from(s)
}

impl Encoder {
    /// The line for a stored object at `rev`: spliced bytes, or a decoded one-row Table.
    fn stored(&mut self, kind: &str, stored: &[u8], rev: i64) -> Option<Bytes> {
        if self.table.is_none() {
            return Some(raw_line(&self.def, kind, stored, rev));
        }
        let mut v: Value = serde_json::from_slice(stored).ok()?;
        objects::stamp(&self.def, &mut v, rev);
        Some(self.event(kind, v))
    }
}

/// Whether stored JSON passes the watch's selectors (decoded only when there are any).
fn selected(def: &ResourceDef, opts: &ListOpts, o: &CachedObject) -> bool {
    if opts.labels.is_empty() && opts.fields.is_empty() {
        return true;
    }
    cached_value(def, o).is_some_and(|v| opts.matches(&v))
}

fn to_line(
    def: &ResourceDef,
    opts: &ListOpts,
    prefix: &str,
    ev: &CachedEvent,
    enc: &mut Encoder,
) -> Option<Bytes> {
    if !ev.object.key.starts_with(prefix.as_bytes()) {
        return None;
    }
    match ev.kind {
        EventKind::Put => {
            let now = selected(def, opts, &ev.object);
            let before = ev.prev.as_ref().is_some_and(|p| selected(def, opts, p));
            let kind = match (before, now) {
                (false, true) => "ADDED",
                (true, true) => "MODIFIED",
                (true, false) => "DELETED",
                (false, false) => return None,
            };
            enc.stored(kind, &ev.object.value, ev.object.mod_revision)
        }
        EventKind::Delete => {
            let p = ev.prev.as_ref()?;
            if !selected(def, opts, p) {
                return None;
            }
            enc.stored("DELETED", &p.value, ev.revision)
        }
    }
}

/// Serves a watch from the watch cache; `None` when the cache cannot (a resourceVersion older
/// than its window, a cache that is not ready).
async fn start_cached(
    st: &Arc<ApiState>,
    def: &Arc<ResourceDef>,
    ns: Option<&str>,
    opts: &ListOpts,
    params: &WatchParams,
) -> ApiResult<Option<mpsc::Receiver<Bytes>>> {
    if def.crd.is_some() || def.schema.is_none() {
        return Ok(None);
    }
    let cache = st.caches.get(&def.key_prefix(None));
    let after = match opts.resource_version.as_deref() {
        None | Some("") => {
            let target = st.store.read_revision().await?;
            if !cache.wait_for(target, Duration::from_secs(3)).await {
                return Ok(None);
            }
            None
        }
        Some("0") => {
            if !cache.wait_for(0, Duration::from_secs(3)).await {
                return Ok(None);
            }
            None
        }
        Some(rv) => {
            let rv = objects::parse_rv(rv)?;
            if !cache.wait_for(0, Duration::from_secs(3)).await {
                return Ok(None);
            }
            Some(rv)
        }
    };
    let prefix = def.key_prefix(ns);
    let Some(mut sub) = cache.subscribe(&prefix, after) else {
        return Ok(None);
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut enc = Encoder {
        def: def.clone(),
        table: params.table,
        first: true,
    };
    let def = def.clone();
    let opts = ListOpts {
        labels: opts.labels.clone(),
        fields: opts.fields.clone(),
        limit: 0,
        continue_token: None,
        resource_version: None,
        rv_match: None,
    };
    let bookmarks = params.bookmarks;
    let deadline = params.timeout.map(|t| tokio::time::Instant::now() + t);
    tokio::spawn(async move {
        for o in std::mem::take(&mut sub.initial) {
            if !selected(&def, &opts, &o) {
                continue;
            }
            let Some(b) = enc.stored("ADDED", &o.value, o.mod_revision) else {
                continue;
            };
            if tx.send(b).await.is_err() {
                return;
            }
        }
        let mut last_seq = sub.last_seq;
        for ev in std::mem::take(&mut sub.replay) {
            last_seq = last_seq.max(ev.seq);
            if let Some(b) = to_line(&def, &opts, &prefix, &ev, &mut enc) {
                if tx.send(b).await.is_err() {
                    return;
                }
            }
        }
        let mut tick = tokio::time::interval(BOOKMARK_EVERY);
        tick.tick().await;
        loop {
            let step = async {
                tokio::select! {
                    r = sub.rx.recv() => Some(Ok(r)),
                    _ = tick.tick() => Some(Err(())),
                    _ = tx.closed() => None,
                }
            };
            let got = match deadline {
                Some(d) => match tokio::time::timeout_at(d, step).await {
                    Ok(g) => g,
                    Err(_) => return,
                },
                None => step.await,
            };
            let Some(got) = got else { return };
            if cache.epoch() != sub.epoch {
                // The cache was rebuilt (compaction or a store error): the client re-watches.
                return;
            }
            let batch: Vec<std::sync::Arc<CachedEvent>> = match got {
                Err(()) => {
                    let rev = cache.revision();
                    if bookmarks && sub.rx.is_empty() {
                        let b = json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": {"resourceVersion": rev.to_string()}});
                        if tx.send(line("BOOKMARK", b)).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                Ok(Ok(ev)) => vec![ev],
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                    match cache.events_after(last_seq) {
                        Some(evs) => evs,
                        None => {
                            let e = ApiError::gone("the watch fell too far behind; please re-list");
                            let _ = tx.send(line("ERROR", e.to_status())).await;
                            return;
                        }
                    }
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return,
            };
            for ev in batch {
                if ev.seq <= last_seq {
                    continue;
                }
                last_seq = ev.seq;
                if let Some(b) = to_line(&def, &opts, &prefix, &ev, &mut enc) {
                    if tx.send(b).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(Some(rx))
}

/// Starts a watch; the receiver yields encoded event lines until the watch ends.
pub async fn start(
    st: Arc<ApiState>,
    def: Arc<ResourceDef>,
    ns: Option<String>,
    opts: ListOpts,
    params: WatchParams,
) -> ApiResult<mpsc::Receiver<Bytes>> {
    if let Some(rx) = start_cached(&st, &def, ns.as_deref(), &opts, &params).await? {
        return Ok(rx);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut enc = Encoder {
        def: def.clone(),
        table: params.table,
        first: true,
    };
    // Where to start: the initial state (as synthetic ADDED events) or after an exact revision.
    let mut initial = Vec::new();
    let start_rev = match opts.resource_version.as_deref() {
        None | Some("") | Some("0") => {
            let r = objects::list(
                &st,
                &def,
                ns.as_deref(),
                &ListOpts {
                    labels: opts.labels.clone(),
                    fields: opts.fields.clone(),
                    limit: 0,
                    continue_token: None,
                    resource_version: opts.resource_version.clone(),
                    rv_match: None,
                },
            )
            .await?;
            initial = r.items;
            r.revision + 1
        }
        Some(rv) => objects::parse_rv(rv)? + 1,
    };
    let prefix = def.key_prefix(ns.as_deref());
    let mut req = WatchRequest::new(KeyRange::prefix(prefix))
        .start_revision(start_rev)
        .prev_kv();
    if params.bookmarks {
        req = req.progress_notify(BOOKMARK_EVERY);
    }
    let watch = st.store.watch(req);
    let mut watch = match watch {
        Ok(w) => w,
        Err(k3rs_storage::Error::Compacted {
            requested,
            compact_revision,
        }) => {
            let _ = tx.send(gone(requested - 1, compact_revision)).await;
            return Ok(rx);
        }
        Err(e) => return Err(e.into()),
    };
    tokio::spawn(async move {
        for obj in initial {
            if tx.send(enc.event("ADDED", obj)).await.is_err() {
                return;
            }
        }
        let deadline = params.timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let next = async {
                tokio::select! {
                    m = watch.next() => Some(m),
                    _ = tx.closed() => None,
                }
            };
            let msg = match deadline {
                Some(d) => match tokio::time::timeout_at(d, next).await {
                    Ok(m) => m,
                    Err(_) => return,
                },
                None => next.await,
            };
            let Some(msg) = msg else { return }; // client went away
            let msg = match msg {
                None => return,
                Some(Err(k3rs_storage::Error::Compacted {
                    requested,
                    compact_revision,
                })) => {
                    let _ = tx.send(gone(requested - 1, compact_revision)).await;
                    return;
                }
                Some(Err(e)) => {
                    let _ = tx.send(line("ERROR", ApiError::from(e).to_status())).await;
                    return;
                }
                Some(Ok(m)) => m,
            };
            match msg {
                WatchMessage::Progress { revision } => {
                    if params.bookmarks {
                        let b = json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": {"resourceVersion": revision.to_string()}});
                        if tx.send(line("BOOKMARK", b)).await.is_err() {
                            return;
                        }
                    }
                }
                WatchMessage::Events(events) => {
                    for ev in events {
                        let prev = ev
                            .prev_kv
                            .as_ref()
                            .and_then(|p| decode_stored(&def, p).ok());
                        let new = match ev.kind {
                            EventKind::Put => decode_stored(&def, &ev.kv).ok(),
                            EventKind::Delete => None,
                        };
                        let Some((kind, obj)) =
                            classify(&def, &opts, ev.kind, new, prev, ev.kv.mod_revision)
                        else {
                            continue;
                        };
                        if tx.send(enc.event(kind, obj)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    Ok(rx)
}
