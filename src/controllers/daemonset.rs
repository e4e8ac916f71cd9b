//! The DaemonSet controller: one daemon pod on every node its template fits (node selector,
//! required node affinity, tolerated taints, plus the tolerations upstream gives every daemon
//! pod), placed by the scheduler through a `metadata.name` node affinity; misplaced, surplus,
//! failed and orphaned pods deleted; rolling updates within maxUnavailable/maxSurge, or OnDelete;
//! revision history in ControllerRevisions (what `kubectl rollout history/undo` read); status
//! counted as upstream counts it.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::api::objects::DeleteOpts;
use crate::api::selectors::{from_label_selector_object, LabelSelector};
use crate::api::status::{ApiError, ApiResult};
use crate::controllers::client::{
    controller_of, is_terminating, key_of, name_of, namespace_of, owner_ref, split_key, uid_of,
    Client,
};
use crate::controllers::events::Recorder;
use crate::controllers::history::{self, HASH_LABEL};
use crate::controllers::informer::{Change, Informer};
use crate::controllers::pods::{self, from_template, phase};
use crate::controllers::queue::Queue;
use crate::controllers::scheduler::plugins::{node_term_matches, tolerates, NodeInfo};
use crate::controllers::{spawn_workers, Context, Expectations};

/// The label naming the revision a daemon pod was made from (also on the revisions).
pub const REVISION_HASH_LABEL: &str = "controller-revision-hash";
/// The label carrying the DaemonSet's template generation a pod was made from.
pub const TEMPLATE_GENERATION_LABEL: &str = "pod-template-generation";
const TEMPLATE_GENERATION_ANNOTATION: &str = "deprecated.daemonset.template.generation";
const MANAGER: &str = "daemonset-controller";
/// Pods created or deleted per reconcile at most (upstream's burst).
const BURST: usize = 250;
/// Back-off between deletions of failed daemon pods on one node (upstream's 1 s … 15 min).
const FAILED_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const FAILED_BACKOFF_MAX: Duration = Duration::from_secs(15 * 60);

// ---------------------------------------------------------------------------------------------
// Eligibility.

/// What a node means for a DaemonSet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fit {
    /// A daemon pod should be created on the node when it has none.
    pub should_run: bool,
    /// A daemon pod already on the node may stay (it may tolerate what forbids a new one).
    pub should_continue: bool,
}

/// Adds the tolerations upstream gives every daemon pod, so that it keeps running through node
/// conditions and may be placed on cordoned nodes. A template toleration for the same key,
/// operator, value and effect is replaced (dropping its `tolerationSeconds`).
pub fn add_default_tolerations(spec: &mut Value) {
    if !spec.is_object() {
        *spec = json!({});
    }
    let mut defaults = vec![
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/disk-pressure", "NoSchedule"),
        ("node.kubernetes.io/memory-pressure", "NoSchedule"),
        ("node.kubernetes.io/pid-pressure", "NoSchedule"),
        ("node.kubernetes.io/unschedulable", "NoSchedule"),
    ];
    if spec["hostNetwork"].as_bool() == Some(true) {
        defaults.push(("node.kubernetes.io/network-unavailable", "NoSchedule"));
    }
    let mut tols = spec["tolerations"].as_array().cloned().unwrap_or_default();
    for (key, effect) in defaults {
        let t = json!({"key": key, "operator": "Exists", "effect": effect});
        let mut found = false;
        for x in tols.iter_mut() {
            let same = x["key"] == key
                && x["operator"].as_str().unwrap_or("Equal") == "Exists"
                && x["value"].as_str().unwrap_or_default().is_empty()
                && x["effect"] == effect;
            if same {
                *x = t.clone();
                found = true;
            }
        }
        if !found {
            tols.push(t);
        }
    }
    spec["tolerations"] = Value::Array(tols);
}

/// The spec of the DaemonSet's pods as eligibility sees it (template plus default tolerations).
pub fn daemon_pod_spec(ds: &Value) -> Value {
    let mut spec = ds
        .pointer("/spec/template/spec")
        .cloned()
        .unwrap_or(json!({}));
    add_default_tolerations(&mut spec);
    spec
}

/// Whether a daemon pod with `spec` belongs on `node`: its node name (if the template pins one),
/// node selector and required node affinity must match; untolerated NoSchedule/NoExecute taints
/// forbid new pods, and only NoExecute ones evict running pods.
pub fn node_fit(spec: &Value, node: &NodeInfo) -> Fit {
    let pinned = spec["nodeName"].as_str().unwrap_or_default();
    if !pinned.is_empty() && pinned != node.name {
        return Fit::default();
    }
    let selector_ok = spec["nodeSelector"].as_object().is_none_or(|m| {
        m.iter()
            .all(|(k, v)| node.labels.get(k).map(String::as_str) == Some(v.as_str().unwrap_or("")))
    });
    let affinity_ok = spec
        .pointer("/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")
        .and_then(Value::as_array)
        .is_none_or(|terms| terms.is_empty() || terms.iter().any(|t| node_term_matches(t, node)));
    if !selector_ok || !affinity_ok {
        return Fit::default();
    }
    let tols: &[Value] = spec["tolerations"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let untolerated = |effects: &[&str]| {
        node.taints
            .iter()
            .any(|t| effects.contains(&t.effect.as_str()) && !tolerates(tols, t))
    };
    if untolerated(&["NoSchedule", "NoExecute"]) {
        return Fit {
            should_run: false,
            should_continue: !untolerated(&["NoExecute"]),
        };
    }
    Fit {
        should_run: true,
        should_continue: true,
    }
}

/// Every node's fit, by name.
pub fn fits(ds: &Value, nodes: &[Arc<Value>]) -> BTreeMap<String, Fit> {
    let spec = daemon_pod_spec(ds);
    nodes
        .iter()
        .map(|n| {
            let info = NodeInfo::from_node(n);
            (info.name.clone(), node_fit(&spec, &info))
        })
        .collect()
}

/// The node a daemon pod is for: its node name, or (before binding) the single node its
/// required `metadata.name` affinity names.
pub fn target_node(pod: &Value) -> Option<&str> {
    if let Some(n) = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    {
        return Some(n);
    }
    let terms = pod
        .pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")
        .and_then(Value::as_array)?;
    for term in terms {
        for f in term["matchFields"].as_array().into_iter().flatten() {
            if f["key"] == "metadata.name" && f["operator"] == "In" {
                let values = f["values"].as_array()?;
                return match values.as_slice() {
                    [one] => one.as_str(),
                    _ => None,
                };
            }
        }
    }
    None
}

/// Makes the scheduler place a pod on `node`: the required node affinity becomes one term
/// matching the node's name (the controller already checked the template's own affinity).
pub fn pin_to_node(spec: &mut Value, node: &str) {
    if !spec.is_object() {
        *spec = json!({});
    }
    let term =
        json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]});
    spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"] = json!([term]);
}

// ---------------------------------------------------------------------------------------------
// Observed pods.

fn pod_hash(p: &Value) -> &str {
    p.pointer("/metadata/labels")
        .and_then(|l| l.get(REVISION_HASH_LABEL))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Made from the update revision.
pub fn is_updated(p: &Value, hash: &str) -> bool {
    !hash.is_empty() && pod_hash(p) == hash
}

fn is_bound(p: &Value) -> bool {
    p.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty())
}

/// Oldest first: bound pods before unbound ones, then by creation time, then by name.
fn oldest_first(a: &Arc<Value>, b: &Arc<Value>) -> Ordering {
    let created = |p: &Value| {
        p.pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<jiff::Timestamp>().ok())
    };
    is_bound(b)
        .cmp(&is_bound(a))
        .then_with(|| created(a).cmp(&created(b)))
        .then_with(|| name_of(a).cmp(name_of(b)))
}

