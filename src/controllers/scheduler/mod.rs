//! The scheduler: a priority queue of pending pods (back-off for unschedulable ones, which come
//! back when nodes, pods or storage change), a cache of what every node offers and runs, the
//! filters and scores of `plugins` and `volumes`, priority preemption, and binding (the pod's
//! volumes first, then `pods/binding`) without waiting (the pod is assumed on its node
//! meanwhile).

pub mod plugins;
pub mod volumes;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::{Notify, Semaphore};

use crate::api::status::ApiError;
use crate::controllers::client::{
    is_terminating, key_of, name_of, namespace_of, split_key, uid_of, Client,
};
use crate::controllers::events::Recorder;
use crate::controllers::informer::{Change, Informer};
use crate::controllers::pods::phase;
use crate::controllers::Context;
use plugins::{Candidate, NodeInfo, Rejection};
use volumes::{Plan, VolumeLister, ANN_SELECTED_NODE};

const SCHEDULER_NAME: &str = "default-scheduler";
const MAX_BINDS_IN_FLIGHT: usize = 256;

#[derive(Default)]
struct Cache {
    nodes: HashMap<String, NodeInfo>,
    /// Where each pod is counted (assigned or assumed).
    pod_node: HashMap<String, String>,
    /// Pods bound by us that the informer has not shown bound yet.
    assumed: HashSet<String>,
    /// Pods on nodes the cache does not know (yet).
    waiting: HashMap<String, Vec<Arc<Value>>>,
}

impl Cache {
    fn place(&mut self, pod: &Arc<Value>, node: &str) {
        let key = key_of(pod);
        self.unplace(&key);
        self.pod_node.insert(key, node.to_string());
        match self.nodes.get_mut(node) {
            Some(n) => n.add_pod(plugins::placed(pod)),
            None => self
                .waiting
                .entry(node.to_string())
                .or_default()
                .push(pod.clone()),
        }
    }

    fn unplace(&mut self, key: &str) {
        if let Some(node) = self.pod_node.remove(key) {
            if let Some(n) = self.nodes.get_mut(&node) {
                n.remove_pod(key);
            }
            if let Some(w) = self.waiting.get_mut(&node) {
                w.retain(|p| key_of(p) != key);
            }
        }
    }
}

#[derive(Default)]
struct Queues {
    active: BinaryHeap<(i64, Reverse<u64>, String)>,
    queued: HashSet<String>,
    /// Unschedulable pods: attempts and when they last failed.
    /// Unschedulable pods: attempts, when parked, and whether the cluster changed since.
    parked: HashMap<String, (u32, Instant, bool)>,
    seq: u64,
    cluster_changed: bool,
}

struct Scheduler {
    client: Client,
    pods: Arc<Informer>,
    nodes: Arc<Informer>,
    claims: Arc<Informer>,
    volumes: Arc<Informer>,
    classes: Arc<Informer>,
    namespaces: Arc<Informer>,
    services: Arc<Informer>,
    /// Owners whose selectors default spreading follows (ReplicaSets, ReplicationControllers,
    /// StatefulSets).
    owners: HashMap<&'static str, Arc<Informer>>,
    recorder: Recorder,
    cache: Mutex<Cache>,
    assumed_volumes: Mutex<AssumedVolumes>,
    queues: Mutex<Queues>,
    wake: Notify,
    binds: Arc<Semaphore>,
}

/// Volume bindings decided for pods being bound that the informers do not show yet (upstream's
/// assume cache), so that the next pods see them.
#[derive(Default)]
struct AssumedVolumes {
    /// Claim key → the node chosen for provisioning it.
    claims: HashMap<String, String>,
    /// Volume name → the volume with its new `claimRef`.
    volumes: HashMap<String, Arc<Value>>,
}

impl AssumedVolumes {
    fn assume(&mut self, plan: &Plan, node: &str) {
        for k in &plan.provisions {
            self.claims.insert(k.clone(), node.to_string());
        }
        for pv in &plan.static_bindings {
            self.volumes
                .insert(name_of(pv).to_string(), Arc::new(pv.clone()));
        }
    }

