//! The StatefulSet controller: pods with stable identities `<set>-<ordinal>`, created in order
//! and each waited for (OrderedReady) or all at once (Parallel); their PersistentVolumeClaims
//! from `volumeClaimTemplates` under the claim retention policy; scale-down from the highest
//! ordinal; rolling updates from the highest ordinal down (partition, maxUnavailable) or OnDelete;
//! ControllerRevision history (what `kubectl rollout history/undo` read); adoption and status.
//!
//! A reconcile is `plan` (a pure decision over the set, its pods and claims) and `apply`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::selectors::{from_label_selector_object, LabelSelector};
use crate::api::status::{ApiError, ApiResult};
use crate::controllers::client::{
    controller_of, is_terminating, key_of, name_of, namespace_of, owner_ref, split_key, uid_of,
    Client,
};
use crate::controllers::events::Recorder;
use crate::controllers::history;
use crate::controllers::informer::{Change, Informer};
use crate::controllers::pods::{self, from_template, phase};
use crate::controllers::queue::Queue;
use crate::controllers::{spawn_workers, Context, Expectations};

const MANAGER: &str = "statefulset-controller";
pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
/// The label naming the ControllerRevision a pod was made from.
pub const REVISION_LABEL: &str = "controller-revision-hash";

/// The parent name and ordinal of a pod named `<parent>-<ordinal>` (upstream's
/// `(.*)-([0-9]+)$`, the ordinal a 32-bit integer).
pub fn parent_and_ordinal(name: &str) -> Option<(&str, i64)> {
    let (parent, ord) = name.rsplit_once('-')?;
    if ord.is_empty() || !ord.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ord.parse::<i32>().ok().map(|n| (parent, i64::from(n)))
}

/// The ordinal of `pod` if it is a member of the set named `set_name`.
fn ordinal_in(set_name: &str, pod: &Value) -> Option<i64> {
    parent_and_ordinal(name_of(pod))
        .filter(|(p, _)| *p == set_name)
        .map(|(_, o)| o)
}

pub fn revision_of(pod: &Value) -> &str {
    pod.pointer("/metadata/labels")
        .and_then(|l| l.get(REVISION_LABEL))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn running_ready(p: &Value) -> bool {
    phase(p) == "Running" && pods::is_ready(p)
}

fn running_available(p: &Value, min_ready: i64, now: jiff::Timestamp) -> bool {
    phase(p) == "Running" && pods::is_available(p, min_ready, now)
}

/// Not counted as available: terminating, not running and ready, or ready for less than
/// `minReadySeconds`.
fn unavailable(p: &Value, min_ready: i64, now: jiff::Timestamp) -> bool {
    is_terminating(p) || !running_available(p, min_ready, now)
}

/// The parts of a StatefulSet's spec the decisions use, with upstream's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub start: i64,
    pub replicas: i64,
    /// OrderedReady (one at a time, in order) rather than Parallel.
    pub monotonic: bool,
    pub min_ready: i64,
    pub on_delete: bool,
    pub partition: i64,
    pub max_unavailable: i64,
    pub delete_when_scaled: bool,
    pub delete_when_deleted: bool,
}

impl Spec {
    pub fn of(set: &Value) -> Spec {
        let s = &set["spec"];
        let replicas = s["replicas"].as_i64().unwrap_or(1).max(0);
        let rolling = &s["updateStrategy"]["rollingUpdate"];
        let max_unavailable = match &rolling["maxUnavailable"] {
            Value::Number(n) => n.as_i64().unwrap_or(1),
            Value::String(p) => p
                .strip_suffix('%')
                .and_then(|p| p.parse::<i64>().ok())
                .map_or(1, |pct| pct * replicas / 100),
            _ => 1,
        }
        .max(1);
        Spec {
            start: s
                .pointer("/ordinals/start")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                .max(0),
            replicas,
            monotonic: s["podManagementPolicy"].as_str() != Some("Parallel"),
            min_ready: s["minReadySeconds"].as_i64().unwrap_or(0),
            on_delete: s["updateStrategy"]["type"].as_str() == Some("OnDelete"),
            partition: rolling["partition"].as_i64().unwrap_or(0).max(0),
            max_unavailable,
            delete_when_scaled: s["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Delete",
            delete_when_deleted: s["persistentVolumeClaimRetentionPolicy"]["whenDeleted"]
                == "Delete",
        }
    }

    fn end(&self) -> i64 {
        self.start + self.replicas
    }

    fn in_range(&self, ordinal: i64) -> bool {
        ordinal >= self.start && ordinal < self.end()
    }
}

fn claim_templates(set: &Value) -> Vec<Value> {
    set.pointer("/spec/volumeClaimTemplates")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// `<template>-<set>-<ordinal>`.
pub fn claim_name(set: &Value, template: &Value, ordinal: i64) -> String {
    format!("{}-{}-{ordinal}", name_of(template), name_of(set))
}

fn pod_owner_ref(pod: &Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "name": name_of(pod), "uid": uid_of(pod), "controller": true, "blockOwnerDeletion": true})
}

/// The claim of `template` for the pod at `ordinal`: labelled with the set's selector, owned by
/// the set when the retention policy deletes claims with it.
pub fn new_claim(set: &Value, template: &Value, ordinal: i64) -> Value {
    let mut labels = template
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if let Some(m) = set
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
    {
        for (k, v) in m {
            labels.insert(k.clone(), v.clone());
        }
    }
    let mut md = json!({
        "name": claim_name(set, template, ordinal),
        "namespace": namespace_of(set),
        "labels": labels,
    });
    if let Some(a) = template.pointer("/metadata/annotations") {
        md["annotations"] = a.clone();
    }
    if Spec::of(set).delete_when_deleted {
        md["ownerReferences"] = json!([owner_ref(set, true)]);
    }
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": md,
        "spec": template.get("spec").cloned().unwrap_or(json!({})),
    })
}

/// The pod at `ordinal` made from `template` (the set's, or the current revision's), labelled
/// with its identity and `revision`, with one volume per claim template.
pub fn new_pod(set: &Value, template: &Value, ordinal: i64, revision: &str) -> Value {
    let name = format!("{}-{ordinal}", name_of(set));
    let mut pod = from_template(template, set, "", namespace_of(set));
    let md = &mut pod["metadata"];
    if let Some(m) = md.as_object_mut() {
        m.remove("generateName");
    }
    md["name"] = json!(name);
    if !md["labels"].is_object() {
        md["labels"] = json!({});
    }
    md["labels"][POD_NAME_LABEL] = json!(name);
    md["labels"][POD_INDEX_LABEL] = json!(ordinal.to_string());
    md["labels"][REVISION_LABEL] = json!(revision);
    let spec = &mut pod["spec"];
    spec["hostname"] = json!(name);
    if let Some(svc) = set
        .pointer("/spec/serviceName")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        spec["subdomain"] = json!(svc);
    }
    let templates = claim_templates(set);
    if !templates.is_empty() {
        let mut volumes: Vec<Value> = templates
            .iter()
            .map(|t| json!({"name": name_of(t), "persistentVolumeClaim": {"claimName": claim_name(set, t, ordinal)}}))
            .collect();
        let claimed: HashSet<&str> = templates.iter().map(name_of).collect();
        for v in spec["volumes"].as_array().into_iter().flatten() {
            if !claimed.contains(v["name"].as_str().unwrap_or_default()) {
                volumes.push(v.clone());
            }
        }
        spec["volumes"] = Value::Array(volumes);
    }
    pod
}

