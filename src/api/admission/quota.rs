//! ResourceQuota: how much of each quota resource an object uses (upstream's evaluators for
//! pods, services, persistent volume claims and object counts), and the admission step that
//! refuses a write exceeding a quota. The step reads the namespace's quotas, checks the
//! object's usage against `status.hard` / `status.used` (which the quota controller computes),
//! and adds to the object's own transaction a compare on each charged quota's revision and a
//! put of that quota with the usage incremented (upstream's compare-and-swap on the status).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k3rs_storage::{Compare, KeyRange, PutRequest, RangeRequest, TxnOp};
use serde_json::{json, Value};

use super::TxnExtra;
use crate::api::resources::ResourceDef;
use crate::api::status::{qualified, ApiError, ApiResult};
use crate::api::ApiState;
use crate::controllers::quantity::parse_milli;

/// A quantity (thousandths of its unit) and whether it prints with binary suffixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Qty {
    pub milli: i128,
    pub binary: bool,
}

impl Qty {
    pub fn int(n: i64) -> Qty {
        Qty {
            milli: n as i128 * 1000,
            binary: false,
        }
    }

    pub fn parse(s: &str) -> Option<Qty> {
        let milli = parse_milli(s)?;
        let t = s.trim();
        let binary = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
            .iter()
            .any(|x| t.ends_with(x));
        Some(Qty { milli, binary })
    }

    /// A quantity field (string or number).
    pub fn of(v: &Value) -> Option<Qty> {
        match v {
            Value::String(s) => Qty::parse(s),
            Value::Number(n) => n
                .as_i64()
                .map(Qty::int)
                .or_else(|| n.as_f64().and_then(|f| Qty::parse(&f.to_string()))),
            _ => None,
        }
    }

    /// Adds `o`; a zero takes the other's format (as upstream's `Quantity.Add`).
    pub fn add(&mut self, o: Qty) {
        if self.milli == 0 {
            self.binary = o.binary;
        }
        self.milli += o.milli;
    }
}

impl std::fmt::Display for Qty {
    /// Upstream's canonical form: `500m`, `1`, `2k`, `128Mi`, `1536`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.milli;
        if m == 0 {
            return f.write_str("0");
        }
        let sign = if m < 0 { "-" } else { "" };
        let a = m.abs();
        if self.binary && a >= 1024 * 1000 && a % 1000 == 0 {
            const SUF: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
            let (mut v, mut i) = (a / 1000, 0);
            while i < 6 && v % 1024 == 0 {
                v /= 1024;
                i += 1;
            }
            return write!(f, "{sign}{v}{}", SUF[i]);
        }
        if a % 1000 != 0 {
            return write!(f, "{sign}{a}m");
        }
        const SUF: [&str; 7] = ["", "k", "M", "G", "T", "P", "E"];
        let (mut v, mut i) = (a / 1000, 0);
        while i < 6 && v % 1000 == 0 {
            v /= 1000;
            i += 1;
        }
        write!(f, "{sign}{v}{}", SUF[i])
    }
}

/// A resource list (`requests.cpu` → quantity), sorted by name as upstream prints it.
pub type Usage = BTreeMap<String, Qty>;

/// A resource list field of an object (unparsable values are left out).
pub fn list_of(v: Option<&Value>) -> Usage {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, q)| Qty::of(q).map(|q| (k.clone(), q)))
                .collect()
        })
        .unwrap_or_default()
}

/// The JSON form of a resource list.
pub fn list_json(u: &Usage) -> Value {
    Value::Object(
        u.iter()
            .map(|(k, q)| (k.clone(), json!(q.to_string())))
            .collect(),
    )
}

/// `a + b` per resource (upstream's `quota.Add`).
pub fn add(a: &Usage, b: &Usage) -> Usage {
    let mut out = a.clone();
    for (k, q) in b {
        out.entry(k.clone()).and_modify(|x| x.add(*q)).or_insert(*q);
    }
    out
}

