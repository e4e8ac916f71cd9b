//! The kubelet's pod manager: watches the pods bound to this node, runs one worker per pod,
//! adopts the shims of pods that were running before a restart, and cleans up after pods
//! that no longer exist.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;
use tokio::sync::{watch, Notify};

use super::worker::Worker;
use super::Agent;

pub struct WorkerHandle {
    pub tx: watch::Sender<Option<Arc<Pod>>>,
    pub wake: Arc<Notify>,
    /// Set to a message to evict the pod (node pressure).
    pub evict: Arc<parking_lot::Mutex<Option<String>>>,
}

impl Agent {
    /// Hands the latest pod object to its worker, starting one if needed.
    fn dispatch(self: &Arc<Self>, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let mut g = self.workers.lock();
        if let Some(w) = g.get(&uid) {
            let _ = w.tx.send(Some(Arc::new(pod)));
            return;
        }
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        let has_shim = self.cfg.shims_dir().join(&uid).exists();
        let finished = phase == "Succeeded" || phase == "Failed";
        if finished && !has_shim && pod.metadata.deletion_timestamp.is_none() {
            return;
        }
        let (tx, rx) = watch::channel(Some(Arc::new(pod)));
        let worker = Worker::new(self.clone(), uid.clone(), rx);
        g.insert(
            uid,
            WorkerHandle {
                tx,
                wake: worker.wake.clone(),
                evict: worker.evict.clone(),
            },
        );
        tokio::spawn(worker.run());
    }

    fn forget(self: &Arc<Self>, uid: &str) {
        if let Some(w) = self.workers.lock().get(uid) {
            let _ = w.tx.send(None);
        }
    }

    /// Shims (and so containers) of pods the API no longer has: their workers tear them down.
    fn reap_orphans(self: &Arc<Self>, live: &HashSet<String>) {
        for (uid, _dir) in k3rs_runtime::shim::list_shims(&self.cfg.shims_dir()) {
            if live.contains(&uid) || self.workers.lock().contains_key(&uid) {
                continue;
            }
            tracing::info!(pod_uid = %uid, "removing the sandbox of a pod that no longer exists");
            let (tx, rx) = watch::channel(None);
            let worker = Worker::new(self.clone(), uid.clone(), rx);
            self.workers.lock().insert(
                uid,
                WorkerHandle {
                    tx,
                    wake: worker.wake.clone(),
                    evict: worker.evict.clone(),
                },
            );
            tokio::spawn(worker.run());
        }
    }

    async fn pod_loop(self: Arc<Self>) {
        let selector = format!("spec.nodeName%3D{}", self.cfg.node_name);
        let mut first = true;
        loop {
            let list = match self
                .client
                .get(&format!("/api/v1/pods?fieldSelector={selector}"))
                .await
            {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "listing pods");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let rv = list
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or("0")
                .to_string();
            let mut live = HashSet::new();
            for item in list["items"].as_array().cloned().unwrap_or_default() {
                if let Ok(p) = serde_json::from_value::<Pod>(item) {
                    if let Some(u) = &p.metadata.uid {
                        live.insert(u.clone());
                    }
                    self.dispatch(p);
                }
            }
            // Workers of pods that vanished while we were not watching.
            let known: Vec<String> = self.workers.lock().keys().cloned().collect();
            for uid in known {
                if !live.contains(&uid) {
                    self.forget(&uid);
                }
            }
            if first {
                self.reap_orphans(&live);
                first = false;
            }
            let mut rx = match self
                .client
                .watch(&format!(
                    "/api/v1/pods?fieldSelector={selector}&resourceVersion={rv}&allowWatchBookmarks=true"
                ))
                .await
            {
                Ok(rx) => rx,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "watching pods");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(ev) = rx.recv().await {
                match ev["type"].as_str() {
                    Some("ADDED") | Some("MODIFIED") => {
                        if let Ok(p) = serde_json::from_value::<Pod>(ev["object"].clone()) {
                            self.dispatch(p);
                        }
                    }
                    Some("DELETED") => {
                        if let Some(uid) = ev["object"]["metadata"]["uid"].as_str() {
                            self.forget(uid);
                        }
                    }
                    Some("ERROR") => break,
                    _ => {}
                }
            }
        }
    }
}

impl Agent {
    /// Node-pressure eviction: under memory or disk pressure, fails one pod per call, the
    /// least important first (BestEffort, then Burstable, then Guaranteed; lower priority
    /// first), never mirror pods or system-critical ones.
    pub fn evict_for_pressure(self: &Arc<Self>) {
        let p = *self.pressure.lock();
        let resource = if p.memory {
            "memory"
        } else if p.disk {
            "ephemeral-storage"
        } else {
            return;
        };
        let g = self.workers.lock();
        let mut victims: Vec<(u8, i32, String)> = Vec::new();
        for (uid, w) in g.iter() {
            let Some(pod) = w.tx.borrow().clone() else {
                continue;
            };
            let ann = pod.metadata.annotations.clone().unwrap_or_default();
            if ann.contains_key("kubernetes.io/config.mirror")
                || pod.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            let prio = pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0);
            if prio >= 2_000_000_000 {
                continue;
            }
            let phase = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            if phase == "Succeeded" || phase == "Failed" {
                continue;
            }
            let rank = match super::container::qos_class(&pod) {
                "BestEffort" => 0,
                "Burstable" => 1,
                _ => 2,
            };
            victims.push((rank, prio, uid.clone()));
        }
        victims.sort();
        if let Some((_, _, uid)) = victims.first() {
            if let Some(w) = g.get(uid) {
                tracing::warn!(pod_uid = %uid, resource, "evicting a pod: the node is low on {resource}");
                *w.evict.lock() = Some(format!("The node was low on resource: {resource}. "));
                w.wake.notify_one();
            }
        }
    }
}

impl Agent {
    /// Image garbage collection: when the image filesystem is fuller than
    /// `image-gc-high-threshold` percent, frees unused images down to the low threshold.
    pub fn image_gc(self: &Arc<Self>) {
        let m = super::node::Machine::read(&self.cfg.data_dir);
        if m.disk_bytes == 0 {
            return;
        }
        let used = m.disk_bytes - m.disk_available_bytes;
        let pct = used * 100 / m.disk_bytes;
        if pct < self.cfg.thresholds.image_gc_high as u64 {
            return;
        }
        let target = m.disk_bytes * self.cfg.thresholds.image_gc_low as u64 / 100;
        let to_free = used.saturating_sub(target);
        let mut in_use = HashSet::new();
        // Air-gap images are pinned, as k3s pins its imported images.
        for i in self.images.list() {
            if i.imported {
                in_use.insert(i.id);
            }
        }
        for w in self.workers.lock().values() {
            let Some(pod) = w.tx.borrow().clone() else {
                continue;
            };
            let spec = pod.spec.clone().unwrap_or_default();
            for c in spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
            {
                let Some(image) = &c.image else { continue };
                if let Ok(r) = k3rs_runtime::images::normalize_reference(image) {
                    if let Some(i) = self.images.get(&r) {
                        in_use.insert(i.id);
                    }
                }
            }
        }
        match self.images.gc(&in_use, to_free) {
            Ok(freed) => tracing::info!(freed, used_percent = pct, "image garbage collection"),
            Err(e) => tracing::warn!(error = %e, "image garbage collection"),
        }
    }
}

/// Starts the pod manager.
pub async fn spawn(agent: Arc<Agent>) {
    tokio::spawn(agent.pod_loop());
}
