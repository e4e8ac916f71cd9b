//! Pod facts the controllers share: activity, readiness and availability, upstream's ranking of
//! pods to delete first, and pods made from templates.

use std::cmp::Ordering;

use serde_json::{json, Value};

use crate::controllers::client::{is_terminating, owner_ref};

pub fn phase(p: &Value) -> &str {
    p.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending")
}

/// Not terminating and not finished.
pub fn is_active(p: &Value) -> bool {
    !is_terminating(p) && !matches!(phase(p), "Succeeded" | "Failed")
}

fn condition<'a>(p: &'a Value, ty: &str) -> Option<&'a Value> {
    p.pointer("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c["type"] == ty)
}

pub fn is_ready(p: &Value) -> bool {
    condition(p, "Ready").is_some_and(|c| c["status"] == "True")
}

/// When the pod became ready (the Ready condition's transition time).
pub fn ready_since(p: &Value) -> Option<jiff::Timestamp> {
    condition(p, "Ready")
        .filter(|c| c["status"] == "True")
        .and_then(|c| c["lastTransitionTime"].as_str())
        .and_then(|t| t.parse().ok())
}

/// Ready for at least `min_ready_seconds`.
pub fn is_available(p: &Value, min_ready_seconds: i64, now: jiff::Timestamp) -> bool {
    if !is_ready(p) {
        return false;
    }
    if min_ready_seconds <= 0 {
        return true;
    }
    ready_since(p).is_some_and(|t| now.as_second() - t.as_second() >= min_ready_seconds)
}

fn restarts(p: &Value) -> i64 {
    p.pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|c| c["restartCount"].as_i64().unwrap_or(0))
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

fn deletion_cost(p: &Value) -> i64 {
    p.pointer("/metadata/annotations/controller.kubernetes.io~1pod-deletion-cost")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Upstream's order for choosing pods to delete: the one to delete first sorts first
/// (unassigned, then pending, not ready, lower deletion cost, ready more recently, more restarts,
/// newer).
pub fn deletion_order(a: &Value, b: &Value) -> Ordering {
    let assigned = |p: &Value| {
        p.pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty())
    };
    let phase_rank = |p: &Value| match phase(p) {
        "Pending" => 0,
        "Unknown" => 1,
        "Running" => 2,
        _ => 3,
    };
    assigned(a)
        .cmp(&assigned(b))
        .then(phase_rank(a).cmp(&phase_rank(b)))
        .then(is_ready(a).cmp(&is_ready(b)))
        .then(deletion_cost(a).cmp(&deletion_cost(b)))
        .then_with(|| match (ready_since(a), ready_since(b)) {
            (Some(x), Some(y)) => y.cmp(&x),
            _ => Ordering::Equal,
        })
        .then(restarts(b).cmp(&restarts(a)))
        .then_with(|| {
            let ts = |p: &Value| {
                p.pointer("/metadata/creationTimestamp")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            ts(b).cmp(&ts(a))
        })
}

/// A pod for `owner` from its pod template, named `<generate_name>xxxxx`.
pub fn from_template(
    template: &Value,
    owner: &Value,
    generate_name: &str,
    namespace: &str,
) -> Value {
    let mut md = json!({
        "generateName": generate_name,
        "namespace": namespace,
        "ownerReferences": [owner_ref(owner, true)],
    });
    if let Some(l) = template.pointer("/metadata/labels") {
        md["labels"] = l.clone();
    }
    if let Some(a) = template.pointer("/metadata/annotations") {
        md["annotations"] = a.clone();
    }
    if let Some(f) = template.pointer("/metadata/finalizers") {
        md["finalizers"] = f.clone();
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": md,
        "spec": template.get("spec").cloned().unwrap_or(json!({})),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(node: &str, phase: &str, ready: bool, created: &str) -> Value {
        json!({
            "metadata": {"name": format!("{node}-{phase}-{ready}"), "creationTimestamp": created},
            "spec": {"nodeName": node},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        })
    }

    #[test]
    fn pods_are_deleted_in_upstream_order() {
        let mut pods = [
            pod("n1", "Running", true, "2026-01-01T00:00:00Z"),
            pod("n1", "Running", true, "2026-01-02T00:00:00Z"),
            pod("", "Pending", false, "2026-01-01T00:00:00Z"),
            pod("n1", "Running", false, "2026-01-01T00:00:00Z"),
            pod("n1", "Pending", false, "2026-01-01T00:00:00Z"),
        ];
        pods.sort_by(deletion_order);
        let order: Vec<(&str, &str, bool)> = pods
            .iter()
            .map(|p| {
                (
                    p["spec"]["nodeName"].as_str().unwrap(),
                    phase(p),
                    is_ready(p),
                )
            })
            .collect();
        assert_eq!(
            order,
            vec![
                ("", "Pending", false),
                ("n1", "Pending", false),
                ("n1", "Running", false),
                ("n1", "Running", true),
                ("n1", "Running", true)
            ]
        );
        assert_eq!(
            pods[3]["metadata"]["creationTimestamp"], "2026-01-02T00:00:00Z",
            "newer first"
        );
    }
}
