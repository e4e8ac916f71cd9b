//! The garbage collector: a graph of ownerReferences over every object in the store (one store
//! watch on `/registry/`, metadata only). Dependents whose owners are all gone are deleted
//! (background propagation); an owner deleted in the foreground waits, through its
//! `foregroundDeletion` finalizer, for its blocking dependents to go; an owner deleted with
//! orphan propagation releases its dependents first.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k3rs_storage::{EventKind, KeyRange, RangeRequest, WatchMessage, WatchRequest};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::resources::ResourceDef;
use crate::api::status::ApiResult;
use crate::controllers::client::Client;
use crate::controllers::queue::Queue;
use crate::controllers::{spawn_workers, Context};

#[derive(Deserialize, Default)]
struct OwnerRef {
    #[serde(default)]
    uid: String,
    #[serde(default, rename = "blockOwnerDeletion")]
    block: Option<bool>,
}

#[derive(Deserialize, Default)]
struct MetaOnly {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: String,
    #[serde(default, rename = "ownerReferences")]
    owners: Vec<OwnerRef>,
    #[serde(default)]
    finalizers: Vec<String>,
    #[serde(default, rename = "deletionTimestamp")]
    deletion: Option<String>,
}

#[derive(Deserialize, Default)]
struct Envelope {
    #[serde(default)]
    metadata: MetaOnly,
}

struct Node {
    def: Arc<ResourceDef>,
    namespace: Option<String>,
    name: String,
    owners: Vec<(String, bool)>,
    finalizers: Vec<String>,
    deleting: bool,
}

#[derive(Default)]
struct Graph {
    nodes: HashMap<String, Node>,
    /// Store key → uid.
    by_key: HashMap<String, String>,
    /// Owner uid → dependent uids.
    dependents: HashMap<String, HashSet<String>>,
}

impl Graph {
    fn remove(&mut self, uid: &str) -> Option<Node> {
        let n = self.nodes.remove(uid)?;
        for (o, _) in &n.owners {
            if let Some(set) = self.dependents.get_mut(o) {
                set.remove(uid);
                if set.is_empty() {
                    self.dependents.remove(o);
                }
            }
        }
        Some(n)
    }

    fn insert(&mut self, key: String, uid: String, n: Node) {
        self.remove(&uid);
        for (o, _) in &n.owners {
            self.dependents
                .entry(o.clone())
                .or_default()
                .insert(uid.clone());
        }
        self.by_key.insert(key, uid.clone());
        self.nodes.insert(uid, n);
    }
}

struct Gc {
    client: Client,
    graph: Mutex<Graph>,
    queue: Arc<Queue>,
}

/// Resource of a store key: `/registry/<group>/<plural>/…`.
fn def_of(client: &Client, key: &str) -> Option<Arc<ResourceDef>> {
    let rest = key.strip_prefix("/registry/")?;
    let mut parts = rest.split('/');
    let group = parts.next()?;
    let plural = parts.next()?;
    let group = if group == "core" { "" } else { group };
    client
        .st
        .registry
        .all()
        .into_iter()
        .find(|d| d.storage_group == group && d.plural == plural)
}

fn skip(key: &str) -> bool {
    key.starts_with("/registry/core/events/")
        || key.starts_with("/registry/events.k8s.io/")
        || key.starts_with("/registry/coordination.k8s.io/leases/")
}

/// A dependent of an owner being deleted in the foreground: its resource, namespace, name, uid
/// and whether it blocks the owner's deletion.
type Dependent = (Arc<ResourceDef>, Option<String>, String, String, bool);

impl Gc {
    fn upsert(&self, key: &str, value: &[u8]) {
        if skip(key) {
            return;
        }
        let Ok(env) = serde_json::from_slice::<Envelope>(value) else {
            return;
        };
        let m = env.metadata;
        if m.uid.is_empty() {
            return;
        }
        let Some(def) = def_of(&self.client, key) else {
            return;
        };
        let node = Node {
            def,
            namespace: m.namespace.filter(|n| !n.is_empty()),
            name: m.name,
            owners: m
                .owners
                .into_iter()
                .map(|o| (o.uid, o.block.unwrap_or(false)))
                .collect(),
            finalizers: m.finalizers,
            deleting: m.deletion.is_some(),
        };
        let uid = m.uid;
        let has_owners = !node.owners.is_empty();
        let special = node.deleting
            && node
                .finalizers
                .iter()
                .any(|f| f == "foregroundDeletion" || f == "orphan");
        self.graph.lock().insert(key.to_string(), uid.clone(), node);
        if has_owners || special {
            self.queue.add(uid);
        }
    }

