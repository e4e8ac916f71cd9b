//! The Node object: registration, capacity/allocatable read from the machine minus
//! reservations, conditions from real measurements, nodeInfo, images, Lease renewal.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::{Agent, Thresholds};
use crate::rest::status_code;

/// What the machine has, and how much of it is free now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Machine {
    pub cpus: u64,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_bytes: u64,
    pub disk_available_bytes: u64,
    pub pid_max: u64,
    pub pids_running: u64,
}

/// A `/proc/meminfo` field in bytes.
pub(crate) fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// A filesystem's bytes and inodes (statvfs); `used` is what the filesystem has in use,
/// callers measuring a directory replace it. Zeros when it cannot be read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fs {
    pub capacity: u64,
    pub available: u64,
    pub used: u64,
    pub inodes: u64,
    pub inodes_free: u64,
    pub inodes_used: u64,
}

pub fn statvfs(path: &Path) -> Fs {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return Fs::default();
    };
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return Fs::default();
        }
        let fr = st.f_frsize as u64;
        let (cap, free) = (st.f_blocks as u64 * fr, st.f_bfree as u64 * fr);
        Fs {
            capacity: cap,
            available: st.f_bavail as u64 * fr,
            used: cap.saturating_sub(free),
            inodes: st.f_files as u64,
            inodes_free: st.f_ffree as u64,
            inodes_used: (st.f_files as u64).saturating_sub(st.f_ffree as u64),
        }
    }
}

/// The kernel's `pid_max`.
pub fn pid_max() -> u64 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768)
}

/// Processes on the machine (the numeric entries of `/proc`).
pub fn process_count() -> u64 {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .count() as u64
        })
        .unwrap_or(0)
}

impl Machine {
    pub fn read(data_dir: &Path) -> Machine {
        let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let disk = statvfs(data_dir);
        Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u64)
                .unwrap_or(1),
            memory_bytes: meminfo_field(&mem, "MemTotal").unwrap_or(0),
            memory_available_bytes: meminfo_field(&mem, "MemAvailable").unwrap_or(0),
            disk_bytes: disk.capacity,
            disk_available_bytes: disk.available,
            pid_max: pid_max(),
            pids_running: process_count(),
        }
    }
}

/// Which pressure conditions hold now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pressure {
    pub memory: bool,
    pub disk: bool,
    pub pid: bool,
}

impl Pressure {
    pub fn of(m: &Machine, t: &Thresholds) -> Pressure {
        let disk_min = t.nodefs_available.resolve(m.disk_bytes);
        Pressure {
            memory: m.memory_available_bytes < t.memory_available.resolve(m.memory_bytes),
            disk: m.disk_bytes > 0 && m.disk_available_bytes < disk_min,
            pid: m.pid_max > 0 && m.pid_max.saturating_sub(m.pids_running) < m.pid_max / 20,
        }
    }
}

fn kib(bytes: u64) -> String {
    format!("{}Ki", bytes / 1024)
}

/// capacity and allocatable as upstream computes them: allocatable = capacity − reservations
/// − the hard eviction threshold (memory and ephemeral storage).
pub fn resources(m: &Machine, t: &Thresholds) -> (Value, Value) {
    let capacity = json!({
        "cpu": m.cpus.to_string(),
        "memory": kib(m.memory_bytes),
        "ephemeral-storage": kib(m.disk_bytes),
        "pods": t.max_pods.to_string(),
        "hugepages-1Gi": "0",
        "hugepages-2Mi": "0",
    });
    let cpu_m = (m.cpus * 1000).saturating_sub(t.reserved_cpu_millis);
    let mem = m
        .memory_bytes
        .saturating_sub(t.reserved_memory)
        .saturating_sub(t.memory_available.resolve(m.memory_bytes));
    let disk = m
        .disk_bytes
        .saturating_sub(t.reserved_ephemeral)
        .saturating_sub(t.nodefs_available.resolve(m.disk_bytes));
    let cpu = if cpu_m % 1000 == 0 {
        (cpu_m / 1000).to_string()
    } else {
        format!("{cpu_m}m")
    };
    let allocatable = json!({
        "cpu": cpu,
        "memory": kib(mem),
        "ephemeral-storage": disk.to_string(),
        "pods": t.max_pods.to_string(),
        "hugepages-1Gi": "0",
        "hugepages-2Mi": "0",
    });
    (capacity, allocatable)
}