/// The DaemonSet's pods by target node, oldest first; finished pods already being deleted are
/// left out (nothing remains to be done with them).
pub fn pods_by_node(pods: &[Arc<Value>]) -> BTreeMap<String, Vec<Arc<Value>>> {
    let mut m: BTreeMap<String, Vec<Arc<Value>>> = BTreeMap::new();
    for p in pods {
        if is_terminating(p) && matches!(phase(p), "Succeeded" | "Failed") {
            continue;
        }
        if let Some(n) = target_node(p) {
            m.entry(n.to_string()).or_default().push(p.clone());
        }
    }
    for v in m.values_mut() {
        v.sort_by(oldest_first);
    }
    m
}

fn min_ready_seconds(ds: &Value) -> i64 {
    ds.pointer("/spec/minReadySeconds")
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn is_rolling(ds: &Value) -> bool {
    ds.pointer("/spec/updateStrategy/type")
        .and_then(Value::as_str)
        .unwrap_or("RollingUpdate")
        == "RollingUpdate"
}

/// An int-or-percent against `total`, percentages rounded up (as upstream does for DaemonSets).
fn scaled(v: &Value, total: i64) -> i64 {
    match v {
        Value::Number(n) => n.as_i64().unwrap_or(0).max(0),
        Value::String(s) => match s.strip_suffix('%') {
            Some(p) => {
                let p: i64 = p.trim().parse().unwrap_or(0).max(0);
                (p * total + 99) / 100
            }
            None => s.trim().parse().unwrap_or(0),
        },
        _ => 0,
    }
}

/// `(maxSurge, maxUnavailable)` for `desired` nodes; never both zero when there is work.
pub fn budget(ds: &Value, desired: i64) -> (i64, i64) {
    if !is_rolling(ds) {
        return (0, 0);
    }
    let ru = ds
        .pointer("/spec/updateStrategy/rollingUpdate")
        .cloned()
        .unwrap_or(Value::Null);
    let unavailable = match &ru["maxUnavailable"] {
        Value::Null => 1,
        v => scaled(v, desired),
    };
    let surge = scaled(&ru["maxSurge"], desired);
    if desired > 0 && surge == 0 && unavailable == 0 {
        return (0, 1);
    }
    (surge, unavailable)
}

/// Whether updates may run two pods on a node (maxSurge is not zero).
pub fn allows_surge(ds: &Value) -> bool {
    is_rolling(ds)
        && scaled(
            ds.pointer("/spec/updateStrategy/rollingUpdate/maxSurge")
                .unwrap_or(&Value::Null),
            1,
        ) > 0
}

// ---------------------------------------------------------------------------------------------
// The decision.

/// Why a pod is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// The node no longer fits (selector, affinity, NoExecute taint).
    NotEligible,
    /// More pods on the node than allowed: the oldest stays.
    Excess,
    Failed,
    Succeeded,
    /// Its node is gone.
    NodeGone,
    /// Replaced by the rolling update.
    Update,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deletion {
    pub name: String,
    pub uid: String,
    pub node: String,
    pub why: Why,
}

impl Deletion {
    fn of(p: &Value, node: &str, why: Why) -> Deletion {
        Deletion {
            name: name_of(p).to_string(),
            uid: uid_of(p).to_string(),
            node: node.to_string(),
            why,
        }
    }
}

/// What one reconcile does.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Nodes to create a daemon pod for.
    pub create: Vec<String>,
    pub delete: Vec<Deletion>,
    /// Sync again after this (failed pods left alone while their node backs off).
    pub requeue: Option<Duration>,
}

impl Plan {
    fn is_idle(&self) -> bool {
        self.create.is_empty() && self.delete.is_empty()
    }
}

/// The state a reconcile decides on.
pub struct Observed<'a> {
    pub nodes: &'a [Arc<Value>],
    /// The DaemonSet's pods (controlled by it).
    pub pods: &'a [Arc<Value>],
    /// The update revision's hash.
    pub hash: &'a str,
    pub now: jiff::Timestamp,
    /// Nodes whose failed daemon pods must not be deleted yet, with the time left.
    pub backoff: &'a HashMap<String, Duration>,
}

/// The reconcile: pods placed where they belong first (upstream's `manage`); when that has
/// nothing to do, the rolling update takes its step.
pub fn plan(ds: &Value, o: &Observed) -> Plan {
    let p = manage(ds, o);
    if !p.is_idle() || !is_rolling(ds) {
        return p;
    }
    let mut r = rolling_update(ds, o);
    r.requeue = p.requeue;
    r
}

fn merge_requeue(a: Option<Duration>, b: Duration) -> Option<Duration> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// One pod per eligible node, none elsewhere.
pub fn manage(ds: &Value, o: &Observed) -> Plan {
    let fits = fits(ds, o.nodes);
    let by_node = pods_by_node(o.pods);
    let surge = allows_surge(ds);
    let min_ready = min_ready_seconds(ds);
    let mut p = Plan::default();
    for (node, fit) in &fits {
        let pods = by_node.get(node);
        if fit.should_run && pods.is_none() {
            p.create.push(node.clone());
            continue;
        }
        let Some(pods) = pods else { continue };
        if !fit.should_continue {
            for pod in pods.iter().filter(|x| !is_terminating(x)) {
                p.delete.push(Deletion::of(pod, node, Why::NotEligible));
            }
            continue;
        }
        let mut running: Vec<&Arc<Value>> = Vec::new();
        for pod in pods.iter().filter(|x| !is_terminating(x)) {
            match phase(pod) {
                "Failed" => match o.backoff.get(node) {
                    Some(left) => p.requeue = merge_requeue(p.requeue, *left),
                    None => p.delete.push(Deletion::of(pod, node, Why::Failed)),
                },
                "Succeeded" => p.delete.push(Deletion::of(pod, node, Why::Succeeded)),
                _ => running.push(pod),
            }
        }
        if !surge {
            // The oldest stays.
            for extra in running.iter().skip(1) {
                p.delete.push(Deletion::of(extra, node, Why::Excess));
            }
            continue;
        }
        if running.len() <= 1 {
            if running.is_empty() && fit.should_run {
                p.create.push(node.clone());
            }
            continue;
        }
        // Surging: at most the oldest new and the oldest old pod; the old one goes once it is
        // not ready or the new one is available.
        let mut oldest_new: Option<&Arc<Value>> = None;
        let mut oldest_old: Option<&Arc<Value>> = None;
        for pod in &running {
            let slot = if is_updated(pod, o.hash) {
                &mut oldest_new
            } else {
                &mut oldest_old
            };
            if slot.is_none() {
                *slot = Some(pod);
            } else {
                p.delete.push(Deletion::of(pod, node, Why::Excess));
            }
        }
        if let (Some(new), Some(old)) = (oldest_new, oldest_old) {
            if !pods::is_ready(old) || pods::is_available(new, min_ready, o.now) {
                p.delete.push(Deletion::of(old, node, Why::Update));
            }
        }
    }
    // Pods of nodes that are gone.
    for (node, pods) in &by_node {
        if fits.contains_key(node) {
            continue;
        }
        for pod in pods {
            let already_forced = is_terminating(pod)
                && pod
                    .pointer("/metadata/deletionGracePeriodSeconds")
                    .and_then(Value::as_i64)
                    == Some(0);
            let pending_delete = is_terminating(pod) && !is_bound(pod);
            if !already_forced && !pending_delete {
                p.delete.push(Deletion::of(pod, node, Why::NodeGone));
            }
        }
    }
    p.create.truncate(BURST);
    p.delete.truncate(BURST);
    p
}

/// A node's pod of the update revision and its pod of an older one.
type NewAndOld<'a> = (Option<&'a Arc<Value>>, Option<&'a Arc<Value>>);

/// The new pod and the old pod on a node (`None` when the node has more than one of either:
/// `manage` sorts that out first). Terminating pods do not count.
fn split_updated<'a>(pods: &'a [Arc<Value>], hash: &str) -> Option<NewAndOld<'a>> {
    let mut new = None;
    let mut old = None;
    for p in pods.iter().filter(|p| !is_terminating(p)) {
        let slot = if is_updated(p, hash) {
            &mut new
        } else {
            &mut old
        };
        if slot.is_some() {
            return None;
        }
        *slot = Some(p);
    }
    Some((new, old))
}

