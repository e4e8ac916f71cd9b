//! The Endpoints, EndpointSlice and EndpointSlice mirroring controllers, and the Service
//! housekeeping loop (allocation repair, the `kubernetes` Service and its endpoints).
//!
//! For a Service with a selector, the pods it selects (same namespace, with an IP, not
//! finished) become addresses: ready ones in `addresses`, others in `notReadyAddresses`
//! (Endpoints), or endpoints with ready/serving/terminating conditions (EndpointSlices, split at
//! 100 per slice, one set of slices per resolved port set). Named target ports are resolved per
//! pod from its container ports. Services without a selector keep the Endpoints users write;
//! those are mirrored into slices. Writes are minimal: unchanged slices are not rewritten and
//! slices are reused (filled) before new ones are created.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Map, Value};

use crate::api::admission::services;
use crate::api::status::ApiResult;
use crate::controllers::client::{
    is_terminating, key_of, name_of, namespace_of, owner_ref, split_key, uid_of, Client,
};
use crate::controllers::informer::{Change, Informer};
use crate::controllers::pods;
use crate::controllers::queue::Queue;
use crate::controllers::{spawn_workers, Context};

/// Endpoints per EndpointSlice (upstream's `--max-endpoints-per-slice` default).
pub const MAX_PER_SLICE: usize = 100;
/// Addresses an Endpoints object holds at most (upstream truncates beyond).
pub const MAX_ENDPOINTS: usize = 1000;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const SLICE_MANAGER: &str = "endpointslice-controller.k8s.io";
pub const MIRROR_MANAGER: &str = "endpointslicemirroring-controller.k8s.io";
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
const OVER_CAPACITY: &str = "endpoints.kubernetes.io/over-capacity";

// ---------------------------------------------------------------------------------------------
// Pure decisions.

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

fn selector(svc: &Value) -> Option<&Map<String, Value>> {
    svc.pointer("/spec/selector")
        .and_then(Value::as_object)
        .filter(|m| !m.is_empty())
}

/// A Service's map selector against a pod's labels.
pub fn selects(svc: &Value, pod: &Value) -> bool {
    let Some(sel) = selector(svc) else {
        return false;
    };
    let labels = pod.pointer("/metadata/labels").and_then(Value::as_object);
    sel.iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

fn is_headless(svc: &Value) -> bool {
    s(svc, "/spec/clusterIP") == "None"
}

fn publish_not_ready(svc: &Value) -> bool {
    svc.pointer("/spec/publishNotReadyAddresses")
        .and_then(Value::as_bool)
        == Some(true)
}

fn pod_ipv4(pod: &Value) -> Option<String> {
    let from_list = pod
        .pointer("/status/podIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p["ip"].as_str())
        .find(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok());
    from_list
        .or_else(|| {
            Some(s(pod, "/status/podIP")).filter(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok())
        })
        .map(str::to_string)
}

/// Upstream's ShouldPodBeInEndpoints: not finished, with an IP, and not terminating unless
/// `include_terminating`.
fn eligible(pod: &Value, include_terminating: bool) -> bool {
    !matches!(pods::phase(pod), "Succeeded" | "Failed")
        && pod_ipv4(pod).is_some()
        && (include_terminating || !is_terminating(pod))
}

/// The port a service port reaches on `pod` (upstream's FindPort): a number as it is, a name
/// through the pod's container ports of the same protocol.
pub fn find_port(pod: &Value, svc_port: &Value) -> Option<i64> {
    let proto = svc_port["protocol"].as_str().unwrap_or("TCP");
    match &svc_port["targetPort"] {
        Value::Number(n) => n.as_i64(),
        Value::String(name) if !name.is_empty() => pod
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .find(|p| {
                p["name"].as_str() == Some(name.as_str())
                    && p["protocol"].as_str().unwrap_or("TCP") == proto
            })
            .and_then(|p| p["containerPort"].as_i64()),
        _ => svc_port["port"].as_i64(),
    }
}

/// The ports of `svc` resolved for `pod` (ports that do not resolve are left out).
fn resolved_ports(svc: &Value, pod: &Value, slice_style: bool) -> Vec<Value> {
    svc.pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|sp| {
            let port = find_port(pod, sp)?;
            let mut p = Map::new();
            let name = sp["name"].as_str().unwrap_or_default();
            if slice_style || !name.is_empty() {
                p.insert("name".into(), json!(name));
            }
            p.insert("port".into(), json!(port));
            p.insert(
                "protocol".into(),
                json!(sp["protocol"].as_str().unwrap_or("TCP")),
            );
            if let Some(ap) = sp.get("appProtocol").filter(|v| v.is_string()) {
                p.insert("appProtocol".into(), ap.clone());
            }
            Some(Value::Object(p))
        })
        .collect()
}

fn target_ref(pod: &Value) -> Value {
    json!({"kind": "Pod", "namespace": namespace_of(pod), "name": name_of(pod), "uid": uid_of(pod)})
}

/// Upstream's ShouldSetHostname: a pod with a hostname whose subdomain is this Service.
fn hostname(svc: &Value, pod: &Value) -> Option<String> {
    let h = s(pod, "/spec/hostname");
    (!h.is_empty()
        && s(pod, "/spec/subdomain") == name_of(svc)
        && namespace_of(pod) == namespace_of(svc))
    .then(|| h.to_string())
}

/// The labels an Endpoints object carries: the Service's, plus the headless marker.
fn endpoints_labels(svc: &Value) -> Map<String, Value> {
    let mut l = svc
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if is_headless(svc) {
        l.insert(HEADLESS_LABEL.into(), json!(""));
    } else {
        l.remove(HEADLESS_LABEL);
    }
    l
}

/// Ports, ready addresses and not-ready addresses of one Endpoints subset.
type Subset = (Vec<Value>, Vec<Value>, Vec<Value>);

/// The subsets of a selector Service's Endpoints (upstream's endpoints controller, repacked:
/// addresses grouped by the ports they resolve to), and whether they were truncated at
/// [`MAX_ENDPOINTS`].
pub fn endpoints_subsets(svc: &Value, pods: &[Arc<Value>]) -> (Vec<Value>, bool) {
    let tolerate = publish_not_ready(svc);
    let has_ports = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    // Port set (JSON) → (ports, ready, not ready).
    let mut groups: BTreeMap<String, Subset> = BTreeMap::new();
    for pod in pods {
        if !selects(svc, pod) || !eligible(pod, tolerate) {
            continue;
        }
        let ip = pod_ipv4(pod).unwrap_or_default();
        let mut addr = Map::new();
        addr.insert("ip".into(), json!(ip));
        if let Some(h) = hostname(svc, pod) {
            addr.insert("hostname".into(), json!(h));
        }
        let node = s(pod, "/spec/nodeName");
        if !node.is_empty() {
            addr.insert("nodeName".into(), json!(node));
        }
        addr.insert("targetRef".into(), target_ref(pod));
        let ports = if has_ports {
            let p = resolved_ports(svc, pod, false);
            if p.is_empty() {
                continue;
            }
            p
        } else if is_headless(svc) {
            vec![]
        } else {
            continue;
        };
        let key = serde_json::to_string(&ports).unwrap_or_default();
        let g = groups.entry(key).or_insert_with(|| (ports, vec![], vec![]));
        if tolerate || pods::is_ready(pod) {
            g.1.push(Value::Object(addr));
        } else {
            g.2.push(Value::Object(addr));
        }
    }
    let by_ip = |a: &Value, b: &Value| {
        (
            a["ip"].as_str(),
            a.pointer("/targetRef/uid").and_then(Value::as_str),
        )
            .cmp(&(
                b["ip"].as_str(),
                b.pointer("/targetRef/uid").and_then(Value::as_str),
            ))
    };
    let mut total = 0usize;
    let mut truncated = false;
    let mut out = Vec::new();
    // Ready addresses are kept first when truncating.
    let mut groups: Vec<Subset> = groups.into_values().collect();
    for g in &mut groups {
        g.1.sort_by(by_ip);
        g.2.sort_by(by_ip);
        let room = MAX_ENDPOINTS.saturating_sub(total);
        if g.1.len() > room {
            g.1.truncate(room);
            truncated = true;
        }
        total += g.1.len();
    }
    for g in &mut groups {
        let room = MAX_ENDPOINTS.saturating_sub(total);
        if g.2.len() > room {
            g.2.truncate(room);
            truncated = true;
        }
        total += g.2.len();
    }
    for (ports, ready, not_ready) in groups {
        if ready.is_empty() && not_ready.is_empty() {
            continue;
        }
        let mut sub = Map::new();
        if !ready.is_empty() {
            sub.insert("addresses".into(), Value::Array(ready));
        }
        if !not_ready.is_empty() {
            sub.insert("notReadyAddresses".into(), Value::Array(not_ready));
        }
        if !ports.is_empty() {
            sub.insert("ports".into(), Value::Array(ports));
        }
        out.push(Value::Object(sub));
    }
    (out, truncated)
}

/// The last change that made the endpoints what they are (an approximation of upstream's
/// trigger time tracker): the latest of the Service's creation and the selected pods' Ready
/// transitions and deletion marks.
pub fn trigger_time(svc: &Value, pods: &[Arc<Value>]) -> String {
    let mut t = s(svc, "/metadata/creationTimestamp").to_string();
    for pod in pods.iter().filter(|p| selects(svc, p)) {
        let ready = pod
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Ready")
            .and_then(|c| c["lastTransitionTime"].as_str())
            .unwrap_or_default();
        for c in [ready, s(pod, "/metadata/deletionTimestamp")] {
            // RFC 3339 UTC timestamps of one format compare as strings.
            if c > t.as_str() {
                t = c.to_string();
            }
        }
    }
    t
}

/// One set of endpoints sharing ports and an address type, as slices hold them.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub address_type: String,
    pub ports: Vec<Value>,
    pub endpoints: Vec<Value>,
}