/// `k=v,k=v` (upstream's `prettyPrint`).
pub fn pretty(u: &Usage) -> String {
    u.iter()
        .map(|(k, q)| format!("{k}={q}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn mask(u: &Usage, names: &BTreeSet<String>) -> Usage {
    u.iter()
        .filter(|(k, _)| names.contains(*k))
        .map(|(k, q)| (k.clone(), *q))
        .collect()
}

const STORAGE_CLASS_SUFFIX: &str = ".storageclass.storage.k8s.io/";

/// Names the pod evaluator counts (besides hugepages and extended resources).
const POD_RESOURCES: [&str; 11] = [
    "count/pods",
    "cpu",
    "memory",
    "ephemeral-storage",
    "requests.cpu",
    "requests.memory",
    "requests.ephemeral-storage",
    "limits.cpu",
    "limits.memory",
    "limits.ephemeral-storage",
    "pods",
];

/// Kinds counted by name alone under their legacy quota name as well as `count/<plural>`.
const LEGACY_COUNTED: [&str; 4] = [
    "configmaps",
    "secrets",
    "replicationcontrollers",
    "resourcequotas",
];

/// Upstream's object count name: `count/<plural>` (core) or `count/<plural>.<group>`.
pub fn count_name(group: &str, plural: &str) -> String {
    if group.is_empty() {
        format!("count/{plural}")
    } else {
        format!("count/{plural}.{group}")
    }
}

/// Whether `name` is an extended resource (a domain-qualified name outside kubernetes.io).
fn is_extended(name: &str) -> bool {
    name.contains('/') && !name.contains("kubernetes.io/") && !name.starts_with("requests.")
}

/// Whether the evaluator of `group`/`plural` counts the quota resource `name` (upstream's
/// `MatchingResources`).
pub fn counts(group: &str, plural: &str, name: &str) -> bool {
    match (group, plural) {
        ("", "pods") => {
            POD_RESOURCES.contains(&name)
                || name.starts_with("hugepages-")
                || name.starts_with("requests.hugepages-")
                || name
                    .strip_prefix("requests.")
                    .is_some_and(|r| is_extended(r) || r.starts_with("hugepages-"))
        }
        ("", "services") => matches!(
            name,
            "services" | "count/services" | "services.nodeports" | "services.loadbalancers"
        ),
        ("", "persistentvolumeclaims") => {
            matches!(
                name,
                "persistentvolumeclaims" | "count/persistentvolumeclaims" | "requests.storage"
            ) || name
                .split_once(STORAGE_CLASS_SUFFIX)
                .is_some_and(|(_, r)| r == "persistentvolumeclaims" || r == "requests.storage")
        }
        ("", p) if LEGACY_COUNTED.contains(&p) => name == p || name == count_name("", p),
        _ => name == count_name(group, plural),
    }
}

/// Whether quota ignores writes of this resource entirely (upstream's ignored resources).
pub fn ignored(def: &ResourceDef) -> bool {
    !def.namespaced
        || def.kind == "Event"
        || matches!(
            def.kind.as_str(),
            "TokenReview"
                | "SubjectAccessReview"
                | "LocalSubjectAccessReview"
                | "SelfSubjectAccessReview"
                | "SelfSubjectRulesReview"
                | "Binding"
        )
}

fn ts_secs(v: Option<&Value>) -> Option<i64> {
    v.and_then(Value::as_str)
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
        .map(|t| t.as_second())
}

/// Whether a pod's compute resources (and `pods`) still count: not terminal, and not stuck
/// terminating past its grace period (upstream's `QuotaV1Pod`).
pub fn pod_counts(pod: &Value, now: i64) -> bool {
    let phase = pod.pointer("/status/phase").and_then(Value::as_str);
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return false;
    }
    if let (Some(t), Some(g)) = (
        ts_secs(pod.pointer("/metadata/deletionTimestamp")),
        pod.pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64),
    ) {
        if now > t + g {
            return false;
        }
    }
    true
}

/// One container's requests or limits; requests fall back to limits per resource, as API
/// defaulting fills them.
fn container_list(c: &Value, which: &str) -> Usage {
    let mut out = list_of(c.pointer(&format!("/resources/{which}")));
    if which == "requests" {
        for (k, q) in list_of(c.pointer("/resources/limits")) {
            out.entry(k).or_insert(q);
        }
    }
    out
}

fn max_into(acc: &mut Usage, u: &Usage) {
    for (k, q) in u {
        match acc.get(k) {
            Some(x) if x.milli >= q.milli => {}
            _ => {
                acc.insert(k.clone(), *q);
            }
        }
    }
}

