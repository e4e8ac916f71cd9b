//! The persistent volume controller (upstream's `pkg/controller/volume/persistentvolume`) and
//! the `k3rs.io/local-path` provisioner, with the PVC/PV protection controllers (`protection`): binds claims to volumes, hands claims of
//! provisioning classes to their provisioner, provisions local-path volumes on the node the
//! scheduler selected, releases volumes whose claim went and applies their reclaim policy.
//! `binder` and `local_path` decide (pure functions over informer objects); this module
//! observes, applies their actions in order and records events as `persistentvolume-controller`
//! (provisioning events as the provisioner).

pub mod binder;
pub mod local_path;
pub mod protection;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::api::status::ApiResult;
use crate::controllers::client::{key_of, name_of, namespace_of, Client};
use crate::controllers::events::Recorder;
use crate::controllers::informer::{Change, Informer};
use crate::controllers::queue::Queue;
use crate::controllers::scheduler::volumes::{claim_class, selected_node};
use crate::controllers::{spawn_workers, Context};

use binder::{Action, ClaimWorld, ANN_BIND_COMPLETED};

/// Everything is looked at again this often (upstream's `--pvclaimbinder-sync-period`).
const RESYNC: Duration = Duration::from_secs(15);
/// How long a volume this controller created is trusted to exist before the informer shows it.
const CREATED_TTL: Duration = Duration::from_secs(60);

struct Controller {
    client: Client,
    claims: Arc<Informer>,
    volumes: Arc<Informer>,
    classes: Arc<Informer>,
    nodes: Arc<Informer>,
    pods: Arc<Informer>,
    recorder: Recorder,
    provisioner_events: Recorder,
    claim_queue: Arc<Queue>,
    volume_queue: Arc<Queue>,
    /// Volumes provisioned and not yet seen by the informer.
    created: Mutex<HashMap<String, Instant>>,
}

/// The claims a pod's volumes name (`namespace/name`), generic ephemeral ones included.
pub fn claims_of_pod(pod: &Value) -> Vec<String> {
    let ns = namespace_of(pod);
    pod.pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| {
            if let Some(n) = v
                .pointer("/persistentVolumeClaim/claimName")
                .and_then(Value::as_str)
            {
                Some(format!("{ns}/{n}"))
            } else if v.get("ephemeral").is_some_and(|e| !e.is_null()) {
                Some(format!(
                    "{ns}/{}-{}",
                    name_of(pod),
                    v["name"].as_str().unwrap_or_default()
                ))
            } else {
                None
            }
        })
        .collect()
}

fn terminated(pod: &Value) -> bool {
    matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    )
}

fn is_default_class(c: &Value) -> bool {
    [
        "storageclass.kubernetes.io/is-default-class",
        "storageclass.beta.kubernetes.io/is-default-class",
    ]
    .iter()
    .any(|a| binder::annotation(c, a) == Some("true"))
}

fn unbound(claim: &Value) -> bool {
    binder::annotation(claim, ANN_BIND_COMPLETED).is_none()
}

/// Whether the actions bind the claim (then there is nothing to provision).
fn binds(actions: &[Action]) -> bool {
    actions.iter().any(|a| match a {
        Action::UpdateVolume(_) | Action::VolumePhase { .. } => true,
        Action::UpdateClaim(c) => c
            .pointer("/spec/volumeName")
            .and_then(Value::as_str)
            .is_some_and(|v| !v.is_empty()),
        Action::ClaimStatus { status, .. } => status["phase"] == "Bound",
        _ => false,
    })
}

