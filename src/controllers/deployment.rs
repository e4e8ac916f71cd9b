//! The Deployment controller: ReplicaSets named by a hash of the pod template, rolling updates
//! within maxSurge/maxUnavailable or Recreate, pause, revision history (what `kubectl rollout
//! history/undo` read and write), cleanup beyond revisionHistoryLimit, conditions and status.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::api::objects::now_rfc3339;
use crate::api::status::ApiResult;
use crate::controllers::client::{
    controller_of, is_terminating, key_of, name_of, namespace_of, owner_ref, split_key, uid_of,
    Client,
};
use crate::controllers::events::Recorder;
use crate::controllers::history::{fnv32a, safe_encode};
use crate::controllers::informer::Informer;
use crate::controllers::pods::is_active;
use crate::controllers::queue::Queue;
use crate::controllers::{spawn_workers, Context};

pub const REVISION: &str = "deployment.kubernetes.io/revision";
const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
const DESIRED: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
const HASH_LABEL: &str = "pod-template-hash";

/// The pod-template-hash of a template (and collision count).
pub fn template_hash(template: &Value, collision_count: i64) -> String {
    let mut t = template.clone();
    strip_hash_label(&mut t);
    let mut data = serde_json::to_vec(&t).expect("JSON");
    if collision_count > 0 {
        data.extend_from_slice(&collision_count.to_le_bytes());
    }
    safe_encode(&fnv32a(&data).to_string())
}

fn strip_hash_label(t: &mut Value) {
    if let Some(l) = t
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        l.remove(HASH_LABEL);
        if l.is_empty() {
            if let Some(md) = t.get_mut("metadata").and_then(Value::as_object_mut) {
                md.remove("labels");
            }
        }
    }
    if let Some(md) = t.get_mut("metadata").and_then(Value::as_object_mut) {
        md.remove("creationTimestamp");
        if md.is_empty() {
            t.as_object_mut().map(|m| m.remove("metadata"));
        }
    }
}

/// Whether a ReplicaSet's template is the deployment's (ignoring the hash label).
pub fn same_template(rs_template: &Value, deploy_template: &Value) -> bool {
    let mut a = rs_template.clone();
    let mut b = deploy_template.clone();
    strip_hash_label(&mut a);
    strip_hash_label(&mut b);
    a == b
}

/// `maxSurge`/`maxUnavailable` against `replicas` (percentages round up for surge, down for
/// unavailability), never both zero.
pub fn resolve_fenceposts(strategy: &Value, replicas: i64) -> (i64, i64) {
    let ru = &strategy["rollingUpdate"];
    let resolve = |v: &Value, default: &str, up: bool| -> i64 {
        let v = if v.is_null() {
            json!(default)
        } else {
            v.clone()
        };
        match v {
            Value::Number(n) => n.as_i64().unwrap_or(0),
            Value::String(s) => match s.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) {
                Some(p) => {
                    let x = p * replicas;
                    if up {
                        (x + 99) / 100
                    } else {
                        x / 100
                    }
                }
                None => s.parse().unwrap_or(0),
            },
            _ => 0,
        }
    };
    let surge = resolve(&ru["maxSurge"], "25%", true);
    let mut unavailable = resolve(&ru["maxUnavailable"], "25%", false);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    (surge, unavailable)
}

