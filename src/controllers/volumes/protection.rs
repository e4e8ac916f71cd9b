//! The PVC and PV protection controllers (upstream's `pvcprotection` and `pvprotection`): the
//! `kubernetes.io/pvc-protection` finalizer (added at creation by admission, or here for older
//! claims) is removed from a claim being deleted once no scheduled pod uses it; the
//! `kubernetes.io/pv-protection` finalizer from a volume being deleted once it is not Bound.
//!
//! Upstream also asks the API server (a live pod list) before releasing a claim the informer
//! shows unused; k3rs controllers read only informers, so a pod created in the same instant
//! as the claim's deletion may be missed (the kubelet refuses to start a pod whose claim is
//! being deleted, which is upstream's other half of this guarantee).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::admission::storage::{PVC_PROTECTION, PV_PROTECTION};
use crate::api::status::ApiResult;
use crate::controllers::client::{
    controller_of, is_terminating, key_of, name_of, namespace_of, uid_of, Client,
};
use crate::controllers::informer::{Change, Informer};
use crate::controllers::queue::Queue;
use crate::controllers::{spawn_workers, Context};

fn has_finalizer(o: &Value, f: &str) -> bool {
    o.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|x| x == f))
}

fn shut_down(pod: &Value) -> bool {
    matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    )
}

/// Whether a pod keeps a claim in use (upstream's `podUsesPVC`): only scheduled pods count
/// (the kubelet will not start a pod whose claim is being deleted); a generic ephemeral
/// volume's claim counts while its pod runs.
pub fn pod_uses_claim(pod: &Value, claim: &Value) -> bool {
    let scheduled = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    if !scheduled || namespace_of(pod) != namespace_of(claim) {
        return false;
    }
    pod.pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|v| {
            if v.pointer("/persistentVolumeClaim/claimName")
                .and_then(Value::as_str)
                == Some(name_of(claim))
            {
                return true;
            }
            v.get("ephemeral").is_some_and(|e| !e.is_null())
                && !shut_down(pod)
                && format!(
                    "{}-{}",
                    name_of(pod),
                    v["name"].as_str().unwrap_or_default()
                ) == name_of(claim)
                && controller_of(claim).and_then(|o| o["uid"].as_str()) == Some(uid_of(pod))
        })
}

/// What to do about an object's protection finalizer.
#[derive(Debug, PartialEq, Eq)]
pub enum Protection {
    Nothing,
    Add,
    Remove,
}

/// The claim's finalizer, given the pods of its namespace.
pub fn claim_protection(claim: &Value, pods: &[Arc<Value>]) -> Protection {
    let has = has_finalizer(claim, PVC_PROTECTION);
    match (is_terminating(claim), has) {
        (false, false) => Protection::Add,
        (true, true) if !pods.iter().any(|p| pod_uses_claim(p, claim)) => Protection::Remove,
        _ => Protection::Nothing,
    }
}

/// The volume's finalizer: kept while the volume is Bound.
pub fn volume_protection(pv: &Value) -> Protection {
    let has = has_finalizer(pv, PV_PROTECTION);
    let bound = pv.pointer("/status/phase").and_then(Value::as_str) == Some("Bound");
    match (is_terminating(pv), has) {
        (false, false) => Protection::Add,
        (true, true) if !bound => Protection::Remove,
        _ => Protection::Nothing,
    }
}

struct Controller {
    client: Client,
    claims: Arc<Informer>,
    volumes: Arc<Informer>,
    pods: Arc<Informer>,
    queue: Arc<Queue>,
}