fn group_key(address_type: &str, ports: &[Value]) -> String {
    let canon: Vec<Value> = ports
        .iter()
        .map(|p| {
            json!([
                p["name"].as_str().unwrap_or_default(),
                p["port"].as_i64(),
                p["protocol"].as_str().unwrap_or("TCP"),
                p["appProtocol"]
            ])
        })
        .collect();
    format!("{address_type}{}", Value::Array(canon))
}

fn endpoint_key(ep: &Value) -> String {
    ep.pointer("/addresses/0")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// The endpoints of a selector Service, grouped by resolved ports (upstream's
/// endpointslice reconciler input). `zones` maps node names to their zone label.
pub fn slice_groups(
    svc: &Value,
    pods: &[Arc<Value>],
    zones: &HashMap<String, String>,
) -> BTreeMap<String, Group> {
    let publish = publish_not_ready(svc);
    let has_ports = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for pod in pods {
        if !selects(svc, pod) || !eligible(pod, true) {
            continue;
        }
        let ports = if has_ports {
            let p = resolved_ports(svc, pod, true);
            if p.is_empty() {
                continue;
            }
            p
        } else {
            vec![]
        };
        let serving = publish || pods::is_ready(pod);
        let terminating = is_terminating(pod);
        let ready = publish || (serving && !terminating);
        let mut ep = Map::new();
        ep.insert("addresses".into(), json!([pod_ipv4(pod)]));
        ep.insert(
            "conditions".into(),
            json!({"ready": ready, "serving": serving, "terminating": terminating}),
        );
        if let Some(h) = hostname(svc, pod) {
            ep.insert("hostname".into(), json!(h));
        }
        let node = s(pod, "/spec/nodeName");
        if !node.is_empty() {
            ep.insert("nodeName".into(), json!(node));
            if let Some(z) = zones.get(node) {
                ep.insert("zone".into(), json!(z));
            }
        }
        ep.insert("targetRef".into(), target_ref(pod));
        let key = group_key("IPv4", &ports);
        groups
            .entry(key)
            .or_insert_with(|| Group {
                address_type: "IPv4".into(),
                ports,
                endpoints: vec![],
            })
            .endpoints
            .push(Value::Object(ep));
    }
    for g in groups.values_mut() {
        g.endpoints.sort_by_key(endpoint_key);
    }
    groups
}

/// User-written Endpoints as slice groups (upstream's endpointslicemirroring controller):
/// ready addresses and not-ready ones, per subset's ports and address family.
pub fn mirror_groups(ep: &Value) -> BTreeMap<String, Group> {
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for sub in ep["subsets"].as_array().into_iter().flatten() {
        let ports: Vec<Value> = sub["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let mut m = Map::new();
                m.insert("name".into(), json!(p["name"].as_str().unwrap_or_default()));
                m.insert("port".into(), p["port"].clone());
                m.insert(
                    "protocol".into(),
                    json!(p["protocol"].as_str().unwrap_or("TCP")),
                );
                if let Some(ap) = p.get("appProtocol").filter(|v| v.is_string()) {
                    m.insert("appProtocol".into(), ap.clone());
                }
                Value::Object(m)
            })
            .collect();
        for (list, ready) in [("addresses", true), ("notReadyAddresses", false)] {
            for a in sub[list].as_array().into_iter().flatten() {
                let ip = a["ip"].as_str().unwrap_or_default();
                let family = match ip.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V4(_)) => "IPv4",
                    Ok(std::net::IpAddr::V6(_)) => "IPv6",
                    Err(_) => continue,
                };
                let mut e = Map::new();
                e.insert("addresses".into(), json!([ip]));
                e.insert("conditions".into(), json!({"ready": ready}));
                for f in ["hostname", "nodeName", "targetRef"] {
                    if let Some(v) = a.get(f).filter(|v| !v.is_null()) {
                        e.insert(f.into(), v.clone());
                    }
                }
                let key = group_key(family, &ports);
                let g = groups.entry(key).or_insert_with(|| Group {
                    address_type: family.into(),
                    ports: ports.clone(),
                    endpoints: vec![],
                });
                if !g.endpoints.iter().any(|x| endpoint_key(x) == ip) {
                    g.endpoints.push(Value::Object(e));
                }
            }
        }
    }
    for g in groups.values_mut() {
        g.endpoints.sort_by_key(endpoint_key);
        g.endpoints.truncate(MAX_ENDPOINTS);
    }
    groups
}