/// One step of a rolling update. Without surge: delete old pods while fewer than maxUnavailable
/// pods are unavailable (`manage` creates their successors); an unavailable old pod is always
/// replaced. With surge: create new pods beside old ones (at most maxSurge waiting at once), and
/// delete an old pod once its successor is available.
pub fn rolling_update(ds: &Value, o: &Observed) -> Plan {
    let fits = fits(ds, o.nodes);
    let mut by_node = pods_by_node(o.pods);
    let mut desired = 0;
    for (node, fit) in &fits {
        if fit.should_run {
            desired += 1;
            by_node.entry(node.clone()).or_default();
        }
    }
    let (max_surge, max_unavailable) = budget(ds, desired);
    let min_ready = min_ready_seconds(ds);
    let available = |p: &Value| pods::is_available(p, min_ready, o.now);
    let mut p = Plan::default();
    if max_surge == 0 {
        let mut unavailable = 0;
        let mut replace: Vec<Deletion> = Vec::new();
        let mut candidates: Vec<Deletion> = Vec::new();
        for (node, pods) in &by_node {
            let Some((new, old)) = split_updated(pods, o.hash) else {
                unavailable += 1;
                continue;
            };
            match (new, old) {
                (None, None) | (Some(_), Some(_)) => unavailable += 1,
                (Some(new), None) => {
                    if !available(new) {
                        unavailable += 1;
                    }
                }
                (None, Some(old)) => {
                    if !available(old) {
                        replace.push(Deletion::of(old, node, Why::Update));
                        unavailable += 1;
                    } else if unavailable < max_unavailable {
                        candidates.push(Deletion::of(old, node, Why::Update));
                    }
                }
            }
        }
        let room = (max_unavailable - unavailable).max(0) as usize;
        p.delete = replace;
        p.delete.extend(candidates.into_iter().take(room));
        return p;
    }
    let mut old_to_delete: Vec<Deletion> = Vec::new();
    let mut should_not_run: Vec<Deletion> = Vec::new();
    let mut candidate_nodes: Vec<String> = Vec::new();
    let mut allowed_nodes: Vec<String> = Vec::new();
    let mut surging = 0;
    let mut available_count = 0;
    for (node, pods) in &by_node {
        let Some((new, old)) = split_updated(pods, o.hash) else {
            surging += 1;
            continue;
        };
        match (old, new) {
            (Some(old), _) if available(old) => available_count += 1,
            (None, Some(new)) if available(new) => available_count += 1,
            _ => {}
        }
        let should_run = fits.get(node).is_some_and(|f| f.should_run);
        match (new, old) {
            (_, None) => {}
            (None, Some(old)) => {
                if !available(old) {
                    if !should_run {
                        old_to_delete.push(Deletion::of(old, node, Why::NotEligible));
                    } else {
                        allowed_nodes.push(node.clone());
                    }
                } else if !should_run {
                    should_not_run.push(Deletion::of(old, node, Why::NotEligible));
                } else if surging < max_surge {
                    candidate_nodes.push(node.clone());
                }
            }
            (Some(new), Some(old)) => {
                if available(new) {
                    old_to_delete.push(Deletion::of(old, node, Why::Update));
                } else {
                    surging += 1;
                }
            }
        }
    }
    let room = (max_surge - surging).max(0) as usize;
    p.create = allowed_nodes;
    p.create.extend(candidate_nodes.into_iter().take(room));
    if !should_not_run.is_empty() {
        let room = (max_unavailable - (desired - available_count)).max(0) as usize;
        old_to_delete.extend(should_not_run.into_iter().take(room));
    }
    p.delete = old_to_delete;
    p
}

/// The status upstream reports: per eligible node its oldest pod counts (ready, available,
/// updated); pods on nodes that do not fit are misscheduled.
pub fn status(ds: &Value, o: &Observed) -> Value {
    let fits = fits(ds, o.nodes);
    let by_node = pods_by_node(o.pods);
    let min_ready = min_ready_seconds(ds);
    let (mut desired, mut current, mut miss, mut ready, mut updated, mut available) =
        (0i64, 0i64, 0i64, 0i64, 0i64, 0i64);
    for (node, fit) in &fits {
        let pods = by_node.get(node).filter(|v| !v.is_empty());
        if !fit.should_run {
            if pods.is_some() {
                miss += 1;
            }
            continue;
        }
        desired += 1;
        let Some(pods) = pods else { continue };
        current += 1;
        let oldest = &pods[0];
        if pods::is_ready(oldest) {
            ready += 1;
            if pods::is_available(oldest, min_ready, o.now) {
                available += 1;
            }
        }
        if is_updated(oldest, o.hash) {
            updated += 1;
        }
    }
    json!({
        "desiredNumberScheduled": desired,
        "currentNumberScheduled": current,
        "numberMisscheduled": miss,
        "numberReady": ready,
        "updatedNumberScheduled": updated,
        "numberAvailable": available,
        "numberUnavailable": desired - available,
    })
}

/// How long until the next ready pod becomes available (`minReadySeconds`), if any waits.
pub fn next_available(ds: &Value, pods: &[Arc<Value>], now: jiff::Timestamp) -> Option<Duration> {
    let min_ready = min_ready_seconds(ds);
    if min_ready <= 0 {
        return None;
    }
    pods.iter()
        .filter(|p| pods::is_ready(p) && !pods::is_available(p, min_ready, now))
        .map(|p| {
            pods::ready_since(p).map_or(min_ready, |t| t.as_second() + min_ready - now.as_second())
        })
        .min()
        .map(|secs| Duration::from_secs(secs.max(1) as u64))
}

const STATUS_FIELDS: [&str; 7] = [
    "desiredNumberScheduled",
    "currentNumberScheduled",
    "numberMisscheduled",
    "numberReady",
    "updatedNumberScheduled",
    "numberAvailable",
    "numberUnavailable",
];

/// The status patch to write, if anything changed (`observedGeneration` only when the
/// reconcile acted on this generation).
pub fn status_patch(ds: &Value, computed: &Value, observe_generation: bool) -> Option<Value> {
    let cur = ds.get("status").cloned().unwrap_or(json!({}));
    let generation = ds
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let observed = cur["observedGeneration"].as_i64().unwrap_or(0);
    let same = STATUS_FIELDS
        .iter()
        .all(|f| cur[*f].as_i64().unwrap_or(0) == computed[*f].as_i64().unwrap_or(0));
    if same && observed >= generation {
        return None;
    }
    if same && !observe_generation {
        return None;
    }
    let mut st = computed.clone();
    if observe_generation {
        st["observedGeneration"] = json!(generation);
    }
    Some(json!({ "status": st }))
}

/// The pod template of new daemon pods: default tolerations, the revision hash and the
/// template generation as labels.
pub fn pod_template(ds: &Value, hash: &str) -> Value {
    let mut t = ds
        .pointer("/spec/template")
        .cloned()
        .filter(Value::is_object)
        .unwrap_or(json!({}));
    add_default_tolerations(&mut t["spec"]);
    let generation = ds
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(TEMPLATE_GENERATION_ANNOTATION))
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<i64>().ok())
        .or_else(|| ds.pointer("/metadata/generation").and_then(Value::as_i64));
    if !t["metadata"]["labels"].is_object() {
        t["metadata"]["labels"] = json!({});
    }
    if let Some(g) = generation {
        t["metadata"]["labels"][TEMPLATE_GENERATION_LABEL] = json!(g.to_string());
    }
    if !hash.is_empty() {
        t["metadata"]["labels"][REVISION_HASH_LABEL] = json!(hash);
    }
    t
}