impl Controller {
    async fn sync(&self, key: String) -> ApiResult<Option<Duration>> {
        let (inf, finalizer, ns, obj) = if let Some(k) = key.strip_prefix("pvc:") {
            let Some(claim) = self.claims.get(k) else {
                return Ok(None);
            };
            let pods = self.pods.list_namespace(namespace_of(&claim));
            let p = claim_protection(&claim, &pods);
            (
                p,
                PVC_PROTECTION,
                Some(namespace_of(&claim).to_string()),
                claim,
            )
        } else if let Some(k) = key.strip_prefix("pv:") {
            let Some(pv) = self.volumes.get(k) else {
                return Ok(None);
            };
            (volume_protection(&pv), PV_PROTECTION, None, pv)
        } else {
            return Ok(None);
        };
        let def = if ns.is_some() {
            self.claims.def.clone()
        } else {
            self.volumes.def.clone()
        };
        let mut o = (*obj).clone();
        let mut list: Vec<Value> = o
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        match inf {
            Protection::Nothing => return Ok(None),
            Protection::Add => list.push(json!(finalizer)),
            Protection::Remove => list.retain(|f| f != finalizer),
        }
        o["metadata"]["finalizers"] = json!(list);
        match self.client.update(&def, ns.as_deref(), o).await {
            Ok(_) => Ok(None),
            Err(e) if e.code == 404 => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn on_pod(&self, ch: &Change) {
        let relevant = match ch {
            Change::Added(_) | Change::Deleted(_) => true,
            Change::Updated { old, new } => {
                old.pointer("/spec/nodeName") != new.pointer("/spec/nodeName")
                    || old.pointer("/status/phase") != new.pointer("/status/phase")
            }
        };
        if !relevant {
            return;
        }
        for k in super::claims_of_pod(ch.object()) {
            if self.claims.get(&k).is_some_and(|c| is_terminating(&c)) {
                self.queue.add(format!("pvc:{k}"));
            }
        }
    }
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client("pvc-protection-controller");
    let inf = |p: &str| ctx.informers.get(&client.def("", "v1", p));
    let c = Arc::new(Controller {
        claims: inf("persistentvolumeclaims"),
        volumes: inf("persistentvolumes"),
        pods: inf("pods"),
        queue: Queue::new(),
        client,
    });
    let mut tasks = Vec::new();
    {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut claims_rx = c.claims.subscribe();
            let mut volumes_rx = c.volumes.subscribe();
            let mut pods_rx = c.pods.subscribe();
            for i in [&c.claims, &c.volumes, &c.pods] {
                i.wait_synced().await;
            }
            for o in c.claims.list() {
                c.queue.add(format!("pvc:{}", key_of(&o)));
            }
            for o in c.volumes.list() {
                c.queue.add(format!("pv:{}", name_of(&o)));
            }
            loop {
                tokio::select! {
                    Some(ch) = claims_rx.recv() => {
                        if !matches!(ch, Change::Deleted(_)) {
                            c.queue.add(format!("pvc:{}", key_of(ch.object())));
                        }
                    }
                    Some(ch) = volumes_rx.recv() => {
                        if !matches!(ch, Change::Deleted(_)) {
                            c.queue.add(format!("pv:{}", name_of(ch.object())));
                        }
                    }
                    Some(ch) = pods_rx.recv() => c.on_pod(&ch),
                    else => return,
                }
            }
        }));
    }
    let c2 = c.clone();
    tasks.extend(spawn_workers(
        c.queue.clone(),
        1,
        "pvc-protection-controller",
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

    #[test]
    fn a_claim_is_released_only_when_no_scheduled_pod_uses_it() {
        let claim = |deleting: bool, fin: bool| {
            let mut c = json!({"metadata": {"name": "data", "namespace": "ns", "uid": "c1"}});
            if deleting {
                c["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
            }
            if fin {
                c["metadata"]["finalizers"] = json!([PVC_PROTECTION]);
            }
            c
        };
        let pod = |node: &str, phase: &str| {
            Arc::new(
                json!({"metadata": {"name": "p", "namespace": "ns", "uid": "p1"},
                "spec": {"nodeName": node, "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "data"}}]},
                "status": {"phase": phase}}),
            )
        };
        assert_eq!(claim_protection(&claim(false, false), &[]), Protection::Add);
        assert_eq!(
            claim_protection(&claim(false, true), &[]),
            Protection::Nothing
        );
        assert_eq!(
            claim_protection(&claim(true, true), &[]),
            Protection::Remove
        );
        assert_eq!(
            claim_protection(&claim(true, true), &[pod("n1", "Running")]),
            Protection::Nothing
        );
        // Unscheduled pods never ran with it; finished ones still hold it, as upstream.
        assert_eq!(
            claim_protection(&claim(true, true), &[pod("", "Pending")]),
            Protection::Remove
        );
        assert_eq!(
            claim_protection(&claim(true, true), &[pod("n1", "Succeeded")]),
            Protection::Nothing
        );
    }

    #[test]
    fn a_volume_is_released_once_it_is_not_bound() {
        let pv = |phase: &str| {
            json!({"metadata": {"name": "v", "deletionTimestamp": "2024-01-01T00:00:00Z", "finalizers": [PV_PROTECTION]},
                   "status": {"phase": phase}})
        };
        assert_eq!(volume_protection(&pv("Bound")), Protection::Nothing);
        assert_eq!(volume_protection(&pv("Released")), Protection::Remove);
        assert_eq!(
            volume_protection(&json!({"metadata": {"name": "v"}})),
            Protection::Add
        );
    }
}
