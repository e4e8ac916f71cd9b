//! WATCH: a stream of `{"type": …, "object": …}` lines over a store watch, with selectors
//! (objects moving out of a selector are reported DELETED, into it ADDED), the initial state
//! for resourceVersion unset/"0", bookmarks, timeouts and 410 Gone after compaction.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use k3rs_storage::{EventKind, KeyRange, WatchMessage, WatchRequest};
use serde_json::{json, Value};
use tokio::sync::mpsc;

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

/// Starts a watch; the receiver yields encoded event lines until the watch ends.
pub async fn start(
    st: Arc<ApiState>,
    def: Arc<ResourceDef>,
    ns: Option<String>,
    opts: ListOpts,
    params: WatchParams,
) -> ApiResult<mpsc::Receiver<Bytes>> {
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
                        let (kind, obj) = match ev.kind {
                            EventKind::Put => {
                                let Ok(new) = decode_stored(&def, &ev.kv) else {
                                    continue;
                                };
                                let now = opts.matches(&new);
                                let before = prev.as_ref().is_some_and(|p| opts.matches(p));
                                match (before, now) {
                                    (false, true) => ("ADDED", new),
                                    (true, true) => ("MODIFIED", new),
                                    (true, false) => ("DELETED", new),
                                    (false, false) => continue,
                                }
                            }
                            EventKind::Delete => {
                                let Some(mut p) = prev else { continue };
                                if !opts.matches(&p) {
                                    continue;
                                }
                                objects::stamp(&def, &mut p, ev.kv.mod_revision);
                                ("DELETED", p)
                            }
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
