//! The resource quota controller: each ResourceQuota's `status.hard` is its `spec.hard` and
//! `status.used` what the namespace's objects use of it (upstream's evaluators, shared with
//! quota admission in `api/admission/quota.rs`). Objects of the counted kinds are watched
//! through shared informers (created when a quota first names a kind); any change in a
//! namespace re-syncs that namespace's quotas, and every quota is re-synced every 5 minutes.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{SelectAll, Stream, StreamExt};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::admission::quota::{add, counts, list_json, quota_matches, usage, Qty, Usage};
use crate::api::resources::ResourceDef;
use crate::api::status::ApiError;
use crate::controllers::client::{key_of, namespace_of, split_key, Client};
use crate::controllers::informer::{Change, Informer};
use crate::controllers::queue::Queue;
use crate::controllers::{spawn_workers, Context};

const RESYNC: Duration = Duration::from_secs(300);

/// The kinds with their own evaluators, always considered.
const BUILTIN: [(&str, &str); 7] = [
    ("", "pods"),
    ("", "services"),
    ("", "persistentvolumeclaims"),
    ("", "configmaps"),
    ("", "secrets"),
    ("", "replicationcontrollers"),
    ("", "resourcequotas"),
];

/// The (group, plural) pairs whose objects count toward some of `hard`'s names: the built-in
/// evaluators', and `count/<plural>.<group>` of any other kind.
pub fn counted_kinds(hard: &BTreeSet<String>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = BUILTIN
        .iter()
        .filter(|(g, p)| hard.iter().any(|n| counts(g, p, n)))
        .map(|(g, p)| (g.to_string(), p.to_string()))
        .collect();
    for n in hard {
        let Some(res) = n.strip_prefix("count/") else {
            continue;
        };
        let (plural, group) = res.split_once('.').unwrap_or((res, ""));
        if !out.iter().any(|(g, p)| g == group && p == plural)
            && !BUILTIN.iter().any(|(g, p)| *g == group && *p == plural)
        {
            out.push((group.to_string(), plural.to_string()));
        }
    }
    out
}

/// The quota's usage over the namespace's objects, per kind (upstream's `CalculateUsage`):
/// every name of `spec.hard` some evaluator counts, zero when nothing uses it.
pub fn calculate(quota: &Value, objects: &[(String, String, Vec<Arc<Value>>)], now: i64) -> Usage {
    let hard: BTreeSet<String> = quota
        .pointer("/spec/hard")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let mut used = Usage::new();
    for (g, p, objs) in objects {
        let names: BTreeSet<&String> = hard.iter().filter(|n| counts(g, p, n)).collect();
        if names.is_empty() {
            continue;
        }
        for n in &names {
            used.entry((*n).clone()).or_insert(Qty::int(0));
        }
        for o in objs {
            if !quota_matches(g, p, quota, &hard, o) {
                continue;
            }
            let u: Usage = usage(g, p, o, now)
                .into_iter()
                .filter(|(k, _)| names.contains(k))
                .collect();
            used = add(&used, &u);
        }
    }
    used
}

/// The status patch that brings `quota` to `hard`/`used` (`None`: already there). Names no
/// longer present are removed (merge patch nulls).
pub fn status_patch(quota: &Value, used: &Usage) -> Option<Value> {
    let hard = quota.pointer("/spec/hard").cloned().unwrap_or(json!({}));
    let want_used = list_json(used);
    let cur_hard = quota.pointer("/status/hard").cloned().unwrap_or(json!({}));
    let cur_used = quota.pointer("/status/used").cloned().unwrap_or(json!({}));
    if cur_hard == hard && cur_used == want_used && quota.pointer("/status/hard").is_some() {
        return None;
    }
    let with_nulls = |want: &Value, cur: &Value| -> Value {
        let mut m = want.as_object().cloned().unwrap_or_default();
        for k in cur.as_object().into_iter().flat_map(|c| c.keys()) {
            m.entry(k.clone()).or_insert(Value::Null);
        }
        Value::Object(m)
    };
    Some(json!({"status": {
        "hard": with_nulls(&hard, &cur_hard),
        "used": with_nulls(&want_used, &cur_used),
    }}))
}