/// The hash of a revision: its `controller-revision-hash` label, the history label, or the
/// suffix of its name.
pub fn revision_hash_of(rev: &Value, ds_name: &str) -> String {
    let labels = rev.pointer("/metadata/labels");
    let label = |k: &str| {
        labels
            .and_then(|l| l.get(k))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    label(REVISION_HASH_LABEL)
        .or_else(|| label(HASH_LABEL))
        .map(str::to_string)
        .unwrap_or_else(|| {
            let name = name_of(rev);
            name.strip_prefix(&format!("{ds_name}-"))
                .unwrap_or(name)
                .to_string()
        })
}

/// Pods to adopt (orphans the selector matches) and to release (ours that it no longer
/// matches), and the DaemonSet's pods after both.
pub fn claim(
    ds: &Value,
    selector: &LabelSelector,
    pods: &[Arc<Value>],
) -> (Vec<String>, Vec<String>, Vec<Arc<Value>>) {
    let uid = uid_of(ds);
    let (mut adopt, mut release, mut owned) = (Vec::new(), Vec::new(), Vec::new());
    for p in pods {
        let matches = !selector.is_empty() && selector.matches_object(p);
        match controller_of(p) {
            Some(c) if c["uid"] == uid => {
                if matches {
                    owned.push(p.clone());
                } else if !is_terminating(p) {
                    release.push(name_of(p).to_string());
                }
            }
            Some(_) => {}
            None => {
                if matches && !is_terminating(p) && !is_terminating(ds) {
                    adopt.push(name_of(p).to_string());
                    owned.push(p.clone());
                }
            }
        }
    }
    (adopt, release, owned)
}

// ---------------------------------------------------------------------------------------------
// The controller.

/// Back-off of failed-pod deletions per (DaemonSet, node), as upstream's: each deletion within
/// the window doubles it.
#[derive(Default)]
struct FailedBackoff {
    entries: Mutex<HashMap<String, (Duration, Instant)>>,
}

impl FailedBackoff {
    fn remaining(&self, key: &str) -> Option<Duration> {
        let g = self.entries.lock();
        let (d, at) = g.get(key)?;
        let el = at.elapsed();
        (el < *d).then(|| *d - el)
    }

    fn next(&self, key: &str) {
        let mut g = self.entries.lock();
        g.retain(|_, (_, at)| at.elapsed() <= 2 * FAILED_BACKOFF_MAX);
        let d = match g.get(key) {
            Some((d, _)) => (*d * 2).min(FAILED_BACKOFF_MAX),
            None => FAILED_BACKOFF_INITIAL,
        };
        g.insert(key.to_string(), (d, Instant::now()));
    }
}

struct Controller {
    client: Client,
    daemonsets: Arc<Informer>,
    pods: Arc<Informer>,
    nodes: Arc<Informer>,
    revisions: Arc<Informer>,
    expectations: Expectations,
    backoff: FailedBackoff,
    recorder: Recorder,
}

impl Controller {
    async fn sync(&self, key: String) -> ApiResult<Option<Duration>> {
        let Some(ds) = self.daemonsets.get(&key) else {
            self.expectations.forget(&key);
            return Ok(None);
        };
        if is_terminating(&ds) {
            return Ok(None);
        }
        let selector = from_label_selector_object(&ds["spec"]["selector"])?;
        if selector.is_empty() {
            self.recorder.event(
                &ds,
                "Warning",
                "SelectingAll",
                "This daemon set is selecting all pods. A non-empty selector is required.".into(),
            );
            return Ok(None);
        }
        let ns = split_key(&key).0.unwrap_or_default().to_string();
        let pod_def = self.pods.def.clone();

        // Adopt and release pods.
        let (adopt, release, pods) = claim(&ds, &selector, &self.pods.list_namespace(&ns));
        for name in &adopt {
            let p = json!({"metadata": {"ownerReferences": [owner_ref(&ds, true)]}});
            if let Err(e) = self.client.merge_patch(&pod_def, Some(&ns), name, &p).await {
                tracing::debug!(pod = %name, error = %e, "adopting");
            }
        }
        for name in &release {
            self.release(&ds, &ns, name).await;
        }

        let (cur, revisions) = self.construct_history(&ds, &selector, &ns).await?;
        let hash = revision_hash_of(&cur, name_of(&ds));

        let nodes = self.nodes.list();
        let now = jiff::Timestamp::now();
        let mut requeue = None;
        let mut result = Ok(());
        let acted = self.expectations.satisfied(&key);
        if acted {
            let backoff = self.backoff_of(&ds, &pods);
            let p = plan(
                &ds,
                &Observed {
                    nodes: &nodes,
                    pods: &pods,
                    hash: &hash,
                    now,
                    backoff: &backoff,
                },
            );
            requeue = p.requeue;
            result = self.apply(&ds, &key, &ns, &hash, p).await;
            self.cleanup_history(&ds, &ns, &cur, &revisions, &pods)
                .await;
        }

        // Status, from what the informers show now.
        let (_, _, pods) = claim(&ds, &selector, &self.pods.list_namespace(&ns));
        let computed = status(
            &ds,
            &Observed {
                nodes: &nodes,
                pods: &pods,
                hash: &hash,
                now,
                backoff: &HashMap::new(),
            },
        );
        if let Some(patch) = status_patch(&ds, &computed, acted) {
            self.client
                .merge_patch_status(&self.daemonsets.def, Some(&ns), name_of(&ds), &patch)
                .await?;
        }
        // Pods become available by time alone: look again when the next one does (a surge
        // update waits on that, and no event says so).
        if let Some(after) = next_available(&ds, &pods, now) {
            requeue = Some(requeue.map_or(after, |r: Duration| r.min(after)));
        }
        result.map(|()| requeue)
    }

    fn backoff_of(&self, ds: &Value, pods: &[Arc<Value>]) -> HashMap<String, Duration> {
        pods.iter()
            .filter(|p| phase(p) == "Failed")
            .filter_map(|p| target_node(p))
            .filter_map(|n| {
                self.backoff
                    .remaining(&format!("{}/{n}", uid_of(ds)))
                    .map(|d| (n.to_string(), d))
            })
            .collect()
    }

    async fn release(&self, ds: &Value, ns: &str, name: &str) {
        let Some(pod) = self.pods.get(&format!("{ns}/{name}")) else {
            return;
        };
        let rest: Vec<Value> = pod
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter(|r| r["uid"] != uid_of(ds))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let refs = if rest.is_empty() {
            Value::Null
        } else {
            Value::Array(rest)
        };
        let p = json!({"metadata": {"ownerReferences": refs}});
        if let Err(e) = self
            .client
            .merge_patch(&self.pods.def, Some(ns), name, &p)
            .await
        {
            tracing::debug!(pod = %name, error = %e, "releasing");
        }
    }

    /// The revision of the current template (created or renumbered as needed) and the
    /// DaemonSet's revisions (orphans matching its selector adopted).
    async fn construct_history(
        &self,
        ds: &Value,
        selector: &LabelSelector,
        ns: &str,
    ) -> ApiResult<(Value, Vec<Arc<Value>>)> {
        let def = self.revisions.def.clone();
        let mut all = self.revisions.list_namespace(ns);
        for r in all.iter_mut() {
            if controller_of(r).is_none() && !is_terminating(r) && selector.matches_object(r) {
                let p = json!({"metadata": {"ownerReferences": [owner_ref(ds, true)]}});
                match self
                    .client
                    .merge_patch(&def, Some(ns), name_of(r), &p)
                    .await
                {
                    Ok(v) => *r = Arc::new(v),
                    Err(e) => tracing::debug!(revision = %name_of(r), error = %e, "adopting"),
                }
            }
        }
        let owned = history::owned(ds, &all);
        let cur = match history::current_revision(&self.client, &def, ds, &owned).await {
            Ok(r) => r,
            Err(e) if e.reason == "AlreadyExists" => self.resolve_collision(ds, ns, e).await?,
            Err(e) => return Err(e),
        };
        // Upstream's revisions carry the hash under the DaemonSet's label too, and a new one
        // the DaemonSet's annotations (`kubernetes.io/change-cause` for `rollout history`).
        let is_new = !owned.iter().any(|r| name_of(r) == name_of(&cur));
        let mut unlabelled: Vec<&Value> = owned.iter().map(|r| &**r).collect();
        if is_new {
            unlabelled.push(&cur);
        }
        unlabelled.retain(|r| {
            r.pointer("/metadata/labels")
                .and_then(|l| l.get(REVISION_HASH_LABEL))
                .is_none()
        });
        for r in unlabelled {
            let hash = revision_hash_of(r, name_of(ds));
            let mut p = json!({"metadata": {"labels": {REVISION_HASH_LABEL: hash}}});
            if is_new && name_of(r) == name_of(&cur) {
                if let Some(a) = ds
                    .pointer("/metadata/annotations")
                    .filter(|a| a.is_object())
                {
                    p["metadata"]["annotations"] = a.clone();
                }
            }
            if let Err(e) = self
                .client
                .merge_patch(&def, Some(ns), name_of(r), &p)
                .await
            {
                tracing::debug!(revision = %name_of(r), error = %e, "labelling");
            }
        }
        Ok((cur, owned))
    }

    /// A revision of the current template's name exists: it is ours (the cache is behind), or
    /// another template's hash collided, and the collision count moves on.
    async fn resolve_collision(&self, ds: &Value, ns: &str, err: ApiError) -> ApiResult<Value> {
        let def = self.revisions.def.clone();
        let collision_count = ds
            .pointer("/status/collisionCount")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let data = history::revision_data(ds);
        let name = format!(
            "{}-{}",
            name_of(ds),
            history::revision_hash(&data, collision_count)
        );
        let existing = self.client.get(&def, Some(ns), &name).await?;
        if existing["data"] == data {
            return Ok(existing);
        }
        let fresh = self
            .client
            .get(&self.daemonsets.def, Some(ns), name_of(ds))
            .await?;
        let fresh_count = fresh
            .pointer("/status/collisionCount")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if fresh_count == collision_count {
            self.client
                .merge_patch_status(
                    &self.daemonsets.def,
                    Some(ns),
                    name_of(ds),
                    &json!({"status": {"collisionCount": collision_count + 1}}),
                )
                .await?;
        }
        Err(err)
    }

    /// Deletes old revisions beyond `revisionHistoryLimit`, keeping those pods still use.
    async fn cleanup_history(
        &self,
        ds: &Value,
        ns: &str,
        cur: &Value,
        revisions: &[Arc<Value>],
        pods: &[Arc<Value>],
    ) {
        let limit = ds
            .pointer("/spec/revisionHistoryLimit")
            .and_then(Value::as_i64)
            .unwrap_or(10);
        let ds_name = name_of(ds);
        let live_hashes: Vec<&str> = pods.iter().map(|p| pod_hash(p)).collect();
        let mut live: Vec<&str> = revisions
            .iter()
            .filter(|r| live_hashes.contains(&revision_hash_of(r, ds_name).as_str()))
            .map(|r| name_of(r))
            .collect();
        live.push(name_of(cur));
        for r in history::to_truncate(revisions, &live, limit) {
            match self
                .client
                .delete_uid(&self.revisions.def, Some(ns), name_of(r), uid_of(r), None)
                .await
            {
                Ok(_) => {}
                Err(e) if e.code == 404 => {}
                Err(e) => tracing::debug!(revision = %name_of(r), error = %e, "deleting"),
            }
        }
    }

    async fn apply(&self, ds: &Value, key: &str, ns: &str, hash: &str, p: Plan) -> ApiResult<()> {
        let pod_def = self.pods.def.clone();
        // Deleting a pod already marked for deletion (bound to a node that is gone) may show
        // no transition to observe: only the others are expected.
        let expected_deletes = p
            .delete
            .iter()
            .filter(|d| {
                self.pods
                    .get(&format!("{ns}/{}", d.name))
                    .is_none_or(|x| !is_terminating(&x))
            })
            .count();
        self.expectations
            .expect(key, p.create.len() as i64, expected_deletes as i64);
        let mut failure: Option<ApiError> = None;

        // Creations, in batches of 1, 2, 4, … stopping at the first failure (upstream's slow
        // start).
        if !p.create.is_empty() {
            let template = pod_template(ds, hash);
            let generate_name = format!("{}-", name_of(ds));
            let mut created = 0usize;
            let mut batch = 1usize;
            let mut pos = 0usize;
            while pos < p.create.len() && failure.is_none() {
                let n = batch.min(p.create.len() - pos);
                let futs = p.create[pos..pos + n].iter().map(|node| {
                    let mut pod = from_template(&template, ds, &generate_name, ns);
                    pin_to_node(&mut pod["spec"], node);
                    let client = self.client.clone();
                    let def = pod_def.clone();
                    async move { client.create(&def, Some(ns), pod).await }
                });
                for r in futures::future::join_all(futs).await {
                    match r {
                        Ok(pod) => {
                            created += 1;
                            self.recorder.event(
                                ds,
                                "Normal",
                                "SuccessfulCreate",
                                format!("Created pod: {}", name_of(&pod)),
                            );
                        }
                        Err(e) => {
                            self.recorder.event(
                                ds,
                                "Warning",
                                "FailedCreate",
                                format!("Error creating: {}", e.message),
                            );
                            failure = Some(e);
                        }
                    }
                }
                pos += n;
                batch *= 2;
            }
            self.expectations
                .lower(key, (p.create.len() - created) as i64, 0);
        }

        // Deletions.
        let uid = uid_of(ds).to_string();
        for d in &p.delete {
            match d.why {
                Why::Failed => {
                    self.backoff.next(&format!("{uid}/{}", d.node));
                    self.recorder.event(
                        ds,
                        "Warning",
                        "FailedDaemonPod",
                        format!(
                            "Found failed daemon pod {ns}/{} on node {}, will try to kill it",
                            d.name, d.node
                        ),
                    );
                }
                Why::Succeeded => self.recorder.event(
                    ds,
                    "Normal",
                    "SucceededDaemonPod",
                    format!(
                        "Found succeeded daemon pod {ns}/{} on node {}, will try to delete it",
                        d.name, d.node
                    ),
                ),
                _ => {}
            }
        }
        let futs = p.delete.iter().map(|d| {
            let client = self.client.clone();
            let def = pod_def.clone();
            // A pod bound to a node that is gone has no kubelet to finish it (what upstream's
            // pod GC does: delete it at once).
            let opts = DeleteOpts {
                precondition_uid: Some(d.uid.clone()).filter(|u| !u.is_empty()),
                grace_period: (d.why == Why::NodeGone).then_some(0),
                ..Default::default()
            };
            async move { (d, client.delete(&def, Some(ns), &d.name, &opts).await) }
        });
        for (d, r) in futures::future::join_all(futs).await {
            match r {
                Ok(_) => self.recorder.event(
                    ds,
                    "Normal",
                    "SuccessfulDelete",
                    format!("Deleted pod: {}", d.name),
                ),
                Err(e) if e.code == 404 || e.code == 409 => self.expectations.lower(key, 0, 1),
                Err(e) => {
                    self.expectations.lower(key, 0, 1);
                    self.recorder.event(
                        ds,
                        "Warning",
                        "FailedDelete",
                        format!("Error deleting: {}", e.message),
                    );
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The DaemonSets a pod change concerns: its controller, or (orphans) those whose selector
    /// matches it.
    fn daemonsets_of(&self, pod: &Value) -> Vec<String> {
        let ns = namespace_of(pod);
        if let Some(c) = controller_of(pod) {
            if c["kind"] != "DaemonSet" {
                return vec![];
            }
            let key = format!("{ns}/{}", c["name"].as_str().unwrap_or_default());
            return match self.daemonsets.get(&key) {
                Some(ds) if c["uid"] == uid_of(&ds) => vec![key],
                _ => vec![],
            };
        }
        self.daemonsets
            .list_namespace(ns)
            .into_iter()
            .filter(|ds| {
                from_label_selector_object(&ds["spec"]["selector"])
                    .is_ok_and(|s| !s.is_empty() && s.matches_object(pod))
            })
            .map(|ds| key_of(&ds))
            .collect()
    }

    /// DaemonSets whose view of a node changed.
    fn daemonsets_for_node(&self, ch: &Change) -> Vec<String> {
        let dss = self.daemonsets.list();
        let fit_of =
            |ds: &Value, n: &Value| node_fit(&daemon_pod_spec(ds), &NodeInfo::from_node(n));
        match ch {
            Change::Added(n) => dss
                .iter()
                .filter(|ds| fit_of(ds, n).should_run)
                .map(|ds| key_of(ds))
                .collect(),
            Change::Deleted(_) => dss.iter().map(|ds| key_of(ds)).collect(),
            Change::Updated { old, new } => {
                if old.pointer("/metadata/labels") == new.pointer("/metadata/labels")
                    && old.get("spec") == new.get("spec")
                {
                    return vec![];
                }
                dss.iter()
                    .filter(|ds| fit_of(ds, old) != fit_of(ds, new))
                    .map(|ds| key_of(ds))
                    .collect()
            }
        }
    }
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client(MANAGER);
    let c = Arc::new(Controller {
        daemonsets: ctx.informers.get(&client.def("apps", "v1", "daemonsets")),
        pods: ctx.informers.get(&client.def("", "v1", "pods")),
        nodes: ctx.informers.get(&client.def("", "v1", "nodes")),
        revisions: ctx
            .informers
            .get(&client.def("apps", "v1", "controllerrevisions")),
        expectations: Expectations::default(),
        backoff: FailedBackoff::default(),
        recorder: Recorder::new(client.clone(), MANAGER),
        client,
    });
    let queue = Queue::new();
    let mut tasks = Vec::new();
    {
        let c = c.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut ds_rx = c.daemonsets.subscribe();
            let mut pod_rx = c.pods.subscribe();
            let mut node_rx = c.nodes.subscribe();
            let mut rev_rx = c.revisions.subscribe();
            c.daemonsets.wait_synced().await;
            c.pods.wait_synced().await;
            c.nodes.wait_synced().await;
            c.revisions.wait_synced().await;
            for ds in c.daemonsets.list() {
                queue.add(key_of(&ds));
            }
            loop {
                tokio::select! {
                    Some(ch) = ds_rx.recv() => queue.add(key_of(ch.object())),
                    Some(ch) = pod_rx.recv() => {
                        let keys = match &ch {
                            Change::Added(p) => {
                                let keys = c.daemonsets_of(p);
                                if controller_of(p).is_some() {
                                    if let Some(k) = keys.first() {
                                        c.expectations.observed_add(k);
                                    }
                                }
                                keys
                            }
                            Change::Deleted(p) => {
                                let keys = c.daemonsets_of(p);
                                if controller_of(p).is_some() {
                                    if let Some(k) = keys.first() {
                                        c.expectations.observed_delete(k);
                                    }
                                }
                                keys
                            }
                            Change::Updated { old, new } => {
                                let mut keys = c.daemonsets_of(new);
                                if is_terminating(new) && !is_terminating(old) && controller_of(new).is_some() {
                                    if let Some(k) = keys.first() {
                                        c.expectations.observed_delete(k);
                                    }
                                }
                                for k in c.daemonsets_of(old) {
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
                    Some(ch) = node_rx.recv() => {
                        for k in c.daemonsets_for_node(&ch) {
                            queue.add(k);
                        }
                    }
                    Some(ch) = rev_rx.recv() => {
                        let r = ch.object();
                        if let Some(o) = controller_of(r).filter(|o| o["kind"] == "DaemonSet") {
                            queue.add(format!("{}/{}", namespace_of(r), o["name"].as_str().unwrap_or_default()));
                        }
                    }
                    else => return,
                }
            }
        }));
    }
    let c2 = c.clone();
    tasks.extend(spawn_workers(queue, 2, MANAGER, move |key| {
        let c = c2.clone();
        async move { c.sync(key).await }
    }));
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "new";

    fn node(name: &str, labels: Value, taints: Value) -> Arc<Value> {
        Arc::new(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"taints": taints},
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"}},
        }))
    }

    fn plain(name: &str) -> Arc<Value> {
        node(name, json!({}), json!([]))
    }

    fn ds(spec: Value, strategy: Value) -> Value {
        json!({
            "metadata": {"name": "ds", "namespace": "d", "uid": "u1", "generation": 3},
            "spec": {
                "selector": {"matchLabels": {"app": "a"}},
                "template": {"metadata": {"labels": {"app": "a"}}, "spec": spec},
                "updateStrategy": strategy,
            }
        })
    }

    fn rolling(max_unavailable: Value, max_surge: Value) -> Value {
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": max_unavailable, "maxSurge": max_surge}})
    }

    fn simple() -> Value {
        ds(
            json!({"containers": [{"name": "c", "image": "i"}]}),
            rolling(json!(1), json!(0)),
        )
    }

    /// A daemon pod on `node` from revision `hash`, created at second `age_rank` of a day.
    fn pod(
        name: &str,
        node: &str,
        hash: &str,
        phase: &str,
        ready: bool,
        created: u32,
    ) -> Arc<Value> {
        Arc::new(json!({
            "metadata": {
                "name": name, "uid": format!("uid-{name}"), "namespace": "d",
                "labels": {"app": "a", REVISION_HASH_LABEL: hash},
                "creationTimestamp": format!("2026-01-01T00:00:{created:02}Z"),
                "ownerReferences": [{"kind": "DaemonSet", "name": "ds", "uid": "u1", "controller": true}],
            },
            "spec": {"nodeName": node},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }, "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
        }))
    }

    fn terminating(p: &Arc<Value>) -> Arc<Value> {
        let mut v = (**p).clone();
        v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:01:00Z");
        v["metadata"]["deletionGracePeriodSeconds"] = json!(30);
        Arc::new(v)
    }

    fn now() -> jiff::Timestamp {
        "2026-01-01T01:00:00Z".parse().unwrap()
    }

    fn run(ds: &Value, nodes: &[Arc<Value>], pods: &[Arc<Value>]) -> Plan {
        plan(
            ds,
            &Observed {
                nodes,
                pods,
                hash: HASH,
                now: now(),
                backoff: &HashMap::new(),
            },
        )
    }

    fn deleted(p: &Plan) -> Vec<(&str, Why)> {
        p.delete.iter().map(|d| (d.name.as_str(), d.why)).collect()
    }

    fn fit_on(spec: Value, n: &Arc<Value>) -> (bool, bool) {
        let d = ds(spec, rolling(json!(1), json!(0)));
        let f = node_fit(&daemon_pod_spec(&d), &NodeInfo::from_node(n));
        (f.should_run, f.should_continue)
    }

    #[test]
    fn eligibility_follows_taints_tolerations_selectors_and_affinity() {
        let no_schedule = node(
            "t",
            json!({}),
            json!([{"key": "dedicated", "value": "infra", "effect": "NoSchedule"}]),
        );
        let no_execute = node(
            "x",
            json!({}),
            json!([{"key": "dedicated", "value": "infra", "effect": "NoExecute"}]),
        );
        let prefer = node(
            "p",
            json!({}),
            json!([{"key": "dedicated", "value": "infra", "effect": "PreferNoSchedule"}]),
        );
        let edge = node("e", json!({"role": "edge"}), json!([]));
        let toleration = json!({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}]});
        type Case<'a> = (&'a str, Value, &'a Arc<Value>, (bool, bool));
        let cases: Vec<Case> = vec![
            ("untainted node", json!({}), &edge, (true, true)),
            (
                "NoSchedule taint: no new pod, a running one stays",
                json!({}),
                &no_schedule,
                (false, true),
            ),
            (
                "NoExecute taint: evicted",
                json!({}),
                &no_execute,
                (false, false),
            ),
            (
                "PreferNoSchedule is no obstacle",
                json!({}),
                &prefer,
                (true, true),
            ),
            (
                "tolerated NoSchedule",
                toleration.clone(),
                &no_schedule,
                (true, true),
            ),
            (
                "toleration for NoSchedule only does not cover NoExecute",
                toleration,
                &no_execute,
                (false, false),
            ),
            (
                "Exists on every taint",
                json!({"tolerations": [{"operator": "Exists"}]}),
                &no_execute,
                (true, true),
            ),
            (
                "nodeSelector matches",
                json!({"nodeSelector": {"role": "edge"}}),
                &edge,
                (true, true),
            ),
            (
                "nodeSelector does not match",
                json!({"nodeSelector": {"role": "core"}}),
                &edge,
                (false, false),
            ),
            (
                "required affinity does not match",
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "role", "operator": "In", "values": ["core"]}]}]}}}}),
                &edge,
                (false, false),
            ),
            (
                "required affinity matches one term",
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "role", "operator": "In", "values": ["core"]}]}, {"matchExpressions": [{"key": "role", "operator": "Exists"}]}]}}}}),
                &edge,
                (true, true),
            ),
            (
                "template pinned to another node",
                json!({"nodeName": "other"}),
                &edge,
                (false, false),
            ),
        ];
        for (what, spec, n, want) in cases {
            assert_eq!(fit_on(spec, n), want, "{what}");
        }
    }

    #[test]
    fn default_tolerations_cover_node_conditions_and_cordons() {
        let taint =
            |key: &str, effect: &str| node("n", json!({}), json!([{"key": key, "effect": effect}]));
        for (key, effect) in [
            ("node.kubernetes.io/not-ready", "NoExecute"),
            ("node.kubernetes.io/unreachable", "NoExecute"),
            ("node.kubernetes.io/disk-pressure", "NoSchedule"),
            ("node.kubernetes.io/memory-pressure", "NoSchedule"),
            ("node.kubernetes.io/pid-pressure", "NoSchedule"),
            ("node.kubernetes.io/unschedulable", "NoSchedule"),
        ] {
            assert_eq!(
                fit_on(json!({}), &taint(key, effect)),
                (true, true),
                "{key}"
            );
        }
        let net = taint("node.kubernetes.io/network-unavailable", "NoSchedule");
        assert_eq!(
            fit_on(json!({}), &net),
            (false, true),
            "only host-network pods tolerate it"
        );
        assert_eq!(fit_on(json!({"hostNetwork": true}), &net), (true, true));

        // A template toleration of the same taint loses its tolerationSeconds; others stay.
        let mut spec = json!({"tolerations": [
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "mine", "operator": "Exists"},
        ]});
        add_default_tolerations(&mut spec);
        let tols = spec["tolerations"].as_array().unwrap();
        assert_eq!(tols.len(), 7);
        assert_eq!(
            tols[0],
            json!({"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"})
        );
        assert_eq!(tols[1]["key"], "mine");
        assert!(tols.iter().all(|t| t.get("tolerationSeconds").is_none()));
    }

    #[test]
    fn new_pods_are_pinned_labelled_and_tolerant() {
        let mut d = simple();
        d["spec"]["template"]["spec"]["affinity"] = json!({"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "role", "operator": "Exists"}]}]},
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1, "preference": {"matchExpressions": [{"key": "a", "operator": "Exists"}]}}],
        }});
        let t = pod_template(&d, "h1");
        assert_eq!(
            t["metadata"]["labels"],
            json!({"app": "a", REVISION_HASH_LABEL: "h1", TEMPLATE_GENERATION_LABEL: "3"})
        );
        assert_eq!(t["spec"]["tolerations"].as_array().unwrap().len(), 6);
        let mut p = from_template(&t, &d, "ds-", "d");
        pin_to_node(&mut p["spec"], "n7");
        let na = &p["spec"]["affinity"]["nodeAffinity"];
        assert_eq!(
            na["requiredDuringSchedulingIgnoredDuringExecution"],
            json!({"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n7"]}]}]})
        );
        assert!(
            na["preferredDuringSchedulingIgnoredDuringExecution"].is_array(),
            "preferences kept"
        );
        assert_eq!(target_node(&p), Some("n7"));
        assert_eq!(p["metadata"]["generateName"], "ds-");
        let mut bare = json!({});
        pin_to_node(&mut bare, "n1");
        assert_eq!(target_node(&json!({"spec": bare})), Some("n1"));
    }

    #[test]
    fn one_pod_per_eligible_node() {
        let tainted = node(
            "c",
            json!({}),
            json!([{"key": "dedicated", "value": "infra", "effect": "NoSchedule"}]),
        );
        let nodes = vec![plain("a"), plain("b"), tainted];
        let p = run(&simple(), &nodes, &[]);
        assert_eq!(p.create, vec!["a", "b"]);
        assert!(p.delete.is_empty());

        // A pod already on the tainted node stays (NoSchedule does not evict); none is added.
        let pods = vec![
            pod("pa", "a", HASH, "Running", true, 1),
            pod("pc", "c", HASH, "Running", true, 1),
        ];
        let p = run(&simple(), &nodes, &pods);
        assert_eq!(p.create, vec!["b"]);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn pods_leave_nodes_that_no_longer_fit_or_are_gone() {
        let mut d = simple();
        d["spec"]["template"]["spec"]["nodeSelector"] = json!({"role": "edge"});
        let nodes = vec![node("a", json!({"role": "edge"}), json!([])), plain("b")];
        let pods = vec![
            pod("pa", "a", HASH, "Running", true, 1),
            pod("pb", "b", HASH, "Running", true, 1),
            pod("pg", "gone", HASH, "Running", true, 1),
        ];
        let p = run(&d, &nodes, &pods);
        assert!(p.create.is_empty());
        assert_eq!(
            deleted(&p),
            vec![("pb", Why::NotEligible), ("pg", Why::NodeGone)]
        );

        // NoExecute evicts.
        let nodes = vec![node(
            "a",
            json!({"role": "edge"}),
            json!([{"key": "k", "effect": "NoExecute"}]),
        )];
        let p = run(&d, &nodes, &pods[..1]);
        assert_eq!(deleted(&p), vec![("pa", Why::NotEligible)]);

        // An unscheduled pod for a gone node goes too; one already deleting is left alone.
        let mut pending = (*pod("pp", "", HASH, "Pending", false, 1)).clone();
        pin_to_node(&mut pending["spec"], "gone");
        let p = run(&d, &[], &[Arc::new(pending.clone())]);
        assert_eq!(deleted(&p), vec![("pp", Why::NodeGone)]);
        let p = run(&d, &[], &[terminating(&Arc::new(pending))]);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn extra_pods_on_a_node_go_and_the_oldest_stays() {
        let nodes = vec![plain("a")];
        let pods = vec![
            pod("young", "a", HASH, "Running", true, 30),
            pod("old", "a", HASH, "Running", true, 10),
            pod("mid", "a", HASH, "Pending", false, 20),
        ];
        let p = run(&simple(), &nodes, &pods);
        assert_eq!(
            deleted(&p),
            vec![("mid", Why::Excess), ("young", Why::Excess)]
        );
    }

    #[test]
    fn failed_pods_are_replaced_with_back_off() {
        let nodes = vec![plain("a"), plain("b")];
        let pods = vec![
            pod("fa", "a", HASH, "Failed", false, 1),
            pod("sb", "b", HASH, "Succeeded", false, 1),
        ];
        let p = run(&simple(), &nodes, &pods);
        assert_eq!(
            deleted(&p),
            vec![("fa", Why::Failed), ("sb", Why::Succeeded)]
        );
        assert!(
            p.create.is_empty(),
            "the replacement comes once the failed pod is gone"
        );

        let backoff = HashMap::from([("a".to_string(), Duration::from_secs(4))]);
        let p = plan(
            &simple(),
            &Observed {
                nodes: &nodes,
                pods: &pods[..1],
                hash: HASH,
                now: now(),
                backoff: &backoff,
            },
        );
        assert!(p.delete.is_empty());
        assert_eq!(p.requeue, Some(Duration::from_secs(4)));

        // Gone from the cache (finished and deleting): a new one is made.
        let p = run(&simple(), &nodes[..1], &[terminating(&pods[0])]);
        assert_eq!(p.create, vec!["a"]);
        // A running pod that is terminating holds the node until it is gone.
        let p = run(
            &simple(),
            &nodes[..1],
            &[terminating(&pod("r", "a", HASH, "Running", true, 1))],
        );
        assert!(p.is_idle());
    }

    #[test]
    fn rolling_update_keeps_within_max_unavailable() {
        let nodes: Vec<Arc<Value>> = ["a", "b", "c", "d"].iter().map(|n| plain(n)).collect();
        let old = |n: &str| pod(&format!("old-{n}"), n, "old", "Running", true, 1);
        let all_old: Vec<Arc<Value>> = ["a", "b", "c", "d"].iter().map(|n| old(n)).collect();

        let p = run(&simple(), &nodes, &all_old);
        assert_eq!(deleted(&p), vec![("old-a", Why::Update)]);
        assert!(
            p.create.is_empty(),
            "manage creates the successor once the old pod is gone"
        );

        // 50% of 4 nodes: two at a time.
        let d = ds(json!({}), rolling(json!("50%"), json!(0)));
        assert_eq!(run(&d, &nodes, &all_old).delete.len(), 2);
        // 30% of 4 rounds up to 2.
        assert_eq!(
            budget(&ds(json!({}), rolling(json!("30%"), json!(0))), 4),
            (0, 2)
        );
        // Both zero: one at a time.
        assert_eq!(
            budget(&ds(json!({}), rolling(json!(0), json!(0))), 4),
            (0, 1)
        );

        // A new pod that is not available yet uses the budget.
        let mut pods = all_old.clone();
        pods[0] = pod("new-a", "a", HASH, "Running", false, 2);
        assert!(run(&simple(), &nodes, &pods).is_idle());
        // Once it is available, the next old pod goes.
        pods[0] = pod("new-a", "a", HASH, "Running", true, 2);
        assert_eq!(
            deleted(&run(&simple(), &nodes, &pods)),
            vec![("old-b", Why::Update)]
        );
        // An old pod that is not available is replaced whatever the budget.
        pods[0] = pod("new-a", "a", HASH, "Running", false, 2);
        pods[2] = pod("old-c", "c", "old", "Running", false, 1);
        assert_eq!(
            deleted(&run(&simple(), &nodes, &pods)),
            vec![("old-c", Why::Update)]
        );

        // OnDelete: old pods stay.
        let d = ds(json!({}), json!({"type": "OnDelete"}));
        assert!(run(&d, &nodes, &all_old).is_idle());
    }

    #[test]
    fn surge_update_starts_new_pods_before_stopping_old_ones() {
        let nodes: Vec<Arc<Value>> = ["a", "b", "c"].iter().map(|n| plain(n)).collect();
        let d = ds(json!({}), rolling(json!(0), json!(1)));
        let mut pods: Vec<Arc<Value>> = ["a", "b", "c"]
            .iter()
            .map(|n| pod(&format!("old-{n}"), n, "old", "Running", true, 1))
            .collect();
        let p = run(&d, &nodes, &pods);
        assert_eq!(p.create, vec!["a"], "one surge pod at a time");
        assert!(
            p.delete.is_empty(),
            "nothing old goes before its successor is available"
        );

        // The surge pod is starting: wait (manage keeps both pods).
        pods.push(pod("new-a", "a", HASH, "Pending", false, 2));
        assert!(run(&d, &nodes, &pods).is_idle());

        // Available: the old pod on that node goes; the next node waits for the budget.
        pods[3] = pod("new-a", "a", HASH, "Running", true, 2);
        let p = run(&d, &nodes, &pods);
        assert_eq!(deleted(&p), vec![("old-a", Why::Update)]);
        assert!(p.create.is_empty());

        // Old pod gone: the next surge pod starts.
        pods.remove(0);
        assert_eq!(run(&d, &nodes, &pods).create, vec!["b"]);

        // An old pod that is not ready gets its successor at once, beyond the surge budget.
        let mut pods: Vec<Arc<Value>> = ["a", "b", "c"]
            .iter()
            .map(|n| pod(&format!("old-{n}"), n, "old", "Running", *n != "c", 1))
            .collect();
        pods.push(pod("new-a", "a", HASH, "Pending", false, 2));
        assert_eq!(run(&d, &nodes, &pods).create, vec!["c"]);
    }

    #[test]
    fn status_counts_as_upstream() {
        let tainted = node(
            "c",
            json!({}),
            json!([{"key": "dedicated", "effect": "NoSchedule"}]),
        );
        let nodes = vec![plain("a"), plain("b"), tainted, plain("d")];
        let pods = vec![
            pod("pa", "a", HASH, "Running", true, 1),
            pod("pb", "b", "old", "Running", false, 1),
            pod("pc", "c", HASH, "Running", true, 1),
        ];
        let s = status(
            &simple(),
            &Observed {
                nodes: &nodes,
                pods: &pods,
                hash: HASH,
                now: now(),
                backoff: &HashMap::new(),
            },
        );
        assert_eq!(
            s,
            json!({
                "desiredNumberScheduled": 3, "currentNumberScheduled": 2, "numberMisscheduled": 1,
                "numberReady": 1, "updatedNumberScheduled": 1, "numberAvailable": 1, "numberUnavailable": 2,
            })
        );
        let mut d = simple();
        d["status"] = s.clone();
        d["status"]["observedGeneration"] = json!(3);
        assert_eq!(status_patch(&d, &s, true), None, "nothing changed");
        d["metadata"]["generation"] = json!(4);
        assert_eq!(
            status_patch(&d, &s, false),
            None,
            "a generation not acted on is not observed"
        );
        assert_eq!(
            status_patch(&d, &s, true).unwrap()["status"]["observedGeneration"],
            4
        );
    }

    #[test]
    fn ready_pods_are_looked_at_again_when_they_become_available() {
        let mut d = simple();
        let ready_at = |secs: u32| {
            let mut p = (*pod("p", "a", HASH, "Running", true, 1)).clone();
            p["status"]["conditions"][0]["lastTransitionTime"] =
                json!(format!("2026-01-01T00:59:{secs:02}Z"));
            Arc::new(p)
        };
        let pods = vec![
            ready_at(50),
            ready_at(55),
            pod("q", "b", HASH, "Running", false, 1),
        ];
        assert_eq!(next_available(&d, &pods, now()), None, "no minReadySeconds");
        d["spec"]["minReadySeconds"] = json!(30);
        assert_eq!(
            next_available(&d, &pods, now()),
            Some(Duration::from_secs(20))
        );
        d["spec"]["minReadySeconds"] = json!(5);
        assert_eq!(
            next_available(&d, &pods, now()),
            None,
            "all available already"
        );
    }

    #[test]
    fn pods_are_claimed_by_selector() {
        let d = simple();
        let sel = from_label_selector_object(&d["spec"]["selector"]).unwrap();
        let mut orphan = (*pod("orphan", "a", "x", "Running", true, 1)).clone();
        orphan["metadata"]["ownerReferences"] = Value::Null;
        let mut relabeled = (*pod("relabeled", "b", "x", "Running", true, 1)).clone();
        relabeled["metadata"]["labels"]["app"] = json!("b");
        let pods = vec![
            Arc::new(orphan),
            Arc::new(relabeled),
            pod("mine", "c", "x", "Running", true, 1),
        ];
        let (adopt, release, owned) = claim(&d, &sel, &pods);
        assert_eq!(adopt, vec!["orphan"]);
        assert_eq!(release, vec!["relabeled"]);
        assert_eq!(
            owned.iter().map(|p| name_of(p)).collect::<Vec<_>>(),
            vec!["orphan", "mine"]
        );
    }

    #[test]
    fn revision_hashes_come_from_labels_or_names() {
        assert_eq!(
            revision_hash_of(
                &json!({"metadata": {"name": "ds-abc", "labels": {REVISION_HASH_LABEL: "x"}}}),
                "ds"
            ),
            "x"
        );
        assert_eq!(
            revision_hash_of(
                &json!({"metadata": {"name": "ds-abc", "labels": {HASH_LABEL: "y"}}}),
                "ds"
            ),
            "y"
        );
        assert_eq!(
            revision_hash_of(&json!({"metadata": {"name": "ds-abc"}}), "ds"),
            "abc"
        );
    }
}