    fn forget(&mut self, plan: &Plan) {
        for k in &plan.provisions {
            self.claims.remove(k);
        }
        for pv in &plan.static_bindings {
            self.volumes.remove(name_of(pv));
        }
    }
}

/// The scheduler's `VolumeLister`: its informers, with the assumed bindings applied.
struct Storage<'a>(&'a Scheduler);

impl Storage<'_> {
    fn with_assumed_volume(&self, pv: Arc<Value>) -> Arc<Value> {
        let assumed = self.0.assumed_volumes.lock();
        assumed.volumes.get(name_of(&pv)).cloned().unwrap_or(pv)
    }
}

impl VolumeLister for Storage<'_> {
    fn claim(&self, namespace: &str, name: &str) -> Option<Arc<Value>> {
        let key = format!("{namespace}/{name}");
        let claim = self.0.claims.get(&key)?;
        let assumed = self.0.assumed_volumes.lock();
        match assumed.claims.get(&key) {
            Some(node) if volumes::selected_node(&claim) != Some(node.as_str()) => {
                let mut c = (*claim).clone();
                c["metadata"]["annotations"][ANN_SELECTED_NODE] = json!(node);
                Some(Arc::new(c))
            }
            _ => Some(claim),
        }
    }

    fn volume(&self, name: &str) -> Option<Arc<Value>> {
        self.0
            .volumes
            .get(name)
            .map(|pv| self.with_assumed_volume(pv))
    }

    fn class(&self, name: &str) -> Option<Arc<Value>> {
        self.0.classes.get(name)
    }

    fn volumes_of_class(&self, class: &str) -> Vec<Arc<Value>> {
        self.0
            .volumes
            .list()
            .into_iter()
            .map(|pv| self.with_assumed_volume(pv))
            .filter(|pv| volumes::volume_class(pv) == class)
            .collect()
    }
}

fn responsible(pod: &Value) -> bool {
    let name = pod
        .pointer("/spec/schedulerName")
        .and_then(Value::as_str)
        .unwrap_or(SCHEDULER_NAME);
    name == SCHEDULER_NAME
}

fn assigned_node(pod: &Value) -> Option<&str> {
    pod.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
}

