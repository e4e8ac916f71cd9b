//! Taint-based eviction (kube-controller-manager's taint eviction controller) and the part of
//! pod GC that deals with lost nodes:
//!
//! - a pod on a node with a NoExecute taint it does not tolerate is deleted at once; one whose
//!   matching tolerations all carry `tolerationSeconds` is deleted when the smallest of them
//!   has passed since the taint's `timeAdded`; without `tolerationSeconds` it stays. Deletion
//!   is graceful, after a `DisruptionTarget` condition (reason `DeletionByTaintManager`), with
//!   upstream's `TaintManagerEviction` event "Marking for deletion Pod ns/name".
//! - a pod bound to a node that no longer exists is force-deleted (grace 0) as pod GC does for
//!   orphaned pods: at once when the node was seen deleted, after upstream's 40 s quarantine
//!   when it was never seen (it may be a node about to register).
//! - k3rs's choice for terminating pods on an unreachable node (no kubelet will ever confirm
//!   their end): once their grace period has expired (deletionTimestamp +
//!   deletionGracePeriodSeconds — k3rs stamps deletionTimestamp at the delete), they are
//!   force-deleted, so that they stop being counted and their names can be reused. Upstream
//!   leaves them until the node returns, is deleted or gets the `out-of-service` taint.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::api::objects::{now_rfc3339, DeleteOpts};
use crate::api::resources::ResourceDef;
use crate::api::status::ApiResult;
use crate::controllers::client::{is_terminating, key_of, name_of, split_key, uid_of, Client};
use crate::controllers::events::Recorder;
use crate::controllers::informer::{Change, Informer};
use crate::controllers::nodelifecycle::UNREACHABLE;
use crate::controllers::queue::Queue;
use crate::controllers::{spawn_workers, Context};

/// How long a pod bound to a never-seen node waits before it counts as orphaned (upstream's
/// pod GC quarantine).
pub const ORPHAN_QUARANTINE: Duration = Duration::from_secs(40);
/// Nodes seen deleted are remembered this long.
const DELETED_MEMORY: Duration = Duration::from_secs(600);

/// Where a pod's node stands, as observed.
#[derive(Debug, Clone, Copy)]
pub enum NodeState<'a> {
    Present(&'a Value),
    /// Seen deleted.
    Deleted,
    /// Not seen (yet) for this long.
    Missing(Duration),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    /// Graceful deletion now (NoExecute taint).
    Evict,
    /// Look again after this long.
    Wait(Duration),
    /// Deletion with grace 0 (orphaned, or terminating on an unreachable node past its grace).
    ForceDelete,
}

fn ts(v: Option<&Value>) -> Option<jiff::Timestamp> {
    v.and_then(Value::as_str).and_then(|s| s.parse().ok())
}

fn until(now: jiff::Timestamp, t: jiff::Timestamp) -> Duration {
    let ms = t.as_millisecond() - now.as_millisecond();
    Duration::from_millis(ms.max(0) as u64)
}

/// Whether a toleration matches a NoExecute taint (upstream's `ToleratesTaint`).
fn tolerates(tol: &Value, taint: &Value) -> bool {
    let effect = tol["effect"].as_str().unwrap_or_default();
    if !effect.is_empty() && effect != "NoExecute" {
        return false;
    }
    let key = tol["key"].as_str().unwrap_or_default();
    if !key.is_empty() && taint["key"].as_str() != Some(key) {
        return false;
    }
    match tol["operator"].as_str().unwrap_or_default() {
        "Exists" => true,
        "" | "Equal" => {
            tol["value"].as_str().unwrap_or_default() == taint["value"].as_str().unwrap_or_default()
        }
        _ => false,
    }
}

