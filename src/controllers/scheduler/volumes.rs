//! VolumeBinding, as upstream's plugin of that name: a pod's PersistentVolumeClaims must exist
//! and not be going away (PreFilter); bound claims pin the pod to the nodes their volumes' node
//! affinity admits; unbound claims of a `WaitForFirstConsumer` class go wherever a matching
//! volume is available or the class can provision (Filter), and the chosen node is written on
//! them before the pod is bound (PreBind); unbound claims of an `Immediate` class keep the pod
//! pending until something binds them.
//!
//! Pure functions over a `VolumeLister` (the scheduler's informers, or maps in tests).

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::api::selectors::{from_label_selector_object, labels_of};
use crate::controllers::client::{controller_of, name_of, namespace_of, uid_of};
use crate::controllers::quantity::milli_of;

use super::plugins::{node_selector_matches, NodeInfo};

/// The node a `WaitForFirstConsumer` claim's volume is to be provisioned for.
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
const ANN_BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
const ANN_BETA_CLASS: &str = "volume.beta.kubernetes.io/storage-class";
const NO_PROVISIONER: &str = "kubernetes.io/no-provisioner";

pub const ERR_UNBOUND_IMMEDIATE: &str = "pod has unbound immediate PersistentVolumeClaims";
pub const ERR_NODE_CONFLICT: &str = "node(s) had volume node affinity conflict";
pub const ERR_BIND_CONFLICT: &str = "node(s) didn't find available persistent volumes to bind";
pub const ERR_PV_NOT_EXIST: &str =
    "node(s) unavailable due to one or more pvc(s) bound to non-existent pv(s)";

/// What VolumeBinding reads: claims, volumes and storage classes.
pub trait VolumeLister {
    fn claim(&self, namespace: &str, name: &str) -> Option<Arc<Value>>;
    fn volume(&self, name: &str) -> Option<Arc<Value>>;
    fn class(&self, name: &str) -> Option<Arc<Value>>;
    /// The volumes whose class is `class` (`""`: volumes without a class).
    fn volumes_of_class(&self, class: &str) -> Vec<Arc<Value>>;
}

/// An unbound claim of a `WaitForFirstConsumer` class.
#[derive(Clone, Debug)]
struct Delayed {
    claim: Arc<Value>,
    class: Arc<Value>,
    /// Volumes of the claim's class (candidates for a static binding).
    volumes: Vec<Arc<Value>>,
}

/// A pod's claims as PreFilter found them.
#[derive(Clone, Debug, Default)]
pub struct PodVolumes {
    /// Bound claims and their volumes (`None`: the volume does not exist).
    bound: Vec<(Arc<Value>, Option<Arc<Value>>)>,
    delayed: Vec<Delayed>,
}

/// What binding a pod's volumes to a node takes (upstream's PreBind).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Existing volumes to bind to claims: the volume with its `claimRef` set.
    pub static_bindings: Vec<Value>,
    /// Claims (`namespace/name`) to provision on the node: they get `ANN_SELECTED_NODE`.
    pub provisions: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.static_bindings.is_empty() && self.provisions.is_empty()
    }
}

/// The storage class a claim asks for (the beta annotation wins, as upstream).
pub fn claim_class(claim: &Value) -> &str {
    claim
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(ANN_BETA_CLASS))
        .and_then(Value::as_str)
        .or_else(|| {
            claim
                .pointer("/spec/storageClassName")
                .and_then(Value::as_str)
        })
        .unwrap_or_default()
}

/// The storage class of a volume (the beta annotation wins, as upstream).
pub fn volume_class(pv: &Value) -> &str {
    pv.pointer("/metadata/annotations")
        .and_then(|a| a.get(ANN_BETA_CLASS))
        .and_then(Value::as_str)
        .or_else(|| pv.pointer("/spec/storageClassName").and_then(Value::as_str))
        .unwrap_or_default()
}