fn priority(pod: &Value) -> i64 {
    pod.pointer("/spec/priority")
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

impl Scheduler {
    /// Waits until every informer the scheduler reads has its initial list.
    async fn synced(&self) {
        for i in [
            &self.nodes,
            &self.pods,
            &self.claims,
            &self.volumes,
            &self.classes,
            &self.namespaces,
            &self.services,
        ]
        .into_iter()
        .chain(self.owners.values())
        {
            i.wait_synced().await;
        }
    }

    fn enqueue(&self, pod: &Value) {
        let key = key_of(pod);
        let mut q = self.queues.lock();
        if q.queued.contains(&key) || q.parked.contains_key(&key) {
            return;
        }
        q.seq += 1;
        let seq = q.seq;
        q.active.push((priority(pod), Reverse(seq), key.clone()));
        q.queued.insert(key);
        drop(q);
        self.wake.notify_one();
    }

    fn forget(&self, key: &str) {
        let mut q = self.queues.lock();
        q.queued.remove(key);
        q.parked.remove(key);
    }

    fn cluster_changed(&self) {
        let mut q = self.queues.lock();
        q.cluster_changed = true;
        for p in q.parked.values_mut() {
            p.2 = true;
        }
    }

    /// Moves parked pods back to the active queue once their back-off passed, if the cluster
    /// changed since they were parked (or every minute regardless).
    fn flush_parked(&self, force: bool) {
        let mut q = self.queues.lock();
        if !q.cluster_changed && !force {
            return;
        }
        let ready: Vec<String> = q
            .parked
            .iter()
            .filter(|(_, (attempts, at, woken))| {
                force || (*woken && at.elapsed() >= backoff(*attempts))
            })
            .map(|(k, _)| k.clone())
            .collect();
        q.cluster_changed = q.parked.values().any(|p| p.2) && ready.len() < q.parked.len();
        if ready.is_empty() {
            return;
        }
        for k in ready {
            q.parked.remove(&k);
            let prio = self.pods.get(&k).map(|p| priority(&p)).unwrap_or(0);
            q.seq += 1;
            let seq = q.seq;
            if q.queued.insert(k.clone()) {
                q.active.push((prio, Reverse(seq), k));
            }
        }
        drop(q);
        self.wake.notify_one();
    }

    async fn next(&self) -> String {
        loop {
            let notified = self.wake.notified();
            {
                let mut q = self.queues.lock();
                if let Some((_, _, k)) = q.active.pop() {
                    q.queued.remove(&k);
                    return k;
                }
            }
            notified.await;
        }
    }

    fn on_pod(&self, ch: &Change) {
        match ch {
            Change::Added(p) | Change::Updated { new: p, .. } => {
                let key = key_of(p);
                let terminal = matches!(phase(p), "Succeeded" | "Failed");
                match assigned_node(p) {
                    Some(node) => {
                        self.forget(&key);
                        let mut c = self.cache.lock();
                        c.assumed.remove(&key);
                        if terminal {
                            c.unplace(&key);
                            drop(c);
                            self.cluster_changed();
                        } else {
                            c.place(p, node);
                        }
                    }
                    None => {
                        if responsible(p)
                            && !is_terminating(p)
                            && !terminal
                            && !self.cache.lock().assumed.contains(&key)
                        {
                            if let Change::Updated { .. } = ch {
                                // A changed pending pod (new tolerations, say) is tried again.
                                let mut q = self.queues.lock();
                                q.parked.remove(&key);
                            }
                            self.enqueue(p);
                        }
                    }
                }
            }
            Change::Deleted(p) => {
                let key = key_of(p);
                self.forget(&key);
                let mut c = self.cache.lock();
                c.assumed.remove(&key);
                c.unplace(&key);
                drop(c);
                self.cluster_changed();
            }
        }
    }

    fn on_node(&self, ch: &Change) {
        let mut c = self.cache.lock();
        match ch {
            Change::Added(n) | Change::Updated { new: n, .. } => {
                let name = name_of(n).to_string();
                match c.nodes.get_mut(&name) {
                    Some(info) => info.update_node(n),
                    None => {
                        let mut info = NodeInfo::from_node(n);
                        for p in c.waiting.remove(&name).unwrap_or_default() {
                            info.add_pod(plugins::placed(&p));
                        }
                        c.nodes.insert(name, info);
                    }
                }
            }
            Change::Deleted(n) => {
                c.nodes.remove(name_of(n));
            }
        }
        drop(c);
        self.cluster_changed();
    }

    /// A claim, volume or storage class changed: parked pods may fit now; bindings the
    /// informers now show are no longer assumed.
    fn on_storage(&self, ch: &Change) {
        let o = ch.object();
        {
            let mut a = self.assumed_volumes.lock();
            match o["kind"].as_str().unwrap_or_default() {
                "PersistentVolumeClaim" => {
                    let key = key_of(o);
                    let seen = matches!(ch, Change::Deleted(_))
                        || a.claims.get(&key).map(String::as_str) == volumes::selected_node(o);
                    if seen {
                        a.claims.remove(&key);
                    }
                }
                "PersistentVolume" => {
                    let name = name_of(o);
                    let seen = matches!(ch, Change::Deleted(_))
                        || a.volumes.get(name).is_some_and(|pv| {
                            pv["spec"]["claimRef"]["uid"] == o["spec"]["claimRef"]["uid"]
                        });
                    if seen {
                        a.volumes.remove(name);
                    }
                }
                _ => {}
            }
        }
        self.cluster_changed();
    }

    /// The pod as the plugins see it: namespace selectors resolved, default spreading.
    fn candidate(&self, pod: Arc<Value>) -> Candidate {
        let mut cand = Candidate::new(pod);
        let ns = cand.me.namespace.clone();
        let namespaces = if cand.has_namespace_selectors() {
            self.namespaces.list()
        } else {
            self.namespaces.get(&ns).into_iter().collect()
        };
        cand.resolve_namespaces(&namespaces);
        if !cand.has_spread {
            let owner = plugins::spreading_owner(&cand.pod)
                .and_then(|(kind, name)| self.owners.get(kind)?.get(&format!("{ns}/{name}")));
            cand.default_spread = plugins::default_selector(
                &cand.pod,
                &self.services.list_namespace(&ns),
                owner.as_deref(),
            );
        }
        cand
    }

    async fn schedule_one(self: &Arc<Self>, key: String) {
        let Some(pod) = self.pods.get(&key) else {
            return;
        };
        if assigned_node(&pod).is_some()
            || is_terminating(&pod)
            || !responsible(&pod)
            || matches!(phase(&pod), "Succeeded" | "Failed")
        {
            return;
        }
        if self.cache.lock().assumed.contains(&key) {
            return;
        }
        let mut cand = self.candidate(pod.clone());
        let claims = volumes::pre_filter(&pod, &Storage(self));
        let never_preempts = cand.pod["spec"]["preemptionPolicy"] == "Never";
        let decision = {
            let c = self.cache.lock();
            let total = c.nodes.len();
            match claims {
                _ if total == 0 => Err(Unschedulable {
                    message: "0/0 nodes are available: no nodes available to schedule pods."
                        .to_string(),
                    preempt: None,
                }),
                Err(reason) => {
                    // A PreFilter rejection: every node gets it, and preemption cannot help.
                    let preemption = if never_preempts {
                        NEVER_PREEMPTS.to_string()
                    } else {
                        plugins::preemption_message(total, total, 0)
                    };
                    Err(Unschedulable {
                        message: plugins::pre_filter_message(total, &reason, &preemption),
                        preempt: None,
                    })
                }
                Ok(claims) => {
                    cand.volumes = claims;
                    decide(&cand, &c.nodes, never_preempts)
                }
            }
        };
        match decision {
            Ok((node, plan)) => {
                {
                    let mut c = self.cache.lock();
                    c.assumed.insert(key.clone());
                    c.place(&pod, &node);
                }
                self.assumed_volumes.lock().assume(&plan, &node);
                let me = self.clone();
                let permit = self
                    .binds
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore open");
                tokio::spawn(async move {
                    let (ns, name) = split_key(&key);
                    let mut res = me.pre_bind(&node, &plan).await;
                    if res.is_ok() {
                        res = me.client.bind(ns.unwrap_or_default(), name, &node).await;
                    }
                    drop(permit);
                    match res {
                        Ok(()) => me.recorder.event(
                            &pod,
                            "Normal",
                            "Scheduled",
                            format!(
                                "Successfully assigned {}/{} to {node}",
                                namespace_of(&pod),
                                name_of(&pod)
                            ),
                        ),
                        Err(e) => {
                            tracing::debug!(pod = %key, error = %e, "binding failed");
                            me.assumed_volumes.lock().forget(&plan);
                            {
                                let mut c = me.cache.lock();
                                c.assumed.remove(&key);
                                c.unplace(&key);
                            }
                            if e.code != 404 && e.code != 409 {
                                me.park(&key);
                            } else if let Some(p) = me.pods.get(&key) {
                                me.enqueue(&p);
                            }
                        }
                    }
                });
            }
            Err(Unschedulable { message, preempt }) => {
                self.park(&key);
                self.report_unschedulable(&pod, &message).await;
                if let Some((node, victims)) = preempt {
                    self.preempt(&pod, &node, &victims).await;
                }
            }
        }
    }

    /// Upstream's PreBind of VolumeBinding: binds the chosen existing volumes to their claims
    /// (`claimRef`) and writes the chosen node on the claims to provision. Upstream then waits
    /// (up to 10 minutes) until the PV controller and the provisioner have bound every claim;
    /// k3rs has neither yet (the storage issue adds PV binding and local-path provisioning), so
    /// the pod is bound right away and nothing waits for its volumes.
    async fn pre_bind(&self, node: &str, plan: &Plan) -> Result<(), ApiError> {
        if plan.is_empty() {
            return Ok(());
        }
        let pvs = self.volumes.def.clone();
        for pv in &plan.static_bindings {
            self.client.update(&pvs, None, pv.clone()).await?;
        }
        let pvcs = self.claims.def.clone();
        for k in &plan.provisions {
            let (ns, name) = split_key(k);
            self.client
                .merge_patch(
                    &pvcs,
                    ns,
                    name,
                    &json!({"metadata": {"annotations": {ANN_SELECTED_NODE: node}}}),
                )
                .await?;
        }
        Ok(())
    }

    fn park(&self, key: &str) {
        let mut q = self.queues.lock();
        q.queued.remove(key);
        let attempts = q.parked.get(key).map_or(1, |(a, _, _)| a + 1);
        q.parked
            .insert(key.to_string(), (attempts, Instant::now(), false));
    }

    async fn report_unschedulable(&self, pod: &Value, message: &str) {
        let current = pod
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().find(|c| c["type"] == "PodScheduled"))
            .and_then(|c| c["message"].as_str())
            .unwrap_or_default()
            .to_string();
        if current == message {
            return;
        }
        let def = self.pods.def.clone();
        let cond = json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message, "lastProbeTime": null, "lastTransitionTime": crate::api::objects::now_rfc3339()});
        let mut conds: Vec<Value> = pod
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        conds.retain(|c| c["type"] != "PodScheduled");
        conds.push(cond);
        if let Err(e) = self
            .client
            .merge_patch_status(
                &def,
                Some(namespace_of(pod)),
                name_of(pod),
                &json!({"status": {"conditions": conds}}),
            )
            .await
        {
            tracing::debug!(error = %e, "reporting an unschedulable pod");
        }
        self.recorder
            .event(pod, "Warning", "FailedScheduling", message.to_string());
    }

    async fn preempt(&self, pod: &Value, node: &str, victims: &[String]) {
        let def = self.pods.def.clone();
        for v in victims {
            let (ns, name) = split_key(v);
            if let Some(victim) = self.pods.get(v) {
                self.recorder.event(
                    &victim,
                    "Normal",
                    "Preempted",
                    format!("Preempted by pod {} on node {node}", uid_of(pod)),
                );
                let _ = self
                    .client
                    .delete_uid(&def, ns, name, uid_of(&victim), None)
                    .await;
            }
        }
        let _ = self
            .client
            .merge_patch_status(
                &def,
                Some(namespace_of(pod)),
                name_of(pod),
                &json!({"status": {"nominatedNodeName": node}}),
            )
            .await;
        self.cluster_changed();
    }
}

