//! Shared informers: one in-memory, decoded copy of every object of a resource, fed by the API
//! server's watch cache, with change notifications for the controllers that registered.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};

use crate::api::cache::{CachedEvent, CachedObject};
use crate::api::objects;
use crate::api::resources::ResourceDef;
use crate::api::ApiState;
use crate::controllers::client::key_of;

/// A change seen by an informer.
#[derive(Clone, Debug)]
pub enum Change {
    Added(Arc<Value>),
    Updated { old: Arc<Value>, new: Arc<Value> },
    Deleted(Arc<Value>),
}

impl Change {
    pub fn object(&self) -> &Arc<Value> {
        match self {
            Change::Added(o) | Change::Deleted(o) => o,
            Change::Updated { new, .. } => new,
        }
    }
}

pub struct Informer {
    pub def: Arc<ResourceDef>,
    objects: RwLock<BTreeMap<String, Arc<Value>>>,
    handlers: Mutex<Vec<mpsc::UnboundedSender<Change>>>,
    synced: tokio::sync::watch::Sender<bool>,
}

impl Informer {
    /// The object with this key (`ns/name` or `name`).
    pub fn get(&self, key: &str) -> Option<Arc<Value>> {
        self.objects.read().get(key).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Value>> {
        self.objects.read().values().cloned().collect()
    }

    /// Objects of one namespace.
    pub fn list_namespace(&self, ns: &str) -> Vec<Arc<Value>> {
        let lo = format!("{ns}/");
        let hi = format!("{ns}0"); // '0' follows '/'
        self.objects
            .read()
            .range(lo..hi)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Receives every change from now on (after `wait_synced`, the current state is in `list`).
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Change> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.handlers.lock().push(tx);
        rx
    }

    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    fn notify(&self, c: Change) {
        self.handlers.lock().retain(|h| h.send(c.clone()).is_ok());
    }

    /// The object as controllers see it: without `managedFields`, which no control loop reads
    /// and which are two thirds of a pod's bytes (an update without them keeps the stored
    /// ones, as upstream).
    fn decode(&self, o: &CachedObject) -> Option<Arc<Value>> {
        let mut v: Value = serde_json::from_slice(&o.value).ok()?;
        if let Some(md) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            md.remove("managedFields");
        }
        objects::stamp(&self.def, &mut v, o.mod_revision);
        Some(Arc::new(v))
    }

    /// Replaces the whole state (initial list, or a relist), notifying the differences.
    fn replace(&self, items: Vec<CachedObject>) {
        let mut fresh: BTreeMap<String, Arc<Value>> = BTreeMap::new();
        for o in &items {
            if let Some(v) = self.decode(o) {
                fresh.insert(key_of(&v), v);
            }
        }
        let old = std::mem::replace(&mut *self.objects.write(), fresh.clone());
        for (k, v) in &fresh {
            match old.get(k) {
                None => self.notify(Change::Added(v.clone())),
                Some(o)
                    if o.pointer("/metadata/resourceVersion")
                        != v.pointer("/metadata/resourceVersion") =>
                {
                    self.notify(Change::Updated {
                        old: o.clone(),
                        new: v.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        for (k, o) in old {
            if !fresh.contains_key(&k) {
                self.notify(Change::Deleted(o));
            }
        }
    }

    fn apply(&self, ev: &CachedEvent) {
        match ev.kind {
            k3rs_storage::EventKind::Put => {
                let Some(v) = self.decode(&ev.object) else {
                    return;
                };
                let key = key_of(&v);
                let old = self.objects.write().insert(key, v.clone());
                match old {
                    Some(old) => self.notify(Change::Updated { old, new: v }),
                    None => self.notify(Change::Added(v)),
                }
            }
            k3rs_storage::EventKind::Delete => {
                let Some(prev) = ev.prev.as_ref().and_then(|p| self.decode(p)) else {
                    return;
                };
                let key = key_of(&prev);
                let old = self.objects.write().remove(&key);
                self.notify(Change::Deleted(old.unwrap_or(prev)));
            }
        }
    }
}

async fn run(st: Arc<ApiState>, inf: Arc<Informer>) {
    let prefix = inf.def.key_prefix(None);
    loop {
        let cache = st.caches.get(&prefix);
        if !cache.wait_for(0, Duration::from_secs(5)).await {
            continue;
        }
        let Some(mut sub) = cache.subscribe(&prefix, None) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        inf.replace(std::mem::take(&mut sub.initial));
        inf.synced.send_replace(true);
        let mut last_seq = sub.last_seq;
        loop {
            match sub.rx.recv().await {
                Ok(ev) => {
                    if ev.seq <= last_seq {
                        continue;
                    }
                    if cache.epoch() != sub.epoch {
                        break;
                    }
                    last_seq = ev.seq;
                    inf.apply(&ev);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => match cache.events_after(last_seq) {
                    Some(evs) => {
                        for ev in evs {
                            last_seq = last_seq.max(ev.seq);
                            inf.apply(&ev);
                        }
                    }
                    None => break, // relist
                },
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// One informer per resource, shared by every control loop.
pub struct Informers {
    st: Arc<ApiState>,
    map: Mutex<BTreeMap<String, Arc<Informer>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Informers {
    pub fn new(st: Arc<ApiState>) -> Arc<Informers> {
        Arc::new(Informers {
            st,
            map: Mutex::new(BTreeMap::new()),
            tasks: Mutex::new(Vec::new()),
        })
    }

    pub fn get(&self, def: &Arc<ResourceDef>) -> Arc<Informer> {
        let key = def.key_prefix(None);
        let mut map = self.map.lock();
        if let Some(i) = map.get(&key) {
            return i.clone();
        }
        let (synced, _) = tokio::sync::watch::channel(false);
        let inf = Arc::new(Informer {
            def: def.clone(),
            objects: RwLock::new(BTreeMap::new()),
            handlers: Mutex::new(Vec::new()),
            synced,
        });
        map.insert(key, inf.clone());
        self.tasks
            .lock()
            .push(tokio::spawn(run(self.st.clone(), inf.clone())));
        inf
    }

    pub fn shutdown(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}