/// What the slices of one Service should carry besides their endpoints.
#[derive(Clone, Debug)]
pub struct SliceMeta {
    pub namespace: String,
    pub generate_name: String,
    pub labels: Map<String, Value>,
    pub owner: Value,
    /// Keep one empty slice when there are no endpoints (the selector controller does).
    pub placeholder: bool,
    pub trigger_time: Option<String>,
}

/// Writes that bring a Service's slices to the desired groups.
#[derive(Debug, Default)]
pub struct SlicePlan {
    pub create: Vec<Value>,
    /// Whole slices (with their resourceVersion) to write back.
    pub update: Vec<Value>,
    /// Names and uids.
    pub delete: Vec<(String, String)>,
}

impl SlicePlan {
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }
}

fn slice_ports(slice: &Value) -> Vec<Value> {
    slice["ports"].as_array().cloned().unwrap_or_default()
}

fn slice_endpoints(slice: &Value) -> Vec<Value> {
    slice["endpoints"].as_array().cloned().unwrap_or_default()
}

/// Whether the slice's metadata (labels, owner) is what `meta` wants.
fn meta_ok(slice: &Value, meta: &SliceMeta) -> bool {
    let labels = slice
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let owners = slice
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    labels == meta.labels && owners == vec![meta.owner.clone()]
}

fn build_slice(
    base: Option<&Value>,
    meta: &SliceMeta,
    g: Option<&Group>,
    eps: Vec<Value>,
) -> Value {
    let mut sl = match base {
        Some(b) => b.clone(),
        None => json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"generateName": meta.generate_name, "namespace": meta.namespace},
        }),
    };
    let md = sl["metadata"].as_object_mut().expect("metadata");
    md.insert("labels".into(), Value::Object(meta.labels.clone()));
    md.insert("ownerReferences".into(), json!([meta.owner]));
    if let Some(t) = &meta.trigger_time {
        let ann = md
            .entry("annotations")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("annotations");
        ann.insert(TRIGGER_TIME.into(), json!(t));
    }
    let o = sl.as_object_mut().expect("object");
    o.insert(
        "addressType".into(),
        json!(g.map_or("IPv4", |g| g.address_type.as_str())),
    );
    o.insert("endpoints".into(), Value::Array(eps));
    match g.filter(|g| !g.ports.is_empty()) {
        Some(g) => o.insert("ports".into(), Value::Array(g.ports.clone())),
        None => o.remove("ports"),
    };
    sl
}

