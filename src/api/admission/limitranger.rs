//! LimitRanger: the namespace's LimitRanges give new pods' containers default requests and
//! limits (`defaultRequest`, `default`), then bound containers, pods and claims (`min`, `max`,
//! `maxLimitRequestRatio`) with upstream's messages. LimitRange items get upstream's defaults
//! (a `default` from `max`, a `defaultRequest` from `default` or `min`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::quota::{forbidden, list_of, pod_list, Qty, Usage};
use crate::api::resources::ResourceDef;
use crate::api::status::ApiResult;
use crate::api::ApiState;

const ANNOTATION: &str = "kubernetes.io/limit-ranger";

/// Upstream's defaulting of a LimitRange's items (`SetDefaults_LimitRangeItem`).
pub fn default_limit_range(lr: &mut Value) {
    let Some(items) = lr.pointer_mut("/spec/limits").and_then(Value::as_array_mut) else {
        return;
    };
    for item in items {
        if item["type"] != "Container" {
            continue;
        }
        let map = |v: &Value| -> Map<String, Value> { v.as_object().cloned().unwrap_or_default() };
        let max = map(&item["max"]);
        let min = map(&item["min"]);
        let mut default = map(&item["default"]);
        let mut default_request = map(&item["defaultRequest"]);
        for (k, v) in &max {
            default.entry(k.clone()).or_insert_with(|| v.clone());
        }
        for (k, v) in &default {
            default_request
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
        for (k, v) in &min {
            default_request
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
        if let Some(o) = item.as_object_mut() {
            if !default.is_empty() {
                o.insert("default".into(), Value::Object(default));
            }
            if !default_request.is_empty() {
                o.insert("defaultRequest".into(), Value::Object(default_request));
            }
        }
    }
}

fn items<'a>(lr: &'a Value, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    lr.pointer("/spec/limits")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(move |i| i["type"] == kind)
}

/// Sets the containers' missing requests and limits from the LimitRange's Container items and
/// records what was set in the `kubernetes.io/limit-ranger` annotation.
pub fn default_pod(lr: &Value, pod: &mut Value) {
    let mut limits = Map::new();
    let mut requests = Map::new();
    for item in items(lr, "Container") {
        for (field, into) in [("defaultRequest", &mut requests), ("default", &mut limits)] {
            if let Some(m) = item[field].as_object() {
                for (k, v) in m {
                    into.insert(k.clone(), v.clone());
                }
            }
        }
    }
    let mut notes = Vec::new();
    for (list, prefix) in [
        ("containers", "container"),
        ("initContainers", "init container"),
    ] {
        let Some(cs) = pod
            .pointer_mut(&format!("/spec/{list}"))
            .and_then(Value::as_array_mut)
        else {
            continue;
        };
        for c in cs {
            let name = c["name"].as_str().unwrap_or_default().to_string();
            if !c["resources"].is_object() {
                c["resources"] = json!({});
            }
            let mut set = |field: &str, defaults: &Map<String, Value>| -> Vec<String> {
                let mut added = Vec::new();
                if defaults.is_empty() {
                    return added;
                }
                let r = &mut c["resources"][field];
                if !r.is_object() {
                    *r = json!({});
                }
                let m = r.as_object_mut().expect("object");
                for (k, v) in defaults {
                    if !m.contains_key(k) {
                        m.insert(k.clone(), v.clone());
                        added.push(k.clone());
                    }
                }
                added.sort();
                added
            };
            let set_limits = set("limits", &limits);
            let set_requests = set("requests", &requests);
            if !set_requests.is_empty() {
                notes.push(format!(
                    "{} request for {prefix} {name}",
                    set_requests.join(", ")
                ));
            }
            if !set_limits.is_empty() {
                notes.push(format!(
                    "{} limit for {prefix} {name}",
                    set_limits.join(", ")
                ));
            }
        }
    }
    if !notes.is_empty() {
        if !pod["metadata"]["annotations"].is_object() {
            pod["metadata"]["annotations"] = json!({});
        }
        pod["metadata"]["annotations"][ANNOTATION] =
            json!(format!("LimitRanger plugin set: {}", notes.join("; ")));
    }
}

fn min_constraint(
    kind: &str,
    res: &str,
    enforced: Qty,
    req: &Usage,
    lim: &Usage,
) -> Option<String> {
    let Some(r) = req.get(res) else {
        return Some(format!(
            "minimum {res} usage per {kind} is {enforced}.  No request is specified"
        ));
    };
    if r.milli < enforced.milli {
        return Some(format!(
            "minimum {res} usage per {kind} is {enforced}, but request is {r}"
        ));
    }
    match lim.get(res) {
        Some(l) if l.milli < enforced.milli => Some(format!(
            "minimum {res} usage per {kind} is {enforced}, but limit is {l}"
        )),
        _ => None,
    }
}

fn max_constraint(
    kind: &str,
    res: &str,
    enforced: Qty,
    req: &Usage,
    lim: &Usage,
) -> Option<String> {
    let Some(l) = lim.get(res) else {
        return Some(format!(
            "maximum {res} usage per {kind} is {enforced}.  No limit is specified"
        ));
    };
    if l.milli > enforced.milli {
        return Some(format!(
            "maximum {res} usage per {kind} is {enforced}, but limit is {l}"
        ));
    }
    match req.get(res) {
        Some(r) if r.milli > enforced.milli => Some(format!(
            "maximum {res} usage per {kind} is {enforced}, but request is {r}"
        )),
        _ => None,
    }
}

fn max_request_constraint(kind: &str, res: &str, enforced: Qty, req: &Usage) -> Option<String> {
    let Some(r) = req.get(res) else {
        return Some(format!(
            "maximum {res} usage per {kind} is {enforced}.  No request is specified"
        ));
    };
    (r.milli > enforced.milli)
        .then(|| format!("maximum {res} usage per {kind} is {enforced}, but request is {r}"))
}

fn ratio_constraint(
    kind: &str,
    res: &str,
    enforced: Qty,
    req: &Usage,
    lim: &Usage,
) -> Option<String> {
    let r = req.get(res).map(|q| q.milli).unwrap_or(0);
    if r == 0 {
        return Some(format!("{res} max limit to request ratio per {kind} is {enforced}, but no request is specified or request is 0"));
    }
    let l = lim.get(res).map(|q| q.milli).unwrap_or(0);
    if l == 0 {
        return Some(format!("{res} max limit to request ratio per {kind} is {enforced}, but no limit is specified or limit is 0"));
    }
    let ratio = l as f64 / r as f64;
    (ratio * 1000.0 > enforced.milli as f64).then(|| {
        format!("{res} max limit to request ratio per {kind} is {enforced}, but provided ratio is {ratio:.6}")
    })
}

fn sorted(v: &Value) -> BTreeMap<String, Qty> {
    list_of(Some(v))
}

/// Checks `req`/`lim` against one item's min, max and ratio.
fn check_item(kind: &str, item: &Value, req: &Usage, lim: &Usage, errs: &mut Vec<String>) {
    for (k, v) in sorted(&item["min"]) {
        errs.extend(min_constraint(kind, &k, v, req, lim));
    }
    for (k, v) in sorted(&item["max"]) {
        errs.extend(max_constraint(kind, &k, v, req, lim));
    }
    for (k, v) in sorted(&item["maxLimitRequestRatio"]) {
        errs.extend(ratio_constraint(kind, &k, v, req, lim));
    }
}

/// Upstream's pod validation against one LimitRange: the messages of every violation.
pub fn validate_pod(lr: &Value, pod: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    for item in lr
        .pointer("/spec/limits")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match item["type"].as_str() {
            Some("Container") => {
                for list in ["containers", "initContainers"] {
                    for c in pod
                        .pointer(&format!("/spec/{list}"))
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        let mut req = list_of(c.pointer("/resources/requests"));
                        let lim = list_of(c.pointer("/resources/limits"));
                        // API defaulting copies limits into absent requests.
                        for (k, q) in &lim {
                            req.entry(k.clone()).or_insert(*q);
                        }
                        check_item("Container", item, &req, &lim, &mut errs);
                    }
                }
            }
            Some("Pod") => {
                let req = pod_list(pod, "requests");
                let lim = pod_list(pod, "limits");
                check_item("Pod", item, &req, &lim, &mut errs);
            }
            _ => {}
        }
    }
    errs
}

