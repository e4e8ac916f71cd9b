//! The node lifecycle controller (kube-controller-manager's): node health from the node's Lease
//! (`kube-node-lease/<node>`, `renewTime`) and its Ready condition's heartbeat. A node not heard
//! from for `--node-monitor-grace-period` gets its Ready, MemoryPressure, DiskPressure and
//! PIDPressure conditions set to Unknown ("Kubelet stopped posting node status."), and its pods
//! are marked not Ready. Taints follow the conditions as upstream's tainting passes do: Ready
//! Unknown → `node.kubernetes.io/unreachable` NoExecute + NoSchedule, Ready False →
//! `node.kubernetes.io/not-ready` NoExecute + NoSchedule, pressure conditions and
//! NetworkUnavailable → their NoSchedule taints, `spec.unschedulable` →
//! `node.kubernetes.io/unschedulable:NoSchedule`; removed again when the node recovers.
//!
//! As upstream, heard-from times are this controller's own observation times (when it saw the
//! Lease's `renewTime` or the heartbeat change), so clock skew between nodes does not matter
//! and a restarted controller gives every node a full grace period. Deleting pods from tainted
//! nodes is the taint eviction controller's job (`tainteviction.rs`). Not done: zone-based
//! eviction rate limiting (upstream's partial/full disruption states).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::api::objects::now_rfc3339;
use crate::api::resources::ResourceDef;
use crate::api::status::ApiResult;
use crate::controllers::client::{name_of, namespace_of, Client};
use crate::controllers::events::Recorder;
use crate::controllers::informer::Informer;
use crate::controllers::queue::Queue;
use crate::controllers::{spawn_workers, Context};

pub const NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";
pub const MEMORY_PRESSURE: &str = "node.kubernetes.io/memory-pressure";
pub const DISK_PRESSURE: &str = "node.kubernetes.io/disk-pressure";
pub const PID_PRESSURE: &str = "node.kubernetes.io/pid-pressure";
pub const NETWORK_UNAVAILABLE: &str = "node.kubernetes.io/network-unavailable";

/// Conditions a silent node has set to Unknown (upstream: Ready plus the remaining ones).
const UNKNOWN_CONDITIONS: [&str; 4] = ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"];

/// How often a node that is already Unknown is looked at again (upstream's monitor period).
const MONITOR_PERIOD: Duration = Duration::from_secs(5);

/// When the controller last heard from a node, and what it had seen then.
#[derive(Clone, Debug)]
pub struct Health {
    pub probe: Instant,
    heartbeat: Option<String>,
    renew: Option<String>,
}

/// Updates a node's health record: heard from now when the Ready heartbeat or the Lease's
/// renewTime changed since the last look (or on first sight).
pub fn observe(
    prev: Option<&Health>,
    heartbeat: Option<&str>,
    renew: Option<&str>,
    now: Instant,
) -> Health {
    let fresh = Health {
        probe: now,
        heartbeat: heartbeat.map(str::to_string),
        renew: renew.map(str::to_string),
    };
    match prev {
        Some(p) if p.heartbeat.as_deref() == heartbeat && p.renew.as_deref() == renew => p.clone(),
        _ => fresh,
    }
}

fn condition<'a>(conds: &'a [Value], ty: &str) -> Option<&'a Value> {
    conds.iter().find(|c| c["type"] == ty)
}

fn status_of(conds: &[Value], ty: &str) -> Option<String> {
    condition(conds, ty).and_then(|c| c["status"].as_str().map(str::to_string))
}

/// What to write for one node.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// The node's new conditions, when they change.
    pub conditions: Option<Vec<Value>>,
    /// The node's new taints, when they change.
    pub taints: Option<Vec<Value>>,
    /// The Ready status after the plan.
    pub ready: Option<String>,
    /// Ready just became Unknown.
    pub became_unknown: bool,
}