type ChangeStream = Pin<Box<dyn Stream<Item = Change> + Send>>;

struct Controller {
    ctx: Arc<Context>,
    client: Client,
    quotas: Arc<Informer>,
    /// Informers of the kinds quotas count, by (group, plural).
    watched: Mutex<BTreeMap<(String, String), Arc<Informer>>>,
    /// New subscriptions for the dispatcher task.
    streams: mpsc::UnboundedSender<ChangeStream>,
}

fn stream_of(mut rx: mpsc::UnboundedReceiver<Change>) -> ChangeStream {
    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

impl Controller {
    fn def_of(&self, group: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.ctx
            .st
            .registry
            .all()
            .into_iter()
            .find(|d| d.group == group && d.plural == plural && d.namespaced)
    }

    /// The informer of a counted kind, created (and subscribed to) on first use.
    async fn informer(&self, group: &str, plural: &str) -> Option<Arc<Informer>> {
        let key = (group.to_string(), plural.to_string());
        let existing = self.watched.lock().get(&key).cloned();
        let inf = match existing {
            Some(i) => i,
            None => {
                let def = self.def_of(group, plural)?;
                let inf = self.ctx.informers.get(&def);
                let mut w = self.watched.lock();
                if let Some(i) = w.get(&key) {
                    i.clone()
                } else {
                    let _ = self.streams.send(stream_of(inf.subscribe()));
                    w.insert(key, inf.clone());
                    inf
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), inf.wait_synced())
            .await
            .ok()?;
        Some(inf)
    }

    async fn sync(&self, key: String) -> Result<Option<Duration>, ApiError> {
        let Some(q) = self.quotas.get(&key) else {
            return Ok(None);
        };
        let (ns, name) = split_key(&key);
        let hard: BTreeSet<String> = q
            .pointer("/spec/hard")
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let mut objects = Vec::new();
        for (g, p) in counted_kinds(&hard) {
            let list = if (g.as_str(), p.as_str()) == ("", "resourcequotas") {
                self.quotas.list_namespace(ns.unwrap_or_default())
            } else {
                match self.informer(&g, &p).await {
                    Some(inf) => inf.list_namespace(ns.unwrap_or_default()),
                    None => continue,
                }
            };
            objects.push((g, p, list));
        }
        let used = calculate(&q, &objects, jiff::Timestamp::now().as_second());
        if let Some(patch) = status_patch(&q, &used) {
            let def = self.quotas.def.clone();
            match self.client.merge_patch_status(&def, ns, name, &patch).await {
                Err(e) if e.code == 404 => return Ok(None),
                r => {
                    r?;
                }
            }
        }
        Ok(Some(RESYNC))
    }
}

/// Whether a quota change needs a sync (new, or its limits changed); usage charged by
/// admission does not.
fn quota_needs_sync(ch: &Change) -> bool {
    match ch {
        Change::Added(_) => true,
        Change::Updated { old, new } => {
            old.pointer("/spec") != new.pointer("/spec") || new.pointer("/status/hard").is_none()
        }
        Change::Deleted(_) => false,
    }
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client("resourcequota-controller");
    let quotas = ctx.informers.get(&client.def("", "v1", "resourcequotas"));
    let (tx, mut new_streams) = mpsc::unbounded_channel::<ChangeStream>();
    let c = Arc::new(Controller {
        ctx: ctx.clone(),
        client,
        quotas,
        watched: Mutex::new(BTreeMap::new()),
        streams: tx,
    });
    let queue = Queue::new();
    let mut tasks = Vec::new();
    {
        let c = c.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut quotas_rx = c.quotas.subscribe();
            // Pods are watched from the start (the most common quota); other kinds when a
            // quota names them.
            if let Some(def) = c.def_of("", "pods") {
                let inf = c.ctx.informers.get(&def);
                let _ = c.streams.send(stream_of(inf.subscribe()));
                c.watched.lock().insert(("".into(), "pods".into()), inf);
            }
            c.quotas.wait_synced().await;
            for q in c.quotas.list() {
                queue.add(key_of(&q));
            }
            let mut objects: SelectAll<ChangeStream> = SelectAll::new();
            loop {
                tokio::select! {
                    Some(ch) = quotas_rx.recv() => {
                        if quota_needs_sync(&ch) {
                            queue.add(key_of(ch.object()));
                        }
                        // A quota counts quotas: the namespace's others change too.
                        if !matches!(ch, Change::Updated { .. }) {
                            for q in c.quotas.list_namespace(namespace_of(ch.object())) {
                                queue.add(key_of(&q));
                            }
                        }
                    }
                    Some(s) = new_streams.recv() => objects.push(s),
                    Some(ch) = objects.next(), if !objects.is_empty() => {
                        for q in c.quotas.list_namespace(namespace_of(ch.object())) {
                            queue.add(key_of(&q));
                        }
                    }
                    else => return,
                }
            }
        }));
    }
    let c2 = c.clone();
    tasks.extend(spawn_workers(
        queue,
        2,
        "resourcequota-controller",
        move |key| {
            let c = c2.clone();
            async move { c.sync(key).await }
        },
    ));
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, cpu: &str, phase: &str) -> Arc<Value> {
        Arc::new(json!({"metadata": {"name": name, "namespace": "d"},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}}}]},
            "status": {"phase": phase}}))
    }

    #[test]
    fn usage_sums_live_pods_and_skips_terminal_ones() {
        let q = json!({"metadata": {"name": "q"}, "spec": {"hard": {
            "pods": "10", "count/pods": "10", "requests.cpu": "4", "requests.memory": "1Gi", "services": "2"}}});
        let pods = vec![
            pod("a", "500m", "Running"),
            pod("b", "250m", "Pending"),
            pod("c", "1", "Succeeded"),
        ];
        let objects = vec![
            ("".to_string(), "pods".to_string(), pods),
            (
                "".to_string(),
                "services".to_string(),
                vec![Arc::new(json!({"spec": {}}))],
            ),
        ];
        let used = calculate(&q, &objects, 0);
        assert_eq!(
            list_json(&used),
            json!({"pods": "2", "count/pods": "3", "requests.cpu": "750m", "requests.memory": "128Mi", "services": "1"})
        );
        let patch = status_patch(&q, &used).unwrap();
        assert_eq!(patch["status"]["hard"], q["spec"]["hard"]);
        let mut synced = q.clone();
        synced["status"] = json!({"hard": q["spec"]["hard"], "used": list_json(&used)});
        assert!(
            status_patch(&synced, &used).is_none(),
            "nothing to write once in sync"
        );
    }

    #[test]
    fn unused_resources_show_zero_and_removed_ones_are_dropped() {
        let q = json!({"spec": {"hard": {"configmaps": "3"}}, "status": {"hard": {"secrets": "1"}, "used": {"secrets": "0"}}});
        let used = calculate(&q, &[("".into(), "configmaps".into(), vec![])], 0);
        let patch = status_patch(&q, &used).unwrap();
        assert_eq!(
            patch["status"]["used"],
            json!({"configmaps": "0", "secrets": null})
        );
        assert_eq!(
            patch["status"]["hard"],
            json!({"configmaps": "3", "secrets": null})
        );
    }

    #[test]
    fn object_counts_name_their_kinds() {
        let hard: BTreeSet<String> = [
            "count/deployments.apps",
            "count/pods",
            "requests.storage",
            "count/serviceaccounts",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let kinds = counted_kinds(&hard);
        assert!(kinds.contains(&("".into(), "pods".into())));
        assert!(kinds.contains(&("".into(), "persistentvolumeclaims".into())));
        assert!(kinds.contains(&("apps".into(), "deployments".into())));
        assert!(kinds.contains(&("".into(), "serviceaccounts".into())));
    }
}