/// The owner references `claim` should have for `pod` under the set's retention policy, or
/// `None` when it has them. Claims referring to an earlier set or pod of the same name (being
/// garbage collected) and claims controlled by someone else are left alone, as upstream does.
pub fn claim_owners(
    claim: &Value,
    set: &Value,
    pod: &Value,
    scaled_down: bool,
) -> Option<Vec<Value>> {
    let s = Spec::of(set);
    let refs: Vec<Value> = claim
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let is_set = |r: &Value| {
        r["apiVersion"] == "apps/v1" && r["kind"] == "StatefulSet" && r["name"] == name_of(set)
    };
    let is_pod =
        |r: &Value| r["apiVersion"] == "v1" && r["kind"] == "Pod" && r["name"] == name_of(pod);
    if refs
        .iter()
        .any(|r| (is_set(r) && r["uid"] != uid_of(set)) || (is_pod(r) && r["uid"] != uid_of(pod)))
    {
        return None;
    }
    let retain = !s.delete_when_scaled && !s.delete_when_deleted;
    let foreign_controller = !retain
        && refs
            .iter()
            .any(|r| !is_set(r) && !is_pod(r) && r["controller"].as_bool() == Some(true));
    let mut desired: Vec<Value> = refs
        .iter()
        .filter(|r| !is_set(r) && !is_pod(r))
        .cloned()
        .collect();
    if !foreign_controller {
        if s.delete_when_scaled && scaled_down {
            desired.push(pod_owner_ref(pod));
        } else if s.delete_when_deleted {
            desired.push(owner_ref(set, true));
        }
    }
    let key = |v: &[Value]| {
        let mut k: Vec<(String, bool)> = v
            .iter()
            .map(|r| {
                (
                    r["uid"].as_str().unwrap_or_default().to_string(),
                    r["controller"].as_bool() == Some(true),
                )
            })
            .collect();
        k.sort();
        k
    };
    (key(&desired) != key(&refs)).then_some(desired)
}

/// Why a pod is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// It failed or succeeded: it is replaced once gone.
    Terminal,
    ScaleDown,
    Update,
}

/// One change a reconcile makes, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Create the missing claims, then the pod (none when only claims are missing).
    Create {
        ordinal: i64,
        claims: Vec<Value>,
        pod: Option<Value>,
    },
    Delete {
        name: String,
        uid: String,
        why: Why,
    },
    /// Replace a claim's owner references (the retention policy).
    ClaimOwners {
        claim: String,
        pod: String,
        owners: Vec<Value>,
    },
    /// Restore a pod's identity labels.
    Relabel {
        name: String,
        labels: Value,
    },
    /// The pod cannot be created yet (a claim of it is being deleted).
    Blocked {
        pod: String,
        reason: String,
    },
}