/// Whether a claim is bound. Upstream also waits for the PV controller's
/// `pv.kubernetes.io/bind-completed` annotation; k3rs has no PV controller yet, so a claim
/// naming its volume counts as bound.
fn is_bound(claim: &Value) -> bool {
    claim
        .pointer("/spec/volumeName")
        .and_then(Value::as_str)
        .is_some_and(|v| !v.is_empty())
}

pub fn selected_node(claim: &Value) -> Option<&str> {
    claim
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(ANN_SELECTED_NODE))
        .and_then(Value::as_str)
}

/// PreFilter: the pod's claims, or the reason no node can take the pod (upstream's messages;
/// UnschedulableAndUnresolvable).
pub fn pre_filter(pod: &Value, lister: &dyn VolumeLister) -> Result<PodVolumes, String> {
    let ns = namespace_of(pod);
    let mut out = PodVolumes::default();
    let mut immediate = false;
    for vol in pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (name, ephemeral) = if let Some(n) = vol
            .pointer("/persistentVolumeClaim/claimName")
            .and_then(Value::as_str)
        {
            (n.to_string(), false)
        } else if vol.get("ephemeral").is_some_and(|e| !e.is_null()) {
            // A generic ephemeral volume's claim is named after the pod and the volume.
            let vname = vol["name"].as_str().unwrap_or_default();
            (format!("{}-{vname}", name_of(pod)), true)
        } else {
            continue;
        };
        let Some(claim) = lister.claim(ns, &name) else {
            return Err(if ephemeral {
                format!("waiting for ephemeral volume controller to create the persistentvolumeclaim \"{name}\"")
            } else {
                format!("persistentvolumeclaim \"{name}\" not found")
            });
        };
        if claim.pointer("/status/phase").and_then(Value::as_str) == Some("Lost") {
            let pv = claim
                .pointer("/spec/volumeName")
                .and_then(Value::as_str)
                .unwrap_or_default();
            return Err(format!(
                "persistentvolumeclaim \"{name}\" bound to non-existent persistentvolume \"{pv}\""
            ));
        }
        if claim.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(format!("persistentvolumeclaim \"{name}\" is being deleted"));
        }
        if ephemeral && controller_of(&claim).and_then(|o| o["uid"].as_str()) != Some(uid_of(pod)) {
            return Err(format!(
                "PVC {ns}/{name} was not created for pod {ns}/{} (pod is not owner)",
                name_of(pod)
            ));
        }
        if is_bound(&claim) {
            let pv = claim["spec"]["volumeName"].as_str().unwrap_or_default();
            let pv = lister.volume(pv);
            out.bound.push((claim, pv));
            continue;
        }
        // An unknown class, or none, binds immediately (upstream's IsDelayBindingMode).
        let class_name = claim_class(&claim).to_string();
        let class = Some(class_name.as_str())
            .filter(|c| !c.is_empty())
            .and_then(|c| lister.class(c))
            .filter(|c| c["volumeBindingMode"] == "WaitForFirstConsumer");
        match class {
            Some(class) => out.delayed.push(Delayed {
                volumes: lister.volumes_of_class(&class_name),
                claim,
                class,
            }),
            None => immediate = true,
        }
    }
    if immediate {
        return Err(ERR_UNBOUND_IMMEDIATE.to_string());
    }
    Ok(out)
}

/// A volume's required node affinity against a node. As upstream, only the node's labels are
/// consulted (a `matchFields` requirement on the name is not checked).
fn volume_fits_node(pv: &Value, node: &NodeInfo) -> bool {
    match pv
        .pointer("/spec/nodeAffinity/required/nodeSelectorTerms")
        .and_then(Value::as_array)
    {
        Some(terms) => node_selector_matches(terms, "", &node.labels),
        None => true,
    }
}