/// The pod's fate given its node. `observed_since` is when this controller first saw the pod
/// under its node's current NoExecute taints: the toleration time counts from the taints'
/// `timeAdded`, but never from before that observation (timeAdded has whole-second precision,
/// and a restarted controller starts afresh, as upstream's does).
pub fn decide(
    pod: &Value,
    node: NodeState,
    now: jiff::Timestamp,
    observed_since: jiff::Timestamp,
) -> Decision {
    if pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .is_empty()
    {
        return Decision::Nothing;
    }
    let node = match node {
        NodeState::Deleted => return Decision::ForceDelete,
        NodeState::Missing(d) if d >= ORPHAN_QUARANTINE => return Decision::ForceDelete,
        NodeState::Missing(d) => return Decision::Wait(ORPHAN_QUARANTINE - d),
        NodeState::Present(n) => n,
    };
    let no_execute: Vec<&Value> = node
        .pointer("/spec/taints")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter(|t| t["effect"] == "NoExecute").collect())
        .unwrap_or_default();
    if is_terminating(pod) {
        if !no_execute.iter().any(|t| t["key"] == UNREACHABLE) {
            return Decision::Nothing;
        }
        let Some(deleted) = ts(pod.pointer("/metadata/deletionTimestamp")) else {
            return Decision::Nothing;
        };
        let grace = pod
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            .max(0);
        let expiry = deleted
            .checked_add(jiff::SignedDuration::from_secs(grace))
            .unwrap_or(deleted);
        return if now >= expiry {
            Decision::ForceDelete
        } else {
            Decision::Wait(until(now, expiry))
        };
    }
    if no_execute.is_empty() {
        return Decision::Nothing;
    }
    let tolerations: Vec<Value> = pod
        .pointer("/spec/tolerations")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut min: Option<i64> = None;
    for t in &no_execute {
        let used: Vec<&Value> = tolerations.iter().filter(|tol| tolerates(tol, t)).collect();
        if used.is_empty() {
            return Decision::Evict;
        }
        for tol in used {
            if let Some(s) = tol["tolerationSeconds"].as_i64() {
                min = Some(min.map_or(s, |m| m.min(s)));
            }
        }
    }
    let Some(secs) = min else {
        return Decision::Nothing; // tolerated forever
    };
    let start = no_execute
        .iter()
        .map(|t| ts(t.get("timeAdded")).unwrap_or(observed_since))
        .min()
        .unwrap_or(observed_since)
        .max(observed_since);
    let deadline = start
        .checked_add(jiff::SignedDuration::from_secs(secs.max(0)))
        .unwrap_or(start);
    if now >= deadline {
        Decision::Evict
    } else {
        Decision::Wait(until(now, deadline))
    }
}

fn node_of(p: &Value) -> &str {
    p.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn no_execute_taints(n: &Value) -> Vec<Value> {
    n.pointer("/spec/taints")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter(|t| t["effect"] == "NoExecute")
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Default)]
struct State {
    /// Pods by the node they are bound to.
    by_node: HashMap<String, BTreeSet<String>>,
    /// Nodes seen deleted, and when.
    deleted_nodes: HashMap<String, Instant>,
    /// Pods whose node was not seen, since when.
    missing_since: HashMap<String, Instant>,
    /// When this controller first saw a pod under NoExecute taints without timeAdded.
    first_tainted: HashMap<String, jiff::Timestamp>,
}

impl State {
    fn forget_pod(&mut self, key: &str, node: &str) {
        if let Some(s) = self.by_node.get_mut(node) {
            s.remove(key);
            if s.is_empty() {
                self.by_node.remove(node);
            }
        }
        self.missing_since.remove(key);
        self.first_tainted.remove(key);
    }