/// A pod's effective requests or limits (upstream's `PodRequests`/`PodLimits`): the containers'
/// sum with sidecars, or the largest init container if larger; plus the overhead.
pub fn pod_list(pod: &Value, which: &str) -> Usage {
    let arr = |k: &str| -> Vec<Value> {
        pod.pointer(&format!("/spec/{k}"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut sum = Usage::new();
    for c in arr("containers") {
        sum = add(&sum, &container_list(&c, which));
    }
    let mut sidecars = Usage::new();
    let mut init_max = Usage::new();
    for c in arr("initContainers") {
        let r = container_list(&c, which);
        if c["restartPolicy"] == "Always" {
            sidecars = add(&sidecars, &r);
            sum = add(&sum, &r);
            continue;
        }
        max_into(&mut init_max, &add(&r, &sidecars));
    }
    max_into(&mut sum, &init_max);
    for (k, q) in list_of(pod.pointer("/spec/overhead")) {
        if which == "requests" || sum.contains_key(&k) {
            sum.entry(k).and_modify(|x| x.add(q)).or_insert(q);
        }
    }
    sum
}

/// Upstream's `podComputeUsageHelper`.
fn compute_usage(requests: &Usage, limits: &Usage) -> Usage {
    let mut u = Usage::new();
    u.insert("pods".into(), Qty::int(1));
    for r in ["cpu", "memory", "ephemeral-storage"] {
        if let Some(q) = requests.get(r) {
            u.insert(r.into(), *q);
            u.insert(format!("requests.{r}"), *q);
        }
        if let Some(q) = limits.get(r) {
            u.insert(format!("limits.{r}"), *q);
        }
    }
    for (k, q) in requests {
        if k.starts_with("hugepages-") {
            u.insert(k.clone(), *q);
            u.insert(format!("requests.{k}"), *q);
        } else if is_extended(k) {
            u.insert(format!("requests.{k}"), *q);
        }
    }
    u
}

/// What one pod uses.
pub fn pod_usage(pod: &Value, now: i64) -> Usage {
    let mut u = Usage::new();
    u.insert("count/pods".into(), Qty::int(1));
    if !pod_counts(pod, now) {
        return u;
    }
    add(
        &u,
        &compute_usage(&pod_list(pod, "requests"), &pod_list(pod, "limits")),
    )
}

fn service_usage(svc: &Value) -> Usage {
    let mut u = Usage::new();
    u.insert("count/services".into(), Qty::int(1));
    u.insert("services".into(), Qty::int(1));
    let ports = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    match svc.pointer("/spec/type").and_then(Value::as_str) {
        Some("NodePort") => {
            u.insert("services.nodeports".into(), Qty::int(ports.len() as i64));
        }
        Some("LoadBalancer") => {
            let n = if svc.pointer("/spec/allocateLoadBalancerNodePorts") == Some(&json!(false)) {
                ports
                    .iter()
                    .filter(|p| p["nodePort"].as_i64().is_some_and(|n| n != 0))
                    .count()
            } else {
                ports.len()
            };
            u.insert("services.nodeports".into(), Qty::int(n as i64));
            u.insert("services.loadbalancers".into(), Qty::int(1));
        }
        _ => {}
    }
    u
}

fn pvc_usage(pvc: &Value) -> Usage {
    let mut u = Usage::new();
    u.insert("persistentvolumeclaims".into(), Qty::int(1));
    u.insert("count/persistentvolumeclaims".into(), Qty::int(1));
    let class = pvc
        .pointer("/spec/storageClassName")
        .and_then(Value::as_str)
        .or_else(|| {
            pvc.pointer("/metadata/annotations/volume.beta.kubernetes.io~1storage-class")
                .and_then(Value::as_str)
        })
        .unwrap_or_default();
    if !class.is_empty() {
        u.insert(
            format!("{class}{STORAGE_CLASS_SUFFIX}persistentvolumeclaims"),
            Qty::int(1),
        );
    }
    let spec = pvc
        .pointer("/spec/resources/requests/storage")
        .and_then(Qty::of);
    let allocated = pvc
        .pointer("/status/allocatedResources/storage")
        .and_then(Qty::of);
    let storage = match (spec, allocated) {
        (Some(s), Some(a)) if a.milli > s.milli => Some(a),
        (s, a) => s.or(a),
    };
    if let Some(s) = storage {
        u.insert("requests.storage".into(), s);
        if !class.is_empty() {
            u.insert(format!("{class}{STORAGE_CLASS_SUFFIX}requests.storage"), s);
        }
    }
    u
}

/// What one object of `group`/`plural` uses (upstream's evaluators' `Usage`).
pub fn usage(group: &str, plural: &str, obj: &Value, now: i64) -> Usage {
    match (group, plural) {
        ("", "pods") => pod_usage(obj, now),
        ("", "services") => service_usage(obj),
        ("", "persistentvolumeclaims") => pvc_usage(obj),
        ("", p) if LEGACY_COUNTED.contains(&p) => {
            let mut u = Usage::new();
            u.insert(p.to_string(), Qty::int(1));
            u.insert(count_name("", p), Qty::int(1));
            u
        }
        _ => {
            let mut u = Usage::new();
            u.insert(count_name(group, plural), Qty::int(1));
            u
        }
    }
}

/// The quota's scope selectors: `spec.scopes` (as `Exists`) and `spec.scopeSelector`.
fn scope_selectors(quota: &Value) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for s in quota
        .pointer("/spec/scopes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push((
            s.as_str().unwrap_or_default().to_string(),
            "Exists".to_string(),
            Vec::new(),
        ));
    }
    for e in quota
        .pointer("/spec/scopeSelector/matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push((
            e["scopeName"].as_str().unwrap_or_default().to_string(),
            e["operator"].as_str().unwrap_or_default().to_string(),
            e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
        ));
    }
    out
}