/// Upstream's claim validation against one LimitRange.
pub fn validate_pvc(lr: &Value, pvc: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    let req = list_of(pvc.pointer("/spec/resources/requests"));
    for item in items(lr, "PersistentVolumeClaim") {
        for (k, v) in sorted(&item["min"]) {
            errs.extend(min_constraint(
                "PersistentVolumeClaim",
                &k,
                v,
                &req,
                &Usage::new(),
            ));
        }
        for (k, v) in sorted(&item["max"]) {
            errs.extend(max_request_constraint("PersistentVolumeClaim", &k, v, &req));
        }
    }
    errs
}

/// Upstream's aggregate error text: one message, or `[a, b]`.
fn aggregate(errs: &[String]) -> String {
    if errs.len() == 1 {
        errs[0].clone()
    } else {
        format!("[{}]", errs.join(", "))
    }
}

/// The namespace's LimitRanges, from the watch cache (no store read).
async fn namespace_limit_ranges(st: &ApiState, ns: &str) -> Vec<Value> {
    let Some(def) = st.registry.get("", "v1", "limitranges") else {
        return Vec::new();
    };
    let cache = st.caches.get(&def.key_prefix(None));
    if !cache.wait_for(0, Duration::from_secs(5)).await {
        return Vec::new();
    }
    cache
        .snapshot(&def.key_prefix(Some(ns)), None)
        .objects
        .iter()
        .filter_map(|o| serde_json::from_slice(&o.value).ok())
        .map(|mut v: Value| {
            default_limit_range(&mut v);
            v
        })
        .collect()
}