/// Upstream's reconciler, simplified: existing slices of each port set keep the endpoints
/// still wanted (updated in place), gain new ones while they have room (slices already being
/// written first), and new slices take the rest, 100 at most each. Slices left empty and slices
/// of port sets no longer wanted go; an unchanged slice is never rewritten.
pub fn plan_slices(
    groups: &BTreeMap<String, Group>,
    existing: &[Arc<Value>],
    meta: &SliceMeta,
) -> SlicePlan {
    let mut plan = SlicePlan::default();
    let mut existing: Vec<&Arc<Value>> = existing.iter().collect();
    existing.sort_by(|a, b| name_of(a).cmp(name_of(b)));
    let total: usize = groups.values().map(|g| g.endpoints.len()).sum();
    if total == 0 {
        if !meta.placeholder {
            plan.delete = existing
                .iter()
                .map(|s| (name_of(s).to_string(), uid_of(s).to_string()))
                .collect();
            return plan;
        }
        // One empty slice (reuse one, preferably one that already is empty).
        let keep = existing
            .iter()
            .position(|s| slice_endpoints(s).is_empty() && slice_ports(s).is_empty())
            .or(if existing.is_empty() { None } else { Some(0) });
        for (i, s) in existing.iter().enumerate() {
            if Some(i) != keep {
                plan.delete
                    .push((name_of(s).to_string(), uid_of(s).to_string()));
            }
        }
        match keep.map(|i| existing[i]) {
            Some(s) => {
                if !(slice_endpoints(s).is_empty() && slice_ports(s).is_empty() && meta_ok(s, meta))
                {
                    plan.update.push(build_slice(Some(s), meta, None, vec![]));
                }
            }
            None => plan.create.push(build_slice(None, meta, None, vec![])),
        }
        return plan;
    }
    let mut by_group: BTreeMap<String, Vec<&Arc<Value>>> = BTreeMap::new();
    for s in existing {
        let key = group_key(s["addressType"].as_str().unwrap_or("IPv4"), &slice_ports(s));
        by_group.entry(key).or_default().push(s);
    }
    for (key, g) in groups {
        let mut pending: BTreeMap<String, &Value> =
            g.endpoints.iter().map(|e| (endpoint_key(e), e)).collect();
        // (slice, its new endpoints, changed)
        let mut kept: Vec<(&Arc<Value>, Vec<Value>, bool)> = Vec::new();
        for s in by_group.remove(key).unwrap_or_default() {
            let mut eps = Vec::new();
            let mut changed = !meta_ok(s, meta);
            for e in slice_endpoints(s) {
                match pending.remove(&endpoint_key(&e)) {
                    Some(want) => {
                        if *want != e {
                            changed = true;
                        }
                        eps.push(want.clone());
                    }
                    None => changed = true,
                }
            }
            kept.push((s, eps, changed));
        }
        // Fill slices with room: those being written anyway first.
        for pass in [true, false] {
            for k in kept.iter_mut().filter(|k| k.2 == pass) {
                while k.1.len() < MAX_PER_SLICE {
                    let Some((_, e)) = pending.pop_first() else {
                        break;
                    };
                    k.1.push(e.clone());
                    k.2 = true;
                }
            }
        }
        for (s, eps, changed) in kept {
            if eps.is_empty() {
                plan.delete
                    .push((name_of(s).to_string(), uid_of(s).to_string()));
            } else if changed {
                plan.update.push(build_slice(Some(s), meta, Some(g), eps));
            }
        }
        let rest: Vec<Value> = pending.into_values().cloned().collect();
        for chunk in rest.chunks(MAX_PER_SLICE) {
            plan.create
                .push(build_slice(None, meta, Some(g), chunk.to_vec()));
        }
    }
    for slices in by_group.into_values() {
        for s in slices {
            plan.delete
                .push((name_of(s).to_string(), uid_of(s).to_string()));
        }
    }
    plan
}

/// The labels of a selector Service's slices.
pub fn slice_labels(svc: &Value, manager: &str) -> Map<String, Value> {
    let mut l = endpoints_labels(svc);
    l.insert(SERVICE_NAME_LABEL.into(), json!(name_of(svc)));
    l.insert(MANAGED_BY_LABEL.into(), json!(manager));
    l
}

/// The labels of slices mirrored from user Endpoints.
fn mirror_labels(ep: &Value, svc: &Value) -> Map<String, Value> {
    let mut l = ep
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    l.remove(SKIP_MIRROR_LABEL);
    l.insert(SERVICE_NAME_LABEL.into(), json!(name_of(svc)));
    l.insert(MANAGED_BY_LABEL.into(), json!(MIRROR_MANAGER));
    l
}

// ---------------------------------------------------------------------------------------------
// The controllers.

/// Slices written and not yet seen in the informer (upstream's endpointSliceTracker): a sync
/// waits for them rather than deciding on a stale cache.
#[derive(Default)]
struct Tracker {
    inner: Mutex<HashMap<String, Tracked>>,
}

/// Slices written (name, resourceVersion), slices deleted, and when.
type Tracked = (Vec<(String, i64)>, Vec<String>, Instant);

impl Tracker {
    fn record(&self, key: &str, written: Vec<(String, i64)>, deleted: Vec<String>) {
        self.inner
            .lock()
            .insert(key.to_string(), (written, deleted, Instant::now()));
    }

    /// Whether the informer shows every write made for `key` (then forgets them).
    fn observed(&self, key: &str, slices: &Informer, ns: &str) -> bool {
        let mut g = self.inner.lock();
        let Some((written, deleted, at)) = g.get(key) else {
            return true;
        };
        let seen = written.iter().all(|(name, rv)| {
            slices.get(&format!("{ns}/{name}")).is_some_and(|s| {
                s.pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .and_then(|r| r.parse::<i64>().ok())
                    .is_some_and(|r| r >= *rv)
            })
        }) && deleted
            .iter()
            .all(|name| slices.get(&format!("{ns}/{name}")).is_none());
        if seen || at.elapsed() > Duration::from_secs(30) {
            g.remove(key);
            return true;
        }
        false
    }
}

