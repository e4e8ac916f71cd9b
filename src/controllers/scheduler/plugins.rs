//! The scheduler's filters and scores, as pure functions over a pod and a cached view of the
//! nodes (what each node offers and which pods it runs). Each filter returns upstream's reason
//! string when a node does not fit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;

use crate::api::selectors::{from_label_selector_object, labels_of, LabelSelector};
use crate::controllers::client::{controller_of, name_of, namespace_of};
use crate::controllers::quantity::{milli_of, pod_requests, Requests};

/// Default requests for scoring pods that request nothing (upstream's non-zero defaults).
const DEFAULT_CPU_MILLI: i128 = 100;
const DEFAULT_MEM_MILLI: i128 = 200 * 1024 * 1024 * 1000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: String,
}

/// What the scheduler needs of a pod placed on a node.
#[derive(Clone, Debug)]
pub struct PlacedPod {
    pub key: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub owner_uid: String,
    pub priority: i64,
    pub requests: Requests,
    pub ports: Vec<(String, i64, String)>,
    /// Required anti-affinity terms of this pod (they constrain pods placed later).
    pub anti_affinity: Vec<Term>,
}

/// A pod (anti-)affinity term.
#[derive(Clone, Debug)]
pub struct Term {
    pub selector: LabelSelector,
    pub namespaces: Vec<String>,
    pub topology_key: String,
    pub weight: i64,
}

pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub unschedulable: bool,
    pub allocatable: Requests,
    pub allocatable_pods: i64,
    pub requested: Requests,
    pub nonzero_requested: Requests,
    pub pods: BTreeMap<String, PlacedPod>,
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
        }
    }

    pub fn add_pod(&mut self, p: PlacedPod) {
        self.remove_pod(&p.key);
        self.requested.add(&p.requests);
        self.nonzero_requested.add(&nonzero(&p.requests));
        self.pods.insert(p.key.clone(), p);
    }

    pub fn remove_pod(&mut self, key: &str) {
        if let Some(old) = self.pods.remove(key) {
            self.requested.sub(&old.requests);
            self.nonzero_requested.sub(&nonzero(&old.requests));
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

fn nonzero(r: &Requests) -> Requests {
    Requests {
        cpu_milli: if r.cpu_milli == 0 {
            DEFAULT_CPU_MILLI
        } else {
            r.cpu_milli
        },
        memory_milli: if r.memory_milli == 0 {
            DEFAULT_MEM_MILLI
        } else {
            r.memory_milli
        },
        ephemeral_milli: r.ephemeral_milli,
    }
}

fn terms(pod: &Value, ptr: &str, weighted: bool) -> Vec<Term> {
    let ns = namespace_of(pod).to_string();
    pod.pointer(ptr)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    let (t, weight) = if weighted {
                        (&t["podAffinityTerm"], t["weight"].as_i64().unwrap_or(1))
                    } else {
                        (t, 1)
                    };
                    let selector = from_label_selector_object(&t["labelSelector"]).ok()?;
                    let mut namespaces: Vec<String> = t["namespaces"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|n| n.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    if namespaces.is_empty()
                        && t.get("namespaceSelector").is_none_or(Value::is_null)
                    {
                        namespaces.push(ns.clone());
                    }
                    Some(Term {
                        selector,
                        namespaces,
                        topology_key: t["topologyKey"].as_str().unwrap_or_default().to_string(),
                        weight,
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

fn host_ports(pod: &Value) -> Vec<(String, i64, String)> {
    let mut out = Vec::new();
    for list in ["containers", "initContainers"] {
        for c in pod
            .pointer(&format!("/spec/{list}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for p in c["ports"].as_array().into_iter().flatten() {
                if let Some(hp) = p["hostPort"].as_i64().filter(|h| *h > 0) {
                    out.push((
                        p["protocol"].as_str().unwrap_or("TCP").to_string(),
                        hp,
                        p["hostIP"].as_str().unwrap_or("0.0.0.0").to_string(),
                    ));
                }
            }
        }
    }
    out
}

pub fn placed(pod: &Arc<Value>) -> PlacedPod {
    PlacedPod {
        key: crate::controllers::client::key_of(pod),
        namespace: namespace_of(pod).to_string(),
        labels: labels_of(pod),
        owner_uid: controller_of(pod)
            .and_then(|c| c["uid"].as_str())
            .unwrap_or_default()
            .to_string(),
        priority: pod
            .pointer("/spec/priority")
            .and_then(Value::as_i64)
            .unwrap_or(0),
        requests: pod_requests(pod),
        ports: host_ports(pod),
        anti_affinity: terms(
            pod,
            "/spec/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution",
            false,
        ),
    }
}

/// A pod being scheduled, with everything the plugins read precomputed.
pub struct Candidate {
    pub pod: Arc<Value>,
    pub me: PlacedPod,
    pub node_selector: BTreeMap<String, String>,
    pub required_affinity: Option<Value>,
    pub preferred_affinity: Vec<(i64, Value)>,
    pub tolerations: Vec<Value>,
    pub affinity: Vec<Term>,
    pub anti_affinity: Vec<Term>,
    pub preferred_pod_affinity: Vec<Term>,
    pub preferred_pod_anti_affinity: Vec<Term>,
    pub spread: Vec<Value>,
}

impl Candidate {
    pub fn new(pod: Arc<Value>) -> Candidate {
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
                    .map(|t| (t["weight"].as_i64().unwrap_or(1), t["preference"].clone()))
                    .collect()
            })
            .unwrap_or_default();
        Candidate {
            me: placed(&pod),
            node_selector,
            required_affinity: na
                .get("requiredDuringSchedulingIgnoredDuringExecution")
                .cloned()
                .filter(|v| !v.is_null()),
            preferred_affinity,
            tolerations: pod
                .pointer("/spec/tolerations")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            affinity: terms(
                &pod,
                "/spec/affinity/podAffinity/requiredDuringSchedulingIgnoredDuringExecution",
                false,
            ),
            anti_affinity: terms(
                &pod,
                "/spec/affinity/podAntiAffinity/requiredDuringSchedulingIgnoredDuringExecution",
                false,
            ),
            preferred_pod_affinity: terms(
                &pod,
                "/spec/affinity/podAffinity/preferredDuringSchedulingIgnoredDuringExecution",
                true,
            ),
            preferred_pod_anti_affinity: terms(
                &pod,
                "/spec/affinity/podAntiAffinity/preferredDuringSchedulingIgnoredDuringExecution",
                true,
            ),
            spread: pod
                .pointer("/spec/topologySpreadConstraints")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            pod,
        }
    }
}

/// A node selector term (matchExpressions and matchFields) against a node.
pub fn node_term_matches(term: &Value, node: &NodeInfo) -> bool {
    let exprs_ok = term["matchExpressions"].as_array().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let v = node.labels.get(key);
            match e["operator"].as_str().unwrap_or_default() {
                "In" => v.is_some_and(|v| values.contains(&v.as_str())),
                "NotIn" => !v.is_some_and(|v| values.contains(&v.as_str())),
                "Exists" => v.is_some(),
                "DoesNotExist" => v.is_none(),
                "Gt" => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .zip(values.first().and_then(|x| x.parse::<i64>().ok()))
                    .is_some_and(|(a, b)| a > b),
                "Lt" => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .zip(values.first().and_then(|x| x.parse::<i64>().ok()))
                    .is_some_and(|(a, b)| a < b),
                _ => false,
            }
        })
    });
    let fields_ok = term["matchFields"].as_array().is_none_or(|fields| {
        fields.iter().all(|f| {
            let values: Vec<&str> = f["values"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let is_name = f["key"] == "metadata.name";
            match f["operator"].as_str().unwrap_or_default() {
                "In" => is_name && values.contains(&node.name.as_str()),
                "NotIn" => !is_name || !values.contains(&node.name.as_str()),
                _ => false,
            }
        })
    });
    exprs_ok && fields_ok
}

pub fn tolerates(tolerations: &[Value], t: &Taint) -> bool {
    tolerations.iter().any(|tol| {
        let effect_ok = tol["effect"]
            .as_str()
            .is_none_or(|e| e.is_empty() || e == t.effect);
        let key = tol["key"].as_str().unwrap_or_default();
        let op = tol["operator"].as_str().unwrap_or("Equal");
        let key_ok = key.is_empty() && op == "Exists" || key == t.key;
        let value_ok = op == "Exists" || tol["value"].as_str().unwrap_or_default() == t.value;
        effect_ok && key_ok && value_ok
    })
}

fn taint_text(t: &Taint) -> String {
    format!("{{{}: {}}}", t.key, t.value)
}

/// Whether a term is satisfied by pods of the node's topology domain.
fn term_has_match(
    term: &Term,
    domain: Option<&String>,
    nodes: &HashMap<String, NodeInfo>,
    exclude: &str,
) -> bool {
    let Some(domain) = domain else { return false };
    nodes
        .values()
        .filter(|n| n.labels.get(&term.topology_key) == Some(domain))
        .any(|n| {
            n.pods.values().any(|p| {
                p.key != exclude
                    && term.namespaces.contains(&p.namespace)
                    && term.selector.matches(&p.labels)
            })
        })
}

/// Runs every filter; `Err(reason)` names why the node does not fit.
pub fn filter(
    c: &Candidate,
    node: &NodeInfo,
    nodes: &HashMap<String, NodeInfo>,
) -> Result<(), String> {
    // NodeUnschedulable.
    if node.unschedulable {
        let t = Taint {
            key: "node.kubernetes.io/unschedulable".into(),
            value: String::new(),
            effect: "NoSchedule".into(),
        };
        if !tolerates(&c.tolerations, &t) {
            return Err("node(s) were unschedulable".into());
        }
    }
    // NodeAffinity (nodeSelector and required affinity).
    let selector_ok = c
        .node_selector
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v));
    let affinity_ok = c.required_affinity.as_ref().is_none_or(|r| {
        r["nodeSelectorTerms"].as_array().is_none_or(|terms| {
            terms.is_empty() || terms.iter().any(|t| node_term_matches(t, node))
        })
    });
    if !selector_ok || !affinity_ok {
        return Err("node(s) didn't match Pod's node affinity/selector".into());
    }
    // TaintToleration.
    if let Some(t) = node.taints.iter().find(|t| {
        (t.effect == "NoSchedule" || t.effect == "NoExecute") && !tolerates(&c.tolerations, t)
    }) {
        return Err(format!("node(s) had untolerated taint {}", taint_text(t)));
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
            return Err("node(s) didn't have free ports for the requested pod ports".into());
        }
    }
    // NodeResourcesFit.
    let mut insufficient = Vec::new();
    if node.pods.len() as i64 + 1 > node.allocatable_pods {
        insufficient.push("Too many pods");
    }
    let r = &c.me.requests;
    if r.cpu_milli > 0 && node.requested.cpu_milli + r.cpu_milli > node.allocatable.cpu_milli {
        insufficient.push("Insufficient cpu");
    }
    if r.memory_milli > 0
        && node.requested.memory_milli + r.memory_milli > node.allocatable.memory_milli
    {
        insufficient.push("Insufficient memory");
    }
    if r.ephemeral_milli > 0
        && node.requested.ephemeral_milli + r.ephemeral_milli > node.allocatable.ephemeral_milli
    {
        insufficient.push("Insufficient ephemeral-storage");
    }
    if !insufficient.is_empty() {
        return Err(insufficient.join(", "));
    }
    // InterPodAffinity: required affinity and anti-affinity, and existing pods' anti-affinity.
    for term in &c.affinity {
        if !term_has_match(term, node.labels.get(&term.topology_key), nodes, &c.me.key) {
            // The first pod of a group may match its own affinity.
            let any_anywhere = nodes.values().flat_map(|n| n.pods.values()).any(|p| {
                p.key != c.me.key
                    && term.namespaces.contains(&p.namespace)
                    && term.selector.matches(&p.labels)
            });
            let self_match =
                term.namespaces.contains(&c.me.namespace) && term.selector.matches(&c.me.labels);
            if any_anywhere || !self_match || !node.labels.contains_key(&term.topology_key) {
                return Err("node(s) didn't match pod affinity rules".into());
            }
        }
    }
    for term in &c.anti_affinity {
        if term_has_match(term, node.labels.get(&term.topology_key), nodes, &c.me.key) {
            return Err("node(s) didn't match pod anti-affinity rules".into());
        }
    }
    for n in nodes.values() {
        for p in n.pods.values() {
            for term in &p.anti_affinity {
                if term.namespaces.contains(&c.me.namespace) && term.selector.matches(&c.me.labels)
                {
                    let theirs = n.labels.get(&term.topology_key);
                    if theirs.is_some() && theirs == node.labels.get(&term.topology_key) {
                        return Err("node(s) didn't match pod anti-affinity rules".into());
                    }
                }
            }
        }
    }
    // PodTopologySpread (DoNotSchedule).
    for s in c
        .spread
        .iter()
        .filter(|s| s["whenUnsatisfiable"] == "DoNotSchedule")
    {
        let key = s["topologyKey"].as_str().unwrap_or_default();
        let Some(domain) = node.labels.get(key) else {
            return Err(
                "node(s) didn't match pod topology spread constraints (missing required label)"
                    .into(),
            );
        };
        let max_skew = s["maxSkew"].as_i64().unwrap_or(1);
        let counts = spread_counts(c, s, nodes);
        let min = counts.values().copied().min().unwrap_or(0);
        let sel = from_label_selector_object(&s["labelSelector"]).unwrap_or_default();
        let me = i64::from(sel.matches(&c.me.labels));
        if counts.get(domain).copied().unwrap_or(0) + me - min > max_skew {
            return Err("node(s) didn't match pod topology spread constraints".into());
        }
    }
    Ok(())
}

