//! The scheduler's plugins as pure functions over a pod and a cached view of the nodes (what
//! each node offers and which pods it runs), in the order and with the weights of upstream's
//! default profile: `pre_filter` computes once per pod what the filters need of the whole
//! cluster, `filter` judges one node (upstream's reason strings, and whether evicting pods
//! could help), `score` ranks the feasible nodes (each plugin's score normalized over them, then
//! weighted), and `victims` finds what preemption would evict.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use super::volumes::PodVolumes;
use crate::api::selectors::{from_label_selector_object, labels_of, LabelSelector};
use crate::controllers::client::{controller_of, key_of, name_of, namespace_of};
use crate::controllers::quantity::{milli_of, pod_requests, pod_requests_nonzero, Requests};

const MAX_NODE_SCORE: i64 = 100;
const HOSTNAME: &str = "kubernetes.io/hostname";
const ZONE: &str = "topology.kubernetes.io/zone";
const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

pub const ERR_UNSCHEDULABLE: &str = "node(s) were unschedulable";
pub const ERR_NODE_NAME: &str = "node(s) didn't match the requested node name";
pub const ERR_NODE_AFFINITY: &str = "node(s) didn't match Pod's node affinity/selector";
pub const ERR_PORTS: &str = "node(s) didn't have free ports for the requested pod ports";
pub const ERR_SPREAD: &str = "node(s) didn't match pod topology spread constraints";
pub const ERR_SPREAD_LABEL: &str =
    "node(s) didn't match pod topology spread constraints (missing required label)";
pub const ERR_AFFINITY: &str = "node(s) didn't match pod affinity rules";
pub const ERR_ANTI_AFFINITY: &str = "node(s) didn't match pod anti-affinity rules";
pub const ERR_EXISTING_ANTI_AFFINITY: &str =
    "node(s) didn't satisfy existing pods anti-affinity rules";

/// Why a node cannot take a pod: upstream's reasons (each counted in the FailedScheduling
/// message) and whether the status is UnschedulableAndUnresolvable (preemption cannot help).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub reasons: Vec<String>,
    pub unresolvable: bool,
}

impl Rejection {
    pub fn unschedulable(reasons: Vec<String>) -> Rejection {
        Rejection {
            reasons,
            unresolvable: false,
        }
    }

