//! The scheduler: a priority queue of pending pods (back-off for unschedulable ones, which come
//! back when nodes or pods change), a cache of what every node offers and runs, the filters and
//! scores of `plugins`, basic priority preemption, and binding through `pods/binding` without
//! waiting (the pod is assumed on its node meanwhile).

pub mod plugins;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::{Notify, Semaphore};

use crate::controllers::client::{
    is_terminating, key_of, name_of, namespace_of, split_key, uid_of, Client,
};
use crate::controllers::events::Recorder;
use crate::controllers::informer::{Change, Informer};
use crate::controllers::pods::phase;
use crate::controllers::Context;
use plugins::{Candidate, NodeInfo};

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
    recorder: Recorder,
    cache: Mutex<Cache>,
    queues: Mutex<Queues>,
    wake: Notify,
    binds: Arc<Semaphore>,
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
        let cand = Candidate::new(pod.clone());
        let decision = {
            let c = self.cache.lock();
            let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
            let mut failed_nodes: Vec<(String, String)> = Vec::new();
            let mut best: Option<(f64, &str)> = None;
            let mut names: Vec<&String> = c.nodes.keys().collect();
            names.sort();
            for name in names {
                let node = &c.nodes[name];
                match plugins::filter(&cand, node, &c.nodes) {
                    Ok(()) => {
                        let s = plugins::score(&cand, node, &c.nodes);
                        if best.is_none_or(|(b, _)| s > b) {
                            best = Some((s, name));
                        }
                    }
                    Err(r) => {
                        for part in plugins::split_reasons(&r) {
                            *reasons.entry(part).or_default() += 1;
                        }
                        failed_nodes.push((name.clone(), r));
                    }
                }
            }
            match best {
                Some((_, n)) => Ok(n.to_string()),
                None => {
                    // Preemption: a node where only resources are missing and lower-priority
                    // pods could make room.
                    let mut choice: Option<(String, Vec<String>)> = None;
                    let never_preempts = cand.pod["spec"]["preemptionPolicy"] == "Never";
                    for (name, r) in &failed_nodes {
                        if never_preempts || !plugins::resources_only(r) {
                            continue;
                        }
                        if let Some(v) = plugins::victims(&cand, &c.nodes[name]) {
                            if choice.as_ref().is_none_or(|(_, cv)| v.len() < cv.len()) {
                                choice = Some((name.clone(), v));
                            }
                        }
                    }
                    let preemption = if choice.is_some() {
                        String::new()
                    } else if never_preempts {
                        "preemption: not eligible due to preemptionPolicy=Never.".to_string()
                    } else {
                        let resources = failed_nodes
                            .iter()
                            .filter(|(_, r)| plugins::resources_only(r))
                            .count();
                        plugins::preemption_message(
                            c.nodes.len(),
                            failed_nodes.len() - resources,
                            resources,
                        )
                    };
                    Err((c.nodes.len(), reasons, choice, preemption))
                }
            }
        };
        match decision {
            Ok(node) => {
                {
                    let mut c = self.cache.lock();
                    c.assumed.insert(key.clone());
                    c.place(&pod, &node);
                }
                let me = self.clone();
                let permit = self
                    .binds
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore open");
                tokio::spawn(async move {
                    let (ns, name) = split_key(&key);
                    let res = me.client.bind(ns.unwrap_or_default(), name, &node).await;
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
            Err((total, reasons, preempt, preemption)) => {
                let message = if total == 0 {
                    "0/0 nodes are available: no nodes available to schedule pods.".to_string()
                } else {
                    plugins::unschedulable_message(total, &reasons, &preemption)
                        .trim_end()
                        .to_string()
                };
                self.park(&key);
                self.report_unschedulable(&pod, &message).await;
                if let Some((node, victims)) = preempt {
                    self.preempt(&pod, &node, &victims).await;
                }
            }
        }
    }

    fn park(&self, key: &str) {
        let mut q = self.queues.lock();
        q.queued.remove(key);
        let attempts = q.parked.get(key).map_or(1, |(a, _, _)| a + 1);
        q.parked.insert(key.to_string(), (attempts, Instant::now(), false));
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

fn backoff(attempts: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.pow(attempts.saturating_sub(1).min(4)))
        .min(Duration::from_secs(10))
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client("default-scheduler");
    let s = Arc::new(Scheduler {
        pods: ctx.informers.get(&client.def("", "v1", "pods")),
        nodes: ctx.informers.get(&client.def("", "v1", "nodes")),
        recorder: Recorder::new(client.clone(), "default-scheduler"),
        client,
        cache: Mutex::new(Cache::default()),
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
            s.nodes.wait_synced().await;
            s.pods.wait_synced().await;
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
            s.nodes.wait_synced().await;
            s.pods.wait_synced().await;
            loop {
                let key = s.next().await;
                s.schedule_one(key).await;
            }
        }));
    }
    tasks
}
