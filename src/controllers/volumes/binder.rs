//! The persistent volume controller's decisions, as upstream's `pv_controller.go`: pure
//! functions from an observed claim or volume (and what it refers to) to the writes and events
//! that bring them together. `Action`s are applied in order by `super`; the first failure stops
//! the rest (the next sync decides again from what was written).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::api::selectors::{from_label_selector_object, labels_of};
use crate::controllers::client::{name_of, namespace_of, uid_of};
use crate::controllers::quantity::milli_of;
use crate::controllers::scheduler::plugins::node_selector_matches;
use crate::controllers::scheduler::volumes::{claim_class, selected_node, volume_class};

pub const ANN_BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
pub const ANN_BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
pub const ANN_STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
pub const ANN_BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
const ANN_BETA_CLASS: &str = "volume.beta.kubernetes.io/storage-class";

/// The provisioner k3rs runs itself (as k3s runs rancher's local-path-provisioner).
pub const LOCAL_PATH: &str = "k3rs.io/local-path";

/// One step of a decision.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Replaces a volume's spec and metadata; the observed `resourceVersion` is the
    /// precondition (two claims racing for one volume: one of them conflicts).
    UpdateVolume(Value),
    /// Sets a volume's `status.phase` and `status.message`.
    VolumePhase {
        name: String,
        phase: &'static str,
        message: String,
    },
    /// Replaces a claim's spec and metadata (observed `resourceVersion` as precondition).
    UpdateClaim(Value),
    /// A merge patch of a claim's `status`.
    ClaimStatus {
        namespace: String,
        name: String,
        status: Value,
    },
    /// Creates a volume (the local-path provisioner's); one that exists already is fine.
    CreateVolume(Value),
    /// Deletes a volume (uid precondition).
    DeleteVolume { name: String, uid: String },
    /// Stops here unless the API server confirms that the claim `namespace/name` with this uid
    /// is gone or bound elsewhere (upstream re-reads before releasing: the informer may lag
    /// behind a claim a provisioner or the scheduler just wrote about).
    ConfirmReleased {
        namespace: String,
        name: String,
        uid: String,
        volume: String,
    },
    /// Records an event about `object`.
    Event {
        object: Arc<Value>,
        kind: &'static str,
        reason: &'static str,
        message: String,
    },
    /// Syncs this claim (`namespace/name`) soon.
    SyncClaim(String),
}

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

pub fn annotation<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.pointer("/metadata/annotations")
        .and_then(|a| a.get(key))
        .and_then(Value::as_str)
}

fn phase(v: &Value) -> &str {
    s(v, "/status/phase")
}

fn volume_mode(v: &Value) -> &str {
    match s(v, "/spec/volumeMode") {
        "" => "Filesystem",
        m => m,
    }
}

fn modes(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn storage(v: &Value, ptr: &str) -> i128 {
    milli_of(v.pointer(ptr))
}

/// Whether the claim named a class at all (`""` included), as upstream's
/// `PersistentVolumeClaimHasClass`.
fn has_class(claim: &Value) -> bool {
    annotation(claim, ANN_BETA_CLASS).is_some()
        || claim
            .pointer("/spec/storageClassName")
            .is_some_and(|c| !c.is_null())
}

/// Whether `pv` is (pre-)bound to `claim`: its claimRef names the claim, with the claim's uid
/// or none.
pub fn bound_to_claim(pv: &Value, claim: &Value) -> bool {
    let r = &pv["spec"]["claimRef"];
    r.is_object()
        && r["name"].as_str() == Some(name_of(claim))
        && r["namespace"].as_str() == Some(namespace_of(claim))
        && r["uid"]
            .as_str()
            .is_none_or(|u| u.is_empty() || u == uid_of(claim))
}

/// The reference a bound volume keeps to its claim.
pub fn claim_ref(claim: &Value) -> Value {
    json!({
        "kind": "PersistentVolumeClaim",
        "namespace": namespace_of(claim),
        "name": name_of(claim),
        "uid": uid_of(claim),
        "apiVersion": "v1",
        "resourceVersion": claim.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null),
    })
}

/// Whether the claim waits for its first consumer (a `WaitForFirstConsumer` class; an unknown
/// class or none binds immediately, as upstream's `IsDelayBindingMode`).
pub fn delay_binding(class: Option<&Value>) -> bool {
    class.is_some_and(|c| c["volumeBindingMode"] == "WaitForFirstConsumer")
}