    fn pods_on(&self, node: &str) -> Vec<String> {
        self.by_node
            .get(node)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

struct Controller {
    pods: Arc<Informer>,
    nodes: Arc<Informer>,
    pod_def: Arc<ResourceDef>,
    state: Mutex<State>,
    client: Client,
    recorder: Recorder,
}

impl Controller {
    async fn sync(&self, key: String) -> ApiResult<Option<Duration>> {
        let Some(pod) = self.pods.get(&key) else {
            return Ok(None);
        };
        let node_name = node_of(&pod).to_string();
        if node_name.is_empty() {
            return Ok(None);
        }
        let node = self.nodes.get(&node_name);
        let now = jiff::Timestamp::now();
        let (node_state, observed_since) = {
            let mut s = self.state.lock();
            let state = match &node {
                Some(n) => {
                    s.missing_since.remove(&key);
                    NodeState::Present(n)
                }
                None if s.deleted_nodes.contains_key(&node_name) => NodeState::Deleted,
                None => NodeState::Missing(
                    s.missing_since
                        .entry(key.clone())
                        .or_insert_with(Instant::now)
                        .elapsed(),
                ),
            };
            let since = *s.first_tainted.entry(key.clone()).or_insert(now);
            (state, since)
        };
        let d = decide(&pod, node_state, now, observed_since);
        if d == Decision::Nothing {
            self.state.lock().first_tainted.remove(&key);
        }
        let (ns, name) = split_key(&key);
        match d {
            Decision::Nothing => Ok(None),
            Decision::Wait(after) => Ok(Some(after + Duration::from_millis(5))),
            Decision::ForceDelete => {
                let opts = DeleteOpts {
                    grace_period: Some(0),
                    precondition_uid: Some(uid_of(&pod).to_string()),
                    ..Default::default()
                };
                tracing::info!(pod = %key, node = %node_name, "force-deleting a pod of a lost node");
                match self.client.delete(&self.pod_def, ns, name, &opts).await {
                    Ok(_) => Ok(None),
                    Err(e) if e.code == 404 => Ok(None),
                    Err(e) => Err(e),
                }
            }
            Decision::Evict => {
                let cond = json!({"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
                    "message": "Taint manager: deleting due to NoExecute taint", "lastTransitionTime": now_rfc3339()});
                let mut conds: Vec<Value> = pod
                    .pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                conds.retain(|c| c["type"] != "DisruptionTarget");
                conds.push(cond);
                match self
                    .client
                    .merge_patch_status(
                        &self.pod_def,
                        ns,
                        name,
                        &json!({"status": {"conditions": conds}}),
                    )
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.code == 404 => return Ok(None),
                    Err(e) => tracing::debug!(pod = %key, error = %e, "adding DisruptionTarget"),
                }
                self.recorder.event(
                    &pod,
                    "Normal",
                    "TaintManagerEviction",
                    format!("Marking for deletion Pod {key}"),
                );
                match self
                    .client
                    .delete_uid(&self.pod_def, ns, name, uid_of(&pod), None)
                    .await
                {
                    Ok(_) => Ok(None),
                    Err(e) if e.code == 404 => Ok(None),
                    Err(e) => Err(e),
                }
            }
        }
    }
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client("taint-eviction-controller");
    let pod_def = client.def("", "v1", "pods");
    let c = Arc::new(Controller {
        pods: ctx.informers.get(&pod_def),
        nodes: ctx.informers.get(&client.def("", "v1", "nodes")),
        pod_def,
        state: Mutex::new(State::default()),
        recorder: Recorder::new(client.clone(), "taint-eviction-controller"),
        client,
    });
    let queue = Queue::new();
    let mut tasks = Vec::new();
    {
        let c = c.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut pods_rx = c.pods.subscribe();
            let mut nodes_rx = c.nodes.subscribe();
            c.pods.wait_synced().await;
            c.nodes.wait_synced().await;
            for p in c.pods.list() {
                let key = key_of(&p);
                let node = node_of(&p);
                if !node.is_empty() {
                    c.state
                        .lock()
                        .by_node
                        .entry(node.to_string())
                        .or_default()
                        .insert(key.clone());
                    queue.add(key);
                }
            }
            loop {
                tokio::select! {
                    Some(ch) = pods_rx.recv() => {
                        let p = ch.object();
                        let key = key_of(p);
                        match &ch {
                            Change::Deleted(_) => c.state.lock().forget_pod(&key, node_of(p)),
                            Change::Added(_) | Change::Updated { .. } => {
                                let node = node_of(p);
                                if node.is_empty() {
                                    continue;
                                }
                                c.state.lock().by_node.entry(node.to_string()).or_default().insert(key.clone());
                                queue.add(key);
                            }
                        }
                    }
                    Some(ch) = nodes_rx.recv() => {
                        let n = ch.object();
                        let name = name_of(n).to_string();
                        let relevant = {
                            let mut s = c.state.lock();
                            match &ch {
                                Change::Added(_) => {
                                    s.deleted_nodes.remove(&name);
                                    true
                                }
                                Change::Deleted(_) => {
                                    s.deleted_nodes.retain(|_, at| at.elapsed() < DELETED_MEMORY);
                                    s.deleted_nodes.insert(name.clone(), Instant::now());
                                    true
                                }
                                Change::Updated { old, new } => no_execute_taints(old) != no_execute_taints(new),
                            }
                        };
                        if relevant {
                            let pods = c.state.lock().pods_on(&name);
                            for k in pods {
                                queue.add(k);
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
        4,
        "taint-eviction-controller",
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

    fn t(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    const T0: &str = "2025-01-01T00:00:00Z";

    fn pod(tolerations: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"nodeName": "n1", "tolerations": tolerations}})
    }

    fn node(taints: Value) -> Value {
        json!({"metadata": {"name": "n1"}, "spec": {"taints": taints}})
    }

    fn unreachable() -> Value {
        node(json!([
            {"key": UNREACHABLE, "effect": "NoExecute", "timeAdded": T0},
            {"key": UNREACHABLE, "effect": "NoSchedule", "timeAdded": T0},
        ]))
    }

    /// Decides at `now` for a pod first seen under its taints at T0.
    fn at(pod: &Value, node: NodeState, now: &str) -> Decision {
        decide(pod, node, t(now), t(T0))
    }

    #[test]
    fn untolerated_no_execute_taints_evict_at_once() {
        let p = pod(json!([]));
        assert_eq!(
            at(&p, NodeState::Present(&unreachable()), T0),
            Decision::Evict
        );
        // A toleration of the NoSchedule effect only does not cover NoExecute.
        let p = pod(json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoSchedule"}]));
        assert_eq!(
            at(&p, NodeState::Present(&unreachable()), T0),
            Decision::Evict
        );
        // NoSchedule-only taints never evict.
        let n = node(json!([{"key": "x", "effect": "NoSchedule"}]));
        assert_eq!(
            at(&pod(json!([])), NodeState::Present(&n), T0),
            Decision::Nothing
        );
    }

    #[test]
    fn tolerated_taints_evict_after_the_smallest_toleration_seconds_from_time_added() {
        let p = pod(json!([
            {"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            {"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 2},
        ]));
        let n = unreachable();
        assert_eq!(
            at(&p, NodeState::Present(&n), "2025-01-01T00:00:01.500Z"),
            Decision::Wait(Duration::from_millis(500))
        );
        assert_eq!(
            at(&p, NodeState::Present(&n), "2025-01-01T00:00:02Z"),
            Decision::Evict
        );
        // Without tolerationSeconds: tolerated forever.
        let forever = pod(json!([{"key": UNREACHABLE, "operator": "Exists"}]));
        assert_eq!(
            at(&forever, NodeState::Present(&n), "2030-01-01T00:00:00Z"),
            Decision::Nothing
        );
        // Equal needs the value.
        let wrong =
            pod(json!([{"key": "k", "operator": "Equal", "value": "a", "tolerationSeconds": 9}]));
        let kv = node(json!([{"key": "k", "value": "b", "effect": "NoExecute", "timeAdded": T0}]));
        assert_eq!(at(&wrong, NodeState::Present(&kv), T0), Decision::Evict);
    }

    #[test]
    fn toleration_time_counts_from_time_added_but_not_before_the_taint_was_seen() {
        let p = pod(json!([{"operator": "Exists", "tolerationSeconds": 10}]));
        let n = node(json!([{"key": "k", "effect": "NoExecute"}]));
        let d = decide(&p, NodeState::Present(&n), t("2025-01-01T00:00:04Z"), t(T0));
        assert_eq!(d, Decision::Wait(Duration::from_secs(6)), "no timeAdded");
        // timeAdded is whole seconds: a taint added at 00:00:00.700 is not evicted before
        // 00:00:10.700.
        let n = node(json!([{"key": "k", "effect": "NoExecute", "timeAdded": T0}]));
        let seen = t("2025-01-01T00:00:00.700Z");
        let d = decide(&p, NodeState::Present(&n), t("2025-01-01T00:00:10Z"), seen);
        assert_eq!(d, Decision::Wait(Duration::from_millis(700)));
        // Seen long after it was added (e.g. a restarted controller): from when seen.
        let d = decide(
            &p,
            NodeState::Present(&n),
            t("2025-01-01T00:01:00Z"),
            t("2025-01-01T00:00:55Z"),
        );
        assert_eq!(d, Decision::Wait(Duration::from_secs(5)));
    }

    #[test]
    fn pods_of_deleted_or_never_seen_nodes_are_force_deleted() {
        let p = pod(json!([]));
        assert_eq!(at(&p, NodeState::Deleted, T0), Decision::ForceDelete);
        assert_eq!(
            at(&p, NodeState::Missing(Duration::from_secs(10)), T0),
            Decision::Wait(Duration::from_secs(30))
        );
        assert_eq!(
            at(&p, NodeState::Missing(ORPHAN_QUARANTINE), T0),
            Decision::ForceDelete
        );
        let unbound = json!({"metadata": {"name": "p"}, "spec": {}});
        assert_eq!(at(&unbound, NodeState::Deleted, T0), Decision::Nothing);
    }

    #[test]
    fn terminating_pods_on_unreachable_nodes_are_force_deleted_after_their_grace() {
        let mut p = pod(json!([]));
        p["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:10Z");
        p["metadata"]["deletionGracePeriodSeconds"] = json!(30);
        let n = unreachable();
        assert_eq!(
            at(&p, NodeState::Present(&n), "2025-01-01T00:00:20Z"),
            Decision::Wait(Duration::from_secs(20))
        );
        assert_eq!(
            at(&p, NodeState::Present(&n), "2025-01-01T00:00:40Z"),
            Decision::ForceDelete
        );
        // On a reachable node the kubelet finishes the deletion.
        let healthy = node(json!([]));
        assert_eq!(
            at(&p, NodeState::Present(&healthy), "2025-01-01T00:01:00Z"),
            Decision::Nothing
        );
    }
}
