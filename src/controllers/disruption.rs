//! The disruption controller: each PodDisruptionBudget's status (expected, desired and current
//! healthy pods, disruptions allowed, the pods an eviction is deleting, the `DisruptionAllowed`
//! condition) from its selector's pods and, for `maxUnavailable` or percentages, the scale of
//! the pods' controllers (upstream's rules). The eviction subresource (`api/eviction.rs`)
//! spends `disruptionsAllowed`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::api::selectors::from_label_selector_object;
use crate::api::status::ApiError;
use crate::controllers::client::{controller_of, key_of, namespace_of, split_key, Client};
use crate::controllers::events::Recorder;
use crate::controllers::informer::Informer;
use crate::controllers::pods::is_ready;
use crate::controllers::queue::Queue;
use crate::controllers::{spawn_workers, Context};

/// How long an eviction's entry in `disruptedPods` keeps the pod out of the healthy count
/// (upstream's `DeletionTimeout`).
pub const DELETION_TIMEOUT_SECS: i64 = 120;

/// The pods a budget's selector picks (a missing selector picks none; an empty one all).
pub fn selects(pdb: &Value, pod: &Value) -> bool {
    let sel = &pdb["spec"]["selector"];
    if !sel.is_object() {
        return false;
    }
    from_label_selector_object(sel).is_ok_and(|s| s.matches_object(pod))
}

/// An int-or-percent against `total`, rounded up (upstream's `GetScaledValueFromIntOrPercent`
/// with `roundUp`).
pub fn scaled(v: &Value, total: i64) -> Result<i64, String> {
    match v {
        Value::Number(n) => Ok(n.as_i64().unwrap_or(0)),
        Value::String(s) => {
            let p = s
                .strip_suffix('%')
                .and_then(|p| p.parse::<i64>().ok())
                .ok_or_else(|| format!("invalid value for IntOrString: invalid value {s:?}"))?;
            Ok((p * total + 99) / 100)
        }
        _ => Ok(0),
    }
}

/// A pod's controller (an identity) and its desired replicas, or why it has none.
pub type ScaleOf<'a> = dyn Fn(&Value) -> Result<(String, i64), String> + 'a;

/// The budget's expected pod count and desired healthy pods. `scale` gives a pod's
/// controller (an identity and its desired replicas) or why it has none.
pub fn expected_and_desired(
    pdb: &Value,
    pods: &[Arc<Value>],
    scale: &ScaleOf,
) -> Result<(i64, i64), String> {
    let expected_scale = || -> Result<i64, String> {
        let mut controllers: BTreeMap<String, i64> = BTreeMap::new();
        for p in pods {
            let (id, n) = scale(p)?;
            controllers.insert(id, n);
        }
        Ok(controllers.values().sum())
    };
    let spec = &pdb["spec"];
    if let Some(mu) = spec.get("maxUnavailable").filter(|v| !v.is_null()) {
        let expected = expected_scale()?;
        let max_unavailable = scaled(mu, expected)?;
        return Ok((expected, (expected - max_unavailable).max(0)));
    }
    match spec.get("minAvailable") {
        Some(Value::Number(n)) => Ok((pods.len() as i64, n.as_i64().unwrap_or(0))),
        Some(v @ Value::String(_)) => {
            let expected = expected_scale()?;
            Ok((expected, scaled(v, expected)?))
        }
        _ => Ok((pods.len() as i64, 0)),
    }
}

fn ts(v: &Value) -> Option<jiff::Timestamp> {
    v.as_str().and_then(|s| s.parse().ok())
}