impl Step {
    /// A short description (`create web-0`, `delete web-2 (Update)`, …).
    pub fn describe(&self) -> String {
        match self {
            Step::Create { pod: Some(p), .. } => format!("create {}", name_of(p)),
            Step::Create {
                ordinal, claims, ..
            } => format!(
                "claims {ordinal}: {}",
                claims.iter().map(name_of).collect::<Vec<_>>().join(",")
            ),
            Step::Delete { name, why, .. } => format!("delete {name} ({why:?})"),
            Step::ClaimOwners { claim, owners, .. } if owners.is_empty() => {
                format!("release {claim}")
            }
            Step::ClaimOwners { claim, owners, .. } => format!(
                "own {claim} by {}",
                owners
                    .iter()
                    .map(|o| o["kind"].as_str().unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Step::Relabel { name, .. } => format!("relabel {name}"),
            Step::Blocked { pod, .. } => format!("blocked {pod}"),
        }
    }
}

/// What a reconcile decides from.
pub struct Observed<'a> {
    /// The set (at its update revision).
    pub set: &'a Value,
    /// The pod template of the current revision (pods below the partition are made from it).
    pub current_template: &'a Value,
    pub current_revision: &'a str,
    pub update_revision: &'a str,
    /// The set's pods: controlled by it, matching its selector, named `<set>-<ordinal>`.
    pub pods: &'a [Arc<Value>],
    /// The namespace's PersistentVolumeClaims by name.
    pub claims: &'a BTreeMap<String, Arc<Value>>,
    pub now: jiff::Timestamp,
}

/// The changes that bring the set's pods and claims towards its spec, as upstream's
/// `updateStatefulSet` orders them: replicas in range (create, replace failed), claims of
/// condemned pods, scale-down (highest ordinal first), then the rolling update. OrderedReady
/// stops at the first pod it has to wait for.
pub fn plan(o: &Observed) -> Vec<Step> {
    let set = o.set;
    let s = Spec::of(set);
    let set_name = name_of(set);
    let mut steps = Vec::new();
    if is_terminating(set) {
        return steps;
    }
    let unavail = |p: &Value| unavailable(p, s.min_ready, o.now);
    let mut replicas: BTreeMap<i64, &Value> = BTreeMap::new();
    let mut condemned: Vec<(i64, &Value)> = Vec::new();
    for p in o.pods {
        match ordinal_in(set_name, p) {
            Some(ord) if s.in_range(ord) => {
                replicas.insert(ord, p);
            }
            Some(ord) => condemned.push((ord, p)),
            None => {}
        }
    }
    condemned.sort_by_key(|(ord, _)| std::cmp::Reverse(*ord));
    // Reaching the condemned pods in OrderedReady means every replica is available, so the first
    // unavailable pod is the lowest condemned one.
    let first_unavailable = (s.start..s.end())
        .find(|ord| replicas.get(ord).is_none_or(|p| unavail(p)))
        .or_else(|| {
            condemned
                .iter()
                .rev()
                .find(|(_, p)| unavail(p))
                .map(|(o, _)| *o)
        });
    let templates = claim_templates(set);
    let claims_of = |ord: i64| -> Vec<(Value, Option<&Arc<Value>>)> {
        templates
            .iter()
            .map(|t| {
                let c = new_claim(set, t, ord);
                let existing = o.claims.get(name_of(&c));
                (c, existing)
            })
            .collect()
    };
    let mut deleting: HashSet<i64> = HashSet::new();

    for ord in s.start..s.end() {
        let pod_name = format!("{set_name}-{ord}");
        let Some(p) = replicas.get(&ord).copied() else {
            let claims = claims_of(ord);
            // A claim still owned by an earlier pod of this name is about to be collected.
            let stale = s.delete_when_scaled
                && claims.iter().filter_map(|(_, e)| *e).any(|c| {
                    c.pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .is_some_and(|refs| {
                            refs.iter()
                                .any(|r| r["kind"] == "Pod" && r["name"] == pod_name.as_str())
                        })
                });
            let deleted = claims
                .iter()
                .filter_map(|(_, e)| *e)
                .find(|c| is_terminating(c))
                .map(|c| name_of(c).to_string());
            if stale || deleted.is_some() {
                if let Some(c) = deleted {
                    steps.push(Step::Blocked {
                        pod: pod_name,
                        reason: format!("pvc {c} is being deleted"),
                    });
                }
                if s.monotonic {
                    return steps;
                }
                continue;
            }
            let (template, revision) = if !s.on_delete && ord < s.start + s.partition {
                (o.current_template, o.current_revision)
            } else {
                (&set["spec"]["template"], o.update_revision)
            };
            steps.push(Step::Create {
                ordinal: ord,
                claims: claims
                    .into_iter()
                    .filter(|(_, e)| e.is_none())
                    .map(|(c, _)| c)
                    .collect(),
                pod: Some(new_pod(set, template, ord, revision)),
            });
            if s.monotonic {
                return steps;
            }
            continue;
        };
        if matches!(phase(p), "Failed" | "Succeeded") {
            if !is_terminating(p) {
                steps.push(Step::Delete {
                    name: pod_name,
                    uid: uid_of(p).to_string(),
                    why: Why::Terminal,
                });
                deleting.insert(ord);
            }
            if s.monotonic {
                return steps;
            }
            continue;
        }
        if phase(p) == "Pending" && !is_terminating(p) {
            let missing: Vec<Value> = claims_of(ord)
                .into_iter()
                .filter(|(_, e)| e.is_none())
                .map(|(c, _)| c)
                .collect();
            if !missing.is_empty() {
                steps.push(Step::Create {
                    ordinal: ord,
                    claims: missing,
                    pod: None,
                });
            }
        }
        if s.monotonic && unavail(p) {
            return steps;
        }
        if is_terminating(p) {
            continue;
        }
        let labels = &p["metadata"]["labels"];
        if labels[POD_NAME_LABEL].as_str() != Some(pod_name.as_str()) {
            steps.push(Step::Relabel {
                name: pod_name.clone(),
                labels: json!({POD_NAME_LABEL: pod_name, POD_INDEX_LABEL: ord.to_string()}),
            });
        }
        for (_, existing) in claims_of(ord) {
            if let Some(c) = existing {
                if let Some(owners) = claim_owners(c, set, p, false) {
                    steps.push(Step::ClaimOwners {
                        claim: name_of(c).to_string(),
                        pod: pod_name.clone(),
                        owners,
                    });
                }
            }
        }
    }

    // Condemned pods hand their claims over to the retention policy before they go.
    for (ord, p) in &condemned {
        for (_, existing) in claims_of(*ord) {
            if let Some(c) = existing {
                if let Some(owners) = claim_owners(c, set, p, true) {
                    steps.push(Step::ClaimOwners {
                        claim: name_of(c).to_string(),
                        pod: name_of(p).to_string(),
                        owners,
                    });
                }
            }
        }
    }
    for (ord, p) in &condemned {
        if is_terminating(p) {
            if s.monotonic {
                return steps;
            }
            continue;
        }
        if s.monotonic && unavail(p) && first_unavailable != Some(*ord) {
            return steps;
        }
        steps.push(Step::Delete {
            name: name_of(p).to_string(),
            uid: uid_of(p).to_string(),
            why: Why::ScaleDown,
        });
        if s.monotonic {
            return steps;
        }
    }

    if s.on_delete {
        return steps;
    }
    // Rolling update: at most maxUnavailable replicas unavailable, highest ordinal first, down to
    // the partition.
    let unavailable_now = (s.start..s.end())
        .filter(|ord| replicas.get(ord).is_none_or(|p| unavail(p)))
        .count() as i64;
    let mut budget = s.max_unavailable - unavailable_now;
    for ord in (s.start + s.partition..s.end()).rev() {
        if budget <= 0 {
            break;
        }
        let Some(p) = replicas.get(&ord) else {
            continue;
        };
        if revision_of(p) != o.update_revision && !is_terminating(p) && !deleting.contains(&ord) {
            steps.push(Step::Delete {
                name: name_of(p).to_string(),
                uid: uid_of(p).to_string(),
                why: Why::Update,
            });
            budget -= 1;
        }
    }
    steps
}

/// The status the set reports from its pods; a rolling update is complete (the current revision
/// becomes the update revision) when every replica is updated and ready.
pub fn status(
    set: &Value,
    pods: &[Arc<Value>],
    current_revision: &str,
    update_revision: &str,
    collision_count: i64,
    now: jiff::Timestamp,
) -> Value {
    let s = Spec::of(set);
    let (mut replicas, mut ready, mut available, mut current, mut updated) = (0, 0, 0, 0, 0);
    for p in pods {
        replicas += 1;
        if running_ready(p) {
            ready += 1;
            if running_available(p, s.min_ready, now) {
                available += 1;
            }
        }
        if !is_terminating(p) {
            if revision_of(p) == current_revision {
                current += 1;
            }
            if revision_of(p) == update_revision {
                updated += 1;
            }
        }
    }
    let mut current_revision = current_revision;
    if !s.on_delete && updated == s.replicas && ready == s.replicas && replicas == s.replicas {
        current = updated;
        current_revision = update_revision;
    }
    json!({
        "observedGeneration": set.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
        "replicas": replicas,
        "readyReplicas": ready,
        "currentReplicas": current,
        "updatedReplicas": updated,
        "availableReplicas": available,
        "currentRevision": current_revision,
        "updateRevision": update_revision,
        "collisionCount": collision_count,
    })
}

/// The pod template a revision restores (its data is `{"spec":{"template":{…,"$patch":"replace"}}}`).
pub fn revision_template(rev: &Value) -> Option<Value> {
    let mut t = rev.pointer("/data/spec/template")?.clone();
    t.as_object_mut()?.remove("$patch");
    Some(t)
}

/// Pods to adopt (orphan members matching the selector) and to release (owned, no longer
/// matching: their remaining owner references), and the set's pods.
#[derive(Debug, Default)]
pub struct Claimed {
    pub adopt: Vec<(String, Vec<Value>)>,
    pub release: Vec<(String, Vec<Value>)>,
    pub members: Vec<Arc<Value>>,
}

pub fn claim_objects(
    set: &Value,
    selector: &LabelSelector,
    objects: &[Arc<Value>],
    members_only: bool,
) -> Claimed {
    let uid = uid_of(set);
    let mut out = Claimed::default();
    let refs = |o: &Value| -> Vec<Value> {
        o.pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    for o in objects {
        let member = !members_only || ordinal_in(name_of(set), o).is_some();
        let matches = member && !selector.is_empty() && selector.matches_object(o);
        match controller_of(o) {
            Some(c) if c["uid"] == uid => {
                if matches {
                    out.members.push(o.clone());
                } else if !is_terminating(set) {
                    let rest: Vec<Value> =
                        refs(o).into_iter().filter(|r| r["uid"] != uid).collect();
                    out.release.push((name_of(o).to_string(), rest));
                }
            }
            Some(_) => {}
            None => {
                if matches && !is_terminating(set) && !is_terminating(o) {
                    let mut r = refs(o);
                    r.push(owner_ref(set, true));
                    out.adopt.push((name_of(o).to_string(), r));
                    out.members.push(o.clone());
                }
            }
        }
    }
    out
}

struct Controller {
    client: Client,
    sets: Arc<Informer>,
    pods: Arc<Informer>,
    claims: Arc<Informer>,
    revisions: Arc<Informer>,
    expectations: Expectations,
    recorder: Recorder,
}

fn selector_of(set: &Value) -> Result<LabelSelector, String> {
    from_label_selector_object(&set["spec"]["selector"]).map_err(|e| e.message)
}

impl Controller {
    /// Adopts and releases objects of one kind, returning the set's.
    async fn claim(
        &self,
        set: &Value,
        selector: &LabelSelector,
        informer: &Informer,
        members_only: bool,
    ) -> Vec<Arc<Value>> {
        let ns = namespace_of(set);
        let c = claim_objects(set, selector, &informer.list_namespace(ns), members_only);
        for (name, refs) in c.adopt.iter().chain(&c.release) {
            let refs = if refs.is_empty() {
                Value::Null
            } else {
                json!(refs)
            };
            let p = json!({"metadata": {"ownerReferences": refs}});
            if let Err(e) = self
                .client
                .merge_patch(&informer.def, Some(ns), name, &p)
                .await
            {
                tracing::debug!(object = %name, error = %e, "adopting or releasing");
            }
        }
        c.members
    }

    /// The revision of the set's template (created, found, or renumbered as after `rollout
    /// undo`), bumping the collision count when its name is taken by different data.
    async fn update_revision(
        &self,
        set: &Value,
        revisions: &[Arc<Value>],
    ) -> ApiResult<(Value, i64)> {
        let def = self.revisions.def.clone();
        let ns = namespace_of(set);
        let data = history::revision_data(set);
        let mut collisions = set
            .pointer("/status/collisionCount")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let mut owner = set.clone();
        for _ in 0..10 {
            if !owner["status"].is_object() {
                owner["status"] = json!({});
            }
            owner["status"]["collisionCount"] = json!(collisions);
            match history::current_revision(&self.client, &def, &owner, revisions).await {
                Ok(rev) => {
                    let fresh = !revisions.iter().any(|r| name_of(r) == name_of(&rev));
                    let annotations = set
                        .pointer("/metadata/annotations")
                        .filter(|a| a.as_object().is_some_and(|m| !m.is_empty()));
                    if let (true, Some(a)) = (fresh, annotations) {
                        // As upstream, a new revision carries the set's annotations (change-cause).
                        let p = json!({"metadata": {"annotations": a}});
                        if let Err(e) = self
                            .client
                            .merge_patch(&def, Some(ns), name_of(&rev), &p)
                            .await
                        {
                            tracing::debug!(revision = %name_of(&rev), error = %e, "annotating revision");
                        }
                    }
                    return Ok((rev, collisions));
                }
                Err(e) if e.reason == "AlreadyExists" => {
                    let name = format!(
                        "{}-{}",
                        name_of(set),
                        history::revision_hash(&data, collisions)
                    );
                    match self.client.get(&def, Some(ns), &name).await {
                        Ok(existing)
                            if existing["data"] == data
                                && controller_of(&existing)
                                    .is_some_and(|c| c["uid"] == uid_of(set)) =>
                        {
                            // Created by an earlier reconcile; the informer has not seen it yet.
                            return Ok((existing, collisions));
                        }
                        Ok(_) => collisions += 1,
                        Err(e) if e.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::new(
            500,
            "InternalError",
            format!(
                "too many ControllerRevision name collisions for StatefulSet {}",
                name_of(set)
            ),
        ))
    }

    async fn sync(&self, key: String) -> ApiResult<Option<Duration>> {
        let Some(set) = self.sets.get(&key) else {
            self.expectations.forget(&key);
            return Ok(None);
        };
        if is_terminating(&set) {
            // The garbage collector removes its pods (and claims it owns).
            return Ok(None);
        }
        let ns = split_key(&key).0.unwrap_or_default().to_string();
        let set_name = name_of(&set).to_string();
        let selector = match selector_of(&set) {
            Ok(s) => s,
            Err(e) => {
                self.recorder.event(
                    &set,
                    "Warning",
                    "InvalidSelector",
                    format!("invalid selector: {e}"),
                );
                return Ok(None);
            }
        };
        let members = self.claim(&set, &selector, &self.pods, true).await;
        self.claim(&set, &selector, &self.revisions, false).await;
        let revisions = history::owned(&set, &self.revisions.list_namespace(&ns));
        let (update, collisions) = self.update_revision(&set, &revisions).await?;
        let update_name = name_of(&update).to_string();
        let current_name = set
            .pointer("/status/currentRevision")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let current = revisions
            .iter()
            .find(|r| name_of(r) == current_name)
            .map(|r| (**r).clone())
            .unwrap_or_else(|| update.clone());
        let current_name = name_of(&current).to_string();
        let current_template =
            revision_template(&current).unwrap_or_else(|| set["spec"]["template"].clone());
        let now = jiff::Timestamp::now();
        let mut requeue = None;

        if self.expectations.satisfied(&key) {
            let claims: BTreeMap<String, Arc<Value>> = self
                .claims
                .list_namespace(&ns)
                .into_iter()
                .map(|c| (name_of(&c).to_string(), c))
                .collect();
            let steps = plan(&Observed {
                set: &set,
                current_template: &current_template,
                current_revision: &current_name,
                update_revision: &update_name,
                pods: &members,
                claims: &claims,
                now,
            });
            requeue = self.apply(&set, &key, steps).await?;
        }

        // History: keep revisionHistoryLimit revisions besides those in use.
        let limit = set
            .pointer("/spec/revisionHistoryLimit")
            .and_then(Value::as_i64)
            .unwrap_or(10);
        let uid = uid_of(&set).to_string();
        let mut live: Vec<String> = self
            .pods
            .list_namespace(&ns)
            .iter()
            .filter(|p| controller_of(p).is_some_and(|c| c["uid"] == uid.as_str()))
            .map(|p| revision_of(p).to_string())
            .collect();
        live.push(current_name.clone());
        live.push(update_name.clone());
        let live: Vec<&str> = live.iter().map(String::as_str).collect();
        for r in history::to_truncate(&revisions, &live, limit) {
            if let Err(e) = self
                .client
                .delete_uid(&self.revisions.def, Some(&ns), name_of(r), uid_of(r), None)
                .await
            {
                if e.code != 404 && e.code != 409 {
                    return Err(e);
                }
            }
        }

        // Status, from what the informer shows now.
        let pods: Vec<Arc<Value>> = self
            .pods
            .list_namespace(&ns)
            .into_iter()
            .filter(|p| {
                controller_of(p).is_some_and(|c| c["uid"] == uid.as_str())
                    && ordinal_in(&set_name, p).is_some()
                    && selector.matches_object(p)
            })
            .collect();
        let st = status(&set, &pods, &current_name, &update_name, collisions, now);
        let old = set.get("status").cloned().unwrap_or(json!({}));
        let changed = st.as_object().into_iter().flatten().any(|(k, v)| {
            let cur = old.get(k).cloned().unwrap_or(Value::Null);
            match v {
                Value::Number(_) => cur.as_i64().unwrap_or(0) != v.as_i64().unwrap_or(0),
                _ => cur.as_str().unwrap_or_default() != v.as_str().unwrap_or_default(),
            }
        });
        if changed {
            self.client
                .merge_patch_status(&self.sets.def, Some(&ns), &set_name, &json!({"status": st}))
                .await?;
        }
        if st["readyReplicas"] != st["availableReplicas"] {
            requeue = Some(
                requeue
                    .unwrap_or(Duration::from_secs(1))
                    .min(Duration::from_secs(1)),
            );
        }
        Ok(requeue)
    }

    /// Carries out the steps in order, stopping at the first failure (expectations record the
    /// creations and deletions not yet seen).
    async fn apply(&self, set: &Value, key: &str, steps: Vec<Step>) -> ApiResult<Option<Duration>> {
        let ns = namespace_of(set).to_string();
        let set_name = name_of(set).to_string();
        let mut adds = steps
            .iter()
            .filter(|s| matches!(s, Step::Create { pod: Some(_), .. }))
            .count() as i64;
        let mut dels = steps
            .iter()
            .filter(|s| matches!(s, Step::Delete { .. }))
            .count() as i64;
        if adds + dels > 0 {
            self.expectations.expect(key, adds, dels);
        }
        let pod_def = self.pods.def.clone();
        let claim_def = self.claims.def.clone();
        let mut requeue = None;
        for step in steps {
            tracing::debug!(statefulset = %set_name, step = %step.describe(), "applying");
            let result: ApiResult<()> = match step {
                Step::Create {
                    ordinal,
                    claims,
                    pod,
                } => {
                    let pod_name = format!("{set_name}-{ordinal}");
                    if pod.is_some() {
                        adds -= 1;
                    }
                    let mut failed = None;
                    for c in claims {
                        let claim = name_of(&c).to_string();
                        match self.client.create(&claim_def, Some(&ns), c).await {
                            Ok(_) => self.recorder.event(
                                set,
                                "Normal",
                                "SuccessfulCreate",
                                format!("create Claim {claim} Pod {pod_name} in StatefulSet {set_name} success"),
                            ),
                            Err(e) if e.reason == "AlreadyExists" => {}
                            Err(e) => {
                                self.recorder.event(
                                    set,
                                    "Warning",
                                    "FailedCreate",
                                    format!("create Claim {claim} for Pod {pod_name} in StatefulSet {set_name} failed error: {}", e.message),
                                );
                                failed = Some(ApiError::new(e.code, &e.reason, format!("failed to create PVC {claim}: {}", e.message)));
                                break;
                            }
                        }
                    }
                    match (failed, pod) {
                        (Some(e), Some(_)) => {
                            self.expectations.lower(key, 1, 0);
                            self.recorder.event(
                                set,
                                "Warning",
                                "FailedCreate",
                                format!("create Pod {pod_name} in StatefulSet {set_name} failed error: {}", e.message),
                            );
                            Err(e)
                        }
                        (Some(e), None) => Err(e),
                        (None, Some(p)) => match self.client.create(&pod_def, Some(&ns), p).await {
                            Ok(_) => {
                                self.recorder.event(
                                    set,
                                    "Normal",
                                    "SuccessfulCreate",
                                    format!("create Pod {pod_name} in StatefulSet {set_name} successful"),
                                );
                                Ok(())
                            }
                            Err(e) if e.reason == "AlreadyExists" => {
                                // The informer has not caught up; it will show the pod.
                                self.expectations.lower(key, 1, 0);
                                Ok(())
                            }
                            Err(e) => {
                                self.expectations.lower(key, 1, 0);
                                self.recorder.event(
                                    set,
                                    "Warning",
                                    "FailedCreate",
                                    format!("create Pod {pod_name} in StatefulSet {set_name} failed error: {}", e.message),
                                );
                                Err(e)
                            }
                        },
                        (None, None) => Ok(()),
                    }
                }
                Step::Delete { name, uid, .. } => {
                    dels -= 1;
                    match self
                        .client
                        .delete_uid(&pod_def, Some(&ns), &name, &uid, None)
                        .await
                    {
                        Ok(_) => {
                            self.recorder.event(
                                set,
                                "Normal",
                                "SuccessfulDelete",
                                format!("delete Pod {name} in StatefulSet {set_name} successful"),
                            );
                            Ok(())
                        }
                        // Gone already, or replaced by another pod of that name.
                        Err(e) if e.code == 404 || e.code == 409 => {
                            self.expectations.lower(key, 0, 1);
                            Ok(())
                        }
                        Err(e) => {
                            self.expectations.lower(key, 0, 1);
                            self.recorder.event(
                                set,
                                "Warning",
                                "FailedDelete",
                                format!(
                                    "delete Pod {name} in StatefulSet {set_name} failed error: {}",
                                    e.message
                                ),
                            );
                            Err(e)
                        }
                    }
                }
                Step::ClaimOwners { claim, pod, owners } => {
                    let p = json!({"metadata": {"ownerReferences": owners}});
                    match self
                        .client
                        .merge_patch(&claim_def, Some(&ns), &claim, &p)
                        .await
                    {
                        Ok(_) => Ok(()),
                        Err(e) if e.code == 404 => Ok(()),
                        Err(e) => {
                            self.recorder.event(
                                set,
                                "Warning",
                                "FailedUpdate",
                                format!("update Claim {claim} for Pod {pod} in StatefulSet {set_name} failed error: {}", e.message),
                            );
                            Err(e)
                        }
                    }
                }
                Step::Relabel { name, labels } => {
                    let p = json!({"metadata": {"labels": labels}});
                    match self
                        .client
                        .merge_patch(&pod_def, Some(&ns), &name, &p)
                        .await
                    {
                        Ok(_) => Ok(()),
                        Err(e) if e.code == 404 => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                Step::Blocked { pod, reason } => {
                    self.recorder.event(
                        set,
                        "Warning",
                        "FailedCreate",
                        format!(
                            "create Pod {pod} in StatefulSet {set_name} failed error: {reason}"
                        ),
                    );
                    requeue = Some(Duration::from_secs(2));
                    Ok(())
                }
            };
            if let Err(e) = result {
                self.expectations.lower(key, adds, dels);
                return Err(e);
            }
        }
        Ok(requeue)
    }

    /// The sets a pod change concerns: its controller, or the set it is named after (an orphan
    /// it may adopt).
    fn sets_of_pod(&self, pod: &Value) -> Option<String> {
        let ns = namespace_of(pod);
        match controller_of(pod) {
            Some(c) if c["kind"] == "StatefulSet" => {
                Some(format!("{ns}/{}", c["name"].as_str().unwrap_or_default()))
            }
            Some(_) => None,
            None => {
                let (parent, _) = parent_and_ordinal(name_of(pod))?;
                let key = format!("{ns}/{parent}");
                self.sets.get(&key).map(|_| key)
            }
        }
    }

    /// Sets whose selector matches an object's labels (claims, orphaned revisions).
    fn sets_matching(&self, obj: &Value) -> Vec<String> {
        self.sets
            .list_namespace(namespace_of(obj))
            .into_iter()
            .filter(|s| selector_of(s).is_ok_and(|sel| !sel.is_empty() && sel.matches_object(obj)))
            .map(|s| key_of(&s))
            .collect()
    }
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client(MANAGER);
    let c = Arc::new(Controller {
        sets: ctx.informers.get(&client.def("apps", "v1", "statefulsets")),
        pods: ctx.informers.get(&client.def("", "v1", "pods")),
        claims: ctx
            .informers
            .get(&client.def("", "v1", "persistentvolumeclaims")),
        revisions: ctx
            .informers
            .get(&client.def("apps", "v1", "controllerrevisions")),
        expectations: Expectations::default(),
        recorder: Recorder::new(client.clone(), MANAGER),
        client,
    });
    let queue = Queue::new();
    let mut tasks = Vec::new();
    {
        let c = c.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut sets_rx = c.sets.subscribe();
            let mut pods_rx = c.pods.subscribe();
            let mut claims_rx = c.claims.subscribe();
            let mut revs_rx = c.revisions.subscribe();
            // Act only on complete caches (a set seen before its pods would recreate them).
            c.sets.wait_synced().await;
            c.pods.wait_synced().await;
            c.claims.wait_synced().await;
            c.revisions.wait_synced().await;
            for s in c.sets.list() {
                queue.add(key_of(&s));
            }
            loop {
                tokio::select! {
                    Some(ch) = sets_rx.recv() => queue.add(key_of(ch.object())),
                    Some(ch) = pods_rx.recv() => {
                        let mut keys: Vec<String> = Vec::new();
                        match &ch {
                            Change::Added(p) => {
                                if let Some(k) = c.sets_of_pod(p) {
                                    if controller_of(p).is_some() {
                                        c.expectations.observed_add(&k);
                                    }
                                    keys.push(k);
                                }
                            }
                            Change::Deleted(p) => {
                                if let Some(k) = c.sets_of_pod(p) {
                                    // Counted when it started terminating, if it did.
                                    if controller_of(p).is_some() && !is_terminating(p) {
                                        c.expectations.observed_delete(&k);
                                    }
                                    keys.push(k);
                                }
                            }
                            Change::Updated { old, new } => {
                                if let Some(k) = c.sets_of_pod(new) {
                                    if controller_of(new).is_some() && is_terminating(new) && !is_terminating(old) {
                                        c.expectations.observed_delete(&k);
                                    }
                                    keys.push(k);
                                }
                                keys.extend(c.sets_of_pod(old));
                            }
                        }
                        for k in keys {
                            queue.add(k);
                        }
                    }
                    Some(ch) = claims_rx.recv() => {
                        let claim = ch.object();
                        for k in c.sets_matching(claim) {
                            queue.add(k);
                        }
                    }
                    Some(ch) = revs_rx.recv() => {
                        let rev = ch.object();
                        match controller_of(rev) {
                            Some(o) if o["kind"] == "StatefulSet" => {
                                queue.add(format!("{}/{}", namespace_of(rev), o["name"].as_str().unwrap_or_default()));
                            }
                            Some(_) => {}
                            None => {
                                for k in c.sets_matching(rev) {
                                    queue.add(k);
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
    tasks.extend(spawn_workers(queue, 2, MANAGER, move |key| {
        let c = c2.clone();
        async move { c.sync(key).await }
    }));
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "web-old";
    const NEW: &str = "web-new";

    fn merge(into: &mut Value, extra: &Value) {
        match (into, extra) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
            (a, b) => *a = b.clone(),
        }
    }

    /// `web`, 3 replicas, OrderedReady, image v2 (the update revision's template).
    fn set(extra: Value) -> Value {
        let mut s = json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "web", "namespace": "d", "uid": "set-uid", "generation": 2},
            "spec": {
                "replicas": 3, "serviceName": "web-svc",
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "v2"}]}},
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
            }
        });
        merge(&mut s, &extra);
        s
    }

    fn current_template() -> Value {
        json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "v1"}]}})
    }

    /// A pod of `web` at `ord`, revision `rev`, in `state`: ready, pending, notready,
    /// terminating, failed.
    fn pod(ord: i64, rev: &str, state: &str) -> Arc<Value> {
        let ready = matches!(state, "ready" | "terminating");
        let phase = match state {
            "pending" => "Pending",
            "failed" => "Failed",
            _ => "Running",
        };
        let mut p = json!({
            "metadata": {
                "name": format!("web-{ord}"), "namespace": "d", "uid": format!("uid-{ord}"),
                "labels": {"app": "web", REVISION_LABEL: rev, POD_NAME_LABEL: format!("web-{ord}")},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "uid": "set-uid", "controller": true}],
            },
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }, "lastTransitionTime": "2020-01-01T00:00:00Z"}]},
        });
        if state == "terminating" {
            p["metadata"]["deletionTimestamp"] = json!("2020-01-01T00:00:00Z");
        }
        Arc::new(p)
    }

    fn claim(name: &str, owners: Value) -> Arc<Value> {
        Arc::new(
            json!({"metadata": {"name": name, "namespace": "d", "uid": format!("uid-{name}"), "labels": {"app": "web"}, "ownerReferences": owners}}),
        )
    }

    fn claims(list: &[Arc<Value>]) -> BTreeMap<String, Arc<Value>> {
        list.iter()
            .map(|c| (name_of(c).to_string(), c.clone()))
            .collect()
    }

    fn steps(set: &Value, pods: &[Arc<Value>], claims: &BTreeMap<String, Arc<Value>>) -> Vec<Step> {
        let t = current_template();
        plan(&Observed {
            set,
            current_template: &t,
            current_revision: OLD,
            update_revision: NEW,
            pods,
            claims,
            now: "2020-01-01T01:00:00Z".parse().unwrap(),
        })
    }

    fn run(set: &Value, pods: &[Arc<Value>]) -> Vec<String> {
        described(&steps(set, pods, &BTreeMap::new()))
    }

    fn described(steps: &[Step]) -> Vec<String> {
        steps.iter().map(Step::describe).collect()
    }

    fn created(steps: &[Step]) -> Vec<Value> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Create { pod: Some(p), .. } => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn pod_names_give_parent_and_ordinal() {
        assert_eq!(parent_and_ordinal("web-0"), Some(("web", 0)));
        assert_eq!(parent_and_ordinal("my-web-12"), Some(("my-web", 12)));
        assert_eq!(parent_and_ordinal("web-1-3"), Some(("web-1", 3)));
        assert_eq!(parent_and_ordinal("web-x"), None);
        assert_eq!(parent_and_ordinal("web-"), None);
        assert_eq!(parent_and_ordinal("web"), None);
        assert_eq!(
            parent_and_ordinal("web-99999999999"),
            None,
            "ordinals are 32-bit"
        );
    }

    #[test]
    fn ordered_ready_creates_the_lowest_missing_ordinal_and_waits_for_it() {
        let s = set(json!({}));
        assert_eq!(run(&s, &[]), vec!["create web-0"]);
        assert_eq!(run(&s, &[pod(0, NEW, "pending")]), Vec::<String>::new());
        assert_eq!(run(&s, &[pod(0, NEW, "notready")]), Vec::<String>::new());
        assert_eq!(run(&s, &[pod(0, NEW, "ready")]), vec!["create web-1"]);
        assert_eq!(
            run(&s, &[pod(0, NEW, "ready"), pod(1, NEW, "ready")]),
            vec!["create web-2"]
        );
        assert_eq!(
            run(&s, &[pod(0, NEW, "ready"), pod(2, NEW, "ready")]),
            vec!["create web-1"],
            "a lost pod is recreated first"
        );
        assert_eq!(
            run(&s, &[pod(0, NEW, "terminating"), pod(1, NEW, "ready")]),
            Vec::<String>::new(),
            "a terminating pod is waited for"
        );
        let all = [
            pod(0, NEW, "ready"),
            pod(1, NEW, "ready"),
            pod(2, NEW, "ready"),
        ];
        assert_eq!(run(&s, &all), Vec::<String>::new());
    }

    #[test]
    fn min_ready_seconds_hold_the_next_pod_back_until_available() {
        let s = set(json!({"spec": {"minReadySeconds": 30}}));
        let mut p = (*pod(0, NEW, "ready")).clone();
        p["status"]["conditions"][0]["lastTransitionTime"] = json!("2020-01-01T00:59:50Z");
        assert_eq!(run(&s, &[Arc::new(p)]), Vec::<String>::new());
        assert_eq!(run(&s, &[pod(0, NEW, "ready")]), vec!["create web-1"]);
    }

    #[test]
    fn created_pods_carry_their_identity_revision_and_claims() {
        let s = set(json!({"spec": {
            "volumeClaimTemplates": [{"metadata": {"name": "data", "labels": {"tier": "db"}}, "spec": {"accessModes": ["ReadWriteOnce"]}}],
            "template": {"spec": {"volumes": [{"name": "data", "emptyDir": {}}, {"name": "cfg", "emptyDir": {}}]}},
        }}));
        let st = steps(&s, &[], &BTreeMap::new());
        let Step::Create {
            claims,
            pod: Some(p),
            ..
        } = &st[0]
        else {
            panic!("{st:?}")
        };
        assert_eq!(name_of(p), "web-0");
        assert!(p["metadata"].get("generateName").is_none());
        assert_eq!(
            p["metadata"]["labels"],
            json!({"app": "web", POD_NAME_LABEL: "web-0", POD_INDEX_LABEL: "0", REVISION_LABEL: NEW})
        );
        assert_eq!(p["spec"]["hostname"], "web-0");
        assert_eq!(p["spec"]["subdomain"], "web-svc");
        assert_eq!(p["spec"]["containers"][0]["image"], "v2");
        assert_eq!(
            p["spec"]["volumes"],
            json!([{"name": "data", "persistentVolumeClaim": {"claimName": "data-web-0"}}, {"name": "cfg", "emptyDir": {}}])
        );
        let owner = &p["metadata"]["ownerReferences"][0];
        assert_eq!(
            (
                owner["kind"].as_str(),
                owner["uid"].as_str(),
                owner["controller"].as_bool()
            ),
            (Some("StatefulSet"), Some("set-uid"), Some(true))
        );
        assert_eq!(claims.len(), 1);
        assert_eq!(name_of(&claims[0]), "data-web-0");
        assert_eq!(
            claims[0]["metadata"]["labels"],
            json!({"app": "web", "tier": "db"})
        );
        assert_eq!(claims[0]["spec"], json!({"accessModes": ["ReadWriteOnce"]}));
        assert!(
            claims[0]["metadata"].get("ownerReferences").is_none(),
            "retained by default"
        );

        // An existing claim is reused; a pending pod gets its missing claims.
        let existing = claims_of_names(&["data-web-0"]);
        let st = steps(&s, &[], &existing);
        assert!(matches!(&st[0], Step::Create { claims, pod: Some(_), .. } if claims.is_empty()));
        assert_eq!(
            described(&steps(&s, &[pod(0, NEW, "pending")], &BTreeMap::new())),
            vec!["claims 0: data-web-0"]
        );
    }

    fn claims_of_names(names: &[&str]) -> BTreeMap<String, Arc<Value>> {
        claims(
            &names
                .iter()
                .map(|n| claim(n, Value::Null))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn parallel_creates_and_deletes_all_at_once() {
        let s = set(json!({"spec": {"podManagementPolicy": "Parallel"}}));
        assert_eq!(
            run(&s, &[]),
            vec!["create web-0", "create web-1", "create web-2"]
        );
        assert_eq!(
            run(&s, &[pod(0, NEW, "pending")]),
            vec!["create web-1", "create web-2"]
        );
        let s = set(json!({"spec": {"podManagementPolicy": "Parallel", "replicas": 1}}));
        let pods = [
            pod(0, NEW, "pending"),
            pod(1, NEW, "pending"),
            pod(2, NEW, "ready"),
            pod(3, NEW, "terminating"),
        ];
        assert_eq!(
            run(&s, &pods),
            vec!["delete web-2 (ScaleDown)", "delete web-1 (ScaleDown)"]
        );
    }

    #[test]
    fn ordered_scale_down_deletes_the_highest_ordinal_first_one_at_a_time() {
        let s = set(json!({"spec": {"replicas": 2}}));
        let p = |states: [&str; 4]| -> Vec<Arc<Value>> {
            (0..4).map(|i| pod(i, NEW, states[i as usize])).collect()
        };
        assert_eq!(run(&s, &p(["ready"; 4])), vec!["delete web-3 (ScaleDown)"]);
        assert_eq!(
            run(&s, &p(["ready", "ready", "ready", "terminating"])),
            Vec::<String>::new(),
            "waits for it to go"
        );
        assert_eq!(
            run(&s, &p(["ready"; 4])[..3]),
            vec!["delete web-2 (ScaleDown)"]
        );
        // The replicas that stay must be available first.
        assert_eq!(
            run(&s, &p(["pending", "ready", "ready", "ready"])),
            Vec::<String>::new()
        );
        // An unhealthy condemned pod goes only when it is the first unhealthy one.
        assert_eq!(
            run(&s, &p(["ready", "ready", "pending", "ready"])),
            vec!["delete web-3 (ScaleDown)"]
        );
        assert_eq!(
            run(&s, &p(["ready", "ready", "pending", "notready"])),
            Vec::<String>::new()
        );
        assert_eq!(
            run(&s, &p(["ready", "ready", "ready", "notready"])),
            vec!["delete web-3 (ScaleDown)"]
        );
    }

    #[test]
    fn rolling_update_replaces_pods_from_the_highest_ordinal_down() {
        let s = set(json!({}));
        let old = [
            pod(0, OLD, "ready"),
            pod(1, OLD, "ready"),
            pod(2, OLD, "ready"),
        ];
        assert_eq!(run(&s, &old), vec!["delete web-2 (Update)"]);
        let st = steps(&s, &old[..2], &BTreeMap::new());
        assert_eq!(described(&st), vec!["create web-2"]);
        assert_eq!(revision_of(&created(&st)[0]), NEW);
        assert_eq!(created(&st)[0]["spec"]["containers"][0]["image"], "v2");
        assert_eq!(
            run(
                &s,
                &[old[0].clone(), old[1].clone(), pod(2, NEW, "pending")]
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            run(&s, &[old[0].clone(), old[1].clone(), pod(2, NEW, "ready")]),
            vec!["delete web-1 (Update)"]
        );
        assert_eq!(
            run(
                &s,
                &[old[0].clone(), pod(1, NEW, "ready"), pod(2, NEW, "ready")]
            ),
            vec!["delete web-0 (Update)"]
        );
        // Parallel pods still respect maxUnavailable (1): an unavailable pod blocks the update.
        let p = set(json!({"spec": {"podManagementPolicy": "Parallel"}}));
        assert_eq!(
            run(
                &p,
                &[old[0].clone(), old[1].clone(), pod(2, NEW, "pending")]
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn partition_keeps_lower_ordinals_at_the_current_revision() {
        let s = set(json!({"spec": {"updateStrategy": {"rollingUpdate": {"partition": 2}}}}));
        let old = [
            pod(0, OLD, "ready"),
            pod(1, OLD, "ready"),
            pod(2, OLD, "ready"),
        ];
        assert_eq!(run(&s, &old), vec!["delete web-2 (Update)"]);
        assert_eq!(
            run(&s, &[old[0].clone(), old[1].clone(), pod(2, NEW, "ready")]),
            Vec::<String>::new()
        );
        // A lost pod below the partition comes back at the current revision and template.
        let st = steps(
            &s,
            &[old[1].clone(), pod(2, NEW, "ready")],
            &BTreeMap::new(),
        );
        let p = &created(&st)[0];
        assert_eq!((name_of(p), revision_of(p)), ("web-0", OLD));
        assert_eq!(p["spec"]["containers"][0]["image"], "v1");
    }

    #[test]
    fn max_unavailable_updates_several_pods_at_once() {
        let s = set(json!({"spec": {"updateStrategy": {"rollingUpdate": {"maxUnavailable": 2}}}}));
        let old = [
            pod(0, OLD, "ready"),
            pod(1, OLD, "ready"),
            pod(2, OLD, "ready"),
        ];
        assert_eq!(
            run(&s, &old),
            vec!["delete web-2 (Update)", "delete web-1 (Update)"]
        );
        let s = set(
            json!({"spec": {"podManagementPolicy": "Parallel", "updateStrategy": {"rollingUpdate": {"maxUnavailable": "67%"}}}}),
        );
        assert_eq!(
            run(
                &s,
                &[old[0].clone(), old[1].clone(), pod(2, NEW, "pending")]
            ),
            vec!["delete web-1 (Update)"]
        );
        assert_eq!(
            Spec::of(&set(
                json!({"spec": {"updateStrategy": {"rollingUpdate": {"maxUnavailable": "10%"}}}})
            ))
            .max_unavailable,
            1
        );
    }

    #[test]
    fn on_delete_only_recreates_deleted_pods_at_the_update_revision() {
        let s =
            set(json!({"spec": {"updateStrategy": {"type": "OnDelete", "rollingUpdate": null}}}));
        let old = [
            pod(0, OLD, "ready"),
            pod(1, OLD, "ready"),
            pod(2, OLD, "ready"),
        ];
        assert_eq!(run(&s, &old), Vec::<String>::new());
        let st = steps(&s, &[old[0].clone(), old[2].clone()], &BTreeMap::new());
        let p = &created(&st)[0];
        assert_eq!((name_of(p), revision_of(p)), ("web-1", NEW));
        assert_eq!(p["spec"]["containers"][0]["image"], "v2");
    }

    #[test]
    fn failed_pods_are_deleted_and_recreated_once_gone() {
        let s = set(json!({}));
        let pods = [pod(0, NEW, "ready"), pod(1, NEW, "failed")];
        assert_eq!(run(&s, &pods), vec!["delete web-1 (Terminal)"]);
        assert_eq!(run(&s, &pods[..1]), vec!["create web-1"]);
        let s = set(json!({"spec": {"podManagementPolicy": "Parallel"}}));
        assert_eq!(
            run(&s, &pods),
            vec!["delete web-1 (Terminal)", "create web-2"]
        );
    }

    #[test]
    fn ordinals_start_shifts_the_range() {
        let s = set(json!({"spec": {"replicas": 2, "ordinals": {"start": 5}}}));
        assert_eq!(run(&s, &[]), vec!["create web-5"]);
        let pods = [
            pod(0, NEW, "ready"),
            pod(5, NEW, "ready"),
            pod(6, NEW, "ready"),
        ];
        assert_eq!(run(&s, &pods), vec!["delete web-0 (ScaleDown)"]);
        let st = steps(&s, &[pod(5, NEW, "ready")], &BTreeMap::new());
        assert_eq!(created(&st)[0]["metadata"]["labels"][POD_INDEX_LABEL], "6");
    }

    #[test]
    fn claims_follow_the_retention_policy() {
        let tmpl = json!({"volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {}}]});
        // whenScaled=Delete: a condemned pod owns its claims before it is deleted.
        let mut spec = tmpl.clone();
        spec["replicas"] = json!(2);
        spec["persistentVolumeClaimRetentionPolicy"] =
            json!({"whenScaled": "Delete", "whenDeleted": "Retain"});
        let s = set(json!({ "spec": spec }));
        let pods = [
            pod(0, NEW, "ready"),
            pod(1, NEW, "ready"),
            pod(2, NEW, "ready"),
        ];
        let cs = claims_of_names(&["data-web-0", "data-web-1", "data-web-2"]);
        let st = steps(&s, &pods, &cs);
        assert_eq!(
            described(&st),
            vec!["own data-web-2 by Pod", "delete web-2 (ScaleDown)"]
        );
        let Step::ClaimOwners { owners, .. } = &st[0] else {
            unreachable!()
        };
        assert_eq!(owners[0]["uid"], "uid-2");
        // A claim still owned by the pod that was scaled down is about to be collected: wait.
        let s3 = set(
            json!({"spec": {"replicas": 3, "volumeClaimTemplates": tmpl["volumeClaimTemplates"], "persistentVolumeClaimRetentionPolicy": {"whenScaled": "Delete"}}}),
        );
        let stale = claims(&[
            claim("data-web-0", Value::Null),
            claim("data-web-1", Value::Null),
            claim(
                "data-web-2",
                json!([{"apiVersion": "v1", "kind": "Pod", "name": "web-2", "uid": "uid-2", "controller": true}]),
            ),
        ]);
        assert_eq!(
            described(&steps(&s3, &pods[..2], &stale)),
            Vec::<String>::new()
        );
        // A pod back in range hands its claim back.
        let pods3 = [pods[0].clone(), pods[1].clone(), pod(2, NEW, "ready")];
        let mut back = (*stale["data-web-2"]).clone();
        back["metadata"]["ownerReferences"][0]["uid"] = json!("uid-2");
        let st = steps(
            &s3,
            &pods3,
            &claims(&[
                claim("data-web-0", Value::Null),
                claim("data-web-1", Value::Null),
                Arc::new(back),
            ]),
        );
        assert_eq!(described(&st), vec!["release data-web-2"]);
        // whenDeleted=Delete: claims are owned by the set (new ones from the start).
        let sd = set(
            json!({"spec": {"volumeClaimTemplates": tmpl["volumeClaimTemplates"], "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete"}}}),
        );
        let st = steps(&sd, &[pods[0].clone()], &claims_of_names(&["data-web-0"]));
        assert_eq!(
            described(&st),
            vec!["own data-web-0 by StatefulSet", "create web-1"]
        );
        let Step::Create { claims: new, .. } = &st[1] else {
            unreachable!()
        };
        assert_eq!(new[0]["metadata"]["ownerReferences"][0]["uid"], "set-uid");
        // Retain/Retain leaves claims alone; a claim being deleted blocks its pod.
        let sr = set(json!({"spec": {"volumeClaimTemplates": tmpl["volumeClaimTemplates"]}}));
        let mut gone = (*claim("data-web-1", Value::Null)).clone();
        gone["metadata"]["deletionTimestamp"] = json!("2020-01-01T00:00:00Z");
        let st = steps(
            &sr,
            &[pods[0].clone()],
            &claims(&[claim("data-web-0", Value::Null), Arc::new(gone)]),
        );
        assert_eq!(described(&st), vec!["blocked web-1"]);
    }

    #[test]
    fn orphans_are_adopted_and_pods_that_stop_matching_released() {
        let s = set(json!({}));
        let sel = selector_of(&s).unwrap();
        let mut orphan = (*pod(0, NEW, "ready")).clone();
        orphan["metadata"]["ownerReferences"] = Value::Null;
        let mut other = orphan.clone();
        other["metadata"]["name"] = json!("db-0");
        let mut relabeled = (*pod(1, NEW, "ready")).clone();
        relabeled["metadata"]["labels"]["app"] = json!("other");
        let c = claim_objects(
            &s,
            &sel,
            &[
                Arc::new(orphan),
                Arc::new(other),
                Arc::new(relabeled),
                pod(2, NEW, "ready"),
            ],
            true,
        );
        assert_eq!(c.adopt.len(), 1);
        assert_eq!(c.adopt[0].0, "web-0");
        assert_eq!(c.adopt[0].1[0]["uid"], "set-uid");
        assert_eq!(c.release, vec![("web-1".to_string(), vec![])]);
        let names: Vec<&str> = c.members.iter().map(|p| name_of(p)).collect();
        assert_eq!(names, vec!["web-0", "web-2"]);
    }

    #[test]
    fn status_completes_a_rolling_update_only_when_every_replica_is_updated_and_ready() {
        let s = set(json!({}));
        let now = "2020-01-01T01:00:00Z".parse().unwrap();
        let mid = [
            pod(0, OLD, "ready"),
            pod(1, NEW, "ready"),
            pod(2, NEW, "pending"),
        ];
        let st = status(&s, &mid, OLD, NEW, 0, now);
        assert_eq!(
            st,
            json!({"observedGeneration": 2, "replicas": 3, "readyReplicas": 2, "currentReplicas": 1, "updatedReplicas": 2, "availableReplicas": 2, "currentRevision": OLD, "updateRevision": NEW, "collisionCount": 0})
        );
        let done = [
            pod(0, NEW, "ready"),
            pod(1, NEW, "ready"),
            pod(2, NEW, "ready"),
        ];
        let st = status(&s, &done, OLD, NEW, 0, now);
        assert_eq!(
            (
                st["currentRevision"].as_str(),
                st["currentReplicas"].as_i64()
            ),
            (Some(NEW), Some(3))
        );
        let od = set(json!({"spec": {"updateStrategy": {"type": "OnDelete"}}}));
        assert_eq!(status(&od, &done, OLD, NEW, 0, now)["currentRevision"], OLD);
        let terminating = [
            pod(0, NEW, "ready"),
            pod(1, NEW, "ready"),
            pod(2, NEW, "terminating"),
        ];
        let st = status(&s, &terminating, OLD, NEW, 0, now);
        assert_eq!(
            (
                st["replicas"].as_i64(),
                st["updatedReplicas"].as_i64(),
                st["currentRevision"].as_str()
            ),
            (Some(3), Some(2), Some(OLD))
        );
    }

    #[test]
    fn revisions_restore_their_template() {
        let s = set(json!({}));
        let rev = json!({"data": history::revision_data(&s)});
        assert_eq!(revision_template(&rev).unwrap(), s["spec"]["template"]);
    }
}