const NEVER_PREEMPTS: &str = "preemption: not eligible due to preemptionPolicy=Never.";

/// Why a pod was not scheduled: the FailedScheduling message, and the node to free (with the
/// pods to evict) when preemption can help.
struct Unschedulable {
    message: String,
    preempt: Option<(String, Vec<String>)>,
}

/// One scheduling cycle over the cached nodes (after the volume PreFilter): filters, scores,
/// and preemption when no node fits. The chosen node and what binding the pod's volumes there
/// takes, or why none was chosen. Ties go to the first node by name.
fn decide(
    cand: &Candidate,
    nodes: &HashMap<String, NodeInfo>,
    never_preempts: bool,
) -> Result<(String, Plan), Unschedulable> {
    let state = plugins::pre_filter(cand, nodes);
    let mut names: Vec<&String> = nodes.keys().collect();
    names.sort();
    let mut feasible: Vec<&NodeInfo> = Vec::new();
    let mut rejected: Vec<(&NodeInfo, Rejection)> = Vec::new();
    for name in names {
        let node = &nodes[name];
        match plugins::filter(cand, &state, node) {
            Ok(()) => feasible.push(node),
            Err(r) => rejected.push((node, r)),
        }
    }
    if !feasible.is_empty() {
        let totals: Vec<i64> = plugins::score(cand, &feasible, nodes)
            .iter()
            .map(plugins::Scores::total)
            .collect();
        let mut best = 0;
        for (i, t) in totals.iter().enumerate() {
            if *t > totals[best] {
                best = i;
            }
        }
        let node = feasible[best];
        return Ok((node.name.clone(), cand.volumes.plan(node)));
    }
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for (_, r) in &rejected {
        for reason in &r.reasons {
            *reasons.entry(reason.clone()).or_default() += 1;
        }
    }
    let total = nodes.len();
    if never_preempts {
        return Err(Unschedulable {
            message: plugins::unschedulable_message(total, &reasons, NEVER_PREEMPTS),
            preempt: None,
        });
    }
    // Preemption on the nodes whose failure is resolvable: the node whose victims matter least
    // (lowest highest priority, then lowest priority sum, then fewest), as upstream without
    // PodDisruptionBudgets.
    let unhelpful = rejected.iter().filter(|(_, r)| r.unresolvable).count();
    let mut no_victims = 0;
    // (rank, node, victims)
    type Choice = ((i64, i64, usize), String, Vec<String>);
    let mut choice: Option<Choice> = None;
    for (node, _) in rejected.iter().filter(|(_, r)| !r.unresolvable) {
        let Some(v) = plugins::victims(cand, &state, node) else {
            no_victims += 1;
            continue;
        };
        let prios: Vec<i64> = v.iter().map(|k| node.pods[k].priority).collect();
        let rank = (
            prios.iter().copied().max().unwrap_or(0),
            prios.iter().sum(),
            v.len(),
        );
        if choice.as_ref().is_none_or(|(r, _, _)| rank < *r) {
            choice = Some((rank, node.name.clone(), v));
        }
    }
    match choice {
        Some((_, node, victims)) => Err(Unschedulable {
            message: plugins::unschedulable_message(total, &reasons, "")
                .trim_end()
                .to_string(),
            preempt: Some((node, victims)),
        }),
        None => Err(Unschedulable {
            message: plugins::unschedulable_message(
                total,
                &reasons,
                &plugins::preemption_message(total, unhelpful, no_victims),
            ),
            preempt: None,
        }),
    }
}