/// The `disruptedPods` entries still pending: pods that exist, are not being deleted yet,
/// and were evicted less than the timeout ago. Also when the earliest entry expires.
pub fn pending_disruptions(
    pdb: &Value,
    pods: &[Arc<Value>],
    now: jiff::Timestamp,
) -> (Map<String, Value>, Option<Duration>) {
    let mut kept = Map::new();
    let mut recheck: Option<i64> = None;
    let Some(map) = pdb
        .pointer("/status/disruptedPods")
        .and_then(Value::as_object)
    else {
        return (kept, None);
    };
    for p in pods {
        let name = p
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if p.pointer("/metadata/deletionTimestamp").is_some() {
            continue;
        }
        let Some(v) = map.get(name) else { continue };
        let Some(t) = ts(v) else { continue };
        let expires = t.as_second() + DELETION_TIMEOUT_SECS;
        if expires <= now.as_second() {
            continue;
        }
        kept.insert(name.to_string(), v.clone());
        let left = expires - now.as_second();
        recheck = Some(recheck.map_or(left, |r| r.min(left)));
    }
    (kept, recheck.map(|s| Duration::from_secs(s as u64)))
}

/// Ready pods not being deleted and not about to be (upstream's `countHealthyPods`).
pub fn current_healthy(pods: &[Arc<Value>], disrupted: &Map<String, Value>) -> i64 {
    pods.iter()
        .filter(|p| p.pointer("/metadata/deletionTimestamp").is_none())
        .filter(|p| {
            let name = p
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            !disrupted.contains_key(name)
        })
        .filter(|p| is_ready(p))
        .count() as i64
}

/// The `DisruptionAllowed` condition, keeping its transition time while its status holds.
pub fn condition(
    pdb: &Value,
    status: bool,
    reason: &str,
    message: &str,
    generation: i64,
    now: &str,
) -> Value {
    let s = if status { "True" } else { "False" };
    let prev = pdb
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == "DisruptionAllowed"));
    let since = match prev {
        Some(c) if c["status"] == s => c["lastTransitionTime"].clone(),
        _ => json!(now),
    };
    json!({
        "type": "DisruptionAllowed",
        "status": s,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    })
}

/// The budget's status over its pods (upstream's `trySync`, or `failSafe` when the expected
/// count cannot be known), and when to look again (a pending disruption expiring).
pub fn compute_status(
    pdb: &Value,
    pods: &[Arc<Value>],
    scale: &ScaleOf,
    now: jiff::Timestamp,
) -> (Value, Option<Duration>) {
    let generation = pdb
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let now_s = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let mut status = pdb["status"].as_object().cloned().unwrap_or_default();
    let (expected, desired) = match expected_and_desired(pdb, pods, scale) {
        Ok(x) => x,
        Err(e) => {
            status.insert("disruptionsAllowed".into(), json!(0));
            status.insert(
                "conditions".into(),
                // As upstream's failSafe: the observed generation is left as it was.
                json!([condition(
                    pdb,
                    false,
                    "SyncFailed",
                    &e,
                    pdb.pointer("/status/observedGeneration")
                        .and_then(Value::as_i64)
                        .unwrap_or(0),
                    &now_s
                )]),
            );
            return (Value::Object(status), None);
        }
    };
    let (disrupted, recheck) = pending_disruptions(pdb, pods, now);
    let healthy = current_healthy(pods, &disrupted);
    let allowed = (healthy - desired).max(0);
    let cond = if allowed > 0 {
        condition(pdb, true, "SufficientPods", "", generation, &now_s)
    } else {
        condition(pdb, false, "InsufficientPods", "", generation, &now_s)
    };
    let mut out = Map::new();
    out.insert("observedGeneration".into(), json!(generation));
    out.insert("disruptionsAllowed".into(), json!(allowed));
    out.insert("currentHealthy".into(), json!(healthy));
    out.insert("desiredHealthy".into(), json!(desired));
    out.insert("expectedPods".into(), json!(expected));
    if !disrupted.is_empty() {
        out.insert("disruptedPods".into(), Value::Object(disrupted));
    }
    out.insert("conditions".into(), json!([cond]));
    (Value::Object(out), recheck)
}