    pub fn unresolvable(reason: impl Into<String>) -> Rejection {
        Rejection {
            reasons: vec![reason.into()],
            unresolvable: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: String,
}

/// A label selector from an object field where, as upstream's `LabelSelectorAsSelector`, an
/// absent (or invalid) selector matches nothing: `None`.
fn selector_of(v: &Value) -> Option<LabelSelector> {
    if v.is_null() {
        return None;
    }
    from_label_selector_object(v).ok()
}

/// A pod (anti-)affinity term.
#[derive(Clone, Debug)]
pub struct Term {
    /// `None`: the term has no label selector and matches no pod.
    pub selector: Option<LabelSelector>,
    pub namespaces: Vec<String>,
    /// `None`: no namespace selector (or one already resolved into `namespaces`); an empty
    /// selector matches every namespace.
    pub namespace_selector: Option<LabelSelector>,
    pub topology_key: String,
    pub weight: i64,
}

impl Term {
    /// Whether a pod (its namespace, labels and its namespace's labels) matches the term.
    pub fn matches(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        ns_labels: &BTreeMap<String, String>,
    ) -> bool {
        (self.namespaces.iter().any(|n| n == namespace)
            || self
                .namespace_selector
                .as_ref()
                .is_some_and(|s| s.matches(ns_labels)))
            && self.selector.as_ref().is_some_and(|s| s.matches(labels))
    }
}

fn terms(pod: &Value, ptr: &str, weighted: bool) -> Vec<Term> {
    let ns = namespace_of(pod).to_string();
    pod.pointer(ptr)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|t| {
                    let (t, weight) = if weighted {
                        (&t["podAffinityTerm"], t["weight"].as_i64().unwrap_or(0))
                    } else {
                        (t, 1)
                    };
                    let mut namespaces: Vec<String> = t["namespaces"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|n| n.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    let namespace_selector = selector_of(&t["namespaceSelector"]);
                    if namespaces.is_empty() && t["namespaceSelector"].is_null() {
                        namespaces.push(ns.clone());
                    }
                    Term {
                        selector: selector_of(&t["labelSelector"]),
                        namespaces,
                        namespace_selector,
                        topology_key: t["topologyKey"].as_str().unwrap_or_default().to_string(),
                        weight,
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What the scheduler needs of a pod placed on a node (or of the pod being scheduled).
#[derive(Clone, Debug)]
pub struct PlacedPod {
    pub key: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub priority: i64,
    pub requests: Requests,
    /// Requests with upstream's defaults for unstated cpu and memory (what scores count).
    pub nonzero: Requests,
    /// Host ports: protocol, port, host IP.
    pub ports: Vec<(String, i64, String)>,
    pub terminating: bool,
    pub affinity: Vec<Term>,
    pub anti_affinity: Vec<Term>,
    pub preferred_affinity: Vec<Term>,
    pub preferred_anti_affinity: Vec<Term>,
}

impl PlacedPod {
    /// Whether the pod has any pod (anti-)affinity term.
    pub fn has_affinity(&self) -> bool {
        !(self.affinity.is_empty()
            && self.anti_affinity.is_empty()
            && self.preferred_affinity.is_empty()
            && self.preferred_anti_affinity.is_empty())
    }
}

/// Host ports of the containers and sidecars (init containers that keep running), as
/// upstream's `GetHostPorts`; protocol and host IP defaulted.
fn host_ports(pod: &Value) -> Vec<(String, i64, String)> {
    let sidecars = pod
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|c| c["restartPolicy"] == "Always");
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    let mut out = Vec::new();
    for c in sidecars.chain(containers) {
        for p in c["ports"].as_array().into_iter().flatten() {
            if let Some(hp) = p["hostPort"].as_i64().filter(|h| *h > 0) {
                let proto = p["protocol"].as_str().filter(|s| !s.is_empty());
                let ip = p["hostIP"].as_str().filter(|s| !s.is_empty());
                out.push((
                    proto.unwrap_or("TCP").to_string(),
                    hp,
                    ip.unwrap_or("0.0.0.0").to_string(),
                ));
            }
        }
    }
    out
}

pub fn placed(pod: &Value) -> PlacedPod {
    let t = |ptr: &str, weighted| terms(pod, ptr, weighted);
    PlacedPod {
        key: key_of(pod),
        namespace: namespace_of(pod).to_string(),
        labels: labels_of(pod),
        priority: pod
            .pointer("/spec/priority")
            .and_then(Value::as_i64)
            .unwrap_or(0),
        requests: pod_requests(pod),
        nonzero: pod_requests_nonzero(pod),
        ports: host_ports(pod),
        terminating: pod.pointer("/metadata/deletionTimestamp").is_some(),
        affinity: t(
            "/spec/affinity/podAffinity/requiredDuringSchedulingIgnoredDuringExecution",
            false,
        ),
        anti_affinity: t(
            "/spec/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution",
            false,
        ),
        preferred_affinity: t(
            "/spec/affinity/podAffinity/preferredDuringSchedulingIgnoredDuringExecution",
            true,
        ),
        preferred_anti_affinity: t(
            "/spec/affinity/podAntiAffinity/preferredDuringSchedulingIgnoredDuringExecution",
            true,
        ),
    }
}

#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub unschedulable: bool,
    pub allocatable: Requests,
    pub allocatable_pods: i64,
    pub requested: Requests,
    pub nonzero_requested: Requests,
    pub pods: BTreeMap<String, Arc<PlacedPod>>,
    /// Pods with any pod (anti-)affinity term, and with a required anti-affinity term.
    pub with_affinity: usize,
    pub with_anti_affinity: usize,
    /// Matching-pod counts of spread selectors on this node, cleared when its pods change:
    /// scheduling a burst of one owner's pods recounts only the node that got the last one.
    spread_memo: SpreadMemo,
}

/// (namespace, selector) -> pods matching on one node. A clone starts empty.
#[derive(Debug, Default)]
struct SpreadMemo(parking_lot::Mutex<HashMap<(String, String), i64>>);

impl Clone for SpreadMemo {
    fn clone(&self) -> Self {
        SpreadMemo::default()
    }
}

impl NodeInfo {
    pub fn from_node(node: &Value) -> NodeInfo {
        let taints = node
            .pointer("/spec/taints")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|t| Taint {
                        key: t["key"].as_str().unwrap_or_default().to_string(),
                        value: t["value"].as_str().unwrap_or_default().to_string(),
                        effect: t["effect"].as_str().unwrap_or_default().to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let alloc = |r: &str| milli_of(node.pointer(&format!("/status/allocatable/{r}")));
        NodeInfo {
            name: name_of(node).to_string(),
            labels: labels_of(node),
            taints,
            unschedulable: node
                .pointer("/spec/unschedulable")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            allocatable: Requests {
                cpu_milli: alloc("cpu"),
                memory_milli: alloc("memory"),
                ephemeral_milli: alloc("ephemeral-storage"),
            },
            allocatable_pods: (alloc("pods") / 1000) as i64,
            requested: Requests::default(),
            nonzero_requested: Requests::default(),
            pods: BTreeMap::new(),
            with_affinity: 0,
            with_anti_affinity: 0,
            spread_memo: SpreadMemo::default(),
        }
    }

    pub fn add_pod(&mut self, p: PlacedPod) {
        self.add(Arc::new(p));
    }

    fn add(&mut self, p: Arc<PlacedPod>) {
        self.remove_pod(&p.key);
        self.requested.add(&p.requests);
        self.nonzero_requested.add(&p.nonzero);
        self.with_affinity += usize::from(p.has_affinity());
        self.with_anti_affinity += usize::from(!p.anti_affinity.is_empty());
        self.pods.insert(p.key.clone(), p);
        self.spread_memo.0.get_mut().clear();
    }

    pub fn remove_pod(&mut self, key: &str) {
        if let Some(old) = self.pods.remove(key) {
            self.requested.sub(&old.requests);
            self.nonzero_requested.sub(&old.nonzero);
            self.with_affinity -= usize::from(old.has_affinity());
            self.with_anti_affinity -= usize::from(!old.anti_affinity.is_empty());
            self.spread_memo.0.get_mut().clear();
        }
    }

    /// Replaces what the node offers, keeping its pods.
    pub fn update_node(&mut self, node: &Value) {
        let fresh = NodeInfo::from_node(node);
        self.labels = fresh.labels;
        self.taints = fresh.taints;
        self.unschedulable = fresh.unschedulable;
        self.allocatable = fresh.allocatable;
        self.allocatable_pods = fresh.allocatable_pods;
    }
}

/// One node selector term against a node's name and labels, as upstream's `nodeaffinity`: every
/// requirement must hold, an empty term or a malformed requirement matches nothing, and
/// `matchFields` (only `metadata.name`) is skipped when the name is unknown (`""`, as for a
/// volume's node affinity).
fn term_matches(term: &Value, name: &str, labels: &BTreeMap<String, String>) -> bool {
    let exprs = term["matchExpressions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let fields = term["matchFields"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    let values = |e: &Value| -> Vec<String> {
        e["values"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let exprs_ok = exprs.iter().all(|e| {
        let key = e["key"].as_str().unwrap_or_default();
        let vals = values(e);
        let v = labels.get(key);
        let int = || match vals.as_slice() {
            [x] => x.parse::<i64>().ok(),
            _ => None,
        };
        let label_int = || v.and_then(|v| v.parse::<i64>().ok());
        match e["operator"].as_str().unwrap_or_default() {
            "In" => !vals.is_empty() && v.is_some_and(|v| vals.contains(v)),
            "NotIn" => !vals.is_empty() && !v.is_some_and(|v| vals.contains(v)),
            "Exists" => vals.is_empty() && v.is_some(),
            "DoesNotExist" => vals.is_empty() && v.is_none(),
            "Gt" => int().zip(label_int()).is_some_and(|(x, l)| l > x),
            "Lt" => int().zip(label_int()).is_some_and(|(x, l)| l < x),
            _ => false,
        }
    });
    let fields_ok = fields.iter().all(|f| {
        let vals = values(f);
        if f["key"] != "metadata.name" || vals.len() != 1 {
            return false;
        }
        if name.is_empty() {
            return true;
        }
        match f["operator"].as_str().unwrap_or_default() {
            "In" => vals[0] == name,
            "NotIn" => vals[0] != name,
            _ => false,
        }
    });
    exprs_ok && fields_ok
}

/// Node selector terms (ORed) against a node's name and labels.
pub fn node_selector_matches(
    terms: &[Value],
    name: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    terms.iter().any(|t| term_matches(t, name, labels))
}

/// A node selector term (matchExpressions and matchFields) against a node.
pub fn node_term_matches(term: &Value, node: &NodeInfo) -> bool {
    term_matches(term, &node.name, &node.labels)
}

/// Whether one toleration tolerates a taint (upstream's `ToleratesTaint`).
fn toleration_tolerates(tol: &Value, t: &Taint) -> bool {
    let effect = tol["effect"].as_str().unwrap_or_default();
    if !effect.is_empty() && effect != t.effect {
        return false;
    }
    let key = tol["key"].as_str().unwrap_or_default();
    if !key.is_empty() && key != t.key {
        return false;
    }
    match tol["operator"].as_str().unwrap_or_default() {
        "" | "Equal" => tol["value"].as_str().unwrap_or_default() == t.value,
        "Exists" => true,
        _ => false,
    }
}

pub fn tolerates(tolerations: &[Value], t: &Taint) -> bool {
    tolerations.iter().any(|tol| toleration_tolerates(tol, t))
}

fn untolerated_hard_taint<'a>(tolerations: &[Value], node: &'a NodeInfo) -> Option<&'a Taint> {
    node.taints.iter().find(|t| {
        (t.effect == "NoSchedule" || t.effect == "NoExecute") && !tolerates(tolerations, t)
    })
}

/// A pod's required node affinity: its node selector and required node affinity terms.
#[derive(Clone, Debug, Default)]
pub struct RequiredAffinity {
    pub node_selector: BTreeMap<String, String>,
    pub terms: Option<Vec<Value>>,
}

impl RequiredAffinity {
    pub fn matches(&self, node: &NodeInfo) -> bool {
        self.node_selector
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v))
            && self
                .terms
                .as_ref()
                .is_none_or(|t| node_selector_matches(t, &node.name, &node.labels))
    }
}

/// A topology spread constraint, with upstream's defaults.
#[derive(Clone, Debug)]
pub struct Spread {
    pub max_skew: i64,
    pub topology_key: String,
    /// `None`: no label selector; it matches no pod.
    pub selector: Option<LabelSelector>,
    pub min_domains: i64,
    /// `nodeAffinityPolicy: Honor` (the default) and `nodeTaintsPolicy: Honor` (not).
    pub honor_affinity: bool,
    pub honor_taints: bool,
    /// The selector's identity for `NodeInfo::spread_memo`.
    memo_key: String,
}

impl Spread {
    fn parse(v: &Value, pod_labels: &BTreeMap<String, String>) -> Spread {
        // matchLabelKeys: the pod's values of those keys narrow the selector.
        let mut sel = v["labelSelector"].clone();
        let keys: Vec<&str> = v["matchLabelKeys"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let extra: Vec<Value> = keys
            .iter()
            .filter_map(|k| {
                pod_labels
                    .get(*k)
                    .map(|val| serde_json::json!({"key": k, "operator": "In", "values": [val]}))
            })
            .collect();
        if !extra.is_empty() && sel.is_object() {
            let exprs = &mut sel["matchExpressions"];
            if !exprs.is_array() {
                *exprs = Value::Array(Vec::new());
            }
            exprs.as_array_mut().expect("array").extend(extra);
        }
        let selector = selector_of(&sel);
        Spread {
            max_skew: v["maxSkew"].as_i64().unwrap_or(1),
            topology_key: v["topologyKey"].as_str().unwrap_or_default().to_string(),
            memo_key: format!("{selector:?}"),
            selector,
            min_domains: v["minDomains"].as_i64().unwrap_or(1),
            honor_affinity: v["nodeAffinityPolicy"].as_str().unwrap_or("Honor") == "Honor",
            honor_taints: v["nodeTaintsPolicy"].as_str().unwrap_or("Ignore") == "Honor",
        }
    }

    /// Whether the node's pods count for this constraint (its inclusion policies).
    fn includes(&self, c: &Candidate, node: &NodeInfo) -> bool {
        (!self.honor_affinity || c.required.matches(node))
            && (!self.honor_taints || untolerated_hard_taint(&c.tolerations, node).is_none())
    }

    /// Whether an existing pod counts (upstream's `countPodsMatchSelector`: same namespace, not
    /// terminating, matched by a non-empty selector).
    fn counts(&self, c: &Candidate, p: &PlacedPod) -> bool {
        !p.terminating
            && p.namespace == c.me.namespace
            && p.key != c.me.key
            && self
                .selector
                .as_ref()
                .is_some_and(|s| !s.is_empty() && s.matches(&p.labels))
    }

    fn count_on(&self, c: &Candidate, node: &NodeInfo) -> i64 {
        let count = || node.pods.values().filter(|p| self.counts(c, p)).count() as i64;
        // The memo holds counts without a candidate of its own on the node.
        if node.pods.contains_key(&c.me.key) {
            return count();
        }
        let key = (c.me.namespace.clone(), self.memo_key.clone());
        if let Some(n) = node.spread_memo.0.lock().get(&key) {
            return *n;
        }
        let n = count();
        node.spread_memo.0.lock().insert(key, n);
        n
    }
}

fn has_keys(node: &NodeInfo, constraints: &[Spread]) -> bool {
    constraints
        .iter()
        .all(|s| node.labels.contains_key(&s.topology_key))
}

/// A pod being scheduled, with everything the plugins read precomputed.
pub struct Candidate {
    pub pod: Arc<Value>,
    pub me: PlacedPod,
    /// `spec.nodeName` (the NodeName filter; the scheduler only sees pods without one).
    pub node_name: String,
    pub required: RequiredAffinity,
    pub preferred_affinity: Vec<(i64, Value)>,
    pub tolerations: Vec<Value>,
    /// Labels of the pod's namespace (existing pods' terms with a namespace selector).
    pub ns_labels: BTreeMap<String, String>,
    /// Whether the pod lists topology spread constraints (else the defaults may apply).
    pub has_spread: bool,
    pub hard_spread: Vec<Spread>,
    pub soft_spread: Vec<Spread>,
    /// The selector of the system default spreading (upstream's `DefaultSelector`: the
    /// pod's services and its ReplicaSet, ReplicationController or StatefulSet).
    pub default_spread: Option<LabelSelector>,
    /// The pod's claims, from `volumes::pre_filter`.
    pub volumes: PodVolumes,
}

impl Candidate {
    pub fn new(pod: Arc<Value>) -> Candidate {
        let me = placed(&pod);
        let node_selector = pod
            .pointer("/spec/nodeSelector")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let na = pod
            .pointer("/spec/affinity/nodeAffinity")
            .cloned()
            .unwrap_or(Value::Null);
        let preferred_affinity = na["preferredDuringSchedulingIgnoredDuringExecution"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|t| (t["weight"].as_i64().unwrap_or(0), t["preference"].clone()))
                    .collect()
            })
            .unwrap_or_default();
        let terms = na["requiredDuringSchedulingIgnoredDuringExecution"]
            .get("nodeSelectorTerms")
            .map(|t| t.as_array().cloned().unwrap_or_default());
        let constraints: Vec<Value> = pod
            .pointer("/spec/topologySpreadConstraints")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let spread = |when: &str| -> Vec<Spread> {
            constraints
                .iter()
                .filter(|s| s["whenUnsatisfiable"] == when)
                .map(|s| Spread::parse(s, &me.labels))
                .collect()
        };
        Candidate {
            node_name: pod
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            required: RequiredAffinity {
                node_selector,
                terms,
            },
            preferred_affinity,
            tolerations: pod
                .pointer("/spec/tolerations")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            ns_labels: BTreeMap::new(),
            has_spread: !constraints.is_empty(),
            hard_spread: spread("DoNotSchedule"),
            soft_spread: spread("ScheduleAnyway"),
            default_spread: None,
            volumes: PodVolumes::default(),
            me,
            pod,
        }
    }

    /// Whether a term of the pod selects namespaces by label (resolving needs every namespace).
    pub fn has_namespace_selectors(&self) -> bool {
        let me = &self.me;
        me.affinity
            .iter()
            .chain(&me.anti_affinity)
            .chain(&me.preferred_affinity)
            .chain(&me.preferred_anti_affinity)
            .any(|t| t.namespace_selector.as_ref().is_some_and(|s| !s.is_empty()))
    }

    /// Resolves the namespace selectors of the pod's terms against the cluster's namespaces
    /// (as upstream merges them into the terms' namespaces) and notes the labels of the pod's
    /// own namespace.
    pub fn resolve_namespaces(&mut self, namespaces: &[Arc<Value>]) {
        let own = self.me.namespace.clone();
        if let Some(ns) = namespaces.iter().find(|n| name_of(n) == own) {
            self.ns_labels = labels_of(ns);
        }
        let me = &mut self.me;
        for t in me
            .affinity
            .iter_mut()
            .chain(me.anti_affinity.iter_mut())
            .chain(me.preferred_affinity.iter_mut())
            .chain(me.preferred_anti_affinity.iter_mut())
        {
            if let Some(sel) = t.namespace_selector.take() {
                if sel.is_empty() {
                    t.namespace_selector = Some(sel);
                    continue;
                }
                for n in namespaces {
                    if sel.matches(&labels_of(n)) && !t.namespaces.iter().any(|x| x == name_of(n)) {
                        t.namespaces.push(name_of(n).to_string());
                    }
                }
            }
        }
    }

    /// The spreading the score uses: the pod's soft constraints, or the system defaults
    /// (`hostname` with maxSkew 3, `zone` with 5) over `default_spread`; and whether nodes need
    /// every topology key.
    fn scoring_spread(&self) -> (Vec<Spread>, bool) {
        if self.has_spread {
            return (self.soft_spread.clone(), true);
        }
        let Some(sel) = self.default_spread.as_ref().filter(|s| !s.is_empty()) else {
            return (Vec::new(), false);
        };
        let memo_key = format!("{:?}", Some(sel));
        let d = |key: &str, max_skew| Spread {
            max_skew,
            topology_key: key.to_string(),
            memo_key: memo_key.clone(),
            selector: Some(sel.clone()),
            min_domains: 1,
            honor_affinity: true,
            honor_taints: false,
        };
        (vec![d(HOSTNAME, 3), d(ZONE, 5)], false)
    }
}

/// Upstream's `DefaultSelector` for default spreading: the selectors of the services that
/// select the pod, and of its controlling ReplicaSet, ReplicationController or StatefulSet.
/// `None` when that is empty (no default spreading).
pub fn default_selector(
    pod: &Value,
    services: &[Arc<Value>],
    owner: Option<&Value>,
) -> Option<LabelSelector> {
    let labels = labels_of(pod);
    let mut match_labels = serde_json::Map::new();
    for s in services {
        let Some(sel) = s.pointer("/spec/selector").and_then(Value::as_object) else {
            continue;
        };
        if sel
            .iter()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
        {
            match_labels.extend(sel.clone());
        }
    }
    let mut exprs: Vec<Value> = Vec::new();
    if let Some(o) = owner {
        let sel = &o["spec"]["selector"];
        if o["kind"] == "ReplicationController" {
            if let Some(m) = sel.as_object() {
                match_labels.extend(m.clone());
            }
        } else {
            for (k, v) in sel["matchLabels"].as_object().into_iter().flatten() {
                exprs.push(serde_json::json!({"key": k, "operator": "In", "values": [v]}));
            }
            exprs.extend(
                sel["matchExpressions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            );
        }
    }
    let sel = from_label_selector_object(
        &serde_json::json!({"matchLabels": match_labels, "matchExpressions": exprs}),
    )
    .ok()?;
    (!sel.is_empty()).then_some(sel)
}

/// Whether a pod's controller is a kind default spreading follows (its selector is looked up).
pub fn spreading_owner(pod: &Value) -> Option<(&str, &str)> {
    let o = controller_of(pod)?;
    let kind = o["kind"].as_str()?;
    let api = o["apiVersion"].as_str().unwrap_or_default();
    match (api, kind) {
        ("v1", "ReplicationController")
        | ("apps/v1", "ReplicaSet")
        | ("apps/v1", "StatefulSet") => Some((kind, o["name"].as_str()?)),
        _ => None,
    }
}

/// Counts per topology pair (`key` → `value` → count); zero entries are dropped.
#[derive(Clone, Debug, Default)]
struct Pairs(HashMap<String, HashMap<String, i64>>);

impl Pairs {
    fn bump(&mut self, node: &NodeInfo, key: &str, delta: i64) {
        let Some(value) = node.labels.get(key) else {
            return;
        };
        let inner = self.0.entry(key.to_string()).or_default();
        let n = inner.entry(value.clone()).or_default();
        *n += delta;
        if *n == 0 {
            inner.remove(value);
            if inner.is_empty() {
                self.0.remove(key);
            }
        }
    }

    fn get(&self, key: &str, value: &str) -> i64 {
        self.0
            .get(key)
            .and_then(|m| m.get(value))
            .copied()
            .unwrap_or(0)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What the filters need of the whole cluster, computed once per pod (upstream's PreFilter
/// state of InterPodAffinity and PodTopologySpread).
#[derive(Clone, Debug, Default)]
pub struct State {
    /// Existing pods matching all the pod's required affinity terms, per term topology.
    affinity: Pairs,
    /// Existing pods matching one of the pod's required anti-affinity terms.
    anti_affinity: Pairs,
    /// Existing pods whose required anti-affinity terms match the pod.
    existing_anti_affinity: Pairs,
    /// Per DoNotSchedule constraint: matching pods per eligible domain.
    spread: Vec<BTreeMap<String, i64>>,
}

impl State {
    /// Counts an existing pod on `node` (`delta` 1), or stops counting it (-1, for preemption).
    fn add_pod(&mut self, c: &Candidate, p: &PlacedPod, node: &NodeInfo, delta: i64) {
        if p.key == c.me.key {
            return;
        }
        let none = BTreeMap::new();
        if !c.me.affinity.is_empty()
            && c.me
                .affinity
                .iter()
                .all(|t| t.matches(&p.namespace, &p.labels, &none))
        {
            for t in &c.me.affinity {
                self.affinity.bump(node, &t.topology_key, delta);
            }
        }
        for t in &c.me.anti_affinity {
            if t.matches(&p.namespace, &p.labels, &none) {
                self.anti_affinity.bump(node, &t.topology_key, delta);
            }
        }
        for t in &p.anti_affinity {
            if t.matches(&c.me.namespace, &c.me.labels, &c.ns_labels) {
                self.existing_anti_affinity
                    .bump(node, &t.topology_key, delta);
            }
        }
        if !c.hard_spread.is_empty() && has_keys(node, &c.hard_spread) {
            for (i, s) in c.hard_spread.iter().enumerate() {
                if s.includes(c, node) && s.counts(c, p) {
                    *self.spread[i]
                        .entry(node.labels[&s.topology_key].clone())
                        .or_default() += delta;
                }
            }
        }
    }
}

/// PreFilter of InterPodAffinity and PodTopologySpread over every node.
pub fn pre_filter(c: &Candidate, nodes: &HashMap<String, NodeInfo>) -> State {
    let mut s = State {
        spread: vec![BTreeMap::new(); c.hard_spread.len()],
        ..State::default()
    };
    let every_pod =
        !c.me.affinity.is_empty() || !c.me.anti_affinity.is_empty() || !c.hard_spread.is_empty();
    for node in nodes.values() {
        if !c.hard_spread.is_empty() && has_keys(node, &c.hard_spread) {
            for (i, sp) in c.hard_spread.iter().enumerate() {
                if sp.includes(c, node) {
                    s.spread[i]
                        .entry(node.labels[&sp.topology_key].clone())
                        .or_default();
                }
            }
        }
        if every_pod || node.with_anti_affinity > 0 {
            for p in node.pods.values() {
                s.add_pod(c, p, node, 1);
            }
        }
    }
    s
}

/// Runs every filter in upstream's order; the first that rejects the node decides.
pub fn filter(c: &Candidate, s: &State, node: &NodeInfo) -> Result<(), Rejection> {
    // NodeUnschedulable.
    if node.unschedulable {
        let t = Taint {
            key: UNSCHEDULABLE_TAINT.into(),
            value: String::new(),
            effect: "NoSchedule".into(),
        };
        if !tolerates(&c.tolerations, &t) {
            return Err(Rejection::unresolvable(ERR_UNSCHEDULABLE));
        }
    }
    // NodeName.
    if !c.node_name.is_empty() && c.node_name != node.name {
        return Err(Rejection::unresolvable(ERR_NODE_NAME));
    }
    // TaintToleration.
    if let Some(t) = untolerated_hard_taint(&c.tolerations, node) {
        return Err(Rejection::unresolvable(format!(
            "node(s) had untolerated taint {{{}: {}}}",
            t.key, t.value
        )));
    }
    // NodeAffinity (node selector and required node affinity).
    if !c.required.matches(node) {
        return Err(Rejection::unresolvable(ERR_NODE_AFFINITY));
    }
    // NodePorts.
    for (proto, port, ip) in &c.me.ports {
        let clash = node.pods.values().any(|p| {
            p.key != c.me.key
                && p.ports.iter().any(|(pp, po, pip)| {
                    pp == proto && po == port && (pip == ip || pip == "0.0.0.0" || ip == "0.0.0.0")
                })
        });
        if clash {
            return Err(Rejection::unschedulable(vec![ERR_PORTS.into()]));
        }
    }
    // NodeResourcesFit.
    let mut insufficient = Vec::new();
    if node.pods.len() as i64 + 1 > node.allocatable_pods {
        insufficient.push("Too many pods".to_string());
    }
    let r = &c.me.requests;
    let (req, alloc) = (&node.requested, &node.allocatable);
    for (name, want, used, has) in [
        ("cpu", r.cpu_milli, req.cpu_milli, alloc.cpu_milli),
        (
            "memory",
            r.memory_milli,
            req.memory_milli,
            alloc.memory_milli,
        ),
        (
            "ephemeral-storage",
            r.ephemeral_milli,
            req.ephemeral_milli,
            alloc.ephemeral_milli,
        ),
    ] {
        if want > 0 && want > has - used {
            insufficient.push(format!("Insufficient {name}"));
        }
    }
    if !insufficient.is_empty() {
        return Err(Rejection::unschedulable(insufficient));
    }
    // VolumeBinding.
    let reasons = c.volumes.filter(node);
    if !reasons.is_empty() {
        return Err(Rejection {
            reasons: reasons.into_iter().map(str::to_string).collect(),
            unresolvable: true,
        });
    }
    // PodTopologySpread (DoNotSchedule).
    for (i, sp) in c.hard_spread.iter().enumerate() {
        let Some(domain) = node.labels.get(&sp.topology_key) else {
            return Err(Rejection::unresolvable(ERR_SPREAD_LABEL));
        };
        let counts = &s.spread[i];
        let min = if (counts.len() as i64) < sp.min_domains {
            0
        } else {
            counts.values().copied().min().unwrap_or(0)
        };
        let me = i64::from(
            sp.selector
                .as_ref()
                .is_some_and(|s| s.matches(&c.me.labels)),
        );
        if counts.get(domain).copied().unwrap_or(0) + me - min > sp.max_skew {
            return Err(Rejection::unschedulable(vec![ERR_SPREAD.into()]));
        }
    }
    // InterPodAffinity: the pod's required affinity, its anti-affinity, and the existing pods'
    // anti-affinity.
    if !c.me.affinity.is_empty() {
        let mut pods_exist = true;
        for t in &c.me.affinity {
            let Some(v) = node.labels.get(&t.topology_key) else {
                return Err(Rejection::unresolvable(ERR_AFFINITY));
            };
            if s.affinity.get(&t.topology_key, v) <= 0 {
                pods_exist = false;
            }
        }
        // The first pod of a group that has affinity to itself may go anywhere.
        let none = BTreeMap::new();
        let first = s.affinity.is_empty()
            && c.me
                .affinity
                .iter()
                .all(|t| t.matches(&c.me.namespace, &c.me.labels, &none));
        if !pods_exist && !first {
            return Err(Rejection::unresolvable(ERR_AFFINITY));
        }
    }
    if !s.anti_affinity.is_empty() {
        for t in &c.me.anti_affinity {
            if let Some(v) = node.labels.get(&t.topology_key) {
                if s.anti_affinity.get(&t.topology_key, v) > 0 {
                    return Err(Rejection::unschedulable(vec![ERR_ANTI_AFFINITY.into()]));
                }
            }
        }
    }
    if !s.existing_anti_affinity.is_empty()
        && node
            .labels
            .iter()
            .any(|(k, v)| s.existing_anti_affinity.get(k, v) > 0)
    {
        return Err(Rejection::unschedulable(vec![
            ERR_EXISTING_ANTI_AFFINITY.into()
        ]));
    }
    Ok(())
}

/// Each scoring plugin's score of a node, normalized to 0–100 over the feasible nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scores {
    pub taint_toleration: i64,
    pub node_affinity: i64,
    pub least_allocated: i64,
    pub balanced_allocation: i64,
    pub topology_spread: i64,
    pub inter_pod_affinity: i64,
}

impl Scores {
    /// The weighted sum of upstream's default profile.
    pub fn total(&self) -> i64 {
        3 * self.taint_toleration
            + 2 * self.node_affinity
            + self.least_allocated
            + self.balanced_allocation
            + 2 * self.topology_spread
            + 2 * self.inter_pod_affinity
    }
}

/// Upstream's `DefaultNormalizeScore`: scaled so that the highest is 100 (reversed: lowest).
fn normalize(raw: &[i64], reverse: bool) -> Vec<i64> {
    let max = raw.iter().copied().max().unwrap_or(0).max(0);
    raw.iter()
        .map(|s| {
            if max == 0 {
                if reverse {
                    MAX_NODE_SCORE
                } else {
                    0
                }
            } else {
                let v = MAX_NODE_SCORE * s / max;
                if reverse {
                    MAX_NODE_SCORE - v
                } else {
                    v
                }
            }
        })
        .collect()
}

/// NodeResourcesFit's LeastAllocated: free share of cpu and memory after placing the pod
/// (requests with defaults for unstated ones), equally weighted.
fn least_allocated(c: &Candidate, node: &NodeInfo) -> i64 {
    let pairs = [
        (
            node.nonzero_requested.cpu_milli + c.me.nonzero.cpu_milli,
            node.allocatable.cpu_milli,
        ),
        (
            node.nonzero_requested.memory_milli + c.me.nonzero.memory_milli,
            node.allocatable.memory_milli,
        ),
    ];
    let scores: Vec<i64> = pairs
        .iter()
        .filter(|(_, alloc)| *alloc > 0)
        .map(|(req, alloc)| {
            if req > alloc {
                0
            } else {
                ((alloc - req) * MAX_NODE_SCORE as i128 / alloc) as i64
            }
        })
        .collect();
    if scores.is_empty() {
        0
    } else {
        scores.iter().sum::<i64>() / scores.len() as i64
    }
}

/// NodeResourcesBalancedAllocation: 100 × (1 − the standard deviation of the cpu and memory
/// shares requested after placing the pod); skipped (0) for pods that request nothing.
fn balanced_allocation(c: &Candidate, node: &NodeInfo) -> i64 {
    let r = &c.me.requests;
    if r.cpu_milli == 0 && r.memory_milli == 0 {
        return 0;
    }
    let fractions: Vec<f64> = [
        (
            node.requested.cpu_milli + r.cpu_milli,
            node.allocatable.cpu_milli,
        ),
        (
            node.requested.memory_milli + r.memory_milli,
            node.allocatable.memory_milli,
        ),
    ]
    .iter()
    .filter(|(_, alloc)| *alloc > 0)
    .map(|(req, alloc)| (*req as f64 / *alloc as f64).min(1.0))
    .collect();
    let std = if fractions.len() == 2 {
        ((fractions[0] - fractions[1]) / 2.0).abs()
    } else {
        0.0
    };
    ((1.0 - std) * MAX_NODE_SCORE as f64) as i64
}

/// PodTopologySpread's scores (soft constraints, or the system defaults).
fn spread_scores(
    c: &Candidate,
    feasible: &[&NodeInfo],
    nodes: &HashMap<String, NodeInfo>,
) -> Vec<i64> {
    let (constraints, require_all) = c.scoring_spread();
    if constraints.is_empty() {
        return vec![0; feasible.len()];
    }
    let ignored: Vec<bool> = feasible
        .iter()
        .map(|n| require_all && !has_keys(n, &constraints))
        .collect();
    // Domains per constraint among the scored nodes (a node without the key is in domain ""
    // for the domain count, as upstream); pods are only counted for domains a scored node has
    // the key for, since only those are read.
    let mut domains: Vec<HashSet<&str>> = vec![HashSet::new(); constraints.len()];
    let mut counts: Vec<HashMap<String, i64>> = vec![HashMap::new(); constraints.len()];
    for (n, _) in feasible.iter().zip(&ignored).filter(|(_, i)| !**i) {
        for (i, s) in constraints.iter().enumerate() {
            if s.topology_key == HOSTNAME {
                continue;
            }
            match n.labels.get(&s.topology_key) {
                Some(v) => {
                    domains[i].insert(v);
                    counts[i].entry(v.clone()).or_default();
                }
                None => {
                    domains[i].insert("");
                }
            }
        }
    }
    let scored = ignored.iter().filter(|i| !**i).count();
    let weights: Vec<f64> = constraints
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let size = if s.topology_key == HOSTNAME {
                scored
            } else {
                domains[i].len()
            };
            ((size + 2) as f64).ln()
        })
        .collect();
    for n in nodes.values() {
        if require_all && !has_keys(n, &constraints) {
            continue;
        }
        for (i, s) in constraints.iter().enumerate() {
            let v = n
                .labels
                .get(&s.topology_key)
                .map(String::as_str)
                .unwrap_or_default();
            if counts[i].contains_key(v) && s.includes(c, n) {
                let add = s.count_on(c, n);
                *counts[i].get_mut(v).expect("domain") += add;
            }
        }
    }
    let raw: Vec<i64> = feasible
        .iter()
        .zip(&ignored)
        .map(|(n, ignored)| {
            if *ignored {
                return 0;
            }
            let mut score = 0.0;
            for (i, s) in constraints.iter().enumerate() {
                let Some(v) = n.labels.get(&s.topology_key) else {
                    continue;
                };
                let cnt = if s.topology_key == HOSTNAME {
                    s.count_on(c, n)
                } else {
                    counts[i].get(v).copied().unwrap_or(0)
                };
                score += cnt as f64 * weights[i] + (s.max_skew - 1) as f64;
            }
            score.round() as i64
        })
        .collect();
    let scored_raw = || {
        raw.iter()
            .zip(&ignored)
            .filter(|(_, i)| !**i)
            .map(|(s, _)| *s)
    };
    let min = scored_raw().min().unwrap_or(0);
    let max = scored_raw().max().unwrap_or(0);
    raw.iter()
        .zip(&ignored)
        .map(|(s, ignored)| {
            if *ignored {
                0
            } else if max == 0 {
                MAX_NODE_SCORE
            } else {
                MAX_NODE_SCORE * (max + min - s) / max
            }
        })
        .collect()
}

/// InterPodAffinity's scores: the pod's preferred terms against existing pods, and existing
/// pods' required affinity (weight 1) and preferred terms against the pod, summed per topology
/// domain; normalized between the lowest and the highest.
fn inter_pod_scores(
    c: &Candidate,
    feasible: &[&NodeInfo],
    nodes: &HashMap<String, NodeInfo>,
) -> Vec<i64> {
    let has_terms = !c.me.preferred_affinity.is_empty() || !c.me.preferred_anti_affinity.is_empty();
    let none = BTreeMap::new();
    let mut topo: HashMap<String, HashMap<String, i64>> = HashMap::new();
    let mut add = |node: &NodeInfo, key: &str, w: i64| {
        if let Some(v) = node.labels.get(key) {
            *topo
                .entry(key.to_string())
                .or_default()
                .entry(v.clone())
                .or_default() += w;
        }
    };
    for n in nodes.values() {
        if n.labels.is_empty() || (!has_terms && n.with_affinity == 0) {
            continue;
        }
        for p in n.pods.values() {
            if p.key == c.me.key || (!has_terms && !p.has_affinity()) {
                continue;
            }
            for t in &c.me.preferred_affinity {
                if t.matches(&p.namespace, &p.labels, &none) {
                    add(n, &t.topology_key, t.weight);
                }
            }
            for t in &c.me.preferred_anti_affinity {
                if t.matches(&p.namespace, &p.labels, &none) {
                    add(n, &t.topology_key, -t.weight);
                }
            }
            let mine = |t: &Term| t.matches(&c.me.namespace, &c.me.labels, &c.ns_labels);
            for t in &p.affinity {
                if mine(t) {
                    add(n, &t.topology_key, 1);
                }
            }
            for t in &p.preferred_affinity {
                if mine(t) {
                    add(n, &t.topology_key, t.weight);
                }
            }
            for t in &p.preferred_anti_affinity {
                if mine(t) {
                    add(n, &t.topology_key, -t.weight);
                }
            }
        }
    }
    if topo.is_empty() {
        return vec![0; feasible.len()];
    }
    let raw: Vec<i64> = feasible
        .iter()
        .map(|n| {
            topo.iter()
                .filter_map(|(k, vals)| n.labels.get(k).and_then(|v| vals.get(v)))
                .sum()
        })
        .collect();
    let min = raw.iter().copied().min().unwrap_or(0);
    let max = raw.iter().copied().max().unwrap_or(0);
    raw.iter()
        .map(|s| {
            if max > min {
                (MAX_NODE_SCORE as f64 * ((s - min) as f64 / (max - min) as f64)) as i64
            } else {
                0
            }
        })
        .collect()
}

/// Scores the feasible nodes (in their order).
pub fn score(
    c: &Candidate,
    feasible: &[&NodeInfo],
    nodes: &HashMap<String, NodeInfo>,
) -> Vec<Scores> {
    // TaintToleration: untolerated PreferNoSchedule taints, fewer is better.
    let taints: Vec<i64> = feasible
        .iter()
        .map(|n| {
            n.taints
                .iter()
                .filter(|t| t.effect == "PreferNoSchedule" && !tolerates(&c.tolerations, t))
                .count() as i64
        })
        .collect();
    let taints = normalize(&taints, true);
    // NodeAffinity: weights of the matching preferred terms.
    let affinity: Vec<i64> = feasible
        .iter()
        .map(|n| {
            c.preferred_affinity
                .iter()
                .filter(|(w, t)| *w != 0 && node_term_matches(t, n))
                .map(|(w, _)| *w)
                .sum()
        })
        .collect();
    let affinity = normalize(&affinity, false);
    let spread = spread_scores(c, feasible, nodes);
    let inter_pod = inter_pod_scores(c, feasible, nodes);
    feasible
        .iter()
        .enumerate()
        .map(|(i, n)| Scores {
            taint_toleration: taints[i],
            node_affinity: affinity[i],
            least_allocated: least_allocated(c, n),
            balanced_allocation: balanced_allocation(c, n),
            topology_spread: spread[i],
            inter_pod_affinity: inter_pod[i],
        })
        .collect()
}

/// Upstream's message for a pod no node fits.
pub fn unschedulable_message(
    total: usize,
    reasons: &BTreeMap<String, usize>,
    preemption: &str,
) -> String {
    // Sorted as strings, count first, as upstream's FitError does.
    let mut parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    parts.sort();
    format!(
        "0/{total} nodes are available: {}. {preemption}",
        parts.join(", ")
    )
}

/// Upstream's message when a PreFilter rejects the pod (every node gets that status, and the
/// message names it once).
pub fn pre_filter_message(total: usize, reason: &str, preemption: &str) -> String {
    format!("0/{total} nodes are available: {reason}. {preemption}")
}

/// The preemption part of the message when no node can be freed: nodes whose failure is
/// unresolvable cannot be helped; the others had no lower-priority pods whose eviction helps.
pub fn preemption_message(total: usize, unhelpful: usize, no_victims: usize) -> String {
    let mut parts = Vec::new();
    if unhelpful > 0 {
        parts.push(format!(
            "{unhelpful} Preemption is not helpful for scheduling"
        ));
    }
    if no_victims > 0 {
        parts.push(format!(
            "{no_victims} No preemption victims found for incoming pod"
        ));
    }
    parts.sort();
    format!(
        "preemption: 0/{total} nodes are available: {}.",
        parts.join(", ")
    )
}

/// Upstream's SelectVictimsOnNode (without PodDisruptionBudgets): remove every lower-priority
/// pod; if the pod then fits, give back as many as possible, most important first. The keys of
/// the pods to evict, lowest priority first, or `None` when evicting does not make it fit.
pub fn victims(c: &Candidate, s: &State, node: &NodeInfo) -> Option<Vec<String>> {
    let mut lower: Vec<Arc<PlacedPod>> = node
        .pods
        .values()
        .filter(|p| p.priority < c.me.priority)
        .cloned()
        .collect();
    if lower.is_empty() {
        return None;
    }
    let mut n = node.clone();
    let mut st = s.clone();
    for p in &lower {
        n.remove_pod(&p.key);
        st.add_pod(c, p, node, -1);
    }
    if filter(c, &st, &n).is_err() {
        return None;
    }
    lower.sort_by_key(|p| std::cmp::Reverse(p.priority));
    let mut out = Vec::new();
    for p in lower {
        n.add(p.clone());
        st.add_pod(c, &p, node, 1);
        if filter(c, &st, &n).is_err() {
            n.remove_pod(&p.key);
            st.add_pod(c, &p, node, -1);
            out.push(p);
        }
    }
    out.sort_by_key(|p| p.priority);
    (!out.is_empty()).then(|| out.iter().map(|p| p.key.clone()).collect())
}

#[cfg(test)]
mod tests {
    //! Table-driven tests of every filter and score. A filter case lists, per node, what
    //! `filter` says: `""` fits, `"U:…"` is an UnschedulableAndUnresolvable rejection, anything
    //! else an Unschedulable one (preemption may help); reasons joined by ", ".

    use super::*;
    use crate::api::patch::merge_patch;
    use crate::controllers::scheduler::volumes::{self, MapLister};
    use serde_json::json;

    fn merged(base: Value, patch: Value) -> Value {
        merge_patch(&base, &patch).expect("merge patch")
    }

    /// A node with 4 cpu, 8Gi, 100Gi of ephemeral storage and 110 pods, labelled with its
    /// hostname and `labels`; `extra` is merged in.
    fn node(name: &str, labels: Value, extra: Value) -> Value {
        let base = json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "ephemeral-storage": "100Gi", "pods": "110"}},
        });
        merged(merged(base, json!({"metadata": {"labels": labels}})), extra)
    }