fn replicas_of(v: &Value) -> i64 {
    v.pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn status_i64(v: &Value, f: &str) -> i64 {
    v.pointer(&format!("/status/{f}"))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn revision_of(rs: &Value) -> i64 {
    rs.pointer("/metadata/annotations")
        .and_then(|a| a.get(REVISION))
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// One scaling decision: set `name` to `to` replicas.
#[derive(Debug, PartialEq, Eq)]
pub struct Scale {
    pub name: String,
    pub from: i64,
    pub to: i64,
}

/// The rolling update's next step, from the new and old ReplicaSets (old sorted oldest first).
pub fn rolling_plan(replicas: i64, strategy: &Value, new: &Value, old: &[&Value]) -> Vec<Scale> {
    let (surge, unavailable) = resolve_fenceposts(strategy, replicas);
    let mut out = Vec::new();
    let new_replicas = replicas_of(new);
    let all: i64 = new_replicas + old.iter().map(|r| replicas_of(r)).sum::<i64>();
    // Scale the new ReplicaSet up within the surge.
    if new_replicas < replicas {
        let max_total = replicas + surge;
        if all < max_total {
            let up = (max_total - all).min(replicas - new_replicas);
            out.push(Scale {
                name: name_of(new).to_string(),
                from: new_replicas,
                to: new_replicas + up,
            });
        }
    } else if new_replicas > replicas {
        out.push(Scale {
            name: name_of(new).to_string(),
            from: new_replicas,
            to: replicas,
        });
    }
    // Scale old ones down while keeping minAvailable.
    let old_total: i64 = old.iter().map(|r| replicas_of(r)).sum();
    if old_total == 0 {
        return out;
    }
    let min_available = replicas - unavailable;
    let new_unavailable = (new_replicas - status_i64(new, "availableReplicas")).max(0);
    let mut max_scaled_down = all - min_available - new_unavailable;
    if max_scaled_down <= 0 {
        return out;
    }
    let mut targets: Vec<(String, i64, i64)> = old
        .iter()
        .map(|r| (name_of(r).to_string(), replicas_of(r), replicas_of(r)))
        .collect();
    // First the unhealthy pods of old ReplicaSets.
    for (i, r) in old.iter().enumerate() {
        if max_scaled_down <= 0 {
            break;
        }
        let unhealthy = (targets[i].2 - status_i64(r, "availableReplicas")).max(0);
        let down = unhealthy.min(max_scaled_down);
        targets[i].2 -= down;
        max_scaled_down -= down;
    }
    // Then available ones, as long as enough stay available.
    let available: i64 = status_i64(new, "availableReplicas")
        + old
            .iter()
            .map(|r| status_i64(r, "availableReplicas").min(replicas_of(r)))
            .sum::<i64>();
    let already_down: i64 = targets.iter().map(|t| t.1 - t.2).sum();
    let mut room =
        (available - min_available).min(all - min_available - new_unavailable - already_down);
    for t in targets.iter_mut() {
        if room <= 0 {
            break;
        }
        let down = t.2.min(room);
        t.2 -= down;
        room -= down;
    }
    for (name, from, to) in targets {
        if to != from {
            out.push(Scale { name, from, to });
        }
    }
    out
}

struct Controller {
    client: Client,
    deployments: Arc<Informer>,
    replicasets: Arc<Informer>,
    pods: Arc<Informer>,
    recorder: Recorder,
}

fn condition(
    ty: &str,
    status: &str,
    reason: &str,
    message: &str,
    old: Option<&Value>,
    progress: bool,
) -> Value {
    let now = now_rfc3339();
    let same = old.is_some_and(|o| o["status"] == status && o["reason"] == reason);
    let transition = if old.is_some_and(|o| o["status"] == status) {
        old.and_then(|o| o.get("lastTransitionTime"))
            .cloned()
            .unwrap_or(json!(now))
    } else {
        json!(now)
    };
    let update = if same && !progress {
        old.and_then(|o| o.get("lastUpdateTime"))
            .cloned()
            .unwrap_or(json!(now))
    } else {
        json!(now)
    };
    json!({"type": ty, "status": status, "reason": reason, "message": message, "lastUpdateTime": update, "lastTransitionTime": transition})
}

impl Controller {
    fn owned_replicasets(&self, d: &Value) -> Vec<Arc<Value>> {
        let uid = uid_of(d);
        let mut v: Vec<Arc<Value>> = self
            .replicasets
            .list_namespace(namespace_of(d))
            .into_iter()
            .filter(|rs| controller_of(rs).is_some_and(|c| c["uid"] == uid))
            .collect();
        v.sort_by(|a, b| {
            let ts = |r: &Value| {
                r.pointer("/metadata/creationTimestamp")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            ts(a).cmp(&ts(b)).then(name_of(a).cmp(name_of(b)))
        });
        v
    }

    async fn scale(&self, d: &Value, rs: &str, from: i64, to: i64) -> ApiResult<()> {
        let def = self.replicasets.def.clone();
        let (surge, _) = resolve_fenceposts(&d["spec"]["strategy"], replicas_of(d));
        let p = json!({
            "metadata": {"annotations": {DESIRED: replicas_of(d).to_string(), MAX_REPLICAS: (replicas_of(d) + surge).to_string()}},
            "spec": {"replicas": to},
        });
        self.client
            .merge_patch(&def, Some(namespace_of(d)), rs, &p)
            .await?;
        let verb = if to > from { "up" } else { "down" };
        self.recorder.event(
            d,
            "Normal",
            "ScalingReplicaSet",
            format!("Scaled {verb} replica set {rs} from {from} to {to}"),
        );
        Ok(())
    }

    /// Finds or creates the ReplicaSet for the current template; gives it the next revision.
    async fn new_replicaset(
        &self,
        d: &Value,
        all: &[Arc<Value>],
        create: bool,
    ) -> ApiResult<Option<Value>> {
        let ns = namespace_of(d);
        let def = self.replicasets.def.clone();
        let template = &d["spec"]["template"];
        let max_rev = all.iter().map(|r| revision_of(r)).max().unwrap_or(0);
        let existing = all
            .iter()
            .find(|r| same_template(&r["spec"]["template"], template));
        let annotations = deployment_annotations(d);
        if let Some(rs) = existing {
            let rev = revision_of(rs);
            let is_newest = all.iter().all(|r| revision_of(r) <= rev);
            let mut ann = annotations.clone();
            if !is_newest {
                // A rollback: the old ReplicaSet becomes the newest revision.
                ann.insert(REVISION.into(), json!((max_rev + 1).to_string()));
                let mut history: Vec<String> = rs
                    .pointer("/metadata/annotations")
                    .and_then(|a| a.get(REVISION_HISTORY))
                    .and_then(Value::as_str)
                    .map(|s| s.split(',').map(str::to_string).collect())
                    .unwrap_or_default();
                history.push(rev.to_string());
                ann.insert(REVISION_HISTORY.into(), json!(history.join(",")));
            }
            let cur_ann = rs
                .pointer("/metadata/annotations")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            if ann.iter().any(|(k, v)| cur_ann.get(k) != Some(v)) {
                let updated = self
                    .client
                    .merge_patch(
                        &def,
                        Some(ns),
                        name_of(rs),
                        &json!({"metadata": {"annotations": ann}}),
                    )
                    .await?;
                return Ok(Some(updated));
            }
            return Ok(Some((**rs).clone()));
        }
        if !create {
            return Ok(None);
        }
        let collision = d
            .pointer("/status/collisionCount")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let hash = template_hash(template, collision);
        let mut t = template.clone();
        t["metadata"]["labels"][HASH_LABEL] = json!(hash);
        let mut selector = d["spec"]["selector"].clone();
        selector["matchLabels"][HASH_LABEL] = json!(hash);
        let mut ann = annotations;
        ann.insert(REVISION.into(), json!((max_rev + 1).to_string()));
        let (surge, _) = resolve_fenceposts(&d["spec"]["strategy"], replicas_of(d));
        ann.insert(DESIRED.into(), json!(replicas_of(d).to_string()));
        ann.insert(
            MAX_REPLICAS.into(),
            json!((replicas_of(d) + surge).to_string()),
        );
        let mut labels = t["metadata"]["labels"].clone();
        labels[HASH_LABEL] = json!(hash);
        let rs = json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {
                "name": format!("{}-{hash}", name_of(d)),
                "namespace": ns,
                "labels": labels,
                "annotations": ann,
                "ownerReferences": [owner_ref(d, true)],
            },
            "spec": {
                "replicas": 0,
                "minReadySeconds": d.pointer("/spec/minReadySeconds").cloned().unwrap_or(json!(0)),
                "selector": selector,
                "template": t,
            },
        });
        match self.client.create(&def, Some(ns), rs).await {
            Ok(created) => Ok(Some(created)),
            Err(e) if e.code == 409 => {
                // A ReplicaSet of that name with another template: bump the collision count.
                let dd = self.deployments.def.clone();
                self.client
                    .merge_patch_status(
                        &dd,
                        Some(ns),
                        name_of(d),
                        &json!({"status": {"collisionCount": collision + 1}}),
                    )
                    .await?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    async fn sync(&self, key: String) -> ApiResult<Option<Duration>> {
        let Some(d) = self.deployments.get(&key) else {
            return Ok(None);
        };
        if is_terminating(&d) {
            return Ok(None);
        }
        let ns = split_key(&key).0.unwrap_or_default().to_string();
        let replicas = replicas_of(&d);
        let paused = d
            .pointer("/spec/paused")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let strategy = d["spec"]["strategy"].clone();
        let recreate = strategy["type"] == "Recreate";
        let all = self.owned_replicasets(&d);
        let mut requeue: Option<Duration> = None;

        // Adopt orphaned ReplicaSets matching the selector (and with our template hash label).
        let new_rs = if paused {
            self.new_replicaset(&d, &all, false).await?
        } else if recreate {
            // Old pods must be gone before the new ReplicaSet gets any.
            let old: Vec<&Arc<Value>> = all
                .iter()
                .filter(|r| !same_template(&r["spec"]["template"], &d["spec"]["template"]))
                .collect();
            let mut waiting = false;
            for r in &old {
                if replicas_of(r) > 0 {
                    self.scale(&d, name_of(r), replicas_of(r), 0).await?;
                    waiting = true;
                }
            }
            let old_uids: Vec<&str> = old.iter().map(|r| uid_of(r)).collect();
            let old_pods = self
                .pods
                .list_namespace(&ns)
                .into_iter()
                .filter(|p| {
                    controller_of(p)
                        .is_some_and(|c| old_uids.contains(&c["uid"].as_str().unwrap_or_default()))
                        && (is_active(p) || is_terminating(p))
                })
                .count();
            if waiting || old_pods > 0 {
                requeue = Some(Duration::from_millis(200));
                self.new_replicaset(&d, &all, false).await?
            } else {
                let rs = self.new_replicaset(&d, &all, true).await?;
                if let Some(rs) = &rs {
                    if replicas_of(rs) != replicas {
                        self.scale(&d, name_of(rs), replicas_of(rs), replicas)
                            .await?;
                    }
                }
                rs
            }
        } else {
            self.new_replicaset(&d, &all, true).await?
        };
        // The informer may not show the new ReplicaSet yet: work from this list.
        let mut all: Vec<Arc<Value>> = self.owned_replicasets(&d);
        if let Some(n) = &new_rs {
            all.retain(|r| uid_of(r) != uid_of(n));
            all.push(Arc::new(n.clone()));
        }
        let new_uid = new_rs
            .as_ref()
            .map(|n| uid_of(n).to_string())
            .unwrap_or_default();
        let old: Vec<&Value> = all
            .iter()
            .filter(|r| uid_of(r) != new_uid)
            .map(|r| &**r)
            .collect();
        if paused {
            // Only scaling while paused: the newest ReplicaSet with replicas takes the change.
            let active: Vec<&Arc<Value>> = all.iter().filter(|r| replicas_of(r) > 0).collect();
            if active.len() == 1 && replicas_of(active[0]) != replicas {
                self.scale(&d, name_of(active[0]), replicas_of(active[0]), replicas)
                    .await?;
            }
        } else if !recreate {
            if let Some(n) = &new_rs {
                for s in rolling_plan(replicas, &strategy, n, &old) {
                    self.scale(&d, &s.name, s.from, s.to).await?;
                }
            }
        }
        // History cleanup.
        let limit = d
            .pointer("/spec/revisionHistoryLimit")
            .and_then(Value::as_i64)
            .unwrap_or(10)
            .max(0) as usize;
        let mut idle: Vec<&Value> = old
            .iter()
            .copied()
            .filter(|r| replicas_of(r) == 0 && status_i64(r, "replicas") == 0 && !is_terminating(r))
            .collect();
        idle.sort_by_key(|r| revision_of(r));
        if idle.len() > limit {
            let rs_def = self.replicasets.def.clone();
            for r in &idle[..idle.len() - limit] {
                let _ = self
                    .client
                    .delete_uid(&rs_def, Some(&ns), name_of(r), uid_of(r), None)
                    .await;
            }
        }
        // Status.
        let all_now = self.owned_replicasets(&d);
        let new_now = all_now
            .iter()
            .find(|r| uid_of(r) == new_uid)
            .cloned()
            .or(new_rs.map(Arc::new));
        let sum = |f: &str| all_now.iter().map(|r| status_i64(r, f)).sum::<i64>();
        let total_spec: i64 = all_now.iter().map(|r| replicas_of(r)).sum();
        let available = sum("availableReplicas");
        let updated = new_now.as_ref().map_or(0, |n| status_i64(n, "replicas"));
        let (_, max_unavailable) = resolve_fenceposts(&strategy, replicas);
        let old_conds: Vec<Value> = d
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let old_cond = |t: &str| old_conds.iter().find(|c| c["type"] == t).cloned();
        let avail_cond = if available >= replicas - max_unavailable {
            condition(
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
                old_cond("Available").as_ref(),
                false,
            )
        } else {
            condition(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
                old_cond("Available").as_ref(),
                false,
            )
        };
        let new_name = new_now
            .as_ref()
            .map(|n| name_of(n).to_string())
            .unwrap_or_default();
        let complete = new_now.as_ref().is_some_and(|n| {
            status_i64(n, "availableReplicas") >= replicas && replicas_of(n) == replicas
        }) && all_now
            .iter()
            .filter(|r| uid_of(r) != new_uid)
            .all(|r| status_i64(r, "replicas") == 0);
        let prev_progress = old_cond("Progressing");
        let old_status = d.get("status").cloned().unwrap_or(json!({}));
        let progressed = old_status["updatedReplicas"].as_i64().unwrap_or(-1) != updated
            || old_status["availableReplicas"].as_i64().unwrap_or(-1) != available
            || old_status["replicas"].as_i64().unwrap_or(-1) != sum("replicas");
        let deadline = d
            .pointer("/spec/progressDeadlineSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(600);
        let progress_cond = if paused {
            condition(
                "Progressing",
                "Unknown",
                "DeploymentPaused",
                "Deployment is paused",
                prev_progress.as_ref(),
                false,
            )
        } else if complete {
            condition(
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                &format!("ReplicaSet \"{new_name}\" has successfully progressed."),
                prev_progress.as_ref(),
                false,
            )
        } else {
            let stalled = !progressed
                && prev_progress.as_ref().is_some_and(|c| {
                    c["lastUpdateTime"]
                        .as_str()
                        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                        .is_some_and(|t| {
                            jiff::Timestamp::now().as_second() - t.as_second() > deadline
                        })
                });
            if stalled
                || prev_progress
                    .as_ref()
                    .is_some_and(|c| c["reason"] == "ProgressDeadlineExceeded" && !progressed)
            {
                condition(
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    &format!("ReplicaSet \"{new_name}\" has timed out progressing."),
                    prev_progress.as_ref(),
                    false,
                )
            } else {
                let reason = if prev_progress.is_none() {
                    "NewReplicaSetCreated"
                } else {
                    "ReplicaSetUpdated"
                };
                let msg = if reason == "NewReplicaSetCreated" {
                    format!("Created new replica set \"{new_name}\"")
                } else {
                    format!("ReplicaSet \"{new_name}\" is progressing.")
                };
                condition(
                    "Progressing",
                    "True",
                    reason,
                    &msg,
                    prev_progress.as_ref(),
                    progressed,
                )
            }
        };
        if !complete && !paused {
            requeue = Some(
                requeue
                    .unwrap_or(Duration::from_secs(5))
                    .min(Duration::from_secs(5)),
            );
        }
        let status = json!({
            "observedGeneration": d.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
            "replicas": sum("replicas"),
            "updatedReplicas": updated,
            "readyReplicas": sum("readyReplicas"),
            "availableReplicas": available,
            "unavailableReplicas": (total_spec.max(replicas) - available).max(0),
            "conditions": [avail_cond, progress_cond],
            "collisionCount": d.pointer("/status/collisionCount").cloned().unwrap_or(Value::Null),
        });
        let strip_times = |v: &Value| {
            let mut v = v.clone();
            if let Some(cs) = v.get_mut("conditions").and_then(Value::as_array_mut) {
                for c in cs {
                    if let Some(m) = c.as_object_mut() {
                        m.remove("lastUpdateTime");
                        m.remove("lastTransitionTime");
                    }
                }
            }
            if let Some(m) = v.as_object_mut() {
                m.retain(|_, x| !x.is_null());
            }
            v
        };
        let dd = self.deployments.def.clone();
        // The deployment carries its current revision (kubectl rollout undo reads and patches it).
        if let Some(n) = &new_now {
            let rev = revision_of(n).to_string();
            let cur = d
                .pointer("/metadata/annotations")
                .and_then(|a| a.get(REVISION))
                .and_then(Value::as_str);
            if cur != Some(rev.as_str()) && rev != "0" {
                self.client
                    .merge_patch(
                        &dd,
                        Some(&ns),
                        name_of(&d),
                        &json!({"metadata": {"annotations": {REVISION: rev}}}),
                    )
                    .await?;
            }
        }
        if strip_times(&status) != strip_times(&old_status) || progressed {
            self.client
                .merge_patch_status(&dd, Some(&ns), name_of(&d), &json!({"status": status}))
                .await?;
        }
        Ok(requeue)
    }
}

/// Annotations a deployment passes on to its ReplicaSets (change-cause and the like).
fn deployment_annotations(d: &Value) -> Map<String, Value> {
    d.pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(k, _)| {
                    !k.starts_with("deployment.kubernetes.io/")
                        && k.as_str() != "kubectl.kubernetes.io/last-applied-configuration"
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client("deployment-controller");
    let c = Arc::new(Controller {
        deployments: ctx.informers.get(&client.def("apps", "v1", "deployments")),
        replicasets: ctx.informers.get(&client.def("apps", "v1", "replicasets")),
        pods: ctx.informers.get(&client.def("", "v1", "pods")),
        recorder: Recorder::new(client.clone(), "deployment-controller"),
        client,
    });
    let queue = Queue::new();
    let mut tasks = Vec::new();
    {
        let c = c.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut d_rx = c.deployments.subscribe();
            let mut rs_rx = c.replicasets.subscribe();
            let mut pod_rx = c.pods.subscribe();
            c.deployments.wait_synced().await;
            c.replicasets.wait_synced().await;
            for d in c.deployments.list() {
                queue.add(key_of(&d));
            }
            loop {
                tokio::select! {
                    Some(ch) = d_rx.recv() => queue.add(key_of(ch.object())),
                    Some(ch) = rs_rx.recv() => {
                        let rs = ch.object();
                        if let Some(o) = controller_of(rs).filter(|o| o["kind"] == "Deployment") {
                            queue.add(format!("{}/{}", namespace_of(rs), o["name"].as_str().unwrap_or_default()));
                        }
                    }
                    Some(ch) = pod_rx.recv() => {
                        // Recreate waits for old pods to go.
                        if let crate::controllers::informer::Change::Deleted(p) = &ch {
                            if let Some(rs_ref) = controller_of(p).filter(|o| o["kind"] == "ReplicaSet") {
                                let rs_key = format!("{}/{}", namespace_of(p), rs_ref["name"].as_str().unwrap_or_default());
                                if let Some(rs) = c.replicasets.get(&rs_key) {
                                    if let Some(o) = controller_of(&rs).filter(|o| o["kind"] == "Deployment") {
                                        queue.add(format!("{}/{}", namespace_of(p), o["name"].as_str().unwrap_or_default()));
                                    }
                                }
                            }
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
        "deployment-controller",
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

    fn rs(name: &str, replicas: i64, available: i64) -> Value {
        json!({"metadata": {"name": name}, "spec": {"replicas": replicas}, "status": {"replicas": replicas, "availableReplicas": available}})
    }

    #[test]
    fn fenceposts_round_as_upstream() {
        let s = json!({"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}});
        assert_eq!(resolve_fenceposts(&s, 10), (3, 2));
        assert_eq!(resolve_fenceposts(&json!({}), 1), (1, 0));
        assert_eq!(
            resolve_fenceposts(
                &json!({"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}),
                4
            ),
            (0, 1)
        );
    }

    #[test]
    fn a_rollout_surges_then_scales_old_down_keeping_availability() {
        let strategy = json!({"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
        // Start: old has 3 available, new has 0.
        let new = rs("new", 0, 0);
        let old = rs("old", 3, 3);
        let p = rolling_plan(3, &strategy, &new, &[&old]);
        assert_eq!(
            p,
            vec![Scale {
                name: "new".into(),
                from: 0,
                to: 1
            }]
        );
        // New pod not yet available: nothing may go down.
        let new = rs("new", 1, 0);
        assert!(rolling_plan(3, &strategy, &new, &[&old]).is_empty());
        // New pod available: one old pod can go.
        let new = rs("new", 1, 1);
        assert_eq!(
            rolling_plan(3, &strategy, &new, &[&old]),
            vec![Scale {
                name: "old".into(),
                from: 3,
                to: 2
            }]
        );
        let old = rs("old", 2, 2);
        assert_eq!(
            rolling_plan(3, &strategy, &new, &[&old]),
            vec![Scale {
                name: "new".into(),
                from: 1,
                to: 2
            }]
        );
    }

    #[test]
    fn template_hashes_ignore_the_hash_label_and_use_upstream_alphabet() {
        let t = json!({"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
        let mut t2 = t.clone();
        t2["metadata"]["labels"][HASH_LABEL] = json!("xyz");
        assert_eq!(template_hash(&t, 0), template_hash(&t2, 0));
        assert_ne!(template_hash(&t, 0), template_hash(&t, 1));
        assert!(template_hash(&t, 0)
            .chars()
            .all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)));
        assert!(same_template(&t2, &t));
    }
}