/// Upstream's `FindMatchingVolume` as the PV controller calls it (by access-mode groups,
/// fewest modes first): a volume pre-bound to the claim wins; otherwise the smallest
/// `Available` volume of the claim's class that is large enough, has every requested access
/// mode and the same volume mode, and matches the claim's selector. A delayed claim matches
/// only a pre-bound volume, unless `node` (the labels of the node the scheduler selected for
/// it) is given: then also volumes whose node affinity admits that node.
pub fn find_match<'a>(
    claim: &Value,
    volumes: &'a [Arc<Value>],
    delayed: bool,
    node: Option<&BTreeMap<String, String>>,
) -> Option<&'a Arc<Value>> {
    let requested = storage(claim, "/spec/resources/requests/storage");
    let wanted = modes(&claim["spec"]["accessModes"]);
    let fits_node = |pv: &Value| match (
        node,
        pv.pointer("/spec/nodeAffinity/required/nodeSelectorTerms")
            .and_then(Value::as_array),
    ) {
        (Some(labels), Some(terms)) => node_selector_matches(terms, "", labels),
        _ => true,
    };
    let usable = |pv: &Value| {
        storage(pv, "/spec/capacity/storage") >= requested
            && volume_mode(pv) == volume_mode(claim)
            && pv.pointer("/metadata/deletionTimestamp").is_none()
            && wanted
                .iter()
                .all(|m| modes(&pv["spec"]["accessModes"]).contains(m))
            && fits_node(pv)
    };
    // A volume pre-bound to the claim: this one or none.
    if let Some(pv) = volumes.iter().find(|pv| bound_to_claim(pv, claim)) {
        return usable(pv).then_some(pv);
    }
    if delayed && node.is_none() {
        return None;
    }
    let selector = match claim.pointer("/spec/selector").filter(|s| !s.is_null()) {
        Some(sel) => match from_label_selector_object(sel) {
            Ok(sel) => Some(sel),
            Err(_) => return None,
        },
        None => None,
    };
    let class = claim_class(claim);
    let mut best: Option<(usize, Vec<&str>, i128, &Arc<Value>)> = None;
    for pv in volumes {
        if pv["spec"]["claimRef"].is_object()
            || phase(pv) != "Available"
            || volume_class(pv) != class
            || !usable(pv)
            || selector
                .as_ref()
                .is_some_and(|sel| !sel.matches(&labels_of(pv)))
        {
            continue;
        }
        let mut set = modes(&pv["spec"]["accessModes"]);
        set.sort_unstable();
        set.dedup();
        let size = storage(pv, "/spec/capacity/storage");
        // Fewest access modes first (upstream searches its access-mode index in that order),
        // then the smallest volume.
        let better = match &best {
            None => true,
            Some((n, m, c, _)) => (set.len(), &set, size) < (*n, m, *c),
        };
        if better {
            best = Some((set.len(), set, size, pv));
        }
    }
    best.map(|(_, _, _, pv)| pv)
}

/// Why a volume named by the claim's `spec.volumeName` cannot be bound to it (upstream's
/// `checkVolumeSatisfyClaim`).
pub fn check_satisfies(pv: &Value, claim: &Value) -> Result<(), String> {
    if pv.pointer("/metadata/deletionTimestamp").is_some() {
        return Err(format!(
            "the volume is marked for deletion {:?}",
            name_of(pv)
        ));
    }
    // Whole units, as upstream compares `Quantity.Value()`.
    let whole = |m: i128| (m + 999).div_euclid(1000);
    if whole(storage(pv, "/spec/capacity/storage"))
        < whole(storage(claim, "/spec/resources/requests/storage"))
    {
        return Err("requested PV is too small".into());
    }
    if volume_class(pv) != claim_class(claim) {
        return Err("storageClassName does not match".into());
    }
    if volume_mode(pv) != volume_mode(claim) {
        return Err("incompatible volumeMode".into());
    }
    let have = modes(&pv["spec"]["accessModes"]);
    if !modes(&claim["spec"]["accessModes"])
        .iter()
        .all(|m| have.contains(m))
    {
        return Err("incompatible accessMode".into());
    }
    Ok(())
}

/// What a claim's sync sees besides the claim.
pub struct ClaimWorld<'a> {
    pub volumes: &'a [Arc<Value>],
    /// The claim's storage class, when it exists.
    pub class: Option<&'a Value>,
    /// The default class's name (for claims created before there was one).
    pub default_class: Option<&'a str>,
    /// The labels of the node in the claim's `selected-node` annotation, when it exists.
    pub selected_node: Option<&'a BTreeMap<String, String>>,
    /// Pods that use the claim and are not scheduled yet (names).
    pub unscheduled_pods: Vec<String>,
}

fn with_annotation(obj: &mut Value, key: &str, value: &str) {
    let md = &mut obj["metadata"];
    if !md["annotations"].is_object() {
        md["annotations"] = json!({});
    }
    md["annotations"][key] = json!(value);
}

fn volume_phase(pv: &Value, want: &'static str, message: &str) -> Option<Action> {
    (phase(pv) != want).then(|| Action::VolumePhase {
        name: name_of(pv).to_string(),
        phase: want,
        message: message.to_string(),
    })
}

/// Upstream's `updateClaimStatus`: phase, and the access modes and capacity of the volume
/// (capacity only when the claim becomes bound: a later difference may be a resize).
fn claim_status(claim: &Value, want: &'static str, pv: Option<&Value>) -> Option<Action> {
    let mut status = serde_json::Map::new();
    let st = &claim["status"];
    if phase(claim) != want {
        status.insert("phase".into(), json!(want));
    }
    match pv {
        None => {
            for k in ["accessModes", "capacity"] {
                if st.get(k).is_some_and(|v| !v.is_null()) {
                    status.insert(k.into(), Value::Null);
                }
            }
        }
        Some(pv) => {
            let modes = pv["spec"]["accessModes"].clone();
            if st.get("accessModes").unwrap_or(&Value::Null) != &modes {
                status.insert("accessModes".into(), modes);
            }
            if phase(claim) != want {
                let cap = pv.pointer("/spec/capacity/storage");
                if st.pointer("/capacity/storage") != cap {
                    status.insert("capacity".into(), pv["spec"]["capacity"].clone());
                }
            }
        }
    }
    (!status.is_empty()).then(|| Action::ClaimStatus {
        namespace: namespace_of(claim).to_string(),
        name: name_of(claim).to_string(),
        status: Value::Object(status),
    })
}