/// The controller's taints a node should carry, from its conditions and cordon.
fn wanted_taints(conds: &[Value], unschedulable: bool) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    match status_of(conds, "Ready").as_deref() {
        Some("False") => {
            out.push((NOT_READY, "NoExecute"));
            out.push((NOT_READY, "NoSchedule"));
        }
        Some("Unknown") => {
            out.push((UNREACHABLE, "NoExecute"));
            out.push((UNREACHABLE, "NoSchedule"));
        }
        _ => {}
    }
    for (ty, key) in [
        ("MemoryPressure", MEMORY_PRESSURE),
        ("DiskPressure", DISK_PRESSURE),
        ("PIDPressure", PID_PRESSURE),
        ("NetworkUnavailable", NETWORK_UNAVAILABLE),
    ] {
        if status_of(conds, ty).as_deref() == Some("True") {
            out.push((key, "NoSchedule"));
        }
    }
    if unschedulable {
        out.push((UNSCHEDULABLE, "NoSchedule"));
    }
    out
}

/// Whether this controller owns a taint (adds and removes it).
fn managed(key: &str, effect: &str) -> bool {
    match effect {
        "NoExecute" => key == NOT_READY || key == UNREACHABLE,
        "NoSchedule" => [
            NOT_READY,
            UNREACHABLE,
            UNSCHEDULABLE,
            MEMORY_PRESSURE,
            DISK_PRESSURE,
            PID_PRESSURE,
            NETWORK_UNAVAILABLE,
        ]
        .contains(&key),
        _ => false,
    }
}

/// The node's conditions and taints given whether it went silent for the grace period
/// (`stale`); `now` is the RFC 3339 time written into transitions and taints.
pub fn decide(node: &Value, stale: bool, now: &str) -> Plan {
    let old: Vec<Value> = node
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut conds = old.clone();
    if stale {
        for ty in UNKNOWN_CONDITIONS {
            match conds.iter_mut().find(|c| c["type"] == ty) {
                Some(c) if c["status"] != "Unknown" => {
                    c["status"] = json!("Unknown");
                    c["reason"] = json!("NodeStatusUnknown");
                    c["message"] = json!("Kubelet stopped posting node status.");
                    c["lastTransitionTime"] = json!(now);
                }
                Some(_) => {}
                None => conds.push(json!({
                    "type": ty, "status": "Unknown", "reason": "NodeStatusNeverUpdated",
                    "message": "Kubelet never posted node status.",
                    "lastHeartbeatTime": node.pointer("/metadata/creationTimestamp").cloned().unwrap_or(Value::Null),
                    "lastTransitionTime": now,
                })),
            }
        }
    }
    let ready = status_of(&conds, "Ready");
    let became_unknown = ready.as_deref() == Some("Unknown")
        && status_of(&old, "Ready").as_deref() != Some("Unknown");

    let old_taints: Vec<Value> = node
        .pointer("/spec/taints")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let unschedulable = node
        .pointer("/spec/unschedulable")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let wanted = wanted_taints(&conds, unschedulable);
    let is = |t: &Value, k: &str, e: &str| t["key"] == k && t["effect"] == e;
    let mut taints: Vec<Value> = old_taints
        .iter()
        .filter(|t| {
            let (k, e) = (
                t["key"].as_str().unwrap_or_default(),
                t["effect"].as_str().unwrap_or_default(),
            );
            !managed(k, e) || wanted.iter().any(|(wk, we)| is(t, wk, we))
        })
        .cloned()
        .collect();
    for (k, e) in &wanted {
        if !taints.iter().any(|t| is(t, k, e)) {
            taints.push(json!({"key": k, "effect": e, "timeAdded": now}));
        }
    }
    Plan {
        conditions: (conds != old).then_some(conds),
        taints: (taints != old_taints).then_some(taints),
        ready,
        became_unknown,
    }
}

