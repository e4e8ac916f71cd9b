//! The `pods/eviction` subresource (POST policy/v1 Eviction): deletes a pod unless that would
//! violate its PodDisruptionBudget. A pod that is not running (pending, finished, already
//! being deleted) is deleted without checks; otherwise the one budget selecting it must allow
//! a disruption, which is spent (`disruptionsAllowed - 1` and the pod in `disruptedPods`,
//! a compare-and-swap on the budget's status) before the pod is deleted, as upstream.

use std::sync::Arc;

use k3rs_storage::{KeyRange, RangeRequest};
use serde_json::{json, Value};

use crate::api::objects::{self, DeleteOpts, Part, WriteOpts};
use crate::api::request::{FieldValidation, Query};
use crate::api::resources::ResourceDef;
use crate::api::status::{ApiError, ApiResult, Cause};
use crate::api::ApiState;
use crate::controllers::disruption::selects;
use crate::controllers::pods::is_ready;

const MESSAGE: &str = "Cannot evict pod as it would violate the pod's disruption budget.";

/// Upstream's 429 for a budget that allows no disruption now.
pub fn too_many_requests(cause: String, retry_after: u64) -> ApiError {
    let mut e = ApiError::new(429, "TooManyRequests", MESSAGE);
    e.causes = vec![Cause::new("DisruptionBudget", "", cause)];
    e.retry_after = Some(retry_after).filter(|s| *s > 0);
    e
}

/// Pods evicted without consulting budgets (upstream's `canIgnorePDB`).
fn can_ignore_budget(pod: &Value) -> bool {
    matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed" | "Pending") | None
    ) || pod.pointer("/metadata/deletionTimestamp").is_some()
}

/// What to do with one budget (upstream's `checkAndDecrement` plus the unhealthy-pod policy):
/// `Ok(None)`: evict without touching the budget; `Ok(Some(status))`: write this status, then
/// evict; `Err`: refuse.
pub fn decide(pdb: &Value, pod: &Value, pod_name: &str, now: &str) -> ApiResult<Option<Value>> {
    let name = pdb
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let st = &pdb["status"];
    let int = |f: &str| st[f].as_i64().unwrap_or(0);
    if !is_ready(pod) {
        let policy = pdb
            .pointer("/spec/unhealthyPodEvictionPolicy")
            .and_then(Value::as_str);
        if policy == Some("AlwaysAllow")
            || (int("currentHealthy") >= int("desiredHealthy") && int("desiredHealthy") > 0)
        {
            return Ok(None);
        }
    }
    let generation = pdb
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if int("observedGeneration") < generation {
        return Err(too_many_requests(
            format!("The disruption budget {name} is still being processed by the server."),
            10,
        ));
    }
    let allowed = int("disruptionsAllowed");
    if allowed < 0 {
        return Err(forbidden_pdb(name, "pdb disruptions allowed is negative"));
    }
    if st["disruptedPods"]
        .as_object()
        .is_some_and(|m| m.len() > 2000)
    {
        return Err(forbidden_pdb(
            name,
            "DisruptedPods map too big - too many evictions not confirmed by PDB controller",
        ));
    }
    if allowed == 0 {
        return Err(too_many_requests(
            format!(
                "The disruption budget {name} needs {} healthy pods and has {} currently",
                int("desiredHealthy"),
                int("currentHealthy")
            ),
            0,
        ));
    }
    let mut status = st.clone();
    if !status.is_object() {
        status = json!({});
    }
    status["disruptionsAllowed"] = json!(allowed - 1);
    if allowed - 1 == 0 {
        if let Some(cs) = status["conditions"].as_array_mut() {
            for c in cs.iter_mut().filter(|c| c["type"] == "DisruptionAllowed") {
                if c["status"] != "False" {
                    c["lastTransitionTime"] = json!(now);
                }
                c["status"] = json!("False");
                c["reason"] = json!("InsufficientPods");
            }
        }
    }
    if !status["disruptedPods"].is_object() {
        status["disruptedPods"] = json!({});
    }
    status["disruptedPods"][pod_name] = json!(now);
    Ok(Some(status))
}

fn forbidden_pdb(name: &str, why: &str) -> ApiError {
    let mut e = ApiError::forbidden(format!(
        "poddisruptionbudget.policy \"{name}\" is forbidden: {why}"
    ));
    e.name = Some(name.to_string());
    e.group = Some("policy".into());
    e.kind = Some("poddisruptionbudget".into());
    e
}

/// The budgets of the pod's namespace that select it.
async fn budgets_of(
    st: &ApiState,
    ns: &str,
    pod: &Value,
) -> ApiResult<(Arc<ResourceDef>, Vec<Value>)> {
    let def = st
        .registry
        .get("policy", "v1", "poddisruptionbudgets")
        .ok_or_else(|| ApiError::internal("poddisruptionbudgets are not served"))?;
    let resp = st
        .store
        .range(RangeRequest::new(KeyRange::prefix(
            def.key_prefix(Some(ns)).into_bytes(),
        )))
        .await?;
    let mut out = Vec::new();
    for kv in resp.kvs {
        let v = objects::decode_stored(&def, &kv)?;
        if selects(&v, pod) {
            out.push(v);
        }
    }
    Ok((def, out))
}