fn event(object: &Arc<Value>, kind: &'static str, reason: &'static str, message: String) -> Action {
    Action::Event {
        object: object.clone(),
        kind,
        reason,
        message,
    }
}

/// Upstream's `bind`: the volume's claimRef (and `bound-by-controller` when the controller
/// chose it), the volume's phase, the claim's volumeName and annotations, the claim's status.
pub fn bind(pv: &Arc<Value>, claim: &Arc<Value>) -> Vec<Action> {
    let mut out = Vec::new();
    let r = &pv["spec"]["claimRef"];
    let same_ref = r.is_object()
        && r["name"].as_str() == Some(name_of(claim))
        && r["namespace"].as_str() == Some(namespace_of(claim))
        && r["uid"].as_str() == Some(uid_of(claim));
    let mut volume = (**pv).clone();
    let mut dirty = false;
    if !bound_to_claim(pv, claim) && annotation(pv, ANN_BOUND_BY_CONTROLLER).is_none() {
        with_annotation(&mut volume, ANN_BOUND_BY_CONTROLLER, "yes");
        dirty = true;
    }
    if !same_ref {
        volume["spec"]["claimRef"] = claim_ref(claim);
        dirty = true;
    }
    if dirty {
        out.push(Action::UpdateVolume(volume));
    }
    out.extend(volume_phase(pv, "Bound", ""));
    let mut c = (**claim).clone();
    let mut dirty = false;
    if s(claim, "/spec/volumeName") != name_of(pv) {
        c["spec"]["volumeName"] = json!(name_of(pv));
        if annotation(claim, ANN_BOUND_BY_CONTROLLER).is_none() {
            with_annotation(&mut c, ANN_BOUND_BY_CONTROLLER, "yes");
        }
        dirty = true;
    }
    if annotation(claim, ANN_BIND_COMPLETED).is_none() {
        with_annotation(&mut c, ANN_BIND_COMPLETED, "yes");
        dirty = true;
    }
    if dirty {
        out.push(Action::UpdateClaim(c));
    }
    out.extend(claim_status(claim, "Bound", Some(pv)));
    out
}

/// Upstream's `syncClaim`.
pub fn sync_claim(claim: &Arc<Value>, w: &ClaimWorld) -> Vec<Action> {
    if annotation(claim, ANN_BIND_COMPLETED).is_some() {
        sync_bound_claim(claim, w)
    } else {
        sync_unbound_claim(claim, w)
    }
}

fn lost(claim: &Arc<Value>, reason: &'static str, message: &str) -> Vec<Action> {
    if phase(claim) == "Lost" {
        return Vec::new();
    }
    let mut out: Vec<Action> = claim_status(claim, "Lost", None).into_iter().collect();
    out.push(event(claim, "Warning", reason, message.to_string()));
    out
}

fn sync_bound_claim(claim: &Arc<Value>, w: &ClaimWorld) -> Vec<Action> {
    let name = s(claim, "/spec/volumeName");
    if name.is_empty() {
        return lost(
            claim,
            "ClaimLost",
            "Bound claim has lost reference to PersistentVolume. Data on the volume is lost!",
        );
    }
    let Some(pv) = w.volumes.iter().find(|v| name_of(v) == name) else {
        return lost(
            claim,
            "ClaimLost",
            "Bound claim has lost its PersistentVolume. Data on the volume is lost!",
        );
    };
    let r = &pv["spec"]["claimRef"];
    if !r.is_object() || r["uid"].as_str() == Some(uid_of(claim)) {
        bind(pv, claim)
    } else {
        lost(
            claim,
            "ClaimMisbound",
            "Two claims are bound to the same volume, this one is bound incorrectly",
        )
    }
}

fn pending(claim: &Arc<Value>, mut out: Vec<Action>) -> Vec<Action> {
    out.extend(claim_status(claim, "Pending", None));
    out
}

fn sync_unbound_claim(claim: &Arc<Value>, w: &ClaimWorld) -> Vec<Action> {
    let wanted = s(claim, "/spec/volumeName");
    if !wanted.is_empty() {
        let Some(pv) = w.volumes.iter().find(|v| name_of(v) == wanted) else {
            // Asked for a volume that does not exist (yet).
            return pending(claim, Vec::new());
        };
        if !pv["spec"]["claimRef"].is_object() {
            return match check_satisfies(pv, claim) {
                Ok(()) => bind(pv, claim),
                Err(e) => pending(
                    claim,
                    vec![event(
                        claim,
                        "Warning",
                        "VolumeMismatch",
                        format!("Cannot bind to requested volume {:?}: {e}", name_of(pv)),
                    )],
                ),
            };
        }
        if bound_to_claim(pv, claim) {
            return bind(pv, claim);
        }
        let ev = event(
            claim,
            "Warning",
            "FailedBinding",
            format!(
                "volume {:?} already bound to a different claim.",
                name_of(pv)
            ),
        );
        return pending(claim, vec![ev]);
    }
    let delayed = delay_binding(w.class);
    let node = if delayed && selected_node(claim).is_some() {
        w.selected_node
    } else {
        None
    };
    if let Some(pv) = find_match(claim, w.volumes, delayed, node) {
        return bind(pv, claim);
    }
    // Claims made before there was a default class get it now.
    if !has_class(claim) {
        if let Some(default) = w.default_class {
            let mut c = (**claim).clone();
            c["spec"]["storageClassName"] = json!(default);
            return vec![Action::UpdateClaim(c)];
        }
    }
    let class_name = claim_class(claim);
    if delayed && selected_node(claim).is_none() {
        let (reason, message) = match w.unscheduled_pods.as_slice() {
            [] => (
                "WaitForFirstConsumer",
                "waiting for first consumer to be created before binding".to_string(),
            ),
            [one] => (
                "WaitForPodScheduled",
                format!("waiting for pod {one} to be scheduled"),
            ),
            many => (
                "WaitForPodScheduled",
                format!("waiting for pods {} to be scheduled", many.join(",")),
            ),
        };
        return pending(claim, vec![event(claim, "Normal", reason, message)]);
    }
    if !class_name.is_empty() {
        return provision(claim, class_name, w.class);
    }
    pending(
        claim,
        vec![event(
            claim,
            "Normal",
            "FailedBinding",
            "no persistent volumes available for this claim and no storage class is set".into(),
        )],
    )
}