/// Matching pods per topology domain, over nodes the pod could go to by node affinity.
fn spread_counts(
    c: &Candidate,
    s: &Value,
    nodes: &HashMap<String, NodeInfo>,
) -> BTreeMap<String, i64> {
    let key = s["topologyKey"].as_str().unwrap_or_default();
    let sel = from_label_selector_object(&s["labelSelector"]).unwrap_or_default();
    let mut counts: BTreeMap<String, i64> = BTreeMap::new();
    for n in nodes.values() {
        let Some(d) = n.labels.get(key) else { continue };
        let selector_ok = c
            .node_selector
            .iter()
            .all(|(k, v)| n.labels.get(k) == Some(v));
        if !selector_ok {
            continue;
        }
        let m = n
            .pods
            .values()
            .filter(|p| {
                p.namespace == c.me.namespace && p.key != c.me.key && sel.matches(&p.labels)
            })
            .count() as i64;
        *counts.entry(d.clone()).or_default() += m;
    }
    counts
}

fn fraction(req: i128, alloc: i128) -> f64 {
    if alloc <= 0 {
        1.0
    } else {
        (req as f64 / alloc as f64).min(1.0)
    }
}

/// Scores a node (higher is better), weighting plugins as upstream's default profile.
pub fn score(c: &Candidate, node: &NodeInfo, nodes: &HashMap<String, NodeInfo>) -> f64 {
    let mine = nonzero(&c.me.requests);
    let cpu = fraction(
        node.nonzero_requested.cpu_milli + mine.cpu_milli,
        node.allocatable.cpu_milli,
    );
    let mem = fraction(
        node.nonzero_requested.memory_milli + mine.memory_milli,
        node.allocatable.memory_milli,
    );
    // NodeResourcesFit (LeastAllocated) and NodeResourcesBalancedAllocation.
    let least = ((1.0 - cpu) + (1.0 - mem)) / 2.0 * 100.0;
    let balanced = (1.0 - (cpu - mem).abs()) * 100.0;
    // NodeAffinity (preferred), weight 2.
    let pref_total: i64 = c.preferred_affinity.iter().map(|(w, _)| *w).sum();
    let pref: i64 = c
        .preferred_affinity
        .iter()
        .filter(|(_, t)| node_term_matches(t, node))
        .map(|(w, _)| *w)
        .sum();
    let node_aff = if pref_total > 0 {
        pref as f64 / pref_total as f64 * 100.0
    } else {
        0.0
    };
    // TaintToleration (PreferNoSchedule), weight 3.
    let bad = node
        .taints
        .iter()
        .filter(|t| t.effect == "PreferNoSchedule" && !tolerates(&c.tolerations, t))
        .count();
    let taint = 100.0 / (1.0 + bad as f64);
    // InterPodAffinity (preferred), weight 2.
    let mut ipa = 0.0;
    for t in &c.preferred_pod_affinity {
        if term_has_match(t, node.labels.get(&t.topology_key), nodes, &c.me.key) {
            ipa += t.weight as f64;
        }
    }
    for t in &c.preferred_pod_anti_affinity {
        if term_has_match(t, node.labels.get(&t.topology_key), nodes, &c.me.key) {
            ipa -= t.weight as f64;
        }
    }
    // PodTopologySpread (ScheduleAnyway), weight 2; default spreading of a controller's pods.
    let mut spread = 0.0;
    for s in c
        .spread
        .iter()
        .filter(|s| s["whenUnsatisfiable"] == "ScheduleAnyway")
    {
        let key = s["topologyKey"].as_str().unwrap_or_default();
        let counts = spread_counts(c, s, nodes);
        let max = counts.values().copied().max().unwrap_or(0).max(1);
        let here = node
            .labels
            .get(key)
            .and_then(|d| counts.get(d))
            .copied()
            .unwrap_or(max);
        spread += (1.0 - here as f64 / max as f64) * 100.0;
    }
    let siblings = if c.me.owner_uid.is_empty() {
        0
    } else {
        node.pods
            .values()
            .filter(|p| p.owner_uid == c.me.owner_uid)
            .count()
    };
    let default_spread = 100.0 / (1.0 + siblings as f64);
    least
        + balanced
        + 2.0 * node_aff
        + 3.0 * taint
        + 2.0 * ipa.clamp(-100.0, 100.0)
        + 2.0 * spread
        + 2.0 * default_spread
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

/// The preemption part of the message when no node can be freed: nodes whose failure is not
/// about resources cannot be helped; the others had no lower-priority pods to evict.
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

/// Splits a combined reason ("Insufficient cpu, Too many pods") into the ones upstream counts.
pub fn split_reasons(r: &str) -> Vec<String> {
    if r.starts_with("Insufficient") || r.starts_with("Too many pods") {
        r.split(", ").map(str::to_string).collect()
    } else {
        vec![r.to_string()]
    }
}

/// Whether a node's only problem is resources (so evicting lower-priority pods could help).
pub fn resources_only(reason: &str) -> bool {
    split_reasons(reason)
        .iter()
        .all(|r| r.starts_with("Insufficient") || r == "Too many pods")
}

/// The lowest-priority pods on `node` whose removal lets `c` fit, or `None`.
pub fn victims(c: &Candidate, node: &NodeInfo) -> Option<Vec<String>> {
    let mut lower: Vec<&PlacedPod> = node
        .pods
        .values()
        .filter(|p| p.priority < c.me.priority)
        .collect();
    lower.sort_by_key(|p| p.priority);
    let mut freed = Requests::default();
    let mut pods_freed = 0;
    let mut out = Vec::new();
    let fits = |freed: &Requests, pods_freed: i64| {
        let r = &c.me.requests;
        node.pods.len() as i64 + 1 - pods_freed <= node.allocatable_pods
            && node.requested.cpu_milli - freed.cpu_milli + r.cpu_milli
                <= node.allocatable.cpu_milli
            && node.requested.memory_milli - freed.memory_milli + r.memory_milli
                <= node.allocatable.memory_milli
    };
    for p in lower {
        if fits(&freed, pods_freed) {
            break;
        }
        freed.add(&p.requests);
        pods_freed += 1;
        out.push(p.key.clone());
    }
    if fits(&freed, pods_freed) && !out.is_empty() {
        Some(out)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cpu: &str, labels: Value, taints: Value) -> NodeInfo {
        NodeInfo::from_node(&json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"taints": taints},
            "status": {"allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "110"}}
        }))
    }

    fn pod(spec: Value) -> Candidate {
        Candidate::new(Arc::new(
            json!({"metadata": {"name": "p", "namespace": "d", "labels": {"app": "a"}}, "spec": spec}),
        ))
    }

    fn nodes(list: Vec<NodeInfo>) -> HashMap<String, NodeInfo> {
        list.into_iter().map(|n| (n.name.clone(), n)).collect()
    }

    #[test]
    fn filters_report_upstream_reasons() {
        let ns = nodes(vec![
            node("small", "500m", json!({"zone": "a"}), json!([])),
            node(
                "tainted",
                "4",
                json!({"zone": "b"}),
                json!([{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]),
            ),
            node("ok", "4", json!({"zone": "c", "disk": "ssd"}), json!([])),
        ]);
        let c = pod(json!({"containers": [{"resources": {"requests": {"cpu": "1"}}}]}));
        assert_eq!(
            filter(&c, &ns["small"], &ns),
            Err("Insufficient cpu".into())
        );
        assert_eq!(
            filter(&c, &ns["tainted"], &ns),
            Err("node(s) had untolerated taint {dedicated: gpu}".into())
        );
        assert_eq!(filter(&c, &ns["ok"], &ns), Ok(()));
        let c = pod(
            json!({"containers": [{}], "tolerations": [{"key": "dedicated", "operator": "Exists"}], "nodeSelector": {"disk": "ssd"}}),
        );
        assert!(filter(&c, &ns["tainted"], &ns)
            .unwrap_err()
            .contains("node affinity/selector"));
        assert_eq!(filter(&c, &ns["ok"], &ns), Ok(()));
        let c = pod(
            json!({"containers": [{}], "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}}),
        );
        assert_eq!(filter(&c, &ns["small"], &ns), Ok(()));
        assert!(filter(&c, &ns["ok"], &ns).is_err());
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

    #[test]
    fn anti_affinity_and_spread_and_ports() {
        let mut ns = nodes(vec![
            node(
                "n1",
                "4",
                json!({"kubernetes.io/hostname": "n1", "zone": "a"}),
                json!([]),
            ),
            node(
                "n2",
                "4",
                json!({"kubernetes.io/hostname": "n2", "zone": "b"}),
                json!([]),
            ),
        ]);
        let existing = Arc::new(
            json!({"metadata": {"name": "x", "namespace": "d", "labels": {"app": "a"}}, "spec": {"containers": [{"ports": [{"containerPort": 80, "hostPort": 8080}]}]}}),
        );
        ns.get_mut("n1").unwrap().add_pod(placed(&existing));
        let c = pod(
            json!({"containers": [{}], "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {"matchLabels": {"app": "a"}}, "topologyKey": "kubernetes.io/hostname"}]}}}),
        );
        assert!(filter(&c, &ns["n1"], &ns)
            .unwrap_err()
            .contains("anti-affinity"));
        assert_eq!(filter(&c, &ns["n2"], &ns), Ok(()));
        let c = pod(json!({"containers": [{"ports": [{"containerPort": 1, "hostPort": 8080}]}]}));
        assert!(filter(&c, &ns["n1"], &ns)
            .unwrap_err()
            .contains("free ports"));
        let c = pod(
            json!({"containers": [{}], "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "a"}}}]}),
        );
        assert!(filter(&c, &ns["n1"], &ns)
            .unwrap_err()
            .contains("topology spread"));
        assert_eq!(filter(&c, &ns["n2"], &ns), Ok(()));
        // Spreading also prefers the emptier node.
        let c = pod(json!({"containers": [{}]}));
        assert!(score(&c, &ns["n2"], &ns) >= score(&c, &ns["n1"], &ns));
    }

    #[test]
    fn preemption_picks_the_lowest_priority_victims() {
        let mut n = node("n", "1", json!({}), json!([]));
        for (name, prio) in [("low", 1), ("mid", 5)] {
            let p = Arc::new(
                json!({"metadata": {"name": name, "namespace": "d"}, "spec": {"priority": prio, "containers": [{"resources": {"requests": {"cpu": "500m"}}}]}}),
            );
            n.add_pod(placed(&p));
        }
        let c = Candidate::new(Arc::new(
            json!({"metadata": {"name": "hi", "namespace": "d"}, "spec": {"priority": 10, "containers": [{"resources": {"requests": {"cpu": "500m"}}}]}}),
        ));
        assert_eq!(victims(&c, &n), Some(vec!["d/low".to_string()]));
        let c = Candidate::new(Arc::new(
            json!({"metadata": {"name": "lo", "namespace": "d"}, "spec": {"priority": 0, "containers": [{"resources": {"requests": {"cpu": "500m"}}}]}}),
        ));
        assert_eq!(victims(&c, &n), None);
    }
}
