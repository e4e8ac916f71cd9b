//! The ReplicaSet and ReplicationController controller: keeps `spec.replicas` pods, adopts
//! matching orphans and releases pods that no longer match, deletes surplus pods in upstream's
//! order, and reports status.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::selectors::{from_label_selector_object, LabelSelector};
use crate::api::status::{ApiError, ApiResult};
use crate::controllers::client::{
    controller_of, is_terminating, key_of, name_of, namespace_of, split_key, uid_of, Client,
};
use crate::controllers::events::Recorder;
use crate::controllers::informer::{Change, Informer};
use crate::controllers::pods::{self, deletion_order, from_template, is_active};
use crate::controllers::queue::Queue;
use crate::controllers::{spawn_workers, Context, Expectations};

/// Pods created or deleted per reconcile at most (upstream's burst).
const BURST: usize = 500;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    ReplicaSet,
    ReplicationController,
}

impl Flavor {
    fn kind(self) -> &'static str {
        match self {
            Flavor::ReplicaSet => "ReplicaSet",
            Flavor::ReplicationController => "ReplicationController",
        }
    }
    fn manager(self) -> &'static str {
        match self {
            Flavor::ReplicaSet => "replicaset-controller",
            Flavor::ReplicationController => "replication-controller",
        }
    }
    fn selector(self, owner: &Value) -> ApiResult<LabelSelector> {
        match self {
            Flavor::ReplicaSet => from_label_selector_object(&owner["spec"]["selector"]),
            Flavor::ReplicationController => {
                from_label_selector_object(&json!({"matchLabels": owner["spec"]["selector"]}))
            }
        }
    }
}

/// What a reconcile decides, from the owner and the pods of its namespace.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Orphans to adopt (names).
    pub adopt: Vec<String>,
    /// Owned pods that no longer match, to release (names).
    pub release: Vec<String>,
    pub create: usize,
    /// Pods to delete, first to go first (names and uids).
    pub delete: Vec<(String, String)>,
}

pub fn plan(owner: &Value, selector: &LabelSelector, pods: &[Arc<Value>]) -> Plan {
    let uid = uid_of(owner);
    let replicas = owner
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1)
        .max(0) as usize;
    let mut p = Plan::default();
    let mut owned: Vec<&Value> = Vec::new();
    for pod in pods {
        let matches = !selector.is_empty() && selector.matches_object(pod);
        match controller_of(pod) {
            Some(c) if c["uid"] == uid => {
                if matches {
                    owned.push(pod);
                } else if !is_terminating(pod) {
                    p.release.push(name_of(pod).to_string());
                }
            }
            Some(_) => {}
            None => {
                if matches && !is_terminating(owner) && !is_terminating(pod) && is_active(pod) {
                    p.adopt.push(name_of(pod).to_string());
                    owned.push(pod);
                }
            }
        }
    }
    let mut active: Vec<&Value> = owned.into_iter().filter(|p| is_active(p)).collect();
    if is_terminating(owner) {
        return p;
    }
    if active.len() < replicas {
        p.create = (replicas - active.len()).min(BURST);
    } else if active.len() > replicas {
        active.sort_by(|a, b| deletion_order(a, b));
        p.delete = active
            .iter()
            .take((active.len() - replicas).min(BURST))
            .map(|p| (name_of(p).to_string(), uid_of(p).to_string()))
            .collect();
    }
    p
}