impl Controller {
    fn default_class(&self) -> Option<String> {
        let created = |c: &Value| {
            c.pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        self.classes
            .list()
            .into_iter()
            .filter(|c| is_default_class(c))
            .min_by(|a, b| {
                created(b)
                    .cmp(&created(a))
                    .then_with(|| name_of(a).cmp(name_of(b)))
            })
            .map(|c| name_of(&c).to_string())
    }

    fn volume_known(&self, name: &str) -> bool {
        if self.volumes.get(name).is_some() {
            return true;
        }
        let mut created = self.created.lock();
        created.retain(|_, at| at.elapsed() < CREATED_TTL);
        created.contains_key(name)
    }

    async fn sync_claim(&self, key: String) -> ApiResult<Option<Duration>> {
        let Some(claim) = self.claims.get(&key) else {
            return Ok(None);
        };
        let volumes = self.volumes.list();
        let class_name = claim_class(&claim).to_string();
        let class = Some(class_name.as_str())
            .filter(|c| !c.is_empty())
            .and_then(|c| self.classes.get(c));
        let default_class = self.default_class();
        let node = selected_node(&claim).and_then(|n| self.nodes.get(n));
        let node_labels: Option<BTreeMap<String, String>> =
            node.as_ref().map(|n| crate::api::selectors::labels_of(n));
        let mut unscheduled: Vec<String> = self
            .pods
            .list_namespace(namespace_of(&claim))
            .into_iter()
            .filter(|p| {
                !terminated(p)
                    && p.pointer("/spec/nodeName")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                    && claims_of_pod(p).contains(&key)
            })
            .map(|p| name_of(&p).to_string())
            .collect();
        unscheduled.sort();
        let world = ClaimWorld {
            volumes: &volumes,
            class: class.as_deref(),
            default_class: default_class.as_deref(),
            selected_node: node_labels.as_ref(),
            unscheduled_pods: unscheduled,
        };
        let mut actions = binder::sync_claim(&claim, &world);
        if !binds(&actions) && local_path::wants(&claim, class.as_deref()) {
            let exists = self.volume_known(&local_path::volume_name(&claim));
            let class = class.as_deref().expect("wants checks the class");
            let provision = local_path::provision(&claim, class, node.as_deref(), exists);
            actions.extend(provision);
        }
        self.apply(actions).await
    }

    async fn sync_volume(&self, key: String) -> ApiResult<Option<Duration>> {
        let Some(pv) = self.volumes.get(&key) else {
            return Ok(None);
        };
        let r = &pv["spec"]["claimRef"];
        let claim = r.is_object().then(|| {
            self.claims.get(&format!(
                "{}/{}",
                r["namespace"].as_str().unwrap_or_default(),
                r["name"].as_str().unwrap_or_default()
            ))
        });
        let actions = binder::sync_volume(&pv, claim.flatten().as_ref());
        self.apply(actions).await
    }

    /// Applies a decision's actions in order; the first failure ends it (and the sync is
    /// retried).
    async fn apply(&self, actions: Vec<Action>) -> ApiResult<Option<Duration>> {
        let pvs = self.volumes.def.clone();
        let pvcs = self.claims.def.clone();
        for a in actions {
            match a {
                Action::UpdateVolume(v) => {
                    self.client.update(&pvs, None, v).await?;
                }
                Action::VolumePhase {
                    name,
                    phase,
                    message,
                } => {
                    let message = Some(message).filter(|m| !m.is_empty());
                    self.client
                        .merge_patch_status(
                            &pvs,
                            None,
                            &name,
                            &json!({"status": {"phase": phase, "message": message}}),
                        )
                        .await?;
                }
                Action::UpdateClaim(c) => {
                    let ns = namespace_of(&c).to_string();
                    self.client.update(&pvcs, Some(&ns), c).await?;
                }
                Action::ClaimStatus {
                    namespace,
                    name,
                    status,
                } => {
                    self.client
                        .merge_patch_status(
                            &pvcs,
                            Some(&namespace),
                            &name,
                            &json!({ "status": status }),
                        )
                        .await?;
                }
                Action::CreateVolume(v) => {
                    let name = name_of(&v).to_string();
                    match self.client.create(&pvs, None, v).await {
                        Ok(_) => {}
                        // Made by an earlier sync the informer does not show yet.
                        Err(e) if e.code == 409 => {}
                        Err(e) => return Err(e),
                    }
                    self.created.lock().insert(name, Instant::now());
                }
                Action::DeleteVolume { name, uid } => {
                    match self.client.delete_uid(&pvs, None, &name, &uid, None).await {
                        Ok(_) => {}
                        Err(e) if e.code == 404 => {}
                        Err(e) => return Err(e),
                    }
                }
                Action::ConfirmReleased {
                    namespace,
                    name,
                    uid,
                    volume,
                } => match self.client.get(&pvcs, Some(&namespace), &name).await {
                    Ok(c) if crate::controllers::client::uid_of(&c) == uid => {
                        let bound_to = c
                            .pointer("/spec/volumeName")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        if bound_to.is_empty() || bound_to == volume {
                            // The informer lags behind the claim: look again soon.
                            return Ok(Some(Duration::from_secs(1)));
                        }
                    }
                    Ok(_) => {}
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                },
                Action::Event {
                    object,
                    kind,
                    reason,
                    message,
                } => {
                    let recorder = if matches!(
                        reason,
                        "Provisioning" | "ProvisioningSucceeded" | "ProvisioningFailed"
                    ) && object["kind"] == "PersistentVolumeClaim"
                        && binder::annotation(&object, binder::ANN_STORAGE_PROVISIONER)
                            == Some(binder::LOCAL_PATH)
                    {
                        &self.provisioner_events
                    } else {
                        &self.recorder
                    };
                    recorder.event(&object, kind, reason, message);
                }
                Action::SyncClaim(k) => self.claim_queue.add(k),
            }
        }
        Ok(None)
    }

    fn enqueue_unbound_claims(&self) {
        for c in self.claims.list().iter().filter(|c| unbound(c)) {
            self.claim_queue.add(key_of(c));
        }
    }

    fn on_claim(&self, ch: &Change) {
        let c = ch.object();
        if let Change::Deleted(c) = ch {
            // Its volume is released.
            if let Some(v) = c.pointer("/spec/volumeName").and_then(Value::as_str) {
                self.volume_queue.add(v);
            }
            for pv in self.volumes.list() {
                let r = &pv["spec"]["claimRef"];
                if r["name"].as_str() == Some(name_of(c))
                    && r["namespace"].as_str() == Some(namespace_of(c))
                {
                    self.volume_queue.add(name_of(&pv));
                }
            }
            return;
        }
        self.claim_queue.add(key_of(c));
    }

    fn on_volume(&self, ch: &Change) {
        let pv = ch.object();
        self.created.lock().remove(name_of(pv));
        if !matches!(ch, Change::Deleted(_)) {
            self.volume_queue.add(name_of(pv));
        }
        let r = &pv["spec"]["claimRef"];
        if r.is_object() {
            self.claim_queue.add(format!(
                "{}/{}",
                r["namespace"].as_str().unwrap_or_default(),
                r["name"].as_str().unwrap_or_default()
            ));
        }
        // A volume that became available may be what a waiting claim needs.
        let available = |v: &Value| v.pointer("/status/phase") == Some(&json!("Available"));
        let newly = match ch {
            Change::Added(v) => available(v),
            Change::Updated { old, new } => available(new) && !available(old),
            Change::Deleted(_) => false,
        };
        if newly {
            self.enqueue_unbound_claims();
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
        if relevant {
            for k in claims_of_pod(ch.object()) {
                if self.claims.get(&k).is_some_and(|c| unbound(&c)) {
                    self.claim_queue.add(k);
                }
            }
        }
    }
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client("persistentvolume-controller");
    let inf = |g: &str, p: &str| ctx.informers.get(&client.def(g, "v1", p));
    let c = Arc::new(Controller {
        claims: inf("", "persistentvolumeclaims"),
        volumes: inf("", "persistentvolumes"),
        classes: inf("storage.k8s.io", "storageclasses"),
        nodes: inf("", "nodes"),
        pods: inf("", "pods"),
        recorder: Recorder::new(client.clone(), "persistentvolume-controller"),
        provisioner_events: Recorder::new(client.clone(), binder::LOCAL_PATH),
        claim_queue: Queue::new(),
        volume_queue: Queue::new(),
        created: Mutex::new(HashMap::new()),
        client,
    });
    let mut tasks = Vec::new();
    {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut claims_rx = c.claims.subscribe();
            let mut volumes_rx = c.volumes.subscribe();
            let mut classes_rx = c.classes.subscribe();
            let mut pods_rx = c.pods.subscribe();
            for i in [&c.claims, &c.volumes, &c.classes, &c.nodes, &c.pods] {
                i.wait_synced().await;
            }
            let mut resync = tokio::time::interval(RESYNC);
            loop {
                tokio::select! {
                    Some(ch) = claims_rx.recv() => c.on_claim(&ch),
                    Some(ch) = volumes_rx.recv() => c.on_volume(&ch),
                    Some(_) = classes_rx.recv() => c.enqueue_unbound_claims(),
                    Some(ch) = pods_rx.recv() => c.on_pod(&ch),
                    _ = resync.tick() => {
                        for v in c.volumes.list() {
                            c.volume_queue.add(name_of(&v));
                        }
                        for pvc in c.claims.list() {
                            c.claim_queue.add(key_of(&pvc));
                        }
                    }
                    else => return,
                }
            }
        }));
    }
    // One worker per queue, as upstream: a claim's and a volume's sync never race with
    // themselves; between the two, resourceVersion preconditions settle it.
    let c1 = c.clone();
    tasks.extend(spawn_workers(
        c.claim_queue.clone(),
        1,
        "persistentvolume-controller",
        move |key| {
            let c = c1.clone();
            async move { c.sync_claim(key).await }
        },
    ));
    let c2 = c.clone();
    tasks.extend(spawn_workers(
        c.volume_queue.clone(),
        1,
        "persistentvolume-controller",
        move |key| {
            let c = c2.clone();
            async move { c.sync_volume(key).await }
        },
    ));
    tasks.extend(protection::start(ctx));
    tasks
}