fn rv_of(v: &Value) -> i64 {
    v.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// Applies a slice plan; returns what was written (for the tracker).
async fn apply_plan(
    client: &Client,
    ns: &str,
    plan: SlicePlan,
) -> ApiResult<(Vec<(String, i64)>, Vec<String>)> {
    let def = client.def("discovery.k8s.io", "v1", "endpointslices");
    let mut written = Vec::new();
    let mut deleted = Vec::new();
    // Updates and creates concurrently: each is its own write.
    let updates = plan.update.into_iter().map(|sl| {
        let def = def.clone();
        async move { client.update(&def, Some(ns), sl).await }
    });
    for r in futures::future::join_all(updates).await {
        let o = r?;
        written.push((name_of(&o).to_string(), rv_of(&o)));
    }
    let creates = plan.create.into_iter().map(|sl| {
        let def = def.clone();
        async move { client.create(&def, Some(ns), sl).await }
    });
    for r in futures::future::join_all(creates).await {
        let o = r?;
        written.push((name_of(&o).to_string(), rv_of(&o)));
    }
    for (name, uid) in plan.delete {
        match client.delete_uid(&def, Some(ns), &name, &uid, None).await {
            Ok(_) => deleted.push(name),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok((written, deleted))
}

/// The slices of `svc_name` in `ns` managed by `manager`.
fn slices_of(slices: &Informer, ns: &str, svc_name: &str, manager: &str) -> Vec<Arc<Value>> {
    slices
        .list_namespace(ns)
        .into_iter()
        .filter(|sl| {
            s(
                sl,
                &format!("/metadata/labels/{}", SERVICE_NAME_LABEL.replace('/', "~1")),
            ) == svc_name
                && s(
                    sl,
                    &format!("/metadata/labels/{}", MANAGED_BY_LABEL.replace('/', "~1")),
                ) == manager
        })
        .collect()
}

fn slice_service_key(sl: &Value, manager: &str) -> Option<String> {
    let labels = sl.pointer("/metadata/labels")?.as_object()?;
    if labels.get(MANAGED_BY_LABEL)?.as_str()? != manager {
        return None;
    }
    let svc = labels.get(SERVICE_NAME_LABEL)?.as_str()?;
    Some(format!("{}/{svc}", namespace_of(sl)))
}

struct Controllers {
    client_ep: Client,
    client_slice: Client,
    client_mirror: Client,
    services: Arc<Informer>,
    pods: Arc<Informer>,
    endpoints: Arc<Informer>,
    slices: Arc<Informer>,
    nodes: Arc<Informer>,
    tracker: Tracker,
    mirror_tracker: Tracker,
}

impl Controllers {
    /// Services of the pod's namespace that select it.
    fn services_of(&self, pod: &Value) -> Vec<String> {
        self.services
            .list_namespace(namespace_of(pod))
            .iter()
            .filter(|svc| selects(svc, pod))
            .map(|svc| key_of(svc))
            .collect()
    }

    fn pods_for(&self, svc: &Value) -> Vec<Arc<Value>> {
        self.pods
            .list_namespace(namespace_of(svc))
            .into_iter()
            .filter(|p| selects(svc, p))
            .collect()
    }

    async fn sync_endpoints(&self, key: String) -> ApiResult<Option<Duration>> {
        let (ns, name) = split_key(&key);
        let ns = ns.unwrap_or_default();
        let def = self.client_ep.def("", "v1", "endpoints");
        let cur = self.endpoints.get(&key);
        let Some(svc) = self.services.get(&key) else {
            // The Service is gone: so are its Endpoints (as upstream).
            if let Some(cur) = cur {
                if cur.pointer("/metadata/labels/endpointslice.kubernetes.io~1skip-mirror")
                    != Some(&json!("true"))
                {
                    match self
                        .client_ep
                        .delete_uid(&def, Some(ns), name, uid_of(&cur), None)
                        .await
                    {
                        Ok(_) => {}
                        Err(e) if e.code == 404 || e.code == 409 => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            return Ok(None);
        };
        if selector(&svc).is_none() {
            return Ok(None);
        }
        let pods = self.pods_for(&svc);
        let (subsets, truncated) = endpoints_subsets(&svc, &pods);
        let labels = endpoints_labels(&svc);
        if let Some(cur) = &cur {
            let cur_subsets = cur["subsets"].as_array().cloned().unwrap_or_default();
            let cur_labels = cur
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let cur_trunc = cur
                .pointer("/metadata/annotations/endpoints.kubernetes.io~1over-capacity")
                .is_some();
            if cur_subsets == subsets && cur_labels == labels && cur_trunc == truncated {
                return Ok(None);
            }
        }
        let mut ann = cur
            .as_ref()
            .and_then(|c| c.pointer("/metadata/annotations"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        ann.insert(TRIGGER_TIME.into(), json!(trigger_time(&svc, &pods)));
        if truncated {
            ann.insert(OVER_CAPACITY.into(), json!("truncated"));
        } else {
            ann.remove(OVER_CAPACITY);
        }
        match cur {
            Some(cur) => {
                let mut o = (*cur).clone();
                o["metadata"]["labels"] = Value::Object(labels);
                o["metadata"]["annotations"] = Value::Object(ann);
                o["subsets"] = Value::Array(subsets);
                self.client_ep.update(&def, Some(ns), o).await?;
            }
            None => {
                let o = json!({
                    "apiVersion": "v1", "kind": "Endpoints",
                    "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": ann},
                    "subsets": subsets,
                });
                self.client_ep.create(&def, Some(ns), o).await?;
            }
        }
        Ok(None)
    }

    async fn sync_slices(&self, key: String) -> ApiResult<Option<Duration>> {
        let (ns, name) = split_key(&key);
        let ns = ns.unwrap_or_default();
        if !self.tracker.observed(&key, &self.slices, ns) {
            return Ok(Some(Duration::from_millis(20)));
        }
        let existing = slices_of(&self.slices, ns, name, SLICE_MANAGER);
        let svc = self.services.get(&key);
        let wanted = svc
            .as_ref()
            .filter(|svc| selector(svc).is_some() && s(svc, "/spec/type") != "ExternalName");
        let Some(svc) = wanted else {
            // Gone (the garbage collector takes its slices) or without selector: none of ours.
            if svc.is_some() && !existing.is_empty() {
                let plan = SlicePlan {
                    delete: existing
                        .iter()
                        .map(|s| (name_of(s).to_string(), uid_of(s).to_string()))
                        .collect(),
                    ..Default::default()
                };
                let (w, d) = apply_plan(&self.client_slice, ns, plan).await?;
                self.tracker.record(&key, w, d);
            }
            return Ok(None);
        };
        let pods = self.pods_for(svc);
        let zones: HashMap<String, String> = self
            .nodes
            .list()
            .iter()
            .filter_map(|n| {
                let z = n
                    .pointer("/metadata/labels/topology.kubernetes.io~1zone")
                    .and_then(Value::as_str)?;
                Some((name_of(n).to_string(), z.to_string()))
            })
            .collect();
        let groups = slice_groups(svc, &pods, &zones);
        let mut owner = owner_ref(svc, true);
        owner["apiVersion"] = json!("v1");
        owner["kind"] = json!("Service");
        let meta = SliceMeta {
            namespace: ns.to_string(),
            generate_name: format!("{name}-"),
            labels: slice_labels(svc, SLICE_MANAGER),
            owner,
            placeholder: true,
            trigger_time: Some(trigger_time(svc, &pods)),
        };
        let plan = plan_slices(&groups, &existing, &meta);
        if plan.is_empty() {
            return Ok(None);
        }
        let (w, d) = apply_plan(&self.client_slice, ns, plan).await?;
        self.tracker.record(&key, w, d);
        Ok(None)
    }

    async fn sync_mirror(&self, key: String) -> ApiResult<Option<Duration>> {
        let (ns, name) = split_key(&key);
        let ns = ns.unwrap_or_default();
        if !self.mirror_tracker.observed(&key, &self.slices, ns) {
            return Ok(Some(Duration::from_millis(20)));
        }
        let existing = slices_of(&self.slices, ns, name, MIRROR_MANAGER);
        let ep = self.endpoints.get(&key);
        let svc = self.services.get(&key);
        let mirrored = match (&ep, &svc) {
            (Some(ep), Some(svc))
                if selector(svc).is_none()
                    && ep.pointer("/metadata/labels/endpointslice.kubernetes.io~1skip-mirror")
                        != Some(&json!("true")) =>
            {
                Some((ep.clone(), svc.clone()))
            }
            _ => None,
        };
        let plan = match &mirrored {
            None => SlicePlan {
                delete: existing
                    .iter()
                    .map(|s| (name_of(s).to_string(), uid_of(s).to_string()))
                    .collect(),
                ..Default::default()
            },
            Some((ep, svc)) => {
                let mut owner = owner_ref(ep, true);
                owner["apiVersion"] = json!("v1");
                owner["kind"] = json!("Endpoints");
                let meta = SliceMeta {
                    namespace: ns.to_string(),
                    generate_name: format!("{name}-"),
                    labels: mirror_labels(ep, svc),
                    owner,
                    placeholder: false,
                    trigger_time: ep
                        .pointer("/metadata/annotations/endpoints.kubernetes.io~1last-change-trigger-time")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                };
                plan_slices(&mirror_groups(ep), &existing, &meta)
            }
        };
        if plan.is_empty() {
            return Ok(None);
        }
        let (w, d) = apply_plan(&self.client_mirror, ns, plan).await?;
        self.mirror_tracker.record(&key, w, d);
        Ok(None)
    }
}

/// Repair of service allocations every 3 minutes (and soon after Services are deleted), and
/// the `kubernetes` Service and endpoints kept as configured every 10 seconds.
async fn housekeeping(ctx: Arc<Context>, poke: Arc<tokio::sync::Notify>) {
    let mut last_repair: Option<Instant> = None;
    loop {
        if let Err(e) = services::ensure_kubernetes(&ctx.st).await {
            tracing::warn!(error = %e, "reconciling the kubernetes Service endpoints");
        }
        if last_repair.is_none_or(|t| t.elapsed() >= Duration::from_secs(180)) {
            match services::repair(&ctx.st).await {
                Ok(r) => {
                    if r.released > 0 || r.restored > 0 {
                        tracing::info!(
                            released = r.released,
                            restored = r.restored,
                            "repaired service allocations"
                        );
                    }
                    for c in r.conflicts {
                        tracing::warn!(conflict = %c, "service allocation held twice");
                    }
                    last_repair = Some(Instant::now());
                }
                Err(e) => tracing::warn!(error = %e, "repairing service allocations"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = poke.notified() => {
                // Let a burst of deletions (a namespace going) finish first.
                tokio::time::sleep(Duration::from_secs(1)).await;
                last_repair = None;
            }
        }
    }
}

/// Starts the three controllers and the housekeeping loop.
pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client_ep = ctx.client("endpoint-controller");
    let c = Arc::new(Controllers {
        services: ctx.informers.get(&client_ep.def("", "v1", "services")),
        pods: ctx.informers.get(&client_ep.def("", "v1", "pods")),
        endpoints: ctx.informers.get(&client_ep.def("", "v1", "endpoints")),
        slices: ctx
            .informers
            .get(&client_ep.def("discovery.k8s.io", "v1", "endpointslices")),
        nodes: ctx.informers.get(&client_ep.def("", "v1", "nodes")),
        client_slice: ctx.client("endpointslice-controller"),
        client_mirror: ctx.client("endpointslicemirroring-controller"),
        client_ep,
        tracker: Tracker::default(),
        mirror_tracker: Tracker::default(),
    });
    let ep_queue = Queue::new();
    let slice_queue = Queue::new();
    let mirror_queue = Queue::new();
    let poke = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    {
        let c = c.clone();
        let (epq, slq, mq, poke) = (
            ep_queue.clone(),
            slice_queue.clone(),
            mirror_queue.clone(),
            poke.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut svc_rx = c.services.subscribe();
            let mut pod_rx = c.pods.subscribe();
            let mut ep_rx = c.endpoints.subscribe();
            let mut slice_rx = c.slices.subscribe();
            for inf in [&c.services, &c.pods, &c.endpoints, &c.slices, &c.nodes] {
                inf.wait_synced().await;
            }
            for svc in c.services.list() {
                let k = key_of(&svc);
                epq.add(k.clone());
                slq.add(k.clone());
                mq.add(k);
            }
            // Endpoints left behind by Services deleted while no controller ran.
            for ep in c.endpoints.list() {
                if c.services.get(&key_of(&ep)).is_none() {
                    epq.add(key_of(&ep));
                }
            }
            loop {
                tokio::select! {
                    Some(ch) = svc_rx.recv() => {
                        let k = key_of(ch.object());
                        if matches!(ch, Change::Deleted(_)) {
                            poke.notify_one();
                        }
                        epq.add(k.clone());
                        slq.add(k.clone());
                        mq.add(k);
                    }
                    Some(ch) = pod_rx.recv() => {
                        let mut keys = c.services_of(ch.object());
                        if let Change::Updated { old, new } = &ch {
                            if old.pointer("/metadata/labels") != new.pointer("/metadata/labels") {
                                for k in c.services_of(old) {
                                    if !keys.contains(&k) {
                                        keys.push(k);
                                    }
                                }
                            }
                            // Only what endpoints show matters.
                            if !endpoint_relevant_change(old, new) {
                                keys.clear();
                            }
                        }
                        for k in keys {
                            epq.add(k.clone());
                            slq.add(k);
                        }
                    }
                    Some(ch) = ep_rx.recv() => {
                        let k = key_of(ch.object());
                        mq.add(k.clone());
                        if matches!(ch, Change::Deleted(_)) && c.services.get(&k).is_some() {
                            epq.add(k);
                        }
                    }
                    Some(ch) = slice_rx.recv() => {
                        for o in changed_objects(&ch) {
                            if let Some(k) = slice_service_key(o, SLICE_MANAGER) {
                                slq.add(k);
                            }
                            if let Some(k) = slice_service_key(o, MIRROR_MANAGER) {
                                mq.add(k);
                            }
                        }
                    }
                    else => return,
                }
            }
        }));
    }
    let c1 = c.clone();
    tasks.extend(spawn_workers(
        ep_queue,
        2,
        "endpoint-controller",
        move |key| {
            let c = c1.clone();
            async move { c.sync_endpoints(key).await }
        },
    ));
    let c2 = c.clone();
    tasks.extend(spawn_workers(
        slice_queue,
        2,
        "endpointslice-controller",
        move |key| {
            let c = c2.clone();
            async move { c.sync_slices(key).await }
        },
    ));
    let c3 = c.clone();
    tasks.extend(spawn_workers(
        mirror_queue,
        1,
        "endpointslicemirroring-controller",
        move |key| {
            let c = c3.clone();
            async move { c.sync_mirror(key).await }
        },
    ));
    tasks.push(tokio::spawn(housekeeping(ctx, poke)));
    tasks
}

fn changed_objects(ch: &Change) -> Vec<&Arc<Value>> {
    match ch {
        Change::Added(o) | Change::Deleted(o) => vec![o],
        Change::Updated { old, new } => vec![old, new],
    }
}

/// Whether a pod update can change endpoints: IPs, readiness, phase, deletion, node, labels,
/// hostname/subdomain (container ports cannot change).
fn endpoint_relevant_change(old: &Value, new: &Value) -> bool {
    let facts = |p: &Value| {
        (
            pod_ipv4(p),
            pods::is_ready(p),
            pods::phase(p).to_string(),
            is_terminating(p),
            s(p, "/spec/nodeName").to_string(),
            p.pointer("/metadata/labels").cloned(),
            s(p, "/spec/hostname").to_string(),
            s(p, "/spec/subdomain").to_string(),
            p.pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().find(|c| c["type"] == "Ready"))
                .map(|c| c["lastTransitionTime"].clone()),
        )
    };
    facts(old) != facts(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ports: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "d", "uid": "s1", "labels": {"team": "a"},
                            "creationTimestamp": "2025-01-01T00:00:00Z"},
               "spec": {"selector": {"app": "web"}, "clusterIP": "10.43.0.7", "ports": ports}})
    }

    fn pod(name: &str, ip: &str, ready: bool) -> Arc<Value> {
        Arc::new(json!({
            "metadata": {"name": name, "namespace": "d", "uid": format!("u-{name}"), "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
                                       "lastTransitionTime": "2025-01-02T00:00:00Z"}]},
        }))
    }

    fn meta() -> SliceMeta {
        let s = svc(json!([{"port": 80}]));
        SliceMeta {
            namespace: "d".into(),
            generate_name: "web-".into(),
            labels: slice_labels(&s, SLICE_MANAGER),
            owner: owner_ref(&s, true),
            placeholder: true,
            trigger_time: None,
        }
    }

    #[test]
    fn named_target_ports_resolve_per_pod_and_unresolved_pods_are_left_out() {
        let s = svc(json!([{"name": "web", "port": 80, "targetPort": "http", "protocol": "TCP"}]));
        let mut other = (*pod("b", "10.42.0.3", true)).clone();
        other["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(9090);
        let mut unnamed = (*pod("c", "10.42.0.4", true)).clone();
        unnamed["spec"]["containers"][0]["ports"] = json!([]);
        let pods = vec![
            pod("a", "10.42.0.2", true),
            Arc::new(other),
            Arc::new(unnamed),
        ];
        let (subsets, truncated) = endpoints_subsets(&s, &pods);
        assert!(!truncated);
        assert_eq!(subsets.len(), 2, "two port sets: {subsets:#?}");
        let ports: Vec<i64> = subsets
            .iter()
            .map(|s| s["ports"][0]["port"].as_i64().unwrap())
            .collect();
        assert_eq!(ports, vec![8080, 9090]);
        assert_eq!(subsets[0]["addresses"][0]["ip"], "10.42.0.2");
        assert_eq!(subsets[0]["addresses"][0]["targetRef"]["name"], "a");
        assert_eq!(subsets[0]["ports"][0]["name"], "web");
        let groups = slice_groups(&s, &pods, &HashMap::new());
        assert_eq!(groups.len(), 2);
        // Numeric target ports and defaults.
        let s = svc(json!([{"port": 80, "targetPort": 8443}]));
        let (subsets, _) = endpoints_subsets(&s, &pods);
        assert_eq!(
            subsets[0]["ports"],
            json!([{"port": 8443, "protocol": "TCP"}])
        );
        assert_eq!(subsets[0]["addresses"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn readiness_decides_addresses_and_slice_conditions() {
        let s = svc(json!([{"port": 80, "targetPort": 80}]));
        let mut terminating = (*pod("t", "10.42.0.9", true)).clone();
        terminating["metadata"]["deletionTimestamp"] = json!("2025-01-03T00:00:00Z");
        let mut done = (*pod("done", "10.42.0.8", false)).clone();
        done["status"]["phase"] = json!("Succeeded");
        let mut no_ip = (*pod("noip", "", false)).clone();
        no_ip["status"]["podIPs"] = json!([]);
        let pods = vec![
            pod("r", "10.42.0.2", true),
            pod("nr", "10.42.0.3", false),
            Arc::new(terminating),
            Arc::new(done),
            Arc::new(no_ip),
        ];
        let (subsets, _) = endpoints_subsets(&s, &pods);
        assert_eq!(subsets.len(), 1);
        assert_eq!(subsets[0]["addresses"].as_array().unwrap().len(), 1);
        assert_eq!(subsets[0]["notReadyAddresses"][0]["ip"], "10.42.0.3");
        let groups = slice_groups(&s, &pods, &HashMap::new());
        let eps = &groups.values().next().unwrap().endpoints;
        let cond = |ip: &str| {
            eps.iter()
                .find(|e| e["addresses"][0] == ip)
                .map(|e| e["conditions"].clone())
        };
        assert_eq!(
            cond("10.42.0.2"),
            Some(json!({"ready": true, "serving": true, "terminating": false}))
        );
        assert_eq!(
            cond("10.42.0.3"),
            Some(json!({"ready": false, "serving": false, "terminating": false}))
        );
        assert_eq!(
            cond("10.42.0.9"),
            Some(json!({"ready": false, "serving": true, "terminating": true}))
        );
        assert_eq!(cond("10.42.0.8"), None, "finished pods have no endpoint");
        // publishNotReadyAddresses: everything is ready.
        let mut p = s.clone();
        p["spec"]["publishNotReadyAddresses"] = json!(true);
        let (subsets, _) = endpoints_subsets(&p, &pods);
        assert_eq!(subsets[0]["addresses"].as_array().unwrap().len(), 3);
        assert!(subsets[0].get("notReadyAddresses").is_none());
    }

    #[test]
    fn stateful_pods_get_hostnames_in_their_headless_service() {
        let mut s = svc(json!([]));
        s["spec"]["clusterIP"] = json!("None");
        let mut p = (*pod("web-0", "10.42.0.2", true)).clone();
        p["spec"]["hostname"] = json!("web-0");
        p["spec"]["subdomain"] = json!("web");
        let pods = vec![Arc::new(p)];
        let (subsets, _) = endpoints_subsets(&s, &pods);
        assert_eq!(subsets[0]["addresses"][0]["hostname"], "web-0");
        assert!(subsets[0].get("ports").is_none());
        assert_eq!(endpoints_labels(&s)[HEADLESS_LABEL], "");
        let groups = slice_groups(&s, &pods, &HashMap::new());
        assert_eq!(
            groups.values().next().unwrap().endpoints[0]["hostname"],
            "web-0"
        );
    }

    fn many(n: usize) -> Vec<Arc<Value>> {
        (0..n)
            .map(|i| {
                pod(
                    &format!("p{i}"),
                    &format!("10.42.{}.{}", i / 200, i % 200 + 2),
                    true,
                )
            })
            .collect()
    }

    fn apply(existing: &mut Vec<Arc<Value>>, plan: SlicePlan, next: &mut usize) {
        for (name, _) in &plan.delete {
            existing.retain(|s| name_of(s) != name);
        }
        for u in plan.update {
            let name = name_of(&u).to_string();
            existing.retain(|s| name_of(s) != name);
            existing.push(Arc::new(u));
        }
        for mut c in plan.create {
            *next += 1;
            c["metadata"]["name"] = json!(format!("web-{next:05}"));
            c["metadata"]["uid"] = json!(format!("sl-{next}"));
            existing.push(Arc::new(c));
        }
    }

    #[test]
    fn slices_split_at_100_and_are_reused_with_minimal_writes() {
        let s = svc(json!([{"port": 80, "targetPort": 80}]));
        let m = meta();
        let mut existing = Vec::new();
        let mut next = 0;
        let pods = many(250);
        let groups = slice_groups(&s, &pods, &HashMap::new());
        let plan = plan_slices(&groups, &existing, &m);
        assert_eq!(plan.create.len(), 3);
        let sizes: Vec<usize> = plan
            .create
            .iter()
            .map(|c| slice_endpoints(c).len())
            .collect();
        assert_eq!(sizes, vec![100, 100, 50]);
        assert_eq!(plan.create[0]["metadata"]["generateName"], "web-");
        assert_eq!(
            plan.create[0]["metadata"]["labels"][SERVICE_NAME_LABEL],
            "web"
        );
        assert_eq!(
            plan.create[0]["metadata"]["labels"][MANAGED_BY_LABEL],
            SLICE_MANAGER
        );
        assert_eq!(plan.create[0]["addressType"], "IPv4");
        apply(&mut existing, plan, &mut next);
        // Nothing changed: nothing written.
        assert!(plan_slices(&groups, &existing, &m).is_empty());
        // One pod not ready: one slice rewritten.
        let mut pods2 = pods.clone();
        let mut p = (*pods2[10]).clone();
        p["status"]["conditions"][0]["status"] = json!("False");
        pods2[10] = Arc::new(p);
        let plan = plan_slices(&slice_groups(&s, &pods2, &HashMap::new()), &existing, &m);
        assert_eq!(
            (plan.create.len(), plan.update.len(), plan.delete.len()),
            (0, 1, 0)
        );
        // Ten more pods: they go into the slice with room, no new slice.
        let pods3 = many(260);
        let plan = plan_slices(&slice_groups(&s, &pods3, &HashMap::new()), &existing, &m);
        assert_eq!(
            (plan.create.len(), plan.update.len(), plan.delete.len()),
            (0, 1, 0)
        );
        apply(&mut existing, plan, &mut next);
        // Scale to nothing: one empty placeholder slice stays.
        let plan = plan_slices(&BTreeMap::new(), &existing, &m);
        assert_eq!(plan.delete.len(), 2);
        assert_eq!(plan.update.len(), 1);
        assert!(slice_endpoints(&plan.update[0]).is_empty());
        apply(&mut existing, plan, &mut next);
        assert!(plan_slices(&BTreeMap::new(), &existing, &m).is_empty());
        // Back to 5 pods: the placeholder is deleted and a new port set's slice created, or
        // reused; either way one slice with 5 endpoints remains.
        let plan = plan_slices(&slice_groups(&s, &many(5), &HashMap::new()), &existing, &m);
        apply(&mut existing, plan, &mut next);
        assert_eq!(existing.len(), 1);
        assert_eq!(slice_endpoints(&existing[0]).len(), 5);
    }

    #[test]
    fn user_endpoints_are_mirrored_with_readiness() {
        let ep = json!({"metadata": {"name": "ext", "namespace": "d"},
            "subsets": [{"addresses": [{"ip": "192.0.2.10"}], "notReadyAddresses": [{"ip": "192.0.2.11"}],
                         "ports": [{"port": 5432}]}]});
        let g = mirror_groups(&ep);
        assert_eq!(g.len(), 1);
        let g = g.values().next().unwrap();
        assert_eq!(
            g.ports,
            vec![json!({"name": "", "port": 5432, "protocol": "TCP"})]
        );
        assert_eq!(g.endpoints[0]["conditions"]["ready"], true);
        assert_eq!(g.endpoints[1]["conditions"]["ready"], false);
    }

    #[test]
    fn endpoints_are_truncated_at_1000_ready_first() {
        let s = svc(json!([{"port": 80}]));
        let mut pods = many(1100);
        let mut p = (*pods[0]).clone();
        p["status"]["conditions"][0]["status"] = json!("False");
        pods[0] = Arc::new(p);
        let (subsets, truncated) = endpoints_subsets(&s, &pods);
        assert!(truncated);
        let n = subsets[0]["addresses"].as_array().unwrap().len();
        assert_eq!(n, 1000);
        assert!(subsets[0].get("notReadyAddresses").is_none());
    }
}