fn pod_scope_matches(scope: &str, op: &str, values: &[String], pod: &Value) -> bool {
    let terminating = pod
        .pointer("/spec/activeDeadlineSeconds")
        .and_then(Value::as_i64)
        .is_some_and(|s| s >= 0);
    let best_effort = crate::api::pods::qos_class(pod) == "BestEffort";
    match scope {
        "Terminating" => terminating,
        "NotTerminating" => !terminating,
        "BestEffort" => best_effort,
        "NotBestEffort" => !best_effort,
        "PriorityClass" => {
            let pc = pod
                .pointer("/spec/priorityClassName")
                .and_then(Value::as_str)
                .unwrap_or_default();
            match op {
                "Exists" => !pc.is_empty(),
                "In" => values.iter().any(|v| v == pc),
                "NotIn" => !values.iter().any(|v| v == pc),
                _ => false,
            }
        }
        "CrossNamespacePodAffinity" => ["podAffinity", "podAntiAffinity"].iter().any(|a| {
            let terms = |k: &str| -> Vec<Value> {
                pod.pointer(&format!("/spec/affinity/{a}/{k}"))
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
            };
            let req = terms("requiredDuringSchedulingIgnoredDuringExecution");
            let pref: Vec<Value> = terms("preferredDuringSchedulingIgnoredDuringExecution")
                .into_iter()
                .map(|t| t["podAffinityTerm"].clone())
                .collect();
            req.iter().chain(pref.iter()).any(|t| {
                t["namespaceSelector"].is_object()
                    || t["namespaces"].as_array().is_some_and(|n| !n.is_empty())
            })
        }),
        _ => false,
    }
}