    /// A pod in namespace `d` with one container; `spec` is merged in.
    fn pod(name: &str, labels: Value, spec: Value) -> Value {
        let base = json!({
            "metadata": {"name": name, "namespace": "d", "uid": format!("uid-{name}"), "labels": labels},
            "spec": {"containers": [{"name": "c"}]},
        });
        merged(base, json!({ "spec": spec }))
    }

    fn cpu_mem(cpu: &str, mem: &str) -> Value {
        json!({"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu, "memory": mem}}}]})
    }

    /// Nodes with pods placed on them (`(node, pod)`).
    fn cluster(nodes: &[Value], pods: &[(&str, Value)]) -> HashMap<String, NodeInfo> {
        let mut m: HashMap<String, NodeInfo> = nodes
            .iter()
            .map(|n| (name_of(n).to_string(), NodeInfo::from_node(n)))
            .collect();
        for (n, p) in pods {
            m.get_mut(*n).expect("node").add_pod(placed(p));
        }
        m
    }

    fn verdict(r: &Result<(), Rejection>) -> String {
        match r {
            Ok(()) => String::new(),
            Err(r) if r.unresolvable => format!("U:{}", r.reasons.join(", ")),
            Err(r) => r.reasons.join(", "),
        }
    }

    /// PreFilter, then every node's filter verdict, by node name.
    fn filter_all(c: &Candidate, nodes: &HashMap<String, NodeInfo>) -> BTreeMap<String, String> {
        let s = pre_filter(c, nodes);
        nodes
            .iter()
            .map(|(k, n)| (k.clone(), verdict(&filter(c, &s, n))))
            .collect()
    }

    struct FilterCase {
        name: &'static str,
        pod: Value,
        nodes: Vec<Value>,
        pods: Vec<(&'static str, Value)>,
        want: Vec<(&'static str, &'static str)>,
    }

    fn run_filter_cases(cases: Vec<FilterCase>) {
        for case in cases {
            let nodes = cluster(&case.nodes, &case.pods);
            let c = Candidate::new(Arc::new(case.pod));
            let got = filter_all(&c, &nodes);
            let want: BTreeMap<String, String> = case
                .want
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect();
            assert_eq!(got, want, "case {:?}", case.name);
        }
    }

    fn plain(name: &str) -> Value {
        node(name, json!({}), json!({}))
    }

    #[test]
    fn node_unschedulable_node_name_and_taints() {
        let cordoned = node(
            "cordoned",
            json!({}),
            json!({"spec": {"unschedulable": true}}),
        );
        let tainted = |name: &str, key: &str, value: &str, effect: &str| {
            node(
                name,
                json!({}),
                json!({"spec": {"taints": [{"key": key, "value": value, "effect": effect}]}}),
            )
        };
        run_filter_cases(vec![
            FilterCase {
                name: "a cordoned node takes no pod",
                pod: pod("p", json!({}), json!({})),
                nodes: vec![cordoned.clone(), plain("ok")],
                pods: vec![],
                want: vec![("cordoned", "U:node(s) were unschedulable"), ("ok", "")],
            },
            FilterCase {
                name: "unless the pod tolerates node.kubernetes.io/unschedulable",
                pod: pod(
                    "p",
                    json!({}),
                    json!({"tolerations": [{"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}]}),
                ),
                nodes: vec![cordoned.clone(), plain("ok")],
                pods: vec![],
                want: vec![("cordoned", ""), ("ok", "")],
            },
            FilterCase {
                name: "a toleration of another key does not help",
                pod: pod(
                    "p",
                    json!({}),
                    json!({"tolerations": [{"key": "other", "operator": "Exists"}]}),
                ),
                nodes: vec![cordoned],
                pods: vec![],
                want: vec![("cordoned", "U:node(s) were unschedulable")],
            },
            FilterCase {
                name: "NodeName: only the named node",
                pod: pod("p", json!({}), json!({"nodeName": "n2"})),
                nodes: vec![plain("n1"), plain("n2")],
                pods: vec![],
                want: vec![
                    ("n1", "U:node(s) didn't match the requested node name"),
                    ("n2", ""),
                ],
            },
            FilterCase {
                name: "NoSchedule and NoExecute taints repel, PreferNoSchedule does not",
                pod: pod("p", json!({}), json!({})),
                nodes: vec![
                    tainted("ns", "dedicated", "gpu", "NoSchedule"),
                    tainted("ne", "dedicated", "", "NoExecute"),
                    tainted("pns", "dedicated", "gpu", "PreferNoSchedule"),
                ],
                pods: vec![],
                want: vec![
                    ("ns", "U:node(s) had untolerated taint {dedicated: gpu}"),
                    ("ne", "U:node(s) had untolerated taint {dedicated: }"),
                    ("pns", ""),
                ],
            },
            FilterCase {
                name: "tolerations: Equal needs the value, Exists any, the effect must match",
                pod: pod(
                    "p",
                    json!({}),
                    json!({"tolerations": [
                        {"key": "a", "operator": "Equal", "value": "1", "effect": "NoSchedule"},
                        {"key": "b", "operator": "Exists"},
                        {"key": "c", "operator": "Exists", "effect": "NoExecute"},
                    ]}),
                ),
                nodes: vec![
                    tainted("a1", "a", "1", "NoSchedule"),
                    tainted("a2", "a", "2", "NoSchedule"),
                    tainted("b", "b", "x", "NoExecute"),
                    tainted("c", "c", "", "NoSchedule"),
                ],
                pods: vec![],
                want: vec![
                    ("a1", ""),
                    ("a2", "U:node(s) had untolerated taint {a: 2}"),
                    ("b", ""),
                    ("c", "U:node(s) had untolerated taint {c: }"),
                ],
            },
            FilterCase {
                name: "an empty key with Exists tolerates everything",
                pod: pod(
                    "p",
                    json!({}),
                    json!({"tolerations": [{"operator": "Exists"}]}),
                ),
                nodes: vec![
                    tainted("t", "x", "y", "NoExecute"),
                    node(
                        "cordoned",
                        json!({}),
                        json!({"spec": {"unschedulable": true}}),
                    ),
                ],
                pods: vec![],
                want: vec![("t", ""), ("cordoned", "")],
            },
        ]);
    }

    #[test]
    fn node_resources_fit() {
        let full = |name: &str| {
            node(
                name,
                json!({}),
                json!({"status": {"allocatable": {"pods": "1"}}}),
            )
        };
        run_filter_cases(vec![
            FilterCase {
                name: "cpu",
                pod: pod("p", json!({}), cpu_mem("3", "0")),
                nodes: vec![plain("busy"), plain("free")],
                pods: vec![("busy", pod("x", json!({}), cpu_mem("2", "0")))],
                want: vec![("busy", "Insufficient cpu"), ("free", "")],
            },
            FilterCase {
                name: "memory",
                pod: pod("p", json!({}), cpu_mem("0", "6Gi")),
                nodes: vec![plain("busy"), plain("free")],
                pods: vec![("busy", pod("x", json!({}), cpu_mem("0", "4Gi")))],
                want: vec![("busy", "Insufficient memory"), ("free", "")],
            },
            FilterCase {
                name: "ephemeral-storage",
                pod: pod(
                    "p",
                    json!({}),
                    json!({"containers": [{"name": "c", "resources": {"requests": {"ephemeral-storage": "60Gi"}}}]}),
                ),
                nodes: vec![plain("busy"), plain("free")],
                pods: vec![(
                    "busy",
                    pod(
                        "x",
                        json!({}),
                        json!({"containers": [{"name": "c", "resources": {"limits": {"ephemeral-storage": "50Gi"}}}]}),
                    ),
                )],
                want: vec![("busy", "Insufficient ephemeral-storage"), ("free", "")],
            },
            FilterCase {
                name: "pods count, also for a pod that requests nothing",
                pod: pod("p", json!({}), json!({})),
                nodes: vec![full("full"), plain("free")],
                pods: vec![("full", pod("x", json!({}), json!({})))],
                want: vec![("full", "Too many pods"), ("free", "")],
            },
            FilterCase {
                name: "every missing resource is a reason",
                pod: pod("p", json!({}), cpu_mem("3", "6Gi")),
                nodes: vec![full("full")],
                pods: vec![("full", pod("x", json!({}), cpu_mem("2", "4Gi")))],
                want: vec![(
                    "full",
                    "Too many pods, Insufficient cpu, Insufficient memory",
                )],
            },
            FilterCase {
                name: "the exact remainder fits",
                pod: pod("p", json!({}), cpu_mem("2", "4Gi")),
                nodes: vec![plain("half")],
                pods: vec![("half", pod("x", json!({}), cpu_mem("2", "4Gi")))],
                want: vec![("half", "")],
            },
            FilterCase {
                // max(max(init) = 3, sum(containers) = 2) + overhead 500m = 3.5 cpu.
                name: "init containers count as max(max(init), sum(containers)) plus overhead",
                pod: pod(
                    "p",
                    json!({}),
                    json!({
                        "initContainers": [{"name": "i1", "resources": {"requests": {"cpu": "3"}}}, {"name": "i2", "resources": {"requests": {"cpu": "1"}}}],
                        "containers": [{"name": "a", "resources": {"requests": {"cpu": "1"}}}, {"name": "b", "resources": {"requests": {"cpu": "1"}}}],
                        "overhead": {"cpu": "500m"},
                    }),
                ),
                nodes: vec![plain("has3"), plain("has3.5"), plain("has4")],
                pods: vec![
                    ("has3", pod("x", json!({}), cpu_mem("1", "0"))),
                    ("has3.5", pod("y", json!({}), cpu_mem("500m", "0"))),
                ],
                want: vec![("has3", "Insufficient cpu"), ("has3.5", ""), ("has4", "")],
            },
            FilterCase {
                // Sidecar 1 + containers 2 = 3 > the init container's 2 + sidecar 1 started before it.
                name: "sidecars run alongside the containers",
                pod: pod(
                    "p",
                    json!({}),
                    json!({
                        "initContainers": [
                            {"name": "side", "restartPolicy": "Always", "resources": {"requests": {"cpu": "1"}}},
                            {"name": "init", "resources": {"requests": {"cpu": "2"}}},
                        ],
                        "containers": [{"name": "a", "resources": {"requests": {"cpu": "2"}}}],
                    }),
                ),
                nodes: vec![plain("has2.5"), plain("has3")],
                pods: vec![
                    ("has2.5", pod("x", json!({}), cpu_mem("1500m", "0"))),
                    ("has3", pod("y", json!({}), cpu_mem("1", "0"))),
                ],
                want: vec![("has2.5", "Insufficient cpu"), ("has3", "")],
            },
        ]);
    }

    #[test]
    fn node_selector_and_required_node_affinity() {
        let nodes = || {
            vec![
                node(
                    "a",
                    json!({"zone": "a", "disk": "ssd", "gen": "3"}),
                    json!({}),
                ),
                node("b", json!({"zone": "b", "gen": "5"}), json!({})),
                node("c", json!({"zone": "c"}), json!({})),
            ]
        };
        let affinity = |terms: Value| {
            pod(
                "p",
                json!({}),
                json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}}),
            )
        };
        let expr = |key: &str, op: &str, values: Value| {
            affinity(
                json!([{"matchExpressions": [{"key": key, "operator": op, "values": values}]}]),
            )
        };
        const NO: &str = "U:node(s) didn't match Pod's node affinity/selector";
        let case = |name, pod, want| FilterCase {
            name,
            pod,
            nodes: nodes(),
            pods: vec![],
            want,
        };
        run_filter_cases(vec![
            case(
                "nodeSelector",
                pod("p", json!({}), json!({"nodeSelector": {"disk": "ssd"}})),
                vec![("a", ""), ("b", NO), ("c", NO)],
            ),
            case(
                "In",
                expr("zone", "In", json!(["a", "b"])),
                vec![("a", ""), ("b", ""), ("c", NO)],
            ),
            case(
                "NotIn (a missing label is not in)",
                expr("disk", "NotIn", json!(["ssd"])),
                vec![("a", NO), ("b", ""), ("c", "")],
            ),
            case(
                "Exists",
                expr("gen", "Exists", json!([])),
                vec![("a", ""), ("b", ""), ("c", NO)],
            ),
            case(
                "DoesNotExist",
                expr("gen", "DoesNotExist", json!([])),
                vec![("a", NO), ("b", NO), ("c", "")],
            ),
            case(
                "Gt",
                expr("gen", "Gt", json!(["4"])),
                vec![("a", NO), ("b", ""), ("c", NO)],
            ),
            case(
                "Lt",
                expr("gen", "Lt", json!(["4"])),
                vec![("a", ""), ("b", NO), ("c", NO)],
            ),
            case(
                "matchFields metadata.name In",
                affinity(
                    json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["c"]}]}]),
                ),
                vec![("a", NO), ("b", NO), ("c", "")],
            ),
            case(
                "matchFields metadata.name NotIn",
                affinity(
                    json!([{"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["c"]}]}]),
                ),
                vec![("a", ""), ("b", ""), ("c", NO)],
            ),
            case(
                "terms are ORed, requirements in a term ANDed",
                affinity(json!([
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}, {"key": "gen", "operator": "In", "values": ["5"]}]},
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["c"]}]},
                ])),
                vec![("a", NO), ("b", NO), ("c", "")],
            ),
            case(
                "an empty term matches no node",
                affinity(json!([{}])),
                vec![("a", NO), ("b", NO), ("c", NO)],
            ),
            case(
                "nodeSelector and affinity must both hold",
                merged(
                    expr("zone", "In", json!(["a", "b"])),
                    json!({"spec": {"nodeSelector": {"gen": "5"}}}),
                ),
                vec![("a", NO), ("b", ""), ("c", NO)],
            ),
        ]);
    }

    #[test]
    fn filters_run_in_upstream_order() {
        // A node failing several filters reports the first: TaintToleration before NodeAffinity,
        // NodeAffinity before NodeResourcesFit.
        let bad = node(
            "bad",
            json!({"zone": "b"}),
            json!({"spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]}, "status": {"allocatable": {"cpu": "1"}}}),
        );
        let mut p = pod("p", json!({}), cpu_mem("2", "0"));
        p["spec"]["nodeSelector"] = json!({"zone": "a"});
        run_filter_cases(vec![FilterCase {
            name: "taint first",
            pod: p.clone(),
            nodes: vec![bad.clone()],
            pods: vec![],
            want: vec![("bad", "U:node(s) had untolerated taint {k: }")],
        }]);
        p["spec"]["tolerations"] = json!([{"operator": "Exists"}]);
        run_filter_cases(vec![FilterCase {
            name: "then affinity",
            pod: p,
            nodes: vec![bad],
            pods: vec![],
            want: vec![("bad", "U:node(s) didn't match Pod's node affinity/selector")],
        }]);
    }

    #[test]
    fn node_ports() {
        let port = |port: i64, proto: &str, ip: &str| json!({"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": port, "protocol": proto, "hostIP": ip}]}]});
        const NO: &str = "node(s) didn't have free ports for the requested pod ports";
        run_filter_cases(vec![
            FilterCase {
                name: "same port and protocol on any address clash",
                pod: pod("p", json!({}), port(8080, "TCP", "")),
                nodes: vec![plain("used"), plain("free")],
                pods: vec![("used", pod("x", json!({}), port(8080, "TCP", "")))],
                want: vec![("used", NO), ("free", "")],
            },
            FilterCase {
                name: "another protocol does not clash",
                pod: pod("p", json!({}), port(8080, "UDP", "")),
                nodes: vec![plain("used")],
                pods: vec![("used", pod("x", json!({}), port(8080, "TCP", "")))],
                want: vec![("used", "")],
            },
            FilterCase {
                name: "two specific addresses do not clash, a specific one and 0.0.0.0 do",
                pod: pod("p", json!({}), port(8080, "TCP", "10.0.0.2")),
                nodes: vec![plain("other-ip"), plain("any-ip")],
                pods: vec![
                    (
                        "other-ip",
                        pod("x", json!({}), port(8080, "TCP", "10.0.0.1")),
                    ),
                    ("any-ip", pod("y", json!({}), port(8080, "TCP", "0.0.0.0"))),
                ],
                want: vec![("other-ip", ""), ("any-ip", NO)],
            },
            FilterCase {
                name: "an init container's port is free again, a sidecar's is not",
                pod: pod("p", json!({}), port(9000, "TCP", "")),
                nodes: vec![plain("init"), plain("sidecar")],
                pods: vec![
                    (
                        "init",
                        pod(
                            "x",
                            json!({}),
                            json!({"initContainers": [{"name": "i", "ports": [{"containerPort": 1, "hostPort": 9000}]}]}),
                        ),
                    ),
                    (
                        "sidecar",
                        pod(
                            "y",
                            json!({}),
                            json!({"initContainers": [{"name": "s", "restartPolicy": "Always", "ports": [{"containerPort": 1, "hostPort": 9000}]}]}),
                        ),
                    ),
                ],
                want: vec![("init", ""), ("sidecar", NO)],
            },
        ]);
    }

    #[test]
    fn inter_pod_affinity() {
        let zones = || {
            vec![
                node("a1", json!({"zone": "a"}), json!({})),
                node("a2", json!({"zone": "a"}), json!({})),
                node("b1", json!({"zone": "b"}), json!({})),
                node("nozone", json!({}), json!({})),
            ]
        };
        let required = |kind: &str, selector: Value, key: &str| json!({"affinity": {kind: {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": selector}, "topologyKey": key}]}}});
        const AFF: &str = "U:node(s) didn't match pod affinity rules";
        const ANTI: &str = "node(s) didn't match pod anti-affinity rules";
        const EXISTING: &str = "node(s) didn't satisfy existing pods anti-affinity rules";
        run_filter_cases(vec![
            FilterCase {
                name: "affinity: the domain of a matching pod",
                pod: pod("p", json!({"app": "web"}), required("podAffinity", json!({"app": "db"}), "zone")),
                nodes: zones(),
                pods: vec![("a1", pod("db", json!({"app": "db"}), json!({})))],
                want: vec![("a1", ""), ("a2", ""), ("b1", AFF), ("nozone", AFF)],
            },
            FilterCase {
                name: "affinity: pods of another namespace do not count",
                pod: pod("p", json!({"app": "web"}), required("podAffinity", json!({"app": "db"}), "zone")),
                nodes: zones(),
                pods: vec![(
                    "a1",
                    merged(pod("db", json!({"app": "db"}), json!({})), json!({"metadata": {"namespace": "other"}})),
                )],
                want: vec![("a1", AFF), ("a2", AFF), ("b1", AFF), ("nozone", AFF)],
            },
            FilterCase {
                name: "affinity: the first pod of a group matching its own term goes anywhere with the key",
                pod: pod("p", json!({"app": "db"}), required("podAffinity", json!({"app": "db"}), "zone")),
                nodes: zones(),
                pods: vec![],
                want: vec![("a1", ""), ("a2", ""), ("b1", ""), ("nozone", AFF)],
            },
            FilterCase {
                name: "affinity: no match anywhere and not matching itself",
                pod: pod("p", json!({"app": "web"}), required("podAffinity", json!({"app": "db"}), "zone")),
                nodes: zones(),
                pods: vec![],
                want: vec![("a1", AFF), ("a2", AFF), ("b1", AFF), ("nozone", AFF)],
            },
            FilterCase {
                name: "anti-affinity: not in the domain of a matching pod; a node without the key is fine",
                pod: pod("p", json!({"app": "web"}), required("podAntiAffinity", json!({"app": "web"}), "zone")),
                nodes: zones(),
                pods: vec![("a1", pod("w1", json!({"app": "web"}), json!({})))],
                want: vec![("a1", ANTI), ("a2", ANTI), ("b1", ""), ("nozone", "")],
            },
            FilterCase {
                name: "anti-affinity per hostname",
                pod: pod(
                    "p",
                    json!({"app": "web"}),
                    required("podAntiAffinity", json!({"app": "web"}), "kubernetes.io/hostname"),
                ),
                nodes: zones(),
                pods: vec![("a1", pod("w1", json!({"app": "web"}), json!({})))],
                want: vec![("a1", ANTI), ("a2", ""), ("b1", ""), ("nozone", "")],
            },
            FilterCase {
                name: "existing pods' anti-affinity against the incoming pod",
                pod: pod("p", json!({"app": "web"}), json!({})),
                nodes: zones(),
                pods: vec![(
                    "a1",
                    pod("loner", json!({"app": "loner"}), required("podAntiAffinity", json!({"app": "web"}), "zone")),
                )],
                want: vec![("a1", EXISTING), ("a2", EXISTING), ("b1", ""), ("nozone", "")],
            },
            FilterCase {
                name: "existing pods' anti-affinity only against pods it selects",
                pod: pod("p", json!({"app": "api"}), json!({})),
                nodes: zones(),
                pods: vec![(
                    "a1",
                    pod("loner", json!({"app": "loner"}), required("podAntiAffinity", json!({"app": "web"}), "zone")),
                )],
                want: vec![("a1", ""), ("a2", ""), ("b1", ""), ("nozone", "")],
            },
            FilterCase {
                name: "an empty namespaceSelector selects pods of every namespace",
                pod: pod(
                    "p",
                    json!({"app": "web"}),
                    json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"app": "web"}}, "namespaceSelector": {}, "topologyKey": "zone"}]}}}),
                ),
                nodes: zones(),
                pods: vec![(
                    "b1",
                    merged(pod("w", json!({"app": "web"}), json!({})), json!({"metadata": {"namespace": "other"}})),
                )],
                want: vec![("a1", ""), ("a2", ""), ("b1", ANTI), ("nozone", "")],
            },
        ]);
    }

    #[test]
    fn namespace_selectors_resolve_against_namespace_labels() {
        let nodes = cluster(
            &[
                node("n1", json!({}), json!({})),
                node("n2", json!({}), json!({})),
            ],
            &[(
                "n1",
                merged(
                    pod("w", json!({"app": "web"}), json!({})),
                    json!({"metadata": {"namespace": "prod"}}),
                ),
            )],
        );
        let mut c = Candidate::new(Arc::new(pod(
            "p",
            json!({"app": "web"}),
            json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"app": "web"}}, "namespaceSelector": {"matchLabels": {"env": "prod"}}, "topologyKey": "kubernetes.io/hostname"}]}}}),
        )));
        assert!(c.has_namespace_selectors());
        let ns = |name: &str, env: &str| {
            Arc::new(json!({"metadata": {"name": name, "labels": {"env": env}}}))
        };
        c.resolve_namespaces(&[ns("d", "dev"), ns("prod", "prod")]);
        let got = filter_all(&c, &nodes);
        assert_eq!(got["n1"], "node(s) didn't match pod anti-affinity rules");
        assert_eq!(got["n2"], "");
        assert_eq!(c.ns_labels.get("env").map(String::as_str), Some("dev"));
    }

    #[test]
    fn pod_topology_spread_do_not_schedule() {
        let zones = || {
            vec![
                node("a", json!({"zone": "a"}), json!({})),
                node("b", json!({"zone": "b"}), json!({})),
                node("c", json!({"zone": "c"}), json!({})),
                node("nozone", json!({}), json!({})),
            ]
        };
        let spread = |extra: Value| {
            let c = merged(
                json!({"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "a"}}}),
                extra,
            );
            pod(
                "p",
                json!({"app": "a"}),
                json!({"topologySpreadConstraints": [c]}),
            )
        };
        let app = |name: &str| pod(name, json!({"app": "a"}), json!({}));
        const SKEW: &str = "node(s) didn't match pod topology spread constraints";
        const LABEL: &str =
            "U:node(s) didn't match pod topology spread constraints (missing required label)";
        run_filter_cases(vec![
            FilterCase {
                name: "counts 2/1/0: only the emptiest zone keeps the skew within 1",
                pod: spread(json!({})),
                nodes: zones(),
                pods: vec![("a", app("x1")), ("a", app("x2")), ("b", app("x3"))],
                want: vec![("a", SKEW), ("b", SKEW), ("c", ""), ("nozone", LABEL)],
            },
            FilterCase {
                name: "maxSkew 2 allows the middle one",
                pod: spread(json!({"maxSkew": 2})),
                nodes: zones(),
                pods: vec![("a", app("x1")), ("a", app("x2")), ("b", app("x3"))],
                want: vec![("a", SKEW), ("b", ""), ("c", ""), ("nozone", LABEL)],
            },
            FilterCase {
                name: "terminating pods and pods of other namespaces do not count",
                pod: spread(json!({})),
                nodes: zones(),
                pods: vec![
                    (
                        "a",
                        merged(
                            app("x1"),
                            json!({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}}),
                        ),
                    ),
                    (
                        "a",
                        merged(app("x2"), json!({"metadata": {"namespace": "other"}})),
                    ),
                ],
                want: vec![("a", ""), ("b", ""), ("c", ""), ("nozone", LABEL)],
            },
            FilterCase {
                name: "minDomains above the domains there are makes the global minimum 0",
                pod: spread(json!({"minDomains": 4})),
                nodes: zones(),
                pods: vec![("a", app("x1")), ("b", app("x2")), ("c", app("x3"))],
                want: vec![("a", SKEW), ("b", SKEW), ("c", SKEW), ("nozone", LABEL)],
            },
            FilterCase {
                name: "nodes the pod's node affinity excludes are not domains (Honor)",
                pod: merged(
                    spread(json!({})),
                    json!({"spec": {"nodeSelector": {"zone": "a"}}}),
                ),
                nodes: zones(),
                pods: vec![("a", app("x1"))],
                // Only zone a counts, so its minimum is its own count: the skew is 1.
                want: vec![
                    ("a", ""),
                    ("b", "U:node(s) didn't match Pod's node affinity/selector"),
                    ("c", "U:node(s) didn't match Pod's node affinity/selector"),
                    (
                        "nozone",
                        "U:node(s) didn't match Pod's node affinity/selector",
                    ),
                ],
            },
            FilterCase {
                name: "nodeAffinityPolicy Ignore counts every node",
                pod: merged(
                    spread(json!({"nodeAffinityPolicy": "Ignore"})),
                    json!({"spec": {"nodeSelector": {"zone": "a"}}}),
                ),
                nodes: zones(),
                pods: vec![("a", app("x1"))],
                want: vec![
                    ("a", SKEW),
                    ("b", "U:node(s) didn't match Pod's node affinity/selector"),
                    ("c", "U:node(s) didn't match Pod's node affinity/selector"),
                    (
                        "nozone",
                        "U:node(s) didn't match Pod's node affinity/selector",
                    ),
                ],
            },
            FilterCase {
                name: "matchLabelKeys narrow the selector to the pod's own values",
                pod: merged(
                    spread(json!({"matchLabelKeys": ["rev"]})),
                    json!({"metadata": {"labels": {"rev": "2"}}}),
                ),
                nodes: zones(),
                pods: vec![
                    (
                        "a",
                        merged(app("x1"), json!({"metadata": {"labels": {"rev": "1"}}})),
                    ),
                    (
                        "a",
                        merged(app("x2"), json!({"metadata": {"labels": {"rev": "1"}}})),
                    ),
                    (
                        "b",
                        merged(app("x3"), json!({"metadata": {"labels": {"rev": "2"}}})),
                    ),
                ],
                want: vec![("a", ""), ("b", SKEW), ("c", ""), ("nozone", LABEL)],
            },
        ]);
    }

    fn storage_objects() -> Vec<Value> {
        vec![
            json!({"kind": "StorageClass", "metadata": {"name": "local-path"}, "provisioner": "k3rs.io/local-path", "volumeBindingMode": "WaitForFirstConsumer"}),
            json!({"kind": "StorageClass", "metadata": {"name": "fast"}, "provisioner": "example.com/fast", "volumeBindingMode": "Immediate"}),
            json!({"kind": "StorageClass", "metadata": {"name": "static"}, "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "WaitForFirstConsumer"}),
            json!({"kind": "StorageClass", "metadata": {"name": "zonal"}, "provisioner": "example.com/zonal", "volumeBindingMode": "WaitForFirstConsumer",
                "allowedTopologies": [{"matchLabelExpressions": [{"key": "zone", "values": ["a"]}]}]}),
            json!({"kind": "PersistentVolume", "metadata": {"name": "pv-a"}, "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}}),
            json!({"kind": "PersistentVolume", "metadata": {"name": "local-b1"}, "spec": {"storageClassName": "static", "capacity": {"storage": "5Gi"}, "accessModes": ["ReadWriteOnce"],
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["b1"]}]}]}}},
                "status": {"phase": "Available"}}),
        ]
    }

    fn claim(name: &str, spec: Value) -> Value {
        merged(
            json!({"kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": "d", "uid": format!("uid-{name}")},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}),
            json!({ "spec": spec }),
        )
    }

    fn with_claims(names: &[&str]) -> Value {
        let vols: Vec<Value> = names
            .iter()
            .map(|n| json!({"name": n, "persistentVolumeClaim": {"claimName": n}}))
            .collect();
        pod("p", json!({}), json!({ "volumes": vols }))
    }

    /// Volume PreFilter, then the filters: the PreFilter's rejection, or the nodes' verdicts.
    fn volume_verdicts(pod: Value, extra: Vec<Value>) -> Result<BTreeMap<String, String>, String> {
        let mut objects = storage_objects();
        objects.extend(extra);
        let lister = MapLister::with(objects);
        let nodes = cluster(
            &[
                node("a1", json!({"zone": "a"}), json!({})),
                node("b1", json!({"zone": "b"}), json!({})),
            ],
            &[],
        );
        let mut c = Candidate::new(Arc::new(pod));
        c.volumes = volumes::pre_filter(&c.pod, &lister)?;
        Ok(filter_all(&c, &nodes))
    }

    fn both(a1: &str, b1: &str) -> Result<BTreeMap<String, String>, String> {
        Ok(BTreeMap::from([
            ("a1".to_string(), a1.to_string()),
            ("b1".to_string(), b1.to_string()),
        ]))
    }

    #[test]
    fn volume_binding() {
        let data = || with_claims(&["data"]);
        let ephemeral = || {
            pod(
                "p",
                json!({}),
                json!({"volumes": [{"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}]}),
            )
        };
        type Verdicts = Result<BTreeMap<String, String>, String>;
        let table: Vec<(&str, Value, Vec<Value>, Verdicts)> = vec![
            ("a pod without claims goes anywhere", json!(null), vec![], both("", "")),
            (
                "a missing claim: no node, and preemption cannot help",
                data(),
                vec![],
                Err("persistentvolumeclaim \"data\" not found".into()),
            ),
            (
                "a claim being deleted",
                data(),
                vec![merged(claim("data", json!({"volumeName": "pv-a"})), json!({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}}))],
                Err("persistentvolumeclaim \"data\" is being deleted".into()),
            ),
            (
                "a lost claim",
                data(),
                vec![merged(claim("data", json!({"volumeName": "gone"})), json!({"status": {"phase": "Lost"}}))],
                Err("persistentvolumeclaim \"data\" bound to non-existent persistentvolume \"gone\"".into()),
            ),
            (
                "a bound claim goes where its volume's node affinity allows",
                data(),
                vec![claim("data", json!({"volumeName": "pv-a"}))],
                both("", "U:node(s) had volume node affinity conflict"),
            ),
            (
                "a claim bound to a volume that does not exist",
                data(),
                vec![claim("data", json!({"volumeName": "gone"}))],
                both(
                    "U:node(s) unavailable due to one or more pvc(s) bound to non-existent pv(s)",
                    "U:node(s) unavailable due to one or more pvc(s) bound to non-existent pv(s)",
                ),
            ),
            (
                "an unbound claim of a WaitForFirstConsumer class goes anywhere",
                data(),
                vec![claim("data", json!({"storageClassName": "local-path"}))],
                both("", ""),
            ),
            (
                "unless it is already being provisioned for another node",
                data(),
                vec![merged(
                    claim("data", json!({"storageClassName": "local-path"})),
                    json!({"metadata": {"annotations": {"volume.kubernetes.io/selected-node": "b1"}}}),
                )],
                both("U:node(s) didn't find available persistent volumes to bind", ""),
            ),
            (
                "a class's allowed topologies limit where it provisions",
                data(),
                vec![claim("data", json!({"storageClassName": "zonal"}))],
                both("", "U:node(s) didn't find available persistent volumes to bind"),
            ),
            (
                "without a provisioner, only where an available volume matches",
                data(),
                vec![claim("data", json!({"storageClassName": "static"}))],
                both("U:node(s) didn't find available persistent volumes to bind", ""),
            ),
            (
                "a volume too small does not match",
                data(),
                vec![claim("data", json!({"storageClassName": "static", "resources": {"requests": {"storage": "8Gi"}}}))],
                both(
                    "U:node(s) didn't find available persistent volumes to bind",
                    "U:node(s) didn't find available persistent volumes to bind",
                ),
            ),
            (
                "an unbound claim of an Immediate class waits for its binding",
                data(),
                vec![claim("data", json!({"storageClassName": "fast"}))],
                Err("pod has unbound immediate PersistentVolumeClaims".into()),
            ),
            (
                "no class (and no default to admit one) binds immediately",
                data(),
                vec![claim("data", json!({}))],
                Err("pod has unbound immediate PersistentVolumeClaims".into()),
            ),
            (
                "a class that does not exist binds immediately",
                data(),
                vec![claim("data", json!({"storageClassName": "nope"}))],
                Err("pod has unbound immediate PersistentVolumeClaims".into()),
            ),
            (
                "a bound claim and a delayed one: both must fit",
                with_claims(&["data", "logs"]),
                vec![
                    claim("data", json!({"volumeName": "pv-a"})),
                    claim("logs", json!({"storageClassName": "static"})),
                ],
                both(
                    "U:node(s) didn't find available persistent volumes to bind",
                    "U:node(s) had volume node affinity conflict",
                ),
            ),
            (
                "a generic ephemeral volume waits for its claim",
                ephemeral(),
                vec![],
                Err("waiting for ephemeral volume controller to create the persistentvolumeclaim \"p-scratch\"".into()),
            ),
            (
                "an ephemeral volume's claim must belong to the pod",
                ephemeral(),
                vec![claim("p-scratch", json!({"storageClassName": "local-path"}))],
                Err("PVC d/p-scratch was not created for pod d/p (pod is not owner)".into()),
            ),
        ];
        for (name, p, extra, want) in table {
            let p = if p.is_null() {
                pod_without_volumes()
            } else {
                p
            };
            assert_eq!(volume_verdicts(p, extra), want, "case {name:?}");
        }
    }

    fn pod_without_volumes() -> Value {
        pod("p", json!({}), json!({}))
    }

    #[test]
    fn volume_binding_plans_what_pre_bind_writes() {
        let lister = MapLister::with({
            let mut o = storage_objects();
            o.push(claim("data", json!({"storageClassName": "local-path"})));
            o.push(claim("logs", json!({"storageClassName": "static"})));
            o
        });
        let p = with_claims(&["data", "logs"]);
        let v = volumes::pre_filter(&p, &lister).expect("claims");
        let b1 = NodeInfo::from_node(&node("b1", json!({"zone": "b"}), json!({})));
        let plan = v.plan(&b1);
        assert_eq!(plan.provisions, vec!["d/data".to_string()]);
        assert_eq!(plan.static_bindings.len(), 1);
        let pv = &plan.static_bindings[0];
        assert_eq!(name_of(pv), "local-b1");
        assert_eq!(
            pv["spec"]["claimRef"],
            json!({"kind": "PersistentVolumeClaim", "namespace": "d", "name": "logs", "uid": "uid-logs", "apiVersion": "v1", "resourceVersion": null})
        );
        assert_eq!(
            pv["metadata"]["annotations"]["pv.kubernetes.io/bound-by-controller"],
            "yes"
        );
        // A bound claim needs nothing written.
        let lister = MapLister::with({
            let mut o = storage_objects();
            o.push(claim("data", json!({"volumeName": "pv-a"})));
            o
        });
        let v = volumes::pre_filter(&with_claims(&["data"]), &lister).expect("claims");
        let a1 = NodeInfo::from_node(&node("a1", json!({"zone": "a"}), json!({})));
        assert!(v.plan(&a1).is_empty());
    }

    #[test]
    fn a_pre_filter_rejection_reads_as_upstream() {
        assert_eq!(
            pre_filter_message(
                3,
                "persistentvolumeclaim \"data\" not found",
                &preemption_message(3, 3, 0)
            ),
            "0/3 nodes are available: persistentvolumeclaim \"data\" not found. preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling."
        );
    }

    /// Scores of the feasible nodes by name.
    fn scores(c: &Candidate, nodes: &HashMap<String, NodeInfo>) -> BTreeMap<String, Scores> {
        let s = pre_filter(c, nodes);
        let mut feasible: Vec<&NodeInfo> = nodes
            .values()
            .filter(|n| filter(c, &s, n).is_ok())
            .collect();
        feasible.sort_by(|a, b| a.name.cmp(&b.name));
        feasible
            .iter()
            .map(|n| n.name.clone())
            .zip(score(c, &feasible, nodes))
            .collect()
    }

    /// One plugin's score per node, for a table of cases.
    fn plugin_scores(
        c: &Candidate,
        nodes: &HashMap<String, NodeInfo>,
        plugin: fn(&Scores) -> i64,
    ) -> Vec<(String, i64)> {
        scores(c, nodes)
            .iter()
            .map(|(n, s)| (n.clone(), plugin(s)))
            .collect()
    }

    fn pairs(want: &[(&str, i64)]) -> Vec<(String, i64)> {
        want.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    struct ScoreCase {
        name: &'static str,
        pod: Value,
        nodes: Vec<Value>,
        pods: Vec<(&'static str, Value)>,
        plugin: fn(&Scores) -> i64,
        want: Vec<(&'static str, i64)>,
    }

    fn run_score_cases(cases: Vec<ScoreCase>) {
        for case in cases {
            let nodes = cluster(&case.nodes, &case.pods);
            let c = Candidate::new(Arc::new(case.pod));
            assert_eq!(
                plugin_scores(&c, &nodes, case.plugin),
                pairs(&case.want),
                "case {:?}",
                case.name
            );
        }
    }

    #[test]
    fn resource_scores() {
        let least = |s: &Scores| s.least_allocated;
        let balanced = |s: &Scores| s.balanced_allocation;
        run_score_cases(vec![
            ScoreCase {
                // 1 cpu/2Gi more: n1 is 25% used (75 free), n2 75% (25 free).
                name: "LeastAllocated prefers the emptier node",
                pod: pod("p", json!({}), cpu_mem("1", "2Gi")),
                nodes: vec![plain("n1"), plain("n2")],
                pods: vec![("n2", pod("x", json!({}), cpu_mem("2", "4Gi")))],
                plugin: least,
                want: vec![("n1", 75), ("n2", 25)],
            },
            ScoreCase {
                // Unstated requests count as 100m and 200Mi: (4000-100)/4000 → 97, (8192-200)/8192 → 97.
                name: "LeastAllocated counts a pod requesting nothing with upstream's defaults",
                pod: pod("p", json!({}), json!({})),
                nodes: vec![plain("n1")],
                pods: vec![],
                plugin: least,
                want: vec![("n1", 97)],
            },
            ScoreCase {
                // n1: cpu 3/4, memory 1/8 → std 0.3125 → 68; n2: 1/4 and 1/8 → std 0.0625 → 93.
                name: "BalancedAllocation prefers even cpu and memory shares",
                pod: pod("p", json!({}), cpu_mem("1", "1Gi")),
                nodes: vec![plain("n1"), plain("n2")],
                pods: vec![("n1", pod("x", json!({}), cpu_mem("2", "0")))],
                plugin: balanced,
                want: vec![("n1", 68), ("n2", 93)],
            },
            ScoreCase {
                name: "BalancedAllocation skips pods that request nothing",
                pod: pod("p", json!({}), json!({})),
                nodes: vec![plain("n1"), plain("n2")],
                pods: vec![("n1", pod("x", json!({}), cpu_mem("2", "0")))],
                plugin: balanced,
                want: vec![("n1", 0), ("n2", 0)],
            },
        ]);
    }

    #[test]
    fn node_affinity_and_taint_scores() {
        let affinity = |s: &Scores| s.node_affinity;
        let taints = |s: &Scores| s.taint_toleration;
        let preferred = json!({"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}},
            {"weight": 10, "preference": {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}},
        ]}}});
        let prefer_no = |name: &str| {
            node(
                name,
                json!({}),
                json!({"spec": {"taints": [{"key": "spot", "value": "true", "effect": "PreferNoSchedule"}, {"key": "old", "effect": "PreferNoSchedule"}]}}),
            )
        };
        run_score_cases(vec![
            ScoreCase {
                // Raw 1, 10, 11, 0, normalized to the highest.
                name: "preferred node affinity: matching weights, scaled to the best",
                pod: pod("p", json!({}), preferred),
                nodes: vec![
                    node("a", json!({"zone": "a"}), json!({})),
                    node("ssd", json!({"disk": "ssd"}), json!({})),
                    node("both", json!({"zone": "a", "disk": "ssd"}), json!({})),
                    plain("none"),
                ],
                pods: vec![],
                plugin: affinity,
                want: vec![("a", 9), ("both", 100), ("none", 0), ("ssd", 90)],
            },
            ScoreCase {
                name: "no preferred terms: no node affinity score",
                pod: pod("p", json!({}), json!({})),
                nodes: vec![node("a", json!({"zone": "a"}), json!({})), plain("b")],
                pods: vec![],
                plugin: affinity,
                want: vec![("a", 0), ("b", 0)],
            },
            ScoreCase {
                // Raw 2, 0 and 1 untolerated: reversed against the most.
                name: "PreferNoSchedule taints: fewer untolerated is better",
                pod: pod("p", json!({}), json!({})),
                nodes: vec![
                    prefer_no("tainted"),
                    plain("clean"),
                    node(
                        "one",
                        json!({}),
                        json!({"spec": {"taints": [{"key": "old", "effect": "PreferNoSchedule"}]}}),
                    ),
                ],
                pods: vec![],
                plugin: taints,
                want: vec![("clean", 100), ("one", 50), ("tainted", 0)],
            },
            ScoreCase {
                name: "a tolerated PreferNoSchedule taint does not count",
                pod: pod(
                    "p",
                    json!({}),
                    json!({"tolerations": [{"key": "spot", "operator": "Exists", "effect": "PreferNoSchedule"}]}),
                ),
                nodes: vec![
                    prefer_no("tainted"),
                    node(
                        "one",
                        json!({}),
                        json!({"spec": {"taints": [{"key": "spot", "value": "true", "effect": "PreferNoSchedule"}]}}),
                    ),
                ],
                pods: vec![],
                plugin: taints,
                want: vec![("one", 100), ("tainted", 0)],
            },
            ScoreCase {
                name: "PreferNoSchedule taints all tolerated: all equal",
                pod: pod(
                    "p",
                    json!({}),
                    json!({"tolerations": [{"operator": "Exists"}]}),
                ),
                nodes: vec![prefer_no("tainted"), plain("clean")],
                pods: vec![],
                plugin: taints,
                want: vec![("clean", 100), ("tainted", 100)],
            },
        ]);
    }

    #[test]
    fn inter_pod_affinity_scores() {
        let ipa = |s: &Scores| s.inter_pod_affinity;
        let zones = || {
            vec![
                node("a1", json!({"zone": "a"}), json!({})),
                node("a2", json!({"zone": "a"}), json!({})),
                node("b1", json!({"zone": "b"}), json!({})),
            ]
        };
        let preferred = |kind: &str, weight: i64, selector: Value, key: &str| {
            json!({"affinity": {kind: {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": weight, "podAffinityTerm": {"labelSelector": {"matchLabels": selector}, "topologyKey": key}}]}}})
        };
        let db = || pod("db", json!({"app": "db"}), json!({}));
        run_score_cases(vec![
            ScoreCase {
                name: "preferred affinity: the zone of a matching pod",
                pod: pod(
                    "p",
                    json!({"app": "web"}),
                    preferred("podAffinity", 50, json!({"app": "db"}), "zone"),
                ),
                nodes: zones(),
                pods: vec![("a1", db())],
                plugin: ipa,
                want: vec![("a1", 100), ("a2", 100), ("b1", 0)],
            },
            ScoreCase {
                name: "preferred anti-affinity: away from a matching pod",
                pod: pod(
                    "p",
                    json!({"app": "web"}),
                    preferred("podAntiAffinity", 50, json!({"app": "db"}), "zone"),
                ),
                nodes: zones(),
                pods: vec![("a1", db())],
                plugin: ipa,
                want: vec![("a1", 0), ("a2", 0), ("b1", 100)],
            },
            ScoreCase {
                // Each matching pod counts: zone a has one db (+10), zone b two (+20); scaled
                // between the lowest and the highest.
                name: "preferred affinity counts every matching pod",
                pod: pod(
                    "p",
                    json!({"app": "web"}),
                    preferred("podAffinity", 10, json!({"app": "db"}), "zone"),
                ),
                nodes: zones(),
                pods: vec![
                    ("a1", db()),
                    ("b1", pod("db2", json!({"app": "db"}), json!({}))),
                    ("b1", pod("db3", json!({"app": "db"}), json!({}))),
                ],
                plugin: ipa,
                want: vec![("a1", 0), ("a2", 0), ("b1", 100)],
            },
            ScoreCase {
                name: "existing pods' preferred affinity draws the pods they select",
                pod: pod("p", json!({"app": "web"}), json!({})),
                nodes: zones(),
                pods: vec![(
                    "b1",
                    pod(
                        "cache",
                        json!({"app": "cache"}),
                        preferred(
                            "podAffinity",
                            5,
                            json!({"app": "web"}),
                            "kubernetes.io/hostname",
                        ),
                    ),
                )],
                plugin: ipa,
                want: vec![("a1", 0), ("a2", 0), ("b1", 100)],
            },
            ScoreCase {
                name: "existing pods' preferred anti-affinity repels the pods they select",
                pod: pod("p", json!({"app": "web"}), json!({})),
                nodes: zones(),
                pods: vec![(
                    "b1",
                    pod(
                        "loner",
                        json!({"app": "loner"}),
                        preferred("podAntiAffinity", 5, json!({"app": "web"}), "zone"),
                    ),
                )],
                plugin: ipa,
                want: vec![("a1", 100), ("a2", 100), ("b1", 0)],
            },
            ScoreCase {
                name: "existing pods' required affinity counts with weight 1",
                pod: pod("p", json!({"app": "web"}), json!({})),
                nodes: zones(),
                pods: vec![(
                    "a2",
                    pod(
                        "follower",
                        json!({"app": "f"}),
                        json!({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "zone"}]}}}),
                    ),
                )],
                plugin: ipa,
                want: vec![("a1", 100), ("a2", 100), ("b1", 0)],
            },
            ScoreCase {
                name: "no terms anywhere: no score",
                pod: pod("p", json!({"app": "web"}), json!({})),
                nodes: zones(),
                pods: vec![("a1", db())],
                plugin: ipa,
                want: vec![("a1", 0), ("a2", 0), ("b1", 0)],
            },
        ]);
    }

    #[test]
    fn topology_spread_scores() {
        let spread = |s: &Scores| s.topology_spread;
        let app = |name: &str| pod(name, json!({"app": "a"}), json!({}));
        let soft = |key: &str| {
            pod(
                "p",
                json!({"app": "a"}),
                json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": {"matchLabels": {"app": "a"}}}]}),
            )
        };
        run_score_cases(vec![
            ScoreCase {
                // Two domains weigh ln(4): zone a raw round(2 × 1.386) = 3, zone b 0.
                name: "ScheduleAnyway prefers the zone with fewer matching pods",
                pod: soft("zone"),
                nodes: vec![
                    node("a1", json!({"zone": "a"}), json!({})),
                    node("b1", json!({"zone": "b"}), json!({})),
                ],
                pods: vec![("a1", app("x1")), ("a1", app("x2"))],
                plugin: spread,
                want: vec![("a1", 0), ("b1", 100)],
            },
            ScoreCase {
                name: "ScheduleAnyway ignores nodes without the key (score 0) and never rejects",
                pod: soft("zone"),
                nodes: vec![node("a1", json!({"zone": "a"}), json!({})), plain("nozone")],
                pods: vec![("a1", app("x1"))],
                plugin: spread,
                want: vec![("a1", 100), ("nozone", 0)],
            },
            ScoreCase {
                name: "no matching pods anywhere: all equal",
                pod: soft("zone"),
                nodes: vec![
                    node("a1", json!({"zone": "a"}), json!({})),
                    node("b1", json!({"zone": "b"}), json!({})),
                ],
                pods: vec![],
                plugin: spread,
                want: vec![("a1", 100), ("b1", 100)],
            },
        ]);
    }

    #[test]
    fn default_spreading_of_a_replicasets_pods() {
        let rs = json!({"kind": "ReplicaSet", "metadata": {"name": "web-1", "namespace": "d"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}}});
        let owned = |name: &str| {
            merged(
                pod(
                    name,
                    json!({"app": "web", "pod-template-hash": "1"}),
                    json!({}),
                ),
                json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "rs", "controller": true}]}}),
            )
        };
        let nodes = cluster(
            &[plain("n1"), plain("n2")],
            &[
                ("n1", owned("w1")),
                ("n1", owned("w2")),
                ("n1", pod("other", json!({"app": "x"}), json!({}))),
            ],
        );
        let p = owned("w3");
        assert_eq!(spreading_owner(&p), Some(("ReplicaSet", "web-1")));
        let mut c = Candidate::new(Arc::new(p.clone()));
        c.default_spread = default_selector(&p, &[], Some(&rs));
        // Hostname (maxSkew 3, weight ln 4): n1 raw round(2 × 1.386 + 2) = 5, n2 2; the zone
        // constraint adds nothing on nodes without a zone: 100 × (5 + 2 − s) / 5.
        assert_eq!(
            plugin_scores(&c, &nodes, |s| s.topology_spread),
            pairs(&[("n1", 40), ("n2", 100)])
        );
        assert!(scores(&c, &nodes)["n2"].total() > scores(&c, &nodes)["n1"].total());
        // Counts are remembered per node until its pods change: two more on n2 even it out.
        let mut grown = nodes.clone();
        assert_eq!(
            plugin_scores(&c, &grown, |s| s.topology_spread),
            pairs(&[("n1", 40), ("n2", 100)])
        );
        for name in ["w4", "w5"] {
            let n2 = grown.get_mut("n2").expect("n2");
            n2.add_pod(placed(&owned(name)));
        }
        assert_eq!(
            plugin_scores(&c, &grown, |s| s.topology_spread),
            pairs(&[("n1", 100), ("n2", 100)])
        );
        // One fewer on n1: raw round(1.386 + 2) = 3 against n2's 5; 100 × (5 + 3 − 5) / 5.
        grown.get_mut("n1").expect("n1").remove_pod("d/w1");
        assert_eq!(
            plugin_scores(&c, &grown, |s| s.topology_spread),
            pairs(&[("n1", 100), ("n2", 60)])
        );
        // A pod of no ReplicaSet and no service is not spread by default.
        let lone = pod("lone", json!({"app": "web"}), json!({}));
        assert_eq!(spreading_owner(&lone), None);
        let mut c = Candidate::new(Arc::new(lone.clone()));
        c.default_spread = default_selector(&lone, &[], None);
        assert!(c.default_spread.is_none());
        assert_eq!(
            plugin_scores(&c, &nodes, |s| s.topology_spread),
            pairs(&[("n1", 0), ("n2", 0)])
        );
        // A service selecting it is enough.
        let svc = Arc::new(
            json!({"metadata": {"name": "web", "namespace": "d"}, "spec": {"selector": {"app": "web"}}}),
        );
        c.default_spread = default_selector(&lone, &[svc], None);
        assert_eq!(
            plugin_scores(&c, &nodes, |s| s.topology_spread),
            pairs(&[("n1", 40), ("n2", 100)])
        );
        // Explicit constraints replace the defaults.
        let mut c = Candidate::new(Arc::new(merged(
            p,
            json!({"spec": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}]}}),
        )));
        c.default_spread = default_selector(&c.pod, &[], Some(&rs));
        assert_eq!(c.scoring_spread().0.len(), 0);
    }

    #[test]
    fn the_total_weighs_plugins_as_upstream() {
        let s = Scores {
            taint_toleration: 1,
            node_affinity: 10,
            least_allocated: 100,
            balanced_allocation: 1000,
            topology_spread: 10000,
            inter_pod_affinity: 100000,
        };
        assert_eq!(s.total(), 3 + 20 + 100 + 1000 + 20000 + 200000);
    }

    #[test]
    fn the_unschedulable_message_reads_as_upstream() {
        let mut r = BTreeMap::new();
        r.insert(
            "node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }".to_string(),
            1,
        );
        r.insert("Insufficient cpu".to_string(), 2);
        assert_eq!(
            unschedulable_message(3, &r, &preemption_message(3, 1, 2)),
            "0/3 nodes are available: 1 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }, 2 Insufficient cpu. preemption: 0/3 nodes are available: 1 Preemption is not helpful for scheduling, 2 No preemption victims found for incoming pod."
        );
    }

    fn prio(name: &str, priority: i64, spec: Value) -> Value {
        merged(
            pod(name, json!({}), spec),
            json!({"spec": {"priority": priority}}),
        )
    }

    fn victims_on(
        c: &Candidate,
        nodes: &HashMap<String, NodeInfo>,
        node: &str,
    ) -> Option<Vec<String>> {
        victims(c, &pre_filter(c, nodes), &nodes[node])
    }

    #[test]
    fn preemption_picks_the_fewest_lowest_priority_victims() {
        let nodes = cluster(
            &[node(
                "n",
                json!({}),
                json!({"status": {"allocatable": {"cpu": "1"}}}),
            )],
            &[
                ("n", prio("low", 1, cpu_mem("500m", "0"))),
                ("n", prio("mid", 5, cpu_mem("500m", "0"))),
            ],
        );
        let c = Candidate::new(Arc::new(prio("hi", 10, cpu_mem("500m", "0"))));
        assert_eq!(victims_on(&c, &nodes, "n"), Some(vec!["d/low".to_string()]));
        let c = Candidate::new(Arc::new(prio("big", 10, cpu_mem("1", "0"))));
        assert_eq!(
            victims_on(&c, &nodes, "n"),
            Some(vec!["d/low".to_string(), "d/mid".to_string()])
        );
        let c = Candidate::new(Arc::new(prio("lo", 0, cpu_mem("500m", "0"))));
        assert_eq!(victims_on(&c, &nodes, "n"), None);
        let c = Candidate::new(Arc::new(prio("huge", 10, cpu_mem("2", "0"))));
        assert_eq!(
            victims_on(&c, &nodes, "n"),
            None,
            "evicting everything is not enough"
        );
    }

    #[test]
    fn preemption_frees_ports_and_anti_affinity() {
        let port = json!({"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}]}]});
        let nodes = cluster(
            &[plain("n")],
            &[
                ("n", prio("web", 1, port.clone())),
                ("n", prio("other", 1, json!({}))),
            ],
        );
        let c = Candidate::new(Arc::new(prio("hi", 10, port)));
        assert_eq!(victims_on(&c, &nodes, "n"), Some(vec!["d/web".to_string()]));

        let nodes = cluster(
            &[plain("n")],
            &[(
                "n",
                merged(
                    prio("w", 1, json!({})),
                    json!({"metadata": {"labels": {"app": "web"}}}),
                ),
            )],
        );
        let c = Candidate::new(Arc::new(merged(
            prio(
                "hi",
                10,
                json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"app": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}}),
            ),
            json!({"metadata": {"labels": {"app": "web"}}}),
        )));
        let s = pre_filter(&c, &nodes);
        assert_eq!(
            verdict(&filter(&c, &s, &nodes["n"])),
            "node(s) didn't match pod anti-affinity rules"
        );
        assert_eq!(victims_on(&c, &nodes, "n"), Some(vec!["d/w".to_string()]));
    }
}