/// A pod's status with its Ready condition set to False (upstream's MarkPodsNotReady), or
/// `None` when it is not Ready=True.
pub fn not_ready_conditions(pod: &Value, now: &str) -> Option<Vec<Value>> {
    let mut conds: Vec<Value> = pod
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let c = conds
        .iter_mut()
        .find(|c| c["type"] == "Ready" && c["status"] == "True")?;
    c["status"] = json!("False");
    c["lastTransitionTime"] = json!(now);
    Some(conds)
}

struct Controller {
    nodes: Arc<Informer>,
    leases: Arc<Informer>,
    pods: Arc<Informer>,
    node_def: Arc<ResourceDef>,
    pod_def: Arc<ResourceDef>,
    health: Mutex<HashMap<String, Health>>,
    grace: Duration,
    client: Client,
    recorder: Recorder,
}

impl Controller {
    async fn sync(&self, name: String) -> ApiResult<Option<Duration>> {
        let Some(node) = self.nodes.get(&name) else {
            self.health.lock().remove(&name);
            return Ok(None);
        };
        let lease = self.leases.get(&format!("kube-node-lease/{name}"));
        let conds: Vec<Value> = node
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let heartbeat = condition(&conds, "Ready")
            .and_then(|c| c["lastHeartbeatTime"].as_str())
            .map(str::to_string);
        let renew = lease
            .as_ref()
            .and_then(|l| l.pointer("/spec/renewTime"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let now = Instant::now();
        let h = {
            let mut health = self.health.lock();
            let h = observe(
                health.get(&name),
                heartbeat.as_deref(),
                renew.as_deref(),
                now,
            );
            health.insert(name.clone(), h.clone());
            h
        };
        let silent = now.saturating_duration_since(h.probe);
        let stale = silent >= self.grace;
        let ts = now_rfc3339();
        let plan = decide(&node, stale, &ts);
        // Taints first, with the observed resourceVersion as precondition (a conflict re-runs
        // the sync on fresh state); then the conditions.
        if let Some(taints) = &plan.taints {
            let mut n = (*node).clone();
            n["spec"]["taints"] = json!(taints);
            self.client.update(&self.node_def, None, n).await?;
        }
        if let Some(c) = &plan.conditions {
            self.client
                .merge_patch_status(
                    &self.node_def,
                    None,
                    &name,
                    &json!({"status": {"conditions": c}}),
                )
                .await?;
        }
        if plan.became_unknown {
            tracing::info!(node = %name, silent = ?silent, "node stopped posting status: Ready Unknown");
            self.recorder.event(
                &node,
                "Normal",
                "NodeNotReady",
                format!("Node {name} status is now: NodeNotReady"),
            );
        }
        if matches!(plan.ready.as_deref(), Some("False") | Some("Unknown")) {
            self.mark_pods_not_ready(&name, &ts).await;
        }
        Ok(Some(if stale {
            MONITOR_PERIOD
        } else {
            self.grace - silent + Duration::from_millis(10)
        }))
    }

    async fn mark_pods_not_ready(&self, node: &str, now: &str) {
        for p in self.pods.list() {
            if p.pointer("/spec/nodeName").and_then(Value::as_str) != Some(node) {
                continue;
            }
            let Some(conds) = not_ready_conditions(&p, now) else {
                continue;
            };
            let ns = namespace_of(&p);
            let r = self
                .client
                .merge_patch_status(
                    &self.pod_def,
                    Some(ns),
                    name_of(&p),
                    &json!({"status": {"conditions": conds}}),
                )
                .await;
            match r {
                Ok(_) => self.recorder.event(
                    &p,
                    "Warning",
                    "NodeNotReady",
                    "Node is not ready".to_string(),
                ),
                Err(e) if e.code == 404 => {}
                Err(e) => {
                    tracing::debug!(pod = %name_of(&p), error = %e, "marking pod not ready")
                }
            }
        }
    }
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client("node-controller");
    let node_def = client.def("", "v1", "nodes");
    let pod_def = client.def("", "v1", "pods");
    let c = Arc::new(Controller {
        nodes: ctx.informers.get(&node_def),
        leases: ctx
            .informers
            .get(&client.def("coordination.k8s.io", "v1", "leases")),
        pods: ctx.informers.get(&pod_def),
        node_def,
        pod_def,
        health: Mutex::new(HashMap::new()),
        grace: ctx.st.config.node_monitor_grace_period,
        recorder: Recorder::new(client.clone(), "node-controller"),
        client,
    });
    let queue = Queue::new();
    let mut tasks = Vec::new();
    {
        let c = c.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut nodes_rx = c.nodes.subscribe();
            let mut leases_rx = c.leases.subscribe();
            c.nodes.wait_synced().await;
            c.leases.wait_synced().await;
            c.pods.wait_synced().await;
            for n in c.nodes.list() {
                queue.add(name_of(&n).to_string());
            }
            loop {
                tokio::select! {
                    Some(ch) = nodes_rx.recv() => queue.add(name_of(ch.object()).to_string()),
                    Some(ch) = leases_rx.recv() => {
                        let l = ch.object();
                        if namespace_of(l) == "kube-node-lease" {
                            queue.add(name_of(l).to_string());
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
        "node-lifecycle-controller",
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

    const NOW: &str = "2025-01-01T00:01:00Z";

    fn node(ready: &str, taints: Value, unschedulable: bool) -> Value {
        let c = |t: &str, s: &str| json!({"type": t, "status": s, "reason": "Kubelet", "lastHeartbeatTime": "2025-01-01T00:00:00Z", "lastTransitionTime": "2025-01-01T00:00:00Z"});
        json!({
            "metadata": {"name": "n1", "creationTimestamp": "2024-12-31T00:00:00Z"},
            "spec": {"taints": taints, "unschedulable": unschedulable},
            "status": {"conditions": [c("MemoryPressure", "False"), c("DiskPressure", "False"), c("PIDPressure", "False"), c("Ready", ready)]},
        })
    }

    fn keys(taints: &[Value]) -> Vec<String> {
        taints
            .iter()
            .map(|t| {
                format!(
                    "{}:{}",
                    t["key"].as_str().unwrap(),
                    t["effect"].as_str().unwrap()
                )
            })
            .collect()
    }

    #[test]
    fn a_healthy_node_is_left_alone() {
        let p = decide(&node("True", json!([]), false), false, NOW);
        assert_eq!(p.conditions, None);
        assert_eq!(p.taints, None);
        assert_eq!(p.ready.as_deref(), Some("True"));
        assert!(!p.became_unknown);
    }

    #[test]
    fn a_silent_node_becomes_unknown_and_unreachable() {
        let p = decide(&node("True", json!([]), false), true, NOW);
        let conds = p.conditions.unwrap();
        for ty in ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"] {
            let c = condition(&conds, ty).unwrap();
            assert_eq!(c["status"], "Unknown", "{ty}");
            assert_eq!(c["reason"], "NodeStatusUnknown");
            assert_eq!(c["message"], "Kubelet stopped posting node status.");
            assert_eq!(c["lastTransitionTime"], NOW);
            assert_eq!(
                c["lastHeartbeatTime"], "2025-01-01T00:00:00Z",
                "kept: when last heard"
            );
        }
        let taints = p.taints.unwrap();
        assert_eq!(
            keys(&taints),
            [
                "node.kubernetes.io/unreachable:NoExecute",
                "node.kubernetes.io/unreachable:NoSchedule"
            ]
        );
        assert!(taints.iter().all(|t| t["timeAdded"] == NOW));
        assert!(p.became_unknown);

        // Once Unknown, nothing changes on the next look (taints keep their timeAdded).
        let mut n = node("Unknown", json!(taints), false);
        n["status"]["conditions"] = json!(conds);
        let again = decide(&n, true, "2025-01-01T00:02:00Z");
        assert_eq!(
            again,
            Plan {
                ready: Some("Unknown".into()),
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_node_never_heard_from_gets_never_updated_conditions() {
        let mut n = node("True", json!([]), false);
        n["status"] = json!({});
        let p = decide(&n, true, NOW);
        let conds = p.conditions.unwrap();
        let ready = condition(&conds, "Ready").unwrap();
        assert_eq!(ready["reason"], "NodeStatusNeverUpdated");
        assert_eq!(ready["message"], "Kubelet never posted node status.");
        assert_eq!(ready["lastHeartbeatTime"], "2024-12-31T00:00:00Z");
    }

    #[test]
    fn a_not_ready_node_gets_the_not_ready_taints() {
        let p = decide(&node("False", json!([]), false), false, NOW);
        assert_eq!(p.conditions, None, "the kubelet's own False is kept");
        assert_eq!(
            keys(&p.taints.unwrap()),
            [
                "node.kubernetes.io/not-ready:NoExecute",
                "node.kubernetes.io/not-ready:NoSchedule"
            ]
        );
    }

    #[test]
    fn a_recovered_node_loses_the_controllers_taints_but_keeps_others() {
        let taints = json!([
            {"key": "dedicated", "value": "infra", "effect": "NoSchedule"},
            {"key": UNREACHABLE, "effect": "NoExecute", "timeAdded": NOW},
            {"key": UNREACHABLE, "effect": "NoSchedule", "timeAdded": NOW},
            {"key": UNREACHABLE, "effect": "PreferNoSchedule"},
        ]);
        let p = decide(&node("True", taints, false), false, NOW);
        assert_eq!(
            keys(&p.taints.unwrap()),
            [
                "dedicated:NoSchedule",
                "node.kubernetes.io/unreachable:PreferNoSchedule"
            ]
        );
    }

    #[test]
    fn a_cordoned_node_gets_the_unschedulable_taint_and_pressure_taints_follow_conditions() {
        let mut n = node("True", json!([]), true);
        n["status"]["conditions"][1]["status"] = json!("True"); // DiskPressure
        let p = decide(&n, false, NOW);
        assert_eq!(
            keys(&p.taints.unwrap()),
            [
                "node.kubernetes.io/disk-pressure:NoSchedule",
                "node.kubernetes.io/unschedulable:NoSchedule"
            ]
        );
        // Uncordoned: removed.
        let n = node(
            "True",
            json!([{"key": UNSCHEDULABLE, "effect": "NoSchedule"}]),
            false,
        );
        assert_eq!(decide(&n, false, NOW).taints, Some(vec![]));
    }

    #[test]
    fn heard_from_when_the_lease_or_heartbeat_changes() {
        let t0 = Instant::now();
        let h = observe(None, Some("hb1"), Some("r1"), t0);
        assert_eq!(h.probe, t0, "first sight counts as heard from");
        let t1 = t0 + Duration::from_secs(3);
        assert_eq!(observe(Some(&h), Some("hb1"), Some("r1"), t1).probe, t0);
        assert_eq!(observe(Some(&h), Some("hb1"), Some("r2"), t1).probe, t1);
        assert_eq!(observe(Some(&h), Some("hb2"), Some("r1"), t1).probe, t1);
    }

    #[test]
    fn pods_lose_ready_only_when_ready() {
        let pod = json!({"status": {"conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True", "lastTransitionTime": "x"},
        ]}});
        let c = not_ready_conditions(&pod, NOW).unwrap();
        assert_eq!(c[1]["status"], "False");
        assert_eq!(c[1]["lastTransitionTime"], NOW);
        assert_eq!(c[0]["status"], "True");
        let mut p2 = pod.clone();
        p2["status"]["conditions"] = json!(c);
        assert_eq!(not_ready_conditions(&p2, NOW), None);
    }
}