/// POST `pods/<name>/eviction`.
pub async fn evict(
    st: &ApiState,
    def: &Arc<ResourceDef>,
    ns: Option<&str>,
    name: &str,
    body: &Value,
    q: &Query,
) -> ApiResult<()> {
    let body_name = body
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(
            "name in URL does not match name in Eviction object",
        ));
    }
    let dopts_bytes = match body.get("deleteOptions").filter(|v| v.is_object()) {
        Some(d) => serde_json::to_vec(d).map_err(|e| ApiError::bad_request(e.to_string()))?,
        None => Vec::new(),
    };
    let dopts = DeleteOpts::parse(q, &dopts_bytes)?;
    let ns_s = ns.unwrap_or_default();
    let wopts = WriteOpts {
        dry_run: dopts.dry_run,
        field_validation: FieldValidation::Ignore,
        field_manager: "kube-apiserver".into(),
        operation: "Update",
    };
    for _ in 0..8 {
        let pod = objects::get(st, def, ns, name).await?;
        if can_ignore_budget(&pod) {
            objects::delete(st, def, ns, name, &dopts).await?;
            return Ok(());
        }
        let (pdb_def, budgets) = budgets_of(st, ns_s, &pod).await?;
        if budgets.len() > 1 {
            return Err(ApiError::internal(
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            ));
        }
        if let Some(pdb) = budgets.first() {
            let now = objects::now_rfc3339();
            if let Some(status) = decide(pdb, &pod, name, &now)? {
                if !dopts.dry_run {
                    let mut updated = pdb.clone();
                    updated["status"] = status;
                    let pdb_name = pdb
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    match objects::update(
                        st,
                        &pdb_def,
                        ns,
                        &pdb_name,
                        updated,
                        Part::Status,
                        &wopts,
                        None,
                    )
                    .await
                    {
                        Err(e) if e.code == 409 => continue,
                        r => {
                            r?;
                        }
                    }
                }
            }
        }
        objects::delete(st, def, ns, name, &dopts).await?;
        return Ok(());
    }
    Err(ApiError::stale("policy", "poddisruptionbudgets", name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pdb(allowed: i64) -> Value {
        json!({"metadata": {"name": "b", "generation": 1}, "spec": {},
            "status": {"observedGeneration": 1, "disruptionsAllowed": allowed, "desiredHealthy": 2, "currentHealthy": 2 + allowed,
                "conditions": [{"type": "DisruptionAllowed", "status": "True", "reason": "SufficientPods", "lastTransitionTime": "t0"}]}})
    }

    fn ready_pod() -> Value {
        json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
    }

    #[test]
    fn a_budget_without_allowed_disruptions_refuses_with_upstream_status() {
        let e = decide(&pdb(0), &ready_pod(), "p", "now").unwrap_err();
        assert_eq!(e.code, 429);
        let s = e.to_status();
        assert_eq!(s["reason"], "TooManyRequests");
        assert_eq!(
            s["message"],
            "Cannot evict pod as it would violate the pod's disruption budget."
        );
        assert_eq!(s["details"]["causes"][0]["reason"], "DisruptionBudget");
        assert_eq!(
            s["details"]["causes"][0]["message"],
            "The disruption budget b needs 2 healthy pods and has 2 currently"
        );
        assert!(s["details"].get("retryAfterSeconds").is_none());
    }

    #[test]
    fn an_allowed_eviction_spends_the_budget() {
        let s = decide(&pdb(1), &ready_pod(), "p", "now").unwrap().unwrap();
        assert_eq!(s["disruptionsAllowed"], 0);
        assert_eq!(s["disruptedPods"], json!({"p": "now"}));
        assert_eq!(s["conditions"][0]["status"], "False");
        assert_eq!(s["conditions"][0]["reason"], "InsufficientPods");
        let s = decide(&pdb(2), &ready_pod(), "p", "now").unwrap().unwrap();
        assert_eq!(s["conditions"][0]["status"], "True");
    }

    #[test]
    fn unprocessed_budgets_and_unhealthy_pods_follow_upstream() {
        let mut b = pdb(1);
        b["metadata"]["generation"] = json!(2);
        let e = decide(&b, &ready_pod(), "p", "now").unwrap_err();
        assert_eq!(e.retry_after, Some(10));
        assert_eq!(
            e.causes[0].message,
            "The disruption budget b is still being processed by the server."
        );
        // An unready pod while the budget is met is evicted without spending it.
        let unready = json!({"status": {"phase": "Running"}});
        assert!(decide(&pdb(0), &unready, "p", "now").unwrap().is_none());
        assert!(can_ignore_budget(
            &json!({"status": {"phase": "Succeeded"}})
        ));
        assert!(!can_ignore_budget(&ready_pod()));
    }
}