/// The status the owner should report.
pub fn status(owner: &Value, pods: &[Arc<Value>], now: jiff::Timestamp) -> Value {
    let uid = uid_of(owner);
    let min_ready = owner
        .pointer("/spec/minReadySeconds")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let template_labels = owner
        .pointer("/spec/template/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let owned: Vec<&Arc<Value>> = pods
        .iter()
        .filter(|p| controller_of(p).is_some_and(|c| c["uid"] == uid) && is_active(p))
        .collect();
    let fully_labeled = owned
        .iter()
        .filter(|p| {
            let labels = p.pointer("/metadata/labels").and_then(Value::as_object);
            template_labels
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .count();
    let ready = owned.iter().filter(|p| pods::is_ready(p)).count();
    let available = owned
        .iter()
        .filter(|p| pods::is_available(p, min_ready, now))
        .count();
    json!({
        "replicas": owned.len(),
        "fullyLabeledReplicas": fully_labeled,
        "readyReplicas": ready,
        "availableReplicas": available,
        "observedGeneration": owner.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
    })
}

struct Controller {
    flavor: Flavor,
    client: Client,
    owners: Arc<Informer>,
    pods: Arc<Informer>,
    expectations: Expectations,
    recorder: Recorder,
}

impl Controller {
    async fn sync(&self, key: String) -> ApiResult<Option<Duration>> {
        let (ns, _name) = split_key(&key);
        let ns = ns.unwrap_or_default();
        let Some(owner) = self.owners.get(&key) else {
            self.expectations.forget(&key);
            return Ok(None);
        };
        let selector = self.flavor.selector(&owner)?;
        let pods = self.pods.list_namespace(ns);
        let pod_def = self.client.def("", "v1", "pods");
        let owner_def = self.owners.def.clone();
        let mut requeue = None;
        if self.expectations.satisfied(&key) {
            let p = plan(&owner, &selector, &pods);
            for name in &p.adopt {
                let refs = json!({"metadata": {"ownerReferences": [crate::controllers::client::owner_ref(&owner, true)]}});
                if let Err(e) = self
                    .client
                    .merge_patch(&pod_def, Some(ns), name, &refs)
                    .await
                {
                    tracing::debug!(pod = %name, error = %e, "adopting");
                }
            }
            for name in &p.release {
                let _ = self
                    .client
                    .merge_patch(
                        &pod_def,
                        Some(ns),
                        name,
                        &json!({"metadata": {"ownerReferences": null}}),
                    )
                    .await;
            }
            if p.create > 0 {
                self.expectations.expect(&key, p.create as i64, 0);
                let template = owner["spec"]["template"].clone();
                let mut created = 0;
                let mut failure: Option<ApiError> = None;
                // Slow start, as upstream: 1, 2, 4, … creations, stopping at the first error.
                let mut batch = 1;
                let mut left = p.create;
                while left > 0 && failure.is_none() {
                    let n = batch.min(left);
                    let futs = (0..n).map(|_| {
                        let pod =
                            from_template(&template, &owner, &format!("{}-", name_of(&owner)), ns);
                        let client = self.client.clone();
                        let def = pod_def.clone();
                        async move { client.create(&def, Some(ns), pod).await }
                    });
                    for r in futures::future::join_all(futs).await {
                        match r {
                            Ok(pod) => {
                                created += 1;
                                self.recorder.event(
                                    &owner,
                                    "Normal",
                                    "SuccessfulCreate",
                                    format!("Created pod: {}", name_of(&pod)),
                                );
                            }
                            Err(e) => {
                                self.recorder.event(
                                    &owner,
                                    "Warning",
                                    "FailedCreate",
                                    format!("Error creating: {}", e.message),
                                );
                                failure = Some(e);
                            }
                        }
                    }
                    left -= n;
                    batch *= 2;
                }
                let skipped = p.create - created;
                self.expectations.lower(&key, skipped as i64, 0);
                if let Some(e) = failure {
                    let cond = json!({"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": e.message, "lastTransitionTime": crate::api::objects::now_rfc3339()});
                    let _ = self
                        .client
                        .merge_patch_status(
                            &owner_def,
                            Some(ns),
                            name_of(&owner),
                            &json!({"status": {"conditions": [cond]}}),
                        )
                        .await;
                    return Err(e);
                }
            } else if !p.delete.is_empty() {
                self.expectations.expect(&key, 0, p.delete.len() as i64);
                let futs = p.delete.iter().map(|(name, uid)| {
                    let client = self.client.clone();
                    let def = pod_def.clone();
                    async move {
                        (
                            name.clone(),
                            client.delete_uid(&def, Some(ns), name, uid, None).await,
                        )
                    }
                });
                for (name, r) in futures::future::join_all(futs).await {
                    match r {
                        Ok(_) => self.recorder.event(
                            &owner,
                            "Normal",
                            "SuccessfulDelete",
                            format!("Deleted pod: {name}"),
                        ),
                        Err(e) if e.code == 404 => self.expectations.lower(&key, 0, 1),
                        Err(e) => {
                            self.expectations.lower(&key, 0, 1);
                            self.recorder.event(
                                &owner,
                                "Warning",
                                "FailedDelete",
                                format!("Error deleting: {}", e.message),
                            );
                        }
                    }
                }
            }
        }
        // Status, from what the informer shows now.
        let pods = self.pods.list_namespace(ns);
        let now = jiff::Timestamp::now();
        let mut st = status(&owner, &pods, now);
        let min_ready = owner
            .pointer("/spec/minReadySeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if min_ready > 0 && st["readyReplicas"] != st["availableReplicas"] {
            requeue = Some(Duration::from_secs(1));
        }
        // Keep conditions (ReplicaFailure clears once creations succeed).
        if self.expectations.satisfied(&key) {
            st["conditions"] = Value::Null;
        }
        let current = owner.get("status").cloned().unwrap_or(json!({}));
        let changed = [
            "replicas",
            "fullyLabeledReplicas",
            "readyReplicas",
            "availableReplicas",
            "observedGeneration",
        ]
        .iter()
        .any(|f| current.get(*f).cloned().unwrap_or(json!(0)) != st[*f])
            || (st["conditions"].is_null() && current.get("conditions").is_some());
        if changed {
            self.client
                .merge_patch_status(
                    &owner_def,
                    Some(ns),
                    name_of(&owner),
                    &json!({"status": st}),
                )
                .await?;
        }
        Ok(requeue)
    }

    /// Owners a pod change concerns.
    fn owners_of(&self, pod: &Value) -> Vec<String> {
        let ns = namespace_of(pod);
        if let Some(c) = controller_of(pod) {
            if c["kind"] == self.flavor.kind() {
                return vec![format!("{ns}/{}", c["name"].as_str().unwrap_or_default())];
            }
            return vec![];
        }
        // An orphan: every owner whose selector matches may adopt it.
        self.owners
            .list_namespace(ns)
            .into_iter()
            .filter(|o| {
                self.flavor
                    .selector(o)
                    .is_ok_and(|s| !s.is_empty() && s.matches_object(pod))
            })
            .map(|o| key_of(&o))
            .collect()
    }
}

pub fn start(ctx: Arc<Context>, flavor: Flavor) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client(flavor.manager());
    let (owner_def, pod_def) = match flavor {
        Flavor::ReplicaSet => (
            client.def("apps", "v1", "replicasets"),
            client.def("", "v1", "pods"),
        ),
        Flavor::ReplicationController => (
            client.def("", "v1", "replicationcontrollers"),
            client.def("", "v1", "pods"),
        ),
    };
    let c = Arc::new(Controller {
        flavor,
        owners: ctx.informers.get(&owner_def),
        pods: ctx.informers.get(&pod_def),
        expectations: Expectations::default(),
        recorder: Recorder::new(client.clone(), flavor.manager()),
        client,
    });
    let queue = Queue::new();
    let mut tasks = Vec::new();
    {
        let c = c.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut owners_rx = c.owners.subscribe();
            let mut pods_rx = c.pods.subscribe();
            c.owners.wait_synced().await;
            c.pods.wait_synced().await;
            for o in c.owners.list() {
                queue.add(key_of(&o));
            }
            loop {
                tokio::select! {
                    Some(ch) = owners_rx.recv() => queue.add(key_of(ch.object())),
                    Some(ch) = pods_rx.recv() => {
                        let keys = match &ch {
                            Change::Added(p) => {
                                let keys = c.owners_of(p);
                                if let Some(k) = keys.first() {
                                    c.expectations.observed_add(k);
                                }
                                keys
                            }
                            Change::Deleted(p) => {
                                let keys = c.owners_of(p);
                                if let Some(k) = keys.first() {
                                    c.expectations.observed_delete(k);
                                }
                                keys
                            }
                            Change::Updated { old, new } => {
                                let mut keys = c.owners_of(new);
                                if is_terminating(new) && !is_terminating(old) {
                                    if let Some(k) = keys.first() {
                                        c.expectations.observed_delete(k);
                                    }
                                }
                                for k in c.owners_of(old) {
                                    if !keys.contains(&k) {
                                        keys.push(k);
                                    }
                                }
                                keys
                            }
                        };
                        for k in keys {
                            queue.add(k);
                        }
                    }
                    else => return,
                }
            }
        }));
    }
    let c2 = c.clone();
    tasks.extend(spawn_workers(queue, 2, flavor.manager(), move |key| {
        let c = c2.clone();
        async move { c.sync(key).await }
    }));
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(replicas: i64) -> Value {
        json!({"metadata": {"name": "rs", "uid": "u1", "namespace": "d"}, "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "a"}}}})
    }

    fn pod(name: &str, owner: Option<&str>, app: &str, phase: &str) -> Arc<Value> {
        let refs = owner
            .map(|u| json!([{"kind": "ReplicaSet", "name": "rs", "uid": u, "controller": true}]));
        Arc::new(json!({
            "metadata": {"name": name, "namespace": "d", "labels": {"app": app}, "ownerReferences": refs},
            "status": {"phase": phase}
        }))
    }

    #[test]
    fn plans_create_adopt_release_and_delete() {
        let sel = from_label_selector_object(&json!({"matchLabels": {"app": "a"}})).unwrap();
        let pods = vec![
            pod("mine", Some("u1"), "a", "Running"),
            pod("orphan", None, "a", "Running"),
            pod("other-owner", Some("u2"), "a", "Running"),
            pod("relabeled", Some("u1"), "b", "Running"),
            pod("done", Some("u1"), "a", "Succeeded"),
        ];
        let p = plan(&rs(4), &sel, &pods);
        assert_eq!(p.adopt, vec!["orphan"]);
        assert_eq!(p.release, vec!["relabeled"]);
        assert_eq!(p.create, 2, "mine + orphan are active; done does not count");
        let p = plan(&rs(1), &sel, &pods);
        assert_eq!(p.delete.len(), 1);
        let p = plan(&rs(0), &sel, &[]);
        assert_eq!(p, Plan::default());
    }
}