fn backoff(attempts: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.pow(attempts.saturating_sub(1).min(4)))
        .min(Duration::from_secs(10))
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client("default-scheduler");
    let inf = |group: &str, plural: &str| ctx.informers.get(&client.def(group, "v1", plural));
    let s = Arc::new(Scheduler {
        pods: inf("", "pods"),
        nodes: inf("", "nodes"),
        claims: inf("", "persistentvolumeclaims"),
        volumes: inf("", "persistentvolumes"),
        classes: inf("storage.k8s.io", "storageclasses"),
        namespaces: inf("", "namespaces"),
        services: inf("", "services"),
        owners: HashMap::from([
            ("ReplicaSet", inf("apps", "replicasets")),
            ("ReplicationController", inf("", "replicationcontrollers")),
            ("StatefulSet", inf("apps", "statefulsets")),
        ]),
        recorder: Recorder::new(client.clone(), "default-scheduler"),
        client,
        cache: Mutex::new(Cache::default()),
        assumed_volumes: Mutex::new(AssumedVolumes::default()),
        queues: Mutex::new(Queues::default()),
        wake: Notify::new(),
        binds: Arc::new(Semaphore::new(MAX_BINDS_IN_FLIGHT)),
    });
    let mut tasks = Vec::new();
    {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut node_rx = s.nodes.subscribe();
            let mut pod_rx = s.pods.subscribe();
            let mut claim_rx = s.claims.subscribe();
            let mut volume_rx = s.volumes.subscribe();
            let mut class_rx = s.classes.subscribe();
            s.synced().await;
            for n in s.nodes.list() {
                s.on_node(&Change::Added(n));
            }
            for p in s.pods.list() {
                s.on_pod(&Change::Added(p));
            }
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut last_force = Instant::now();
            loop {
                tokio::select! {
                    Some(ch) = node_rx.recv() => s.on_node(&ch),
                    Some(ch) = pod_rx.recv() => s.on_pod(&ch),
                    Some(ch) = claim_rx.recv() => s.on_storage(&ch),
                    Some(ch) = volume_rx.recv() => s.on_storage(&ch),
                    Some(ch) = class_rx.recv() => s.on_storage(&ch),
                    _ = tick.tick() => {
                        let force = last_force.elapsed() > Duration::from_secs(60);
                        if force {
                            last_force = Instant::now();
                        }
                        s.flush_parked(force);
                    }
                    else => return,
                }
            }
        }));
    }
    {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.synced().await;
            loop {
                let key = s.next().await;
                s.schedule_one(key).await;
            }
        }));
    }
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod on a test node: name, priority, cpu request.
    type TestPod<'a> = (&'a str, i64, &'a str);

    fn nodes(list: &[(&str, &str, &[TestPod])]) -> HashMap<String, NodeInfo> {
        list.iter()
            .map(|(name, cpu, pods)| {
                let mut n = NodeInfo::from_node(&json!({
                    "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                    "status": {"allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "110"}},
                }));
                for (p, prio, cpu) in pods.iter() {
                    n.add_pod(plugins::placed(&json!({
                        "metadata": {"name": p, "namespace": "d"},
                        "spec": {"priority": prio, "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]},
                    })));
                }
                (name.to_string(), n)
            })
            .collect()
    }

    fn candidate(priority: i64, cpu: &str, extra: Value) -> Candidate {
        let mut pod = json!({
            "metadata": {"name": "new", "namespace": "d"},
            "spec": {"priority": priority, "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]},
        });
        if let (Some(spec), Some(extra)) = (pod["spec"].as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        Candidate::new(Arc::new(pod))
    }

    fn failure(
        r: Result<(String, Plan), Unschedulable>,
    ) -> (String, Option<(String, Vec<String>)>) {
        match r {
            Ok((node, _)) => panic!("scheduled on {node}"),
            Err(u) => (u.message, u.preempt),
        }
    }

    #[test]
    fn the_best_node_wins_and_ties_go_to_the_first_by_name() {
        let ns = nodes(&[
            ("b", "4", &[]),
            ("a", "4", &[]),
            ("c", "4", &[("x", 0, "2")]),
        ]);
        let got = decide(&candidate(0, "1", json!({})), &ns, false);
        assert_eq!(got.ok().map(|(n, _)| n), Some("a".to_string()));
    }

    #[test]
    fn preemption_frees_the_node_whose_victims_matter_least() {
        let ns = nodes(&[
            ("a", "2", &[("a-mid", 5, "2")]),
            ("b", "2", &[("b-low", 1, "1"), ("b-low2", 1, "1")]),
            ("c", "2", &[("c-high", 50, "2")]),
        ]);
        let (message, preempt) = failure(decide(&candidate(10, "2", json!({})), &ns, false));
        assert_eq!(message, "0/3 nodes are available: 3 Insufficient cpu.");
        assert_eq!(
            preempt,
            Some((
                "b".to_string(),
                vec!["d/b-low".to_string(), "d/b-low2".to_string()]
            ))
        );
    }

    #[test]
    fn without_victims_the_message_says_why_per_node() {
        let mut ns = nodes(&[("a", "2", &[("a-high", 50, "2")]), ("big", "8", &[])]);
        ns.get_mut("big").unwrap().unschedulable = true;
        let (message, preempt) = failure(decide(&candidate(10, "2", json!({})), &ns, false));
        assert_eq!(
            message,
            "0/2 nodes are available: 1 Insufficient cpu, 1 node(s) were unschedulable. preemption: 0/2 nodes are available: 1 No preemption victims found for incoming pod, 1 Preemption is not helpful for scheduling."
        );
        assert_eq!(preempt, None);
        let (message, _) = failure(decide(
            &candidate(10, "2", json!({"preemptionPolicy": "Never"})),
            &ns,
            true,
        ));
        assert!(
            message.ends_with(". preemption: not eligible due to preemptionPolicy=Never."),
            "{message}"
        );
    }
}