/// Upstream's `provisionClaim` for provisioners outside the controller (every provisioner
/// k3rs knows is one, local-path included): the claim is annotated with the provisioner that
/// is to act, and the claim's status is left to the binding that follows.
fn provision(claim: &Arc<Value>, class_name: &str, class: Option<&Value>) -> Vec<Action> {
    let Some(class) = class else {
        return vec![event(
            claim,
            "Warning",
            "ProvisioningFailed",
            format!("storageclass.storage.k8s.io {class_name:?} not found"),
        )];
    };
    let provisioner = class["provisioner"].as_str().unwrap_or_default();
    if provisioner.starts_with("kubernetes.io/") {
        // In-tree plugins: k3rs has none (`kubernetes.io/no-provisioner` included).
        return vec![event(
            claim,
            "Warning",
            "ProvisioningFailed",
            format!("no volume plugin matched name: {provisioner}"),
        )];
    }
    let mut out = Vec::new();
    if annotation(claim, ANN_STORAGE_PROVISIONER) != Some(provisioner)
        || annotation(claim, ANN_BETA_STORAGE_PROVISIONER) != Some(provisioner)
    {
        let mut c = (**claim).clone();
        with_annotation(&mut c, ANN_STORAGE_PROVISIONER, provisioner);
        with_annotation(&mut c, ANN_BETA_STORAGE_PROVISIONER, provisioner);
        out.push(Action::UpdateClaim(c));
    }
    out.push(event(
        claim,
        "Normal",
        "ExternalProvisioning",
        format!("Waiting for a volume to be created either by the external provisioner '{provisioner}' or manually by the system administrator. If volume creation is delayed, please verify that the provisioner is running and correctly registered."),
    ));
    out
}

/// Upstream's `syncVolume`. `claim` is the claim the volume's claimRef names (by namespace
/// and name), if the informer has it.
pub fn sync_volume(pv: &Arc<Value>, claim: Option<&Arc<Value>>) -> Vec<Action> {
    let r = &pv["spec"]["claimRef"];
    if !r.is_object() || r["uid"].as_str().unwrap_or_default().is_empty() {
        // Unused, or reserved for a claim that has not been bound to it yet.
        return volume_phase(pv, "Available", "").into_iter().collect();
    }
    let ref_uid = r["uid"].as_str().unwrap_or_default();
    let claim = claim.filter(|c| uid_of(c) == ref_uid);
    let Some(claim) = claim else {
        return release(pv);
    };
    let bound_to = s(claim, "/spec/volumeName");
    if bound_to.is_empty() {
        if volume_mode(claim) != volume_mode(pv) {
            return vec![
                event(
                    pv,
                    "Warning",
                    "VolumeMismatch",
                    format!("Cannot bind PersistentVolume to requested PersistentVolumeClaim {:?} due to incompatible volumeMode.", name_of(claim)),
                ),
                event(
                    claim,
                    "Warning",
                    "VolumeMismatch",
                    format!("Cannot bind PersistentVolume {:?} to requested PersistentVolumeClaim due to incompatible volumeMode.", name_of(pv)),
                ),
            ];
        }
        // The claim's sync completes the binding.
        return vec![Action::SyncClaim(format!(
            "{}/{}",
            namespace_of(claim),
            name_of(claim)
        ))];
    }
    if bound_to == name_of(pv) {
        return volume_phase(pv, "Bound", "").into_iter().collect();
    }
    // The claim is bound to another volume.
    if annotation(pv, ANN_PROVISIONED_BY).is_some()
        && s(pv, "/spec/persistentVolumeReclaimPolicy") == "Delete"
    {
        return release(pv);
    }
    let mut v = (**pv).clone();
    if annotation(pv, ANN_BOUND_BY_CONTROLLER).is_some() {
        v["spec"]["claimRef"] = Value::Null;
        if let Some(a) = v["metadata"]["annotations"].as_object_mut() {
            a.remove(ANN_BOUND_BY_CONTROLLER);
        }
    } else {
        // Pre-bound by the user: it stays reserved for that claim.
        v["spec"]["claimRef"]["uid"] = json!("");
    }
    let mut out = vec![Action::UpdateVolume(v)];
    out.push(Action::VolumePhase {
        name: name_of(pv).to_string(),
        phase: "Available",
        message: String::new(),
    });
    out
}