    fn removed(&self, key: &str) {
        let mut g = self.graph.lock();
        let Some(uid) = g.by_key.remove(key) else {
            return;
        };
        let node = g.remove(&uid);
        let deps: Vec<String> = g
            .dependents
            .get(&uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        drop(g);
        for d in deps {
            self.queue.add(d);
        }
        // An owner waiting for this dependent in the foreground may proceed.
        if let Some(n) = node {
            for (o, _) in n.owners {
                self.queue.add(o);
            }
        }
    }

    async fn process(&self, uid: String) -> ApiResult<Option<Duration>> {
        enum Action {
            None,
            Delete {
                def: Arc<ResourceDef>,
                ns: Option<String>,
                name: String,
            },
            DropRefs {
                def: Arc<ResourceDef>,
                ns: Option<String>,
                name: String,
                gone: Vec<String>,
            },
            Foreground {
                def: Arc<ResourceDef>,
                ns: Option<String>,
                name: String,
                deps: Vec<Dependent>,
                blocking_left: bool,
            },
            Orphan {
                def: Arc<ResourceDef>,
                ns: Option<String>,
                name: String,
                deps: Vec<(Arc<ResourceDef>, Option<String>, String)>,
            },
        }
        let action = {
            let g = self.graph.lock();
            let Some(n) = g.nodes.get(&uid) else {
                return Ok(None);
            };
            if n.deleting && n.finalizers.iter().any(|f| f == "orphan") {
                let deps = g
                    .dependents
                    .get(&uid)
                    .map(|s| {
                        s.iter()
                            .filter_map(|d| g.nodes.get(d))
                            .map(|d| (d.def.clone(), d.namespace.clone(), d.name.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                Action::Orphan {
                    def: n.def.clone(),
                    ns: n.namespace.clone(),
                    name: n.name.clone(),
                    deps,
                }
            } else if n.deleting && n.finalizers.iter().any(|f| f == "foregroundDeletion") {
                let deps: Vec<_> = g
                    .dependents
                    .get(&uid)
                    .map(|s| {
                        s.iter()
                            .filter_map(|d| g.nodes.get(d).map(|dn| (d, dn)))
                            .map(|(d, dn)| {
                                let blocking = dn.owners.iter().any(|(o, b)| o == &uid && *b);
                                (
                                    dn.def.clone(),
                                    dn.namespace.clone(),
                                    dn.name.clone(),
                                    d.clone(),
                                    blocking,
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let blocking_left = deps.iter().any(|d| d.4);
                Action::Foreground {
                    def: n.def.clone(),
                    ns: n.namespace.clone(),
                    name: n.name.clone(),
                    deps,
                    blocking_left,
                }
            } else if !n.owners.is_empty() {
                let gone: Vec<String> = n
                    .owners
                    .iter()
                    .filter(|(o, _)| !g.nodes.contains_key(o))
                    .map(|(o, _)| o.clone())
                    .collect();
                if gone.len() == n.owners.len() {
                    if n.deleting {
                        Action::None
                    } else {
                        Action::Delete {
                            def: n.def.clone(),
                            ns: n.namespace.clone(),
                            name: n.name.clone(),
                        }
                    }
                } else if !gone.is_empty() {
                    Action::DropRefs {
                        def: n.def.clone(),
                        ns: n.namespace.clone(),
                        name: n.name.clone(),
                        gone,
                    }
                } else {
                    Action::None
                }
            } else {
                Action::None
            }
        };
        match action {
            Action::None => Ok(None),
            Action::Delete { def, ns, name } => {
                tracing::debug!(object = %name, "garbage collecting a dependent whose owners are gone");
                match self
                    .client
                    .delete_uid(&def, ns.as_deref(), &name, &uid, Some("Background"))
                    .await
                {
                    Ok(_) => Ok(None),
                    Err(e) if e.code == 404 || e.code == 409 => Ok(None),
                    Err(e) => Err(e),
                }
            }
            Action::DropRefs {
                def,
                ns,
                name,
                gone,
            } => {
                let cur = match self.client.get(&def, ns.as_deref(), &name).await {
                    Ok(c) => c,
                    Err(e) if e.code == 404 => return Ok(None),
                    Err(e) => return Err(e),
                };
                let refs: Vec<Value> = cur
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|r| !gone.iter().any(|g| r["uid"] == g.as_str()))
                    .collect();
                self.client
                    .merge_patch(
                        &def,
                        ns.as_deref(),
                        &name,
                        &json!({"metadata": {"ownerReferences": refs}}),
                    )
                    .await
                    .map(|_| None)
            }
            Action::Orphan {
                def,
                ns,
                name,
                deps,
            } => {
                for (dd, dns, dname) in deps {
                    let cur = match self.client.get(&dd, dns.as_deref(), &dname).await {
                        Ok(c) => c,
                        Err(e) if e.code == 404 => continue,
                        Err(e) => return Err(e),
                    };
                    let refs: Vec<Value> = cur
                        .pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|r| r["uid"] != uid.as_str())
                        .collect();
                    let refs = if refs.is_empty() {
                        Value::Null
                    } else {
                        Value::Array(refs)
                    };
                    self.client
                        .merge_patch(
                            &dd,
                            dns.as_deref(),
                            &dname,
                            &json!({"metadata": {"ownerReferences": refs}}),
                        )
                        .await?;
                }
                self.remove_finalizer(&def, ns.as_deref(), &name, "orphan")
                    .await
            }
            Action::Foreground {
                def,
                ns,
                name,
                deps,
                blocking_left,
            } => {
                for (dd, dns, dname, duid, _) in &deps {
                    let deleting = self
                        .graph
                        .lock()
                        .nodes
                        .get(duid)
                        .is_some_and(|n| n.deleting);
                    if !deleting {
                        match self
                            .client
                            .delete_uid(dd, dns.as_deref(), dname, duid, Some("Foreground"))
                            .await
                        {
                            Ok(_) => {}
                            Err(e) if e.code == 404 || e.code == 409 => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                if blocking_left {
                    // Re-checked when a dependent goes; also poll in case of a missed event.
                    return Ok(Some(Duration::from_secs(2)));
                }
                self.remove_finalizer(&def, ns.as_deref(), &name, "foregroundDeletion")
                    .await
            }
        }
    }

    async fn remove_finalizer(
        &self,
        def: &Arc<ResourceDef>,
        ns: Option<&str>,
        name: &str,
        finalizer: &str,
    ) -> ApiResult<Option<Duration>> {
        let cur = match self.client.get(def, ns, name).await {
            Ok(c) => c,
            Err(e) if e.code == 404 => return Ok(None),
            Err(e) => return Err(e),
        };
        let fins: Vec<Value> = cur
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f != finalizer)
            .collect();
        let mut next = cur.clone();
        next["metadata"]["finalizers"] = if fins.is_empty() {
            Value::Null
        } else {
            Value::Array(fins)
        };
        if let Some(m) = next["metadata"].as_object_mut() {
            if m.get("finalizers").is_some_and(Value::is_null) {
                m.remove("finalizers");
            }
        }
        self.client.update(def, ns, next).await.map(|_| None)
    }
}

async fn feed(gc: Arc<Gc>) {
    let store = gc.client.st.store.clone();
    loop {
        let list = match store
            .range(RangeRequest::new(KeyRange::prefix("/registry/")))
            .await
        {
            Ok(l) => l,
            Err(k3rs_storage::Error::ShuttingDown) => return,
            Err(e) => {
                tracing::warn!(error = %e, "garbage collector list failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        *gc.graph.lock() = Graph::default();
        for kv in &list.kvs {
            gc.upsert(&String::from_utf8_lossy(&kv.key), &kv.value);
        }
        let mut w = match store.watch(
            WatchRequest::new(KeyRange::prefix("/registry/")).start_revision(list.revision + 1),
        ) {
            Ok(w) => w,
            Err(_) => continue,
        };
        loop {
            match w.next().await {
                None => return,
                Some(Err(e)) => {
                    tracing::info!(error = %e, "garbage collector relists");
                    break;
                }
                Some(Ok(WatchMessage::Progress { .. })) => {}
                Some(Ok(WatchMessage::Events(evs))) => {
                    for e in evs {
                        let key = String::from_utf8_lossy(&e.kv.key).into_owned();
                        match e.kind {
                            EventKind::Put => gc.upsert(&key, &e.kv.value),
                            EventKind::Delete => gc.removed(&key),
                        }
                    }
                }
            }
        }
    }
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let queue = Queue::new();
    let gc = Arc::new(Gc {
        client: ctx.client("generic-garbage-collector"),
        graph: Mutex::new(Graph::default()),
        queue: queue.clone(),
    });
    let mut tasks = vec![tokio::spawn(feed(gc.clone()))];
    tasks.extend(spawn_workers(queue, 2, "garbage-collector", move |uid| {
        let gc = gc.clone();
        async move { gc.process(uid).await }
    }));
    tasks
}
