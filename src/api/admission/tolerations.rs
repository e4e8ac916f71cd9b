//! DefaultTolerationSeconds: new pods tolerate `node.kubernetes.io/not-ready` and
//! `node.kubernetes.io/unreachable` (NoExecute) for 300 s unless they already tolerate them.

use serde_json::{json, Value};

pub const NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const DEFAULT_SECONDS: i64 = 300;

/// Whether `tolerations` already cover `key` with effect NoExecute (an empty key or effect
/// matches anything, as upstream checks it).
fn tolerates(tolerations: &[Value], key: &str) -> bool {
    tolerations.iter().any(|t| {
        let k = t["key"].as_str().unwrap_or_default();
        let e = t["effect"].as_str().unwrap_or_default();
        (k == key || k.is_empty()) && (e == "NoExecute" || e.is_empty())
    })
}

/// Adds the default tolerations to a pod.
pub fn apply(pod: &mut Value) {
    if !pod["spec"].is_object() {
        return;
    }
    let mut tolerations: Vec<Value> = pod
        .pointer("/spec/tolerations")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let before = tolerations.len();
    for key in [NOT_READY, UNREACHABLE] {
        if !tolerates(&tolerations, key) {
            tolerations.push(json!({
                "key": key,
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": DEFAULT_SECONDS,
            }));
        }
    }
    if tolerations.len() != before {
        pod["spec"]["tolerations"] = Value::Array(tolerations);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_get_both_default_tolerations() {
        let mut p = json!({"spec": {"containers": []}});
        apply(&mut p);
        assert_eq!(
            p["spec"]["tolerations"],
            json!([
                {"key": NOT_READY, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            ])
        );
    }

    #[test]
    fn existing_tolerations_are_kept_and_not_duplicated() {
        let own = json!({"key": NOT_READY, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 10});
        let mut p = json!({"spec": {"tolerations": [own.clone()]}});
        apply(&mut p);
        let t = p["spec"]["tolerations"].as_array().unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0], own);
        assert_eq!(t[1]["key"], UNREACHABLE);
        // Tolerating everything (empty key, operator Exists) covers both.
        let mut p = json!({"spec": {"tolerations": [{"operator": "Exists"}]}});
        apply(&mut p);
        assert_eq!(p["spec"]["tolerations"].as_array().unwrap().len(), 1);
    }
}