fn read_trim(p: &str) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn os_image() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

fn kernel_version() -> String {
    read_trim("/proc/sys/kernel/osrelease")
}

pub fn node_info() -> Value {
    json!({
        "machineID": read_trim("/etc/machine-id"),
        "systemUUID": read_trim("/sys/class/dmi/id/product_uuid"),
        "bootID": read_trim("/proc/sys/kernel/random/boot_id"),
        "kernelVersion": kernel_version(),
        "osImage": os_image(),
        "containerRuntimeVersion": format!("k3rs://{}", crate::api::K3RS_VERSION),
        "kubeletVersion": format!("{}+k3rs{}", crate::api::KUBE_VERSION, crate::api::K3RS_VERSION),
        "kubeProxyVersion": "",
        "operatingSystem": "linux",
        "architecture": crate::arch(),
    })
}

fn condition(
    kind: &str,
    status: bool,
    reason: &str,
    message: &str,
    since: &BTreeMap<String, (bool, String)>,
    now: &str,
) -> Value {
    let transition = since
        .get(kind)
        .filter(|(s, _)| *s == status)
        .map(|(_, t)| t.clone())
        .unwrap_or_else(|| now.to_string());
    json!({
        "type": kind,
        "status": if status { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": now,
        "lastTransitionTime": transition,
    })
}

/// The node conditions as upstream's kubelet words them.
pub fn conditions(p: Pressure, since: &BTreeMap<String, (bool, String)>, now: &str) -> Vec<Value> {
    // Pressure conditions taint the node (node lifecycle); the node stays Ready.
    let ready = true;
    vec![
        if p.memory {
            condition(
                "MemoryPressure",
                true,
                "KubeletHasInsufficientMemory",
                "kubelet has insufficient memory available",
                since,
                now,
            )
        } else {
            condition(
                "MemoryPressure",
                false,
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
                since,
                now,
            )
        },
        if p.disk {
            condition(
                "DiskPressure",
                true,
                "KubeletHasDiskPressure",
                "kubelet has disk pressure",
                since,
                now,
            )
        } else {
            condition(
                "DiskPressure",
                false,
                "KubeletHasNoDiskPressure",
                "kubelet has no disk pressure",
                since,
                now,
            )
        },
        if p.pid {
            condition(
                "PIDPressure",
                true,
                "KubeletHasInsufficientPID",
                "kubelet has insufficient PID available",
                since,
                now,
            )
        } else {
            condition(
                "PIDPressure",
                false,
                "KubeletHasSufficientPID",
                "kubelet has sufficient PID available",
                since,
                now,
            )
        },
        condition(
            "Ready",
            ready,
            "KubeletReady",
            "kubelet is posting ready status",
            since,
            now,
        ),
    ]
}

impl Agent {
    fn node_labels(&self) -> Value {
        let mut labels = serde_json::Map::new();
        labels.insert("kubernetes.io/hostname".into(), json!(self.cfg.node_name));
        labels.insert("kubernetes.io/os".into(), json!("linux"));
        labels.insert("kubernetes.io/arch".into(), json!(crate::arch()));
        labels.insert("beta.kubernetes.io/os".into(), json!("linux"));
        labels.insert("beta.kubernetes.io/arch".into(), json!(crate::arch()));
        labels.insert("node.kubernetes.io/instance-type".into(), json!("k3rs"));
        if self.cfg.control_plane {
            labels.insert(
                "node-role.kubernetes.io/control-plane".into(),
                json!("true"),
            );
            labels.insert("node-role.kubernetes.io/master".into(), json!("true"));
        }
        for (k, v) in &self.cfg.node_labels {
            labels.insert(k.clone(), json!(v));
        }
        Value::Object(labels)
    }

    /// The status part the agent owns (everything but the images list, which is added here too).
    pub(super) fn node_status(&self) -> Value {
        let m = Machine::read(&self.cfg.data_dir);
        let p = Pressure::of(&m, &self.cfg.thresholds);
        *self.pressure.lock() = p;
        let now = super::now_rfc3339();
        let since = self.condition_since.lock().clone();
        let conds = conditions(p, &since, &now);
        {
            let mut g = self.condition_since.lock();
            for c in &conds {
                let kind = c["type"].as_str().unwrap_or_default().to_string();
                let status = c["status"] == "True";
                let t = c["lastTransitionTime"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                g.insert(kind, (status, t));
            }
        }
        let (capacity, allocatable) = resources(&m, &self.cfg.thresholds);
        let mut images: Vec<Value> = self
            .images
            .list()
            .into_iter()
            .map(|i| {
                let mut names = i.repo_digests.clone();
                names.extend(i.names.iter().cloned());
                json!({"names": names, "sizeBytes": i.size})
            })
            .collect();
        images.sort_by_key(|i| std::cmp::Reverse(i["sizeBytes"].as_u64().unwrap_or(0)));
        images.truncate(50);
        json!({
            "capacity": capacity,
            "allocatable": allocatable,
            "conditions": conds,
            "addresses": [
                {"type": "InternalIP", "address": self.cfg.node_ip.to_string()},
                {"type": "Hostname", "address": self.cfg.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": node_info(),
            "images": images,
        })
    }

    /// Creates the Node, or brings an existing one's labels up to date.
    pub(super) async fn register(self: &Arc<Self>) -> Result<()> {
        let name = &self.cfg.node_name;
        let taints: Vec<Value> = self
            .cfg
            .node_taints
            .iter()
            .map(|(k, v, e)| {
                let mut t = json!({"key": k, "effect": e});
                if !v.is_empty() {
                    t["value"] = json!(v);
                }
                t
            })
            .collect();
        let mut spec = json!({});
        if !taints.is_empty() {
            spec["taints"] = json!(taints);
        }
        let node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": self.node_labels(),
                "annotations": {
                    "node.alpha.kubernetes.io/ttl": "0",
                    "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                    "k3rs.io/node-ip": self.cfg.node_ip.to_string(),
                },
            },
            "spec": spec,
        });
        match self.client.post("/api/v1/nodes", &node).await {
            Ok(_) => tracing::info!(node = %name, "node registered"),
            Err(e) if status_code(&e) == Some(409) => {
                self.client
                    .merge_patch(
                        &format!("/api/v1/nodes/{name}"),
                        &json!({"metadata": {"labels": self.node_labels()}}),
                    )
                    .await
                    .context("updating the node's labels")?;
                tracing::info!(node = %name, "node already registered; labels updated");
            }
            Err(e) => return Err(e.context("registering the node")),
        }
        self.post_status(true).await?;
        Ok(())
    }

    /// Posts the node status when it changed (or `force`). Returns whether it posted.
    pub(super) async fn post_status(&self, force: bool) -> Result<bool> {
        let status = self.node_status();
        // Compare without heartbeat times.
        let mut key = status.clone();
        if let Some(cs) = key["conditions"].as_array_mut() {
            for c in cs {
                c.as_object_mut().map(|o| o.remove("lastHeartbeatTime"));
            }
        }
        let mut key_s = key.to_string();
        // Free memory/disk jitter does not change allocatable/capacity (totals only).
        key_s.shrink_to_fit();
        {
            let last = self.last_status.lock();
            if !force && *last == key_s {
                return Ok(false);
            }
        }
        self.client
            .merge_patch(
                &format!("/api/v1/nodes/{}/status", self.cfg.node_name),
                &json!({"status": status}),
            )
            .await
            .context("posting node status")?;
        *self.last_status.lock() = key_s;
        Ok(true)
    }

    pub(super) async fn renew_lease(&self) -> Result<()> {
        let name = &self.cfg.node_name;
        let path = format!("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}");
        let now = super::micro_now();
        match self
            .client
            .merge_patch(
                &path,
                &json!({"spec": {"renewTime": now, "holderIdentity": name}}),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => {
                let node_uid = self
                    .client
                    .get(&format!("/api/v1/nodes/{name}"))
                    .await
                    .ok()
                    .and_then(|n| n["metadata"]["uid"].as_str().map(String::from));
                let mut lease = json!({
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": name, "namespace": "kube-node-lease"},
                    "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now},
                });
                if let Some(uid) = node_uid {
                    lease["metadata"]["ownerReferences"] = json!([{
                        "apiVersion": "v1", "kind": "Node", "name": name, "uid": uid,
                    }]);
                }
                self.client
                    .post(
                        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                        &lease,
                    )
                    .await
                    .map(drop)
                    .context("creating the node lease")
            }
            Err(e) => Err(e.context("renewing the node lease")),
        }
    }

    /// Lease every 10 s; status when it changes (checked every 10 s) and at least every 5 min.
    pub(super) async fn node_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            n += 1;
            if let Err(e) = self.renew_lease().await {
                tracing::warn!(error = %format!("{e:#}"), "node lease");
            }
            self.evict_for_pressure();
            if n % 6 == 0 {
                self.image_gc();
            }
            // A node deleted while the agent runs is registered again, as upstream.
            if let Err(e) = self.post_status(n % 30 == 0).await {
                if e.chain().any(|c| {
                    c.downcast_ref::<crate::rest::Status>()
                        .is_some_and(|s| s.code == 404)
                }) {
                    let _ = self.register().await;
                } else {
                    tracing::warn!(error = %format!("{e:#}"), "node status");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{Quantity, Thresholds};

    fn machine() -> Machine {
        Machine {
            cpus: 2,
            memory_bytes: 4 << 30,
            memory_available_bytes: 3 << 30,
            disk_bytes: 100 << 30,
            disk_available_bytes: 50 << 30,
            pid_max: 32768,
            pids_running: 200,
        }
    }

    #[test]
    fn allocatable_subtracts_reservations_and_eviction_threshold() {
        let t = Thresholds {
            reserved_cpu_millis: 250,
            reserved_memory: 256 << 20,
            ..Default::default()
        };
        let (cap, alloc) = resources(&machine(), &t);
        assert_eq!(cap["cpu"], "2");
        assert_eq!(cap["memory"], format!("{}Ki", 4u64 << 20));
        assert_eq!(cap["pods"], "110");
        assert_eq!(alloc["cpu"], "1750m");
        // 4 GiB − 256 MiB − 100 MiB (memory.available<100Mi).
        assert_eq!(
            alloc["memory"],
            format!("{}Ki", ((4u64 << 30) - (356 << 20)) / 1024)
        );
        // 100 GiB − 10 % (nodefs.available<10%).
        assert_eq!(
            alloc["ephemeral-storage"],
            ((100u64 << 30) * 9 / 10).to_string()
        );
    }

    #[test]
    fn pressure_follows_thresholds() {
        let t = Thresholds::default();
        assert_eq!(Pressure::of(&machine(), &t), Pressure::default());
        let mut m = machine();
        m.memory_available_bytes = 50 << 20;
        m.disk_available_bytes = 5 << 30;
        let p = Pressure::of(&m, &t);
        assert!(p.memory && p.disk && !p.pid);
        let t2 = Thresholds {
            memory_available: Quantity::Bytes(4 << 30),
            ..Default::default()
        };
        assert!(Pressure::of(&machine(), &t2).memory);
    }

    #[test]
    fn conditions_keep_transition_time_while_status_holds() {
        let mut since = BTreeMap::new();
        since.insert(
            "Ready".to_string(),
            (true, "2020-01-01T00:00:00Z".to_string()),
        );
        since.insert(
            "MemoryPressure".to_string(),
            (true, "2020-01-01T00:00:00Z".to_string()),
        );
        let cs = conditions(Pressure::default(), &since, "2026-01-01T00:00:00Z");
        let get = |k: &str| cs.iter().find(|c| c["type"] == k).unwrap().clone();
        assert_eq!(get("Ready")["lastTransitionTime"], "2020-01-01T00:00:00Z");
        assert_eq!(get("Ready")["reason"], "KubeletReady");
        assert_eq!(
            get("MemoryPressure")["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(get("MemoryPressure")["status"], "False");
    }
}