fn storage(v: &Value, ptr: &str) -> i128 {
    milli_of(v.pointer(ptr))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn bound_to_claim(pv: &Value, claim: &Value) -> bool {
    let r = &pv["spec"]["claimRef"];
    r.is_object()
        && r["name"].as_str() == Some(name_of(claim))
        && r["namespace"].as_str() == Some(namespace_of(claim))
        && r["uid"]
            .as_str()
            .is_none_or(|u| u.is_empty() || u == uid_of(claim))
}

/// Upstream's FindMatchingVolume on the scheduler's path: a volume pre-bound to the claim, or
/// the smallest available one that fits it (class, size, mode, access modes, selector, node).
fn matching_volume<'a>(
    claim: &Value,
    volumes: &'a [Arc<Value>],
    node: &NodeInfo,
    excluded: &HashSet<String>,
) -> Option<&'a Arc<Value>> {
    let requested = storage(claim, "/spec/resources/requests/storage");
    let class = claim_class(claim);
    let selector = claim
        .pointer("/spec/selector")
        .filter(|s| !s.is_null())
        .map(|s| from_label_selector_object(s).ok());
    let mode = |v: &Value| {
        v.pointer("/spec/volumeMode")
            .and_then(Value::as_str)
            .unwrap_or("Filesystem")
            .to_string()
    };
    let mut best: Option<(&Arc<Value>, i128)> = None;
    for pv in volumes {
        if excluded.contains(name_of(pv)) {
            continue;
        }
        if pv["spec"]["claimRef"].is_object() && !bound_to_claim(pv, claim) {
            continue;
        }
        let capacity = storage(pv, "/spec/capacity/storage");
        if capacity < requested
            || mode(pv) != mode(claim)
            || pv.pointer("/metadata/deletionTimestamp").is_some()
        {
            continue;
        }
        let fits = volume_fits_node(pv, node);
        if bound_to_claim(pv, claim) {
            // Pre-bound: this volume or none.
            return fits.then_some(pv);
        }
        if pv.pointer("/status/phase").and_then(Value::as_str) != Some("Available") {
            continue;
        }
        match &selector {
            Some(None) => continue,
            Some(Some(sel)) if !sel.matches(&labels_of(pv)) => continue,
            _ => {}
        }
        if volume_class(pv) != class || !fits {
            continue;
        }
        let modes = strings(&pv["spec"]["accessModes"]);
        if !strings(&claim["spec"]["accessModes"])
            .iter()
            .all(|m| modes.contains(m))
        {
            continue;
        }
        if best.is_none_or(|(_, c)| capacity < c) {
            best = Some((pv, capacity));
        }
    }
    best.map(|(pv, _)| pv)
}

/// Whether a class can provision a volume reachable from `node` (its provisioner and allowed
/// topologies; storage capacity is only tracked for CSI drivers, which k3rs has none of).
fn can_provision(class: &Value, node: &NodeInfo) -> bool {
    let provisioner = class["provisioner"].as_str().unwrap_or_default();
    if provisioner.is_empty() || provisioner == NO_PROVISIONER {
        return false;
    }
    let terms = class["allowedTopologies"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    terms.is_empty()
        || terms.iter().any(|t| {
            t["matchLabelExpressions"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|e| {
                    let key = e["key"].as_str().unwrap_or_default();
                    node.labels
                        .get(key)
                        .is_some_and(|v| strings(&e["values"]).contains(&v.as_str()))
                })
        })
}

fn claim_ref(claim: &Value) -> Value {
    json!({
        "kind": "PersistentVolumeClaim",
        "namespace": namespace_of(claim),
        "name": name_of(claim),
        "uid": uid_of(claim),
        "apiVersion": "v1",
        "resourceVersion": claim.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null),
    })
}