/// The merge patch from `pdb`'s status to `status` (`None`: nothing changes).
pub fn status_patch(pdb: &Value, status: &Value) -> Option<Value> {
    let cur = pdb["status"].as_object().cloned().unwrap_or_default();
    let want = status.as_object().cloned().unwrap_or_default();
    if cur == want {
        return None;
    }
    let mut p = want.clone();
    for (k, v) in &cur {
        if !want.contains_key(k) {
            p.insert(k.clone(), Value::Null);
        } else if k == "disruptedPods" {
            // A map: entries no longer wanted are removed explicitly.
            let mut m = want[k].as_object().cloned().unwrap_or_default();
            for name in v.as_object().into_iter().flat_map(|o| o.keys()) {
                m.entry(name.clone()).or_insert(Value::Null);
            }
            p.insert(k.clone(), Value::Object(m));
        }
    }
    Some(json!({"status": p}))
}

struct Controller {
    client: Client,
    recorder: Recorder,
    pdbs: Arc<Informer>,
    pods: Arc<Informer>,
    rs: Arc<Informer>,
    rcs: Arc<Informer>,
    deployments: Arc<Informer>,
    statefulsets: Arc<Informer>,
}

impl Controller {
    /// A pod's controller and its desired replicas, through ReplicaSet → Deployment,
    /// ReplicationController and StatefulSet (upstream's finders).
    fn scale_of(&self, pod: &Value) -> Result<(String, i64), String> {
        let name = pod
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let ns = namespace_of(pod);
        let no = || format!("found no controllers for pod {name:?}");
        let r = controller_of(pod).ok_or_else(no)?;
        let owner = r["name"].as_str().unwrap_or_default();
        let uid = r["uid"].as_str().unwrap_or_default();
        let key = format!("{ns}/{owner}");
        let replicas = |o: &Value| {
            o.pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1)
        };
        let same = |o: &Value| o.pointer("/metadata/uid").and_then(Value::as_str) == Some(uid);
        match (
            r["apiVersion"].as_str().unwrap_or_default(),
            r["kind"].as_str().unwrap_or_default(),
        ) {
            ("apps/v1", "ReplicaSet") => {
                let rs = self.rs.get(&key).filter(|o| same(o)).ok_or_else(no)?;
                if let Some(d) = controller_of(&rs).filter(|d| d["kind"] == "Deployment") {
                    let dk = format!("{ns}/{}", d["name"].as_str().unwrap_or_default());
                    if let Some(dep) = self.deployments.get(&dk) {
                        return Ok((format!("Deployment/{dk}"), replicas(&dep)));
                    }
                }
                Ok((format!("ReplicaSet/{key}"), replicas(&rs)))
            }
            ("v1", "ReplicationController") => {
                let rc = self.rcs.get(&key).filter(|o| same(o)).ok_or_else(no)?;
                Ok((format!("ReplicationController/{key}"), replicas(&rc)))
            }
            ("apps/v1", "StatefulSet") => {
                let s = self
                    .statefulsets
                    .get(&key)
                    .filter(|o| same(o))
                    .ok_or_else(no)?;
                Ok((format!("StatefulSet/{key}"), replicas(&s)))
            }
            _ => Err(no()),
        }
    }

    async fn sync(&self, key: String) -> Result<Option<Duration>, ApiError> {
        let Some(pdb) = self.pdbs.get(&key) else {
            return Ok(None);
        };
        let (ns, name) = split_key(&key);
        let pods: Vec<Arc<Value>> = self
            .pods
            .list_namespace(ns.unwrap_or_default())
            .into_iter()
            .filter(|p| selects(&pdb, p))
            .collect();
        if pods.is_empty() {
            self.recorder
                .event(&pdb, "Normal", "NoPods", "No matching pods found".into());
        }
        let (status, recheck) =
            compute_status(&pdb, &pods, &|p| self.scale_of(p), jiff::Timestamp::now());
        if let Some(reason) = status
            .pointer("/conditions/0")
            .filter(|c| c["reason"] == "SyncFailed")
            .and_then(|c| c["message"].as_str())
        {
            self.recorder
                .event(&pdb, "Warning", "NoControllers", reason.to_string());
        }
        if let Some(patch) = status_patch(&pdb, &status) {
            let def = self.pdbs.def.clone();
            match self.client.merge_patch_status(&def, ns, name, &patch).await {
                Err(e) if e.code == 404 => return Ok(None),
                r => {
                    r?;
                }
            }
        }
        Ok(recheck)
    }
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client("disruption-controller");
    let inf = |g: &str, v: &str, p: &str| ctx.informers.get(&client.def(g, v, p));
    let c = Arc::new(Controller {
        pdbs: inf("policy", "v1", "poddisruptionbudgets"),
        pods: inf("", "v1", "pods"),
        rs: inf("apps", "v1", "replicasets"),
        rcs: inf("", "v1", "replicationcontrollers"),
        deployments: inf("apps", "v1", "deployments"),
        statefulsets: inf("apps", "v1", "statefulsets"),
        recorder: Recorder::new(client.clone(), "controllermanager"),
        client,
    });
    let queue = Queue::new();
    let mut tasks = Vec::new();
    {
        let c = c.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut pdb_rx = c.pdbs.subscribe();
            let mut pod_rx = c.pods.subscribe();
            let mut rs_rx = c.rs.subscribe();
            let mut rc_rx = c.rcs.subscribe();
            let mut dep_rx = c.deployments.subscribe();
            let mut sts_rx = c.statefulsets.subscribe();
            for i in [
                &c.pdbs,
                &c.pods,
                &c.rs,
                &c.rcs,
                &c.deployments,
                &c.statefulsets,
            ] {
                i.wait_synced().await;
            }
            for p in c.pdbs.list() {
                queue.add(key_of(&p));
            }
            let in_namespace = |o: &Value| {
                for p in c.pdbs.list_namespace(namespace_of(o)) {
                    queue.add(key_of(&p));
                }
            };
            loop {
                tokio::select! {
                    Some(ch) = pdb_rx.recv() => queue.add(key_of(ch.object())),
                    Some(ch) = pod_rx.recv() => {
                        let p = ch.object();
                        let mut seen = BTreeSet::new();
                        for b in c.pdbs.list_namespace(namespace_of(p)) {
                            if selects(&b, p) && seen.insert(key_of(&b)) {
                                queue.add(key_of(&b));
                            }
                        }
                    }
                    Some(ch) = rs_rx.recv() => in_namespace(ch.object()),
                    Some(ch) = rc_rx.recv() => in_namespace(ch.object()),
                    Some(ch) = dep_rx.recv() => in_namespace(ch.object()),
                    Some(ch) = sts_rx.recv() => in_namespace(ch.object()),
                    else => return,
                }
            }
        }));
    }
    let c2 = c.clone();
    tasks.extend(spawn_workers(
        queue,
        2,
        "disruption-controller",
        move |key| {
            let c = c2.clone();
            async move { c.sync(key).await }
        },
    ));
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool) -> Arc<Value> {
        Arc::new(
            json!({"metadata": {"name": name, "namespace": "d", "labels": {"app": "web"}},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}}),
        )
    }

    fn pdb(spec: Value) -> Value {
        let mut s = spec;
        s["selector"] = json!({"matchLabels": {"app": "web"}});
        json!({"metadata": {"name": "b", "namespace": "d", "generation": 2}, "spec": s})
    }

    fn scale3(_: &Value) -> Result<(String, i64), String> {
        Ok(("Deployment/d/web".into(), 3))
    }

    fn now() -> jiff::Timestamp {
        "2024-01-01T00:10:00Z".parse().unwrap()
    }

    #[test]
    fn min_available_counts_matching_pods() {
        let pods = vec![pod("a", true), pod("b", true), pod("c", false)];
        let (s, _) = compute_status(&pdb(json!({"minAvailable": 1})), &pods, &scale3, now());
        assert_eq!(s["expectedPods"], 3);
        assert_eq!(s["desiredHealthy"], 1);
        assert_eq!(s["currentHealthy"], 2);
        assert_eq!(s["disruptionsAllowed"], 1);
        assert_eq!(s["observedGeneration"], 2);
        assert_eq!(s["conditions"][0]["reason"], "SufficientPods");
        assert_eq!(s["conditions"][0]["status"], "True");
        let (s, _) = compute_status(&pdb(json!({"minAvailable": 2})), &pods, &scale3, now());
        assert_eq!(s["disruptionsAllowed"], 0);
        assert_eq!(s["conditions"][0]["reason"], "InsufficientPods");
    }

    #[test]
    fn max_unavailable_and_percentages_use_the_controllers_scale() {
        let pods = vec![pod("a", true), pod("b", true), pod("c", true)];
        let (s, _) = compute_status(&pdb(json!({"maxUnavailable": 1})), &pods, &scale3, now());
        assert_eq!(
            (
                s["expectedPods"].as_i64(),
                s["desiredHealthy"].as_i64(),
                s["disruptionsAllowed"].as_i64()
            ),
            (Some(3), Some(2), Some(1))
        );
        // 50% of 3 rounds up to 2.
        let (s, _) = compute_status(&pdb(json!({"minAvailable": "50%"})), &pods, &scale3, now());
        assert_eq!(s["desiredHealthy"], 2);
        let (s, _) = compute_status(
            &pdb(json!({"maxUnavailable": "50%"})),
            &pods,
            &scale3,
            now(),
        );
        assert_eq!(s["desiredHealthy"], 1);
        let none = |p: &Value| -> Result<(String, i64), String> {
            Err(format!(
                "found no controllers for pod {:?}",
                p["metadata"]["name"].as_str().unwrap()
            ))
        };
        let (s, _) = compute_status(&pdb(json!({"maxUnavailable": 1})), &pods, &none, now());
        assert_eq!(s["disruptionsAllowed"], 0);
        assert_eq!(s["conditions"][0]["reason"], "SyncFailed");
        assert_eq!(
            s["conditions"][0]["message"],
            "found no controllers for pod \"a\""
        );
    }

    #[test]
    fn evicted_pods_do_not_count_until_their_entry_expires() {
        let pods = vec![pod("a", true), pod("b", true)];
        let mut b = pdb(json!({"minAvailable": 1}));
        b["status"] =
            json!({"disruptedPods": {"a": "2024-01-01T00:09:30Z", "gone": "2024-01-01T00:09:30Z"}});
        let (s, recheck) = compute_status(&b, &pods, &scale3, now());
        assert_eq!(s["currentHealthy"], 1);
        assert_eq!(s["disruptionsAllowed"], 0);
        assert_eq!(s["disruptedPods"], json!({"a": "2024-01-01T00:09:30Z"}));
        assert_eq!(recheck, Some(Duration::from_secs(90)));
        let p = status_patch(&b, &s).unwrap();
        assert_eq!(p["status"]["disruptedPods"]["gone"], Value::Null);
        b["status"]["disruptedPods"]["a"] = json!("2024-01-01T00:07:00Z");
        let (s, _) = compute_status(&b, &pods, &scale3, now());
        assert_eq!(s["currentHealthy"], 2);
        assert!(s.get("disruptedPods").is_none());
    }

    #[test]
    fn selectors_pick_pods_as_upstream() {
        let p = pod("a", true);
        assert!(selects(&pdb(json!({})), &p));
        assert!(
            selects(&json!({"spec": {"selector": {}}}), &p),
            "an empty selector picks all"
        );
        assert!(!selects(&json!({"spec": {}}), &p), "no selector picks none");
    }
}