/// The quota's hard limits as the admission step sees them (`status.hard`).
fn status_hard_names(quota: &Value) -> BTreeSet<String> {
    quota
        .pointer("/status/hard")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Whether `quota` applies to `obj` given its `hard` names (upstream's `Matches`): it limits
/// something the evaluator counts and every scope selector matches (only pods have scopes).
pub fn quota_matches(
    group: &str,
    plural: &str,
    quota: &Value,
    hard: &BTreeSet<String>,
    obj: &Value,
) -> bool {
    if !hard.iter().any(|n| counts(group, plural, n)) {
        return false;
    }
    scope_selectors(quota)
        .iter()
        .all(|(s, op, vals)| (group, plural) == ("", "pods") && pod_scope_matches(s, op, vals, obj))
}

/// Upstream's pod constraints: with cpu or memory under quota, every container must state
/// them.
pub fn pod_constraints(pod: &Value, restricted: &BTreeSet<String>) -> Result<(), String> {
    const VALIDATED: [&str; 6] = [
        "cpu",
        "memory",
        "requests.cpu",
        "requests.memory",
        "limits.cpu",
        "limits.memory",
    ];
    let required: Vec<&str> = VALIDATED
        .iter()
        .copied()
        .filter(|r| restricted.contains(*r))
        .collect();
    if required.is_empty() {
        return Ok(());
    }
    let mut missing: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for k in ["containers", "initContainers"] {
        for c in pod
            .pointer(&format!("/spec/{k}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let u = compute_usage(&container_list(c, "requests"), &container_list(c, "limits"));
            for r in &required {
                if !u.contains_key(*r) {
                    missing
                        .entry(r)
                        .or_default()
                        .insert(c["name"].as_str().unwrap_or_default().to_string());
                }
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let parts: Vec<String> = missing
        .iter()
        .map(|(r, names)| {
            format!(
                "{r} for: {}",
                names.iter().cloned().collect::<Vec<_>>().join(",")
            )
        })
        .collect();
    Err(format!("must specify {}", parts.join("; ")))
}

/// Checks a create (`old` = None) or update of `obj` against `quotas` (upstream's
/// `CheckRequest`). Returns the quotas to charge and their new `status.used`, or why the
/// write is forbidden (the message after `<resource> "<name>" is forbidden: `).
pub fn check(
    quotas: &[Value],
    group: &str,
    plural: &str,
    obj: &Value,
    old: Option<&Value>,
    now: i64,
) -> Result<Vec<(usize, Usage)>, String> {
    let mut interesting = Vec::new();
    for (i, q) in quotas.iter().enumerate() {
        let hard = status_hard_names(q);
        if !quota_matches(group, plural, q, &hard, obj) {
            continue;
        }
        let name = q
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let restricted: BTreeSet<String> = hard
            .iter()
            .filter(|n| counts(group, plural, n))
            .cloned()
            .collect();
        if (group, plural) == ("", "pods") {
            pod_constraints(obj, &restricted).map_err(|e| format!("failed quota: {name}: {e}"))?;
        }
        let used = q.pointer("/status/used").and_then(Value::as_object);
        if restricted
            .iter()
            .any(|r| used.is_none_or(|u| !u.contains_key(r)))
        {
            return Err(format!(
                "status unknown for quota: {name}, resources: {}",
                restricted.iter().cloned().collect::<Vec<_>>().join(",")
            ));
        }
        interesting.push(i);
    }
    if interesting.is_empty() {
        return Ok(Vec::new());
    }
    let input = usage(group, plural, obj, now);
    let negative: Vec<&str> = input
        .iter()
        .filter(|(_, q)| q.milli < 0)
        .map(|(k, _)| k.as_str())
        .collect();
    if !negative.is_empty() {
        return Err(format!(
            "quota usage is negative for resource(s): {}",
            negative.join(",")
        ));
    }
    let mut deltas: BTreeMap<usize, Usage> =
        interesting.iter().map(|i| (*i, input.clone())).collect();
    if let Some(prev) = old {
        let prev_usage = usage(group, plural, prev, now);
        let delta: Usage = input
            .iter()
            .map(|(k, q)| {
                let p = prev_usage.get(k).map(|p| p.milli).unwrap_or(0);
                (
                    k.clone(),
                    Qty {
                        milli: (q.milli - p).max(0),
                        binary: q.binary,
                    },
                )
            })
            .collect();
        for i in &interesting {
            if quota_matches(
                group,
                plural,
                &quotas[*i],
                &status_hard_names(&quotas[*i]),
                prev,
            ) {
                deltas.insert(*i, delta.clone());
            }
        }
    }
    let mut out = Vec::new();
    for (i, delta) in deltas {
        let delta: Usage = delta.into_iter().filter(|(_, q)| q.milli != 0).collect();
        if delta.is_empty() {
            continue;
        }
        let q = &quotas[i];
        let hard = list_of(q.pointer("/status/hard"));
        let used = list_of(q.pointer("/status/used"));
        let hard_names = status_hard_names(q);
        let requested = mask(&delta, &hard_names);
        if requested.is_empty() {
            continue;
        }
        let new_used = add(&used, &requested);
        let exceeded: BTreeSet<String> = requested
            .keys()
            .filter(|k| match (new_used.get(*k), hard.get(*k)) {
                (Some(n), Some(h)) => n.milli > h.milli,
                _ => false,
            })
            .cloned()
            .collect();
        if !exceeded.is_empty() {
            let name = q
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            return Err(format!(
                "exceeded quota: {name}, requested: {}, used: {}, limited: {}",
                pretty(&mask(&requested, &exceeded)),
                pretty(&mask(&used, &exceeded)),
                pretty(&mask(&hard, &exceeded)),
            ));
        }
        out.push((i, new_used));
    }
    Ok(out)
}

fn now_secs() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// Whether the namespace has any ResourceQuota (a watch cache lookup).
pub async fn namespace_has_quotas(st: &ApiState, ns: &str) -> bool {
    let Some(qdef) = st.registry.get("", "v1", "resourcequotas") else {
        return false;
    };
    let cache = st.caches.get(&qdef.key_prefix(None));
    !(cache.wait_for(0, Duration::from_secs(5)).await
        && cache
            .snapshot(&qdef.key_prefix(Some(ns)), None)
            .objects
            .is_empty())
}

/// The namespace's quotas with their store revisions; cheap (a watch cache lookup) when the
/// namespace has none.
async fn namespace_quotas(st: &ApiState, ns: &str) -> ApiResult<Vec<(Value, i64, String)>> {
    let Some(qdef) = st.registry.get("", "v1", "resourcequotas") else {
        return Ok(Vec::new());
    };
    if !namespace_has_quotas(st, ns).await {
        return Ok(Vec::new());
    }
    let prefix = qdef.key_prefix(Some(ns));
    // Quotas exist: read them from the store, whose revisions the transaction compares.
    let resp = st
        .store
        .range(RangeRequest::new(KeyRange::prefix(prefix.into_bytes())))
        .await?;
    let mut out = Vec::new();
    for kv in resp.kvs {
        let v = crate::api::objects::decode_stored(&qdef, &kv)?;
        out.push((
            v,
            kv.mod_revision,
            String::from_utf8_lossy(&kv.key).into_owned(),
        ));
    }
    Ok(out)
}

/// The admission step: refuses a write that would exceed a quota; otherwise charges the
/// quotas in the write's own transaction.
pub async fn admit(
    st: &ApiState,
    def: &ResourceDef,
    ns: Option<&str>,
    obj: &Value,
    old: Option<&Value>,
    dry_run: bool,
) -> ApiResult<TxnExtra> {
    let mut extra = TxnExtra::default();
    let Some(ns) = ns.filter(|_| !ignored(def)) else {
        return Ok(extra);
    };
    // Only creates, and updates of the kinds whose usage can grow in place.
    if old.is_some() && !matches!(def.plural.as_str(), "services" | "persistentvolumeclaims") {
        return Ok(extra);
    }
    if def.group.is_empty() && def.plural == "resourcequotas" && old.is_some() {
        return Ok(extra);
    }
    let quotas = namespace_quotas(st, ns).await?;
    if quotas.is_empty() {
        return Ok(extra);
    }
    let values: Vec<Value> = quotas.iter().map(|(v, _, _)| v.clone()).collect();
    let charged = check(&values, &def.group, &def.plural, obj, old, now_secs()).map_err(|msg| {
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        forbidden(&def.group, &def.plural, name, &msg)
    })?;
    if dry_run {
        return Ok(extra);
    }
    for (i, used) in charged {
        let (q, rev, key) = &quotas[i];
        let mut q = q.clone();
        q["status"]["used"] = list_json(&used);
        if let Some(md) = q.get_mut("metadata").and_then(Value::as_object_mut) {
            md.remove("resourceVersion");
        }
        extra
            .compares
            .push(Compare::mod_revision_is(key.clone(), *rev));
        extra.ops.push(TxnOp::Put(PutRequest::new(
            key.clone(),
            serde_json::to_vec(&q).expect("JSON to memory"),
        )));
    }
    Ok(extra)
}

/// The REQUEST and LIMIT columns of `kubectl get quota`: `name: used/hard` per resource of
/// `status.hard`, `limits.*` in the second.
pub fn table_columns(quota: &Value) -> (String, String) {
    let hard = list_of(quota.pointer("/status/hard"));
    let used = list_of(quota.pointer("/status/used"));
    let (mut req, mut lim) = (Vec::new(), Vec::new());
    for (k, h) in &hard {
        let u = used.get(k).copied().unwrap_or(Qty::int(0));
        let cell = format!("{k}: {u}/{h}");
        if k.split('.').next() == Some("limits") && k.contains('.') {
            lim.push(cell);
        } else {
            req.push(cell);
        }
    }
    (req.join(", "), lim.join(", "))
}

/// `pods "p" is forbidden: <msg>` (upstream's admission `NewForbidden`).
pub fn forbidden(group: &str, plural: &str, name: &str, msg: &str) -> ApiError {
    let mut e = ApiError::forbidden(format!(
        "{} \"{name}\" is forbidden: {msg}",
        qualified(group, plural)
    ));
    e.name = Some(name.to_string()).filter(|n| !n.is_empty());
    e.group = Some(group.to_string()).filter(|g| !g.is_empty());
    e.kind = Some(plural.to_string());
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(hard: Value, used: Value) -> Value {
        json!({"metadata": {"name": "q", "namespace": "d"}, "spec": {"hard": hard.clone()}, "status": {"hard": hard, "used": used}})
    }

    fn pod(containers: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"containers": containers}, "status": {"phase": "Pending"}})
    }

    #[test]
    fn quantities_print_in_canonical_form() {
        let s = |x: &str| Qty::parse(x).unwrap().to_string();
        assert_eq!(s("500m"), "500m");
        assert_eq!(s("1000m"), "1");
        assert_eq!(s("2000"), "2k");
        assert_eq!(s("128Mi"), "128Mi");
        assert_eq!(s("1024Mi"), "1Gi");
        assert_eq!(s("1.5"), "1500m");
        assert_eq!(s("0"), "0");
        let mut z = Qty::parse("0").unwrap();
        z.add(Qty::parse("64Mi").unwrap());
        z.add(Qty::parse("64Mi").unwrap());
        assert_eq!(z.to_string(), "128Mi", "a zero takes the added format");
    }

    #[test]
    fn pod_count_over_quota_is_refused_with_upstream_message() {
        let q = quota(json!({"pods": "2"}), json!({"pods": "2"}));
        let err = check(&[q], "", "pods", &pod(json!([{"name": "c"}])), None, 0).unwrap_err();
        assert_eq!(
            err,
            "exceeded quota: q, requested: pods=1, used: pods=2, limited: pods=2"
        );
        let q = quota(json!({"pods": "2"}), json!({"pods": "1"}));
        let ok = check(&[q], "", "pods", &pod(json!([{"name": "c"}])), None, 0).unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].1["pods"], Qty::int(2));
    }

    #[test]
    fn compute_quota_sums_requests_and_reports_each_exceeded_resource() {
        let q = quota(
            json!({"requests.cpu": "1", "requests.memory": "1Gi", "limits.cpu": "2"}),
            json!({"requests.cpu": "800m", "requests.memory": "512Mi", "limits.cpu": "1"}),
        );
        let p = pod(
            json!([{"name": "c", "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"cpu": "500m"}}}]),
        );
        let err = check(std::slice::from_ref(&q), "", "pods", &p, None, 0).unwrap_err();
        assert_eq!(err, "exceeded quota: q, requested: requests.cpu=500m, used: requests.cpu=800m, limited: requests.cpu=1");
        let p = pod(
            json!([{"name": "c", "resources": {"requests": {"cpu": "200m", "memory": "256Mi"}, "limits": {"cpu": "500m"}}}]),
        );
        let ok = check(&[q], "", "pods", &p, None, 0).unwrap();
        let used = list_json(&ok[0].1);
        assert_eq!(
            used,
            json!({"requests.cpu": "1", "requests.memory": "768Mi", "limits.cpu": "1500m"})
        );
    }

    #[test]
    fn containers_must_state_quota_tracked_compute_resources() {
        let q = quota(
            json!({"requests.cpu": "1", "limits.memory": "1Gi"}),
            json!({"requests.cpu": "0", "limits.memory": "0"}),
        );
        let p = pod(json!([{"name": "a"}, {"name": "b", "resources": {"limits": {"cpu": "1"}}}]));
        assert_eq!(
            check(&[q], "", "pods", &p, None, 0).unwrap_err(),
            "failed quota: q: must specify limits.memory for: a,b; requests.cpu for: a"
        );
    }

    #[test]
    fn a_quota_without_usage_for_a_tracked_resource_refuses_as_status_unknown() {
        let q =
            json!({"metadata": {"name": "q"}, "status": {"hard": {"pods": "3", "services": "1"}}});
        assert_eq!(
            check(&[q], "", "pods", &pod(json!([{"name": "c"}])), None, 0).unwrap_err(),
            "status unknown for quota: q, resources: pods"
        );
        // A quota the controller has not seen yet (no status) does not apply, as upstream.
        let q = json!({"metadata": {"name": "q"}, "spec": {"hard": {"pods": "0"}}});
        assert!(check(&[q], "", "pods", &pod(json!([])), None, 0)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn quota_table_columns_split_limits_from_requests() {
        let q = quota(
            json!({"pods": "4", "requests.cpu": "2", "limits.memory": "1Gi"}),
            json!({"pods": "1", "requests.cpu": "500m", "limits.memory": "0"}),
        );
        assert_eq!(
            table_columns(&q),
            (
                "pods: 1/4, requests.cpu: 500m/2".to_string(),
                "limits.memory: 0/1Gi".to_string()
            )
        );
    }

    #[test]
    fn terminal_pods_count_only_as_objects() {
        let mut p = pod(json!([{"name": "c", "resources": {"requests": {"cpu": "1"}}}]));
        assert_eq!(pod_usage(&p, 0)["requests.cpu"], Qty::int(1));
        p["status"]["phase"] = json!("Succeeded");
        let u = pod_usage(&p, 0);
        assert_eq!(u.keys().collect::<Vec<_>>(), vec!["count/pods"]);
    }

    #[test]
    fn services_and_claims_count_their_special_resources() {
        let svc = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}, {"port": 81}]}});
        let u = usage("", "services", &svc, 0);
        assert_eq!(u["services.nodeports"], Qty::int(2));
        assert!(!u.contains_key("services.loadbalancers"));
        let pvc = json!({"spec": {"storageClassName": "fast", "resources": {"requests": {"storage": "1Gi"}}}});
        let u = usage("", "persistentvolumeclaims", &pvc, 0);
        assert_eq!(u["requests.storage"].to_string(), "1Gi");
        assert_eq!(
            u["fast.storageclass.storage.k8s.io/requests.storage"].to_string(),
            "1Gi"
        );
        assert!(counts(
            "",
            "persistentvolumeclaims",
            "fast.storageclass.storage.k8s.io/persistentvolumeclaims"
        ));
        let u = usage("apps", "deployments", &json!({}), 0);
        assert_eq!(u.keys().collect::<Vec<_>>(), vec!["count/deployments.apps"]);
        assert!(
            counts("", "configmaps", "configmaps") && counts("", "configmaps", "count/configmaps")
        );
    }

    #[test]
    fn scopes_select_pods() {
        let q = json!({"spec": {"scopes": ["BestEffort"]}, "status": {"hard": {"pods": "1"}, "used": {"pods": "1"}}});
        let hard = status_hard_names(&q);
        let be = pod(json!([{"name": "c"}]));
        let burst = pod(json!([{"name": "c", "resources": {"requests": {"cpu": "1"}}}]));
        assert!(quota_matches("", "pods", &q, &hard, &be));
        assert!(!quota_matches("", "pods", &q, &hard, &burst));
        assert!(check(&[q], "", "pods", &burst, None, 0).unwrap().is_empty());
    }

    #[test]
    fn service_update_charges_only_the_growth() {
        let q = quota(
            json!({"services.nodeports": "1"}),
            json!({"services.nodeports": "0"}),
        );
        let old = json!({"metadata": {"resourceVersion": "3"}, "spec": {"type": "ClusterIP", "ports": [{"port": 1}, {"port": 2}]}});
        let new = json!({"spec": {"type": "NodePort", "ports": [{"port": 1}, {"port": 2}]}});
        assert_eq!(
            check(&[q], "", "services", &new, Some(&old), 0).unwrap_err(),
            "exceeded quota: q, requested: services.nodeports=2, used: services.nodeports=0, limited: services.nodeports=1"
        );
    }
}