/// The volume's claim is gone (or bound elsewhere): `Released`, then its reclaim policy.
fn release(pv: &Arc<Value>) -> Vec<Action> {
    let r = &pv["spec"]["claimRef"];
    let mut out = Vec::new();
    if phase(pv) != "Released" && phase(pv) != "Failed" {
        out.push(Action::ConfirmReleased {
            namespace: r["namespace"].as_str().unwrap_or_default().to_string(),
            name: r["name"].as_str().unwrap_or_default().to_string(),
            uid: r["uid"].as_str().unwrap_or_default().to_string(),
            volume: name_of(pv).to_string(),
        });
        out.extend(volume_phase(pv, "Released", ""));
    }
    out.extend(reclaim(pv));
    out
}

fn failed(pv: &Arc<Value>, reason: &'static str, message: String) -> Vec<Action> {
    if phase(pv) == "Failed" {
        return Vec::new();
    }
    vec![
        Action::VolumePhase {
            name: name_of(pv).to_string(),
            phase: "Failed",
            message: message.clone(),
        },
        event(pv, "Warning", reason, message),
    ]
}

/// Upstream's `reclaimVolume`, with k3rs's deleters: volumes the local-path provisioner made
/// (their directory is removed by the node agent, which watches for its volumes going away)
/// and `hostPath` volumes under `/tmp/` (as upstream's host_path deleter, whose data removal
/// also falls to the node agent). Other provisioners delete their own volumes.
fn reclaim(pv: &Arc<Value>) -> Vec<Action> {
    let delete = || Action::DeleteVolume {
        name: name_of(pv).to_string(),
        uid: uid_of(pv).to_string(),
    };
    match s(pv, "/spec/persistentVolumeReclaimPolicy") {
        "Retain" => Vec::new(),
        "Recycle" => failed(
            pv,
            "VolumeFailedRecycle",
            "No recycler plugin found for the volume!".into(),
        ),
        "Delete" => {
            if pv.pointer("/metadata/deletionTimestamp").is_some() {
                return Vec::new();
            }
            match annotation(pv, ANN_PROVISIONED_BY) {
                Some(LOCAL_PATH) => return vec![delete()],
                Some(p) if !p.is_empty() && !p.starts_with("kubernetes.io/") => {
                    return Vec::new();
                }
                _ => {}
            }
            if let Some(path) = pv.pointer("/spec/hostPath/path").and_then(Value::as_str) {
                let under_tmp = path
                    .strip_prefix("/tmp/")
                    .is_some_and(|rest| !rest.is_empty());
                return if under_tmp {
                    vec![delete()]
                } else {
                    failed(
                        pv,
                        "VolumeFailedDelete",
                        format!(
                            "host_path deleter only supports /tmp/.+ but received provided {path}"
                        ),
                    )
                };
            }
            failed(
                pv,
                "VolumeFailedDelete",
                format!(
                    "error getting deleter volume plugin for volume {:?}: no deletable volume plugin matched",
                    name_of(pv)
                ),
            )
        }
        _ => failed(
            pv,
            "VolumeUnknownReclaimPolicy",
            "Volume has unrecognized PersistentVolumeReclaimPolicy".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pv(name: &str, size: &str, extra: Value) -> Arc<Value> {
        let v = json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "uid": format!("uid-{name}"), "resourceVersion": "5"},
            "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteOnce"],
                     "persistentVolumeReclaimPolicy": "Retain", "volumeMode": "Filesystem",
                     "hostPath": {"path": format!("/data/{name}")}},
            "status": {"phase": "Available"},
        });
        Arc::new(crate::api::patch::merge_patch(&v, &extra).expect("patch"))
    }

    fn pvc(name: &str, size: &str, extra: Value) -> Arc<Value> {
        let v = json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "resourceVersion": "7"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}},
                     "storageClassName": "", "volumeMode": "Filesystem"},
            "status": {"phase": "Pending"},
        });
        Arc::new(crate::api::patch::merge_patch(&v, &extra).expect("patch"))
    }

    fn names(v: Option<&Arc<Value>>) -> &str {
        v.map(|v| name_of(v)).unwrap_or("<none>")
    }

    #[test]
    fn matching_picks_the_smallest_fitting_volume_of_the_class() {
        let labels: BTreeMap<String, String> =
            [("kubernetes.io/hostname".to_string(), "n1".to_string())].into();
        let other: BTreeMap<String, String> =
            [("kubernetes.io/hostname".to_string(), "n2".to_string())].into();
        let on_n1 = json!({"spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1"]}]}]}}}});
        // name, claim, volumes, waiting for a consumer, the selected node's labels, expected.
        type Case<'a> = (
            &'a str,
            Arc<Value>,
            Vec<Arc<Value>>,
            bool,
            Option<&'a BTreeMap<String, String>>,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (
                "too small is skipped",
                pvc("c", "2Gi", json!({})),
                vec![pv("small", "1Gi", json!({})), pv("big", "5Gi", json!({}))],
                false,
                None,
                "big",
            ),
            (
                "smallest that fits",
                pvc("c", "1Gi", json!({})),
                vec![
                    pv("big", "5Gi", json!({})),
                    pv("fit", "1Gi", json!({})),
                    pv("mid", "2Gi", json!({})),
                ],
                false,
                None,
                "fit",
            ),
            (
                "class must be equal",
                pvc("c", "1Gi", json!({"spec": {"storageClassName": "fast"}})),
                vec![
                    pv("none", "1Gi", json!({})),
                    pv("fast", "3Gi", json!({"spec": {"storageClassName": "fast"}})),
                ],
                false,
                None,
                "fast",
            ),
            (
                "no class matches only classless volumes",
                pvc("c", "1Gi", json!({})),
                vec![pv(
                    "fast",
                    "1Gi",
                    json!({"spec": {"storageClassName": "fast"}}),
                )],
                false,
                None,
                "<none>",
            ),
            (
                "access modes are a superset",
                pvc(
                    "c",
                    "1Gi",
                    json!({"spec": {"accessModes": ["ReadWriteMany"]}}),
                ),
                vec![
                    pv("rwo", "1Gi", json!({})),
                    pv(
                        "rwx",
                        "9Gi",
                        json!({"spec": {"accessModes": ["ReadWriteOnce", "ReadWriteMany"]}}),
                    ),
                ],
                false,
                None,
                "rwx",
            ),
            (
                "fewest access modes first",
                pvc("c", "1Gi", json!({})),
                vec![
                    pv(
                        "two",
                        "1Gi",
                        json!({"spec": {"accessModes": ["ReadWriteOnce", "ReadOnlyMany"]}}),
                    ),
                    pv("one", "4Gi", json!({})),
                ],
                false,
                None,
                "one",
            ),
            (
                "volume mode is equal",
                pvc("c", "1Gi", json!({"spec": {"volumeMode": "Block"}})),
                vec![
                    pv("fs", "1Gi", json!({})),
                    pv("blk", "2Gi", json!({"spec": {"volumeMode": "Block"}})),
                ],
                false,
                None,
                "blk",
            ),
            (
                "the selector filters by labels",
                pvc(
                    "c",
                    "1Gi",
                    json!({"spec": {"selector": {"matchLabels": {"tier": "gold"}}}}),
                ),
                vec![
                    pv("plain", "1Gi", json!({})),
                    pv(
                        "gold",
                        "2Gi",
                        json!({"metadata": {"labels": {"tier": "gold"}}}),
                    ),
                ],
                false,
                None,
                "gold",
            ),
            (
                "only Available volumes",
                pvc("c", "1Gi", json!({})),
                vec![
                    pv("released", "1Gi", json!({"status": {"phase": "Released"}})),
                    pv("ok", "2Gi", json!({})),
                ],
                false,
                None,
                "ok",
            ),
            (
                "claimed volumes are skipped",
                pvc("c", "1Gi", json!({})),
                vec![
                    pv(
                        "taken",
                        "1Gi",
                        json!({"spec": {"claimRef": {"namespace": "ns", "name": "other"}}}),
                    ),
                    pv("ok", "2Gi", json!({})),
                ],
                false,
                None,
                "ok",
            ),
            (
                "a pre-bound volume wins over a better fit",
                pvc("c", "1Gi", json!({})),
                vec![
                    pv("fit", "1Gi", json!({})),
                    pv(
                        "mine",
                        "8Gi",
                        json!({"spec": {"claimRef": {"namespace": "ns", "name": "c"}}, "status": {"phase": "Bound"}}),
                    ),
                ],
                false,
                None,
                "mine",
            ),
            (
                "a pre-bound volume too small is no match",
                pvc("c", "2Gi", json!({})),
                vec![
                    pv("fit", "2Gi", json!({})),
                    pv(
                        "mine",
                        "1Gi",
                        json!({"spec": {"claimRef": {"namespace": "ns", "name": "c"}}}),
                    ),
                ],
                false,
                None,
                "<none>",
            ),
            (
                "pre-bound to another uid of that name is not mine",
                pvc("c", "1Gi", json!({})),
                vec![pv(
                    "old",
                    "1Gi",
                    json!({"spec": {"claimRef": {"namespace": "ns", "name": "c", "uid": "gone"}}}),
                )],
                false,
                None,
                "<none>",
            ),
            (
                "a delayed claim without a node takes only pre-bound volumes",
                pvc("c", "1Gi", json!({})),
                vec![pv("free", "1Gi", json!({}))],
                true,
                None,
                "<none>",
            ),
            (
                "a delayed claim with a node takes a volume on that node",
                pvc("c", "1Gi", json!({})),
                vec![
                    pv(
                        "elsewhere",
                        "1Gi",
                        json!({"spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["n9"]}]}]}}}}),
                    ),
                    pv("here", "2Gi", on_n1.clone()),
                ],
                true,
                Some(&labels),
                "here",
            ),
            (
                "node affinity that excludes the node",
                pvc("c", "1Gi", json!({})),
                vec![pv("here", "2Gi", on_n1.clone())],
                true,
                Some(&other),
                "<none>",
            ),
            (
                "volumes being deleted are skipped",
                pvc("c", "1Gi", json!({})),
                vec![pv(
                    "going",
                    "1Gi",
                    json!({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}}),
                )],
                false,
                None,
                "<none>",
            ),
        ];
        for (what, claim, volumes, delayed, node, want) in cases {
            assert_eq!(
                names(find_match(&claim, &volumes, delayed, node)),
                want,
                "{what}"
            );
        }
    }

    #[test]
    fn a_requested_volume_is_checked_with_upstream_reasons() {
        let c = pvc("c", "2Gi", json!({}));
        assert_eq!(check_satisfies(&pv("a", "2Gi", json!({})), &c), Ok(()));
        assert_eq!(
            check_satisfies(&pv("a", "1Gi", json!({})), &c).unwrap_err(),
            "requested PV is too small"
        );
        assert_eq!(
            check_satisfies(
                &pv("a", "2Gi", json!({"spec": {"storageClassName": "x"}})),
                &c
            )
            .unwrap_err(),
            "storageClassName does not match"
        );
        assert_eq!(
            check_satisfies(
                &pv(
                    "a",
                    "2Gi",
                    json!({"spec": {"accessModes": ["ReadOnlyMany"]}})
                ),
                &c
            )
            .unwrap_err(),
            "incompatible accessMode"
        );
    }

    #[test]
    fn binding_writes_both_sides_as_upstream() {
        let claim = pvc("c", "1Gi", json!({}));
        let vol = pv("v", "5Gi", json!({}));
        let actions = bind(&vol, &claim);
        let Action::UpdateVolume(v) = &actions[0] else {
            panic!("{actions:?}")
        };
        assert_eq!(v["spec"]["claimRef"]["uid"], "uid-c");
        assert_eq!(v["spec"]["claimRef"]["resourceVersion"], "7");
        assert_eq!(v["metadata"]["annotations"][ANN_BOUND_BY_CONTROLLER], "yes");
        assert_eq!(
            actions[1],
            Action::VolumePhase {
                name: "v".into(),
                phase: "Bound",
                message: String::new()
            }
        );
        let Action::UpdateClaim(c) = &actions[2] else {
            panic!("{actions:?}")
        };
        assert_eq!(c["spec"]["volumeName"], "v");
        assert_eq!(c["metadata"]["annotations"][ANN_BIND_COMPLETED], "yes");
        assert_eq!(c["metadata"]["annotations"][ANN_BOUND_BY_CONTROLLER], "yes");
        assert_eq!(
            actions[3],
            Action::ClaimStatus {
                namespace: "ns".into(),
                name: "c".into(),
                status: json!({"phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "5Gi"}})
            }
        );
        // A volume pre-bound by the user keeps its annotations as they are.
        let pre = pv(
            "p",
            "1Gi",
            json!({"spec": {"claimRef": {"namespace": "ns", "name": "c"}}}),
        );
        let Action::UpdateVolume(v) = &bind(&pre, &claim)[0] else {
            panic!()
        };
        assert!(v["metadata"]["annotations"][ANN_BOUND_BY_CONTROLLER].is_null());
        // Everything in place: nothing to write.
        let done_v = pv(
            "v",
            "5Gi",
            json!({"spec": {"claimRef": {"namespace": "ns", "name": "c", "uid": "uid-c"}}, "status": {"phase": "Bound"}}),
        );
        let done_c = pvc(
            "c",
            "1Gi",
            json!({"metadata": {"annotations": {ANN_BIND_COMPLETED: "yes"}}, "spec": {"volumeName": "v"},
                   "status": {"phase": "Bound", "accessModes": ["ReadWriteOnce"], "capacity": {"storage": "5Gi"}}}),
        );
        assert_eq!(bind(&done_v, &done_c), vec![]);
    }

    fn world<'a>(volumes: &'a [Arc<Value>], class: Option<&'a Value>) -> ClaimWorld<'a> {
        ClaimWorld {
            volumes,
            class,
            default_class: None,
            selected_node: None,
            unscheduled_pods: Vec::new(),
        }
    }

    fn reasons(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Event {
                    reason, message, ..
                } => format!("{reason}: {message}"),
                Action::ClaimStatus { status, .. } => format!("status {status}"),
                Action::VolumePhase { phase, .. } => format!("phase {phase}"),
                Action::UpdateClaim(_) => "update claim".into(),
                Action::UpdateVolume(_) => "update volume".into(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn unbound_claims_wait_fail_or_ask_the_provisioner_with_upstream_events() {
        let none: Vec<Arc<Value>> = vec![];
        let c = pvc("c", "1Gi", json!({"status": {"phase": ""}}));
        assert_eq!(
            reasons(&sync_claim(&c, &world(&none, None))),
            vec![
                "FailedBinding: no persistent volumes available for this claim and no storage class is set".to_string(),
                "status {\"phase\":\"Pending\"}".into()
            ]
        );
        let wffc = json!({"metadata": {"name": "local-path"}, "provisioner": LOCAL_PATH, "volumeBindingMode": "WaitForFirstConsumer"});
        let c = pvc(
            "c",
            "1Gi",
            json!({"spec": {"storageClassName": "local-path"}}),
        );
        assert_eq!(
            reasons(&sync_claim(&c, &world(&none, Some(&wffc)))),
            vec!["WaitForFirstConsumer: waiting for first consumer to be created before binding"]
        );
        let mut w = world(&none, Some(&wffc));
        w.unscheduled_pods = vec!["p1".into()];
        assert_eq!(
            reasons(&sync_claim(&c, &w)),
            vec!["WaitForPodScheduled: waiting for pod p1 to be scheduled"]
        );
        // Once a node is selected, the provisioner is asked.
        let c = pvc(
            "c",
            "1Gi",
            json!({"metadata": {"annotations": {"volume.kubernetes.io/selected-node": "n1"}}, "spec": {"storageClassName": "local-path"}}),
        );
        let actions = sync_claim(&c, &world(&none, Some(&wffc)));
        let Action::UpdateClaim(u) = &actions[0] else {
            panic!("{actions:?}")
        };
        assert_eq!(
            u["metadata"]["annotations"][ANN_STORAGE_PROVISIONER],
            LOCAL_PATH
        );
        assert_eq!(
            u["metadata"]["annotations"][ANN_BETA_STORAGE_PROVISIONER],
            LOCAL_PATH
        );
        assert!(reasons(&actions)[1].starts_with(
            "ExternalProvisioning: Waiting for a volume to be created either by the external provisioner 'k3rs.io/local-path'"
        ));
        // A missing class.
        let c = pvc("c", "1Gi", json!({"spec": {"storageClassName": "gone"}}));
        assert_eq!(
            reasons(&sync_claim(&c, &world(&none, None))),
            vec!["ProvisioningFailed: storageclass.storage.k8s.io \"gone\" not found"]
        );
        // A requested volume that does not fit.
        let small = vec![pv("small", "1Gi", json!({}))];
        let c = pvc("c", "2Gi", json!({"spec": {"volumeName": "small"}}));
        assert_eq!(
            reasons(&sync_claim(&c, &world(&small, None)))[0],
            "VolumeMismatch: Cannot bind to requested volume \"small\": requested PV is too small"
        );
        // A claim without any class gets the default one.
        let mut c = (*pvc("c", "1Gi", json!({}))).clone();
        c["spec"]
            .as_object_mut()
            .unwrap()
            .remove("storageClassName");
        let mut w = world(&none, None);
        w.default_class = Some("local-path");
        let actions = sync_claim(&Arc::new(c), &w);
        let Action::UpdateClaim(u) = &actions[0] else {
            panic!("{actions:?}")
        };
        assert_eq!(u["spec"]["storageClassName"], "local-path");
    }

    #[test]
    fn bound_claims_whose_volume_went_are_lost() {
        let none: Vec<Arc<Value>> = vec![];
        let c = pvc(
            "c",
            "1Gi",
            json!({"metadata": {"annotations": {ANN_BIND_COMPLETED: "yes"}}, "spec": {"volumeName": "v"}, "status": {"phase": "Bound"}}),
        );
        assert_eq!(
            reasons(&sync_claim(&c, &world(&none, None))),
            vec![
                "status {\"phase\":\"Lost\"}".to_string(),
                "ClaimLost: Bound claim has lost its PersistentVolume. Data on the volume is lost!"
                    .into()
            ]
        );
        let other = vec![pv(
            "v",
            "1Gi",
            json!({"spec": {"claimRef": {"namespace": "ns", "name": "c", "uid": "someone"}}}),
        )];
        assert_eq!(
            reasons(&sync_claim(&c, &world(&other, None)))[1],
            "ClaimMisbound: Two claims are bound to the same volume, this one is bound incorrectly"
        );
    }

    #[test]
    fn volumes_whose_claim_went_are_released_and_reclaimed() {
        let bound = |policy: &str, extra: Value| {
            let base = json!({"spec": {"persistentVolumeReclaimPolicy": policy, "claimRef": {"namespace": "ns", "name": "c", "uid": "uid-c"}}, "status": {"phase": "Bound"}});
            pv(
                "v",
                "1Gi",
                crate::api::patch::merge_patch(&base, &extra).unwrap(),
            )
        };
        let confirm = Action::ConfirmReleased {
            namespace: "ns".into(),
            name: "c".into(),
            uid: "uid-c".into(),
            volume: "v".into(),
        };
        let released = Action::VolumePhase {
            name: "v".into(),
            phase: "Released",
            message: String::new(),
        };
        let delete = Action::DeleteVolume {
            name: "v".into(),
            uid: "uid-v".into(),
        };
        assert_eq!(
            sync_volume(&bound("Retain", json!({})), None),
            vec![confirm.clone(), released.clone()]
        );
        let local = bound(
            "Delete",
            json!({"metadata": {"annotations": {ANN_PROVISIONED_BY: LOCAL_PATH}}}),
        );
        assert_eq!(
            sync_volume(&local, None),
            vec![confirm.clone(), released.clone(), delete.clone()]
        );
        // A new claim of the same name is not the volume's claim.
        let newer = pvc("c", "1Gi", json!({"metadata": {"uid": "new"}}));
        assert_eq!(sync_volume(&local, Some(&newer))[2], delete);
        // Delete without a deleter: Failed, with upstream's messages.
        let r = reasons(&sync_volume(&bound("Delete", json!({})), None));
        assert_eq!(
            r[2..],
            [
                "phase Failed".to_string(),
                "VolumeFailedDelete: host_path deleter only supports /tmp/.+ but received provided /data/v".into()
            ]
        );
        let tmp = bound("Delete", json!({"spec": {"hostPath": {"path": "/tmp/v"}}}));
        assert_eq!(sync_volume(&tmp, None)[2], delete);
        // Still bound: Bound; claim not yet bound to it: its sync finishes the binding.
        let c = pvc("c", "1Gi", json!({"spec": {"volumeName": "v"}}));
        assert_eq!(sync_volume(&bound("Retain", json!({})), Some(&c)), vec![]);
        let c = pvc("c", "1Gi", json!({}));
        assert_eq!(
            sync_volume(&bound("Retain", json!({})), Some(&c)),
            vec![Action::SyncClaim("ns/c".into())]
        );
        // Unused: Available.
        let free = pv("v", "1Gi", json!({"status": {"phase": "Pending"}}));
        assert_eq!(reasons(&sync_volume(&free, None)), vec!["phase Available"]);
    }
}