impl PodVolumes {
    /// Filter: upstream's reasons why `node` cannot take the pod's volumes (none: it can).
    pub fn filter(&self, node: &NodeInfo) -> Vec<&'static str> {
        self.find(node).0
    }

    /// PreBind: what binding the pod's volumes to `node` (which passed `filter`) takes.
    pub fn plan(&self, node: &NodeInfo) -> Plan {
        self.find(node).1
    }

    fn find(&self, node: &NodeInfo) -> (Vec<&'static str>, Plan) {
        let mut plan = Plan::default();
        let (mut bound_ok, mut pvs_found, mut unbound_ok) = (true, true, true);
        for (_, pv) in &self.bound {
            match pv {
                None => {
                    pvs_found = false;
                    break;
                }
                Some(pv) if !volume_fits_node(pv, node) => {
                    bound_ok = false;
                    break;
                }
                Some(_) => {}
            }
        }
        let reasons = |b: bool, u: bool, f: bool| {
            let mut r = Vec::new();
            if !b {
                r.push(ERR_NODE_CONFLICT);
            }
            if !u {
                r.push(ERR_BIND_CONFLICT);
            }
            if !f {
                r.push(ERR_PV_NOT_EXIST);
            }
            r
        };
        let mut to_match = Vec::new();
        let mut to_provision = Vec::new();
        for d in &self.delayed {
            match selected_node(&d.claim) {
                Some(n) if n != node.name => {
                    // Being provisioned for another node.
                    return (reasons(bound_ok, false, pvs_found), Plan::default());
                }
                Some(_) => to_provision.push(d),
                None => to_match.push(d),
            }
        }
        // The smallest requests first, so that each gets the smallest volume that fits.
        to_match.sort_by_key(|d| storage(&d.claim, "/spec/resources/requests/storage"));
        let mut chosen = HashSet::new();
        for d in to_match {
            match matching_volume(&d.claim, &d.volumes, node, &chosen) {
                Some(pv) => {
                    chosen.insert(name_of(pv).to_string());
                    let mut bound = (**pv).clone();
                    bound["spec"]["claimRef"] = claim_ref(&d.claim);
                    if !bound_to_claim(pv, &d.claim) {
                        let md = &mut bound["metadata"];
                        if !md["annotations"].is_object() {
                            md["annotations"] = json!({});
                        }
                        md["annotations"][ANN_BOUND_BY_CONTROLLER] = json!("yes");
                    }
                    plan.static_bindings.push(bound);
                }
                None => {
                    unbound_ok = false;
                    to_provision.push(d);
                }
            }
        }
        if !to_provision.is_empty() {
            unbound_ok = to_provision.iter().all(|d| can_provision(&d.class, node));
            plan.provisions = to_provision
                .iter()
                .map(|d| format!("{}/{}", namespace_of(&d.claim), name_of(&d.claim)))
                .collect();
        }
        (reasons(bound_ok, unbound_ok, pvs_found), plan)
    }
}

/// Objects in maps: a `VolumeLister` for tests.
#[cfg(test)]
#[derive(Default)]
pub struct MapLister {
    pub claims: std::collections::BTreeMap<String, Arc<Value>>,
    pub volumes: std::collections::BTreeMap<String, Arc<Value>>,
    pub classes: std::collections::BTreeMap<String, Arc<Value>>,
}

#[cfg(test)]
impl MapLister {
    pub fn with(objects: Vec<Value>) -> MapLister {
        let mut l = MapLister::default();
        for o in objects {
            let o = Arc::new(o);
            match o["kind"].as_str().unwrap_or_default() {
                "PersistentVolumeClaim" => {
                    l.claims
                        .insert(format!("{}/{}", namespace_of(&o), name_of(&o)), o);
                }
                "PersistentVolume" => {
                    l.volumes.insert(name_of(&o).to_string(), o);
                }
                "StorageClass" => {
                    l.classes.insert(name_of(&o).to_string(), o);
                }
                other => panic!("not a storage object: {other}"),
            }
        }
        l
    }
}

#[cfg(test)]
impl VolumeLister for MapLister {
    fn claim(&self, namespace: &str, name: &str) -> Option<Arc<Value>> {
        self.claims.get(&format!("{namespace}/{name}")).cloned()
    }
    fn volume(&self, name: &str) -> Option<Arc<Value>> {
        self.volumes.get(name).cloned()
    }
    fn class(&self, name: &str) -> Option<Arc<Value>> {
        self.classes.get(name).cloned()
    }
    fn volumes_of_class(&self, class: &str) -> Vec<Arc<Value>> {
        self.volumes
            .values()
            .filter(|v| volume_class(v) == class)
            .cloned()
            .collect()
    }
}