/// The admission step for new pods and claims (and defaulting of new LimitRanges).
pub async fn admit(
    st: &ApiState,
    def: &ResourceDef,
    ns: Option<&str>,
    obj: &mut Value,
) -> ApiResult<()> {
    if !def.group.is_empty() {
        return Ok(());
    }
    match def.kind.as_str() {
        "LimitRange" => {
            default_limit_range(obj);
            return Ok(());
        }
        "Pod" | "PersistentVolumeClaim" => {}
        _ => return Ok(()),
    }
    let Some(ns) = ns else { return Ok(()) };
    let ranges = namespace_limit_ranges(st, ns).await;
    if ranges.is_empty() {
        return Ok(());
    }
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    for lr in &ranges {
        let errs = if def.kind == "Pod" {
            default_pod(lr, obj);
            validate_pod(lr, obj)
        } else {
            validate_pvc(lr, obj)
        };
        if !errs.is_empty() {
            return Err(forbidden(&def.group, &def.plural, &name, &aggregate(&errs)));
        }
    }
    if def.kind == "Pod" && obj["status"].is_object() {
        // The QoS class follows the defaulted resources.
        obj["status"]["qosClass"] = json!(crate::api::pods::qos_class(obj));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lr(limits: Value) -> Value {
        let mut v = json!({"metadata": {"name": "lr"}, "spec": {"limits": limits}});
        default_limit_range(&mut v);
        v
    }

    #[test]
    fn limit_range_items_get_upstream_defaults() {
        let v = lr(json!([{"type": "Container", "max": {"cpu": "2"}, "min": {"memory": "64Mi"}}]));
        assert_eq!(v["spec"]["limits"][0]["default"], json!({"cpu": "2"}));
        assert_eq!(
            v["spec"]["limits"][0]["defaultRequest"],
            json!({"cpu": "2", "memory": "64Mi"})
        );
    }

    #[test]
    fn containers_get_default_requests_and_limits_with_annotation() {
        let r = lr(
            json!([{"type": "Container", "default": {"cpu": "500m", "memory": "256Mi"}, "defaultRequest": {"cpu": "100m"}}]),
        );
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "a"},
            {"name": "b", "resources": {"limits": {"cpu": "1"}}},
        ]}});
        default_pod(&r, &mut pod);
        let a = &pod["spec"]["containers"][0]["resources"];
        assert_eq!(a["limits"], json!({"cpu": "500m", "memory": "256Mi"}));
        assert_eq!(a["requests"], json!({"cpu": "100m", "memory": "256Mi"}));
        let b = &pod["spec"]["containers"][1]["resources"];
        assert_eq!(b["limits"], json!({"cpu": "1", "memory": "256Mi"}));
        assert_eq!(
            pod["metadata"]["annotations"][ANNOTATION],
            "LimitRanger plugin set: cpu, memory request for container a; cpu, memory limit for container a; cpu, memory request for container b; memory limit for container b"
        );
        assert!(validate_pod(&r, &pod).is_empty());
    }

    #[test]
    fn violations_read_as_upstream() {
        let r = lr(json!([
            {"type": "Container", "max": {"cpu": "1"}, "min": {"memory": "100Mi"}, "maxLimitRequestRatio": {"cpu": "2"}},
        ]));
        let pod = json!({"spec": {"containers": [{"name": "c", "resources": {
            "requests": {"cpu": "500m", "memory": "50Mi"}, "limits": {"cpu": "2", "memory": "50Mi"}}}]}});
        assert_eq!(
            aggregate(&validate_pod(&r, &pod)),
            "[minimum memory usage per Container is 100Mi, but request is 50Mi, maximum cpu usage per Container is 1, but limit is 2, cpu max limit to request ratio per Container is 2, but provided ratio is 4.000000]"
        );
        let r = lr(json!([{"type": "Pod", "max": {"cpu": "1"}}]));
        let pod = json!({"spec": {"containers": [
            {"name": "a", "resources": {"limits": {"cpu": "600m"}}},
            {"name": "b", "resources": {"limits": {"cpu": "600m"}}},
        ]}});
        assert_eq!(
            validate_pod(&r, &pod),
            vec!["maximum cpu usage per Pod is 1, but limit is 1200m".to_string()]
        );
    }

    #[test]
    fn claims_are_bounded_by_storage_min_and_max() {
        let r = lr(
            json!([{"type": "PersistentVolumeClaim", "min": {"storage": "1Gi"}, "max": {"storage": "2Gi"}}]),
        );
        let pvc = |s: &str| json!({"spec": {"resources": {"requests": {"storage": s}}}});
        assert_eq!(
            validate_pvc(&r, &pvc("5Gi")),
            vec![
                "maximum storage usage per PersistentVolumeClaim is 2Gi, but request is 5Gi"
                    .to_string()
            ]
        );
        assert_eq!(
            validate_pvc(&r, &pvc("500Mi")),
            vec![
                "minimum storage usage per PersistentVolumeClaim is 1Gi, but request is 500Mi"
                    .to_string()
            ]
        );
        assert!(validate_pvc(&r, &pvc("1Gi")).is_empty());
    }
}
