//! Resource usage for `stats/summary` (upstream's Summary API, `stats/v1alpha1`) and the
//! Prometheus endpoints `metrics`, `metrics/resource` and `metrics/cadvisor`.
//!
//! Everything is read when asked: CPU and memory from the pod and container cgroups (v2 or
//! v1) and `/proc` for the node, network from the pod's network namespace (`/proc/<pid>/net/dev`
//! of one of its processes), filesystems with statvfs plus the bytes each container's writable
//! layer, logs and volumes hold. CPU rates (`usageNanoCores`) are the change since the previous
//! read (a first read samples twice, 100 ms apart).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::{Response, StatusCode};
use k3rs_runtime::shim::{bundle_dir, cgroup_v2, ContainerState, ContainerStatus, ShimClient};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

use super::local_pods;
use crate::agent::node::{self as machine, statvfs, Fs};
use crate::agent::{container, Agent};
use crate::httputil::{full, Body};

/// CPU and memory of one cgroup (or the node).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// Cumulative CPU time, nanoseconds.
    pub cpu_ns: u64,
    pub memory: u64,
    pub working_set: u64,
    pub rss: u64,
    pub page_faults: u64,
    pub major_page_faults: u64,
    /// Bytes the memory limit leaves (only when there is a limit).
    pub available: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Net {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
}

#[derive(Debug, Clone, Default)]
struct ContainerSample {
    name: String,
    id: String,
    image: String,
    start: String,
    usage: Usage,
    rootfs: Fs,
    logs: Fs,
}

#[derive(Debug, Clone, Default)]
struct PodSample {
    name: String,
    namespace: String,
    uid: String,
    start: String,
    usage: Usage,
    net: Vec<Net>,
    containers: Vec<ContainerSample>,
    volumes: Vec<(String, Fs)>,
    processes: u64,
}

#[derive(Debug, Clone, Default)]
struct Snapshot {
    time: String,
    node: Usage,
    boot: String,
    net: Vec<Net>,
    fs: Fs,
    image_fs: Fs,
    pods: Vec<PodSample>,
    pid_max: u64,
    procs: u64,
    cpus: u64,
    memory_total: u64,
}

/// The stats and metrics endpoints; None for other paths.
pub async fn route(agent: &Arc<Agent>, s: &[&str]) -> Option<Response<Body>> {
    match s {
        ["stats", "summary"] | ["stats"] => {
            static SAMPLED: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            if !SAMPLED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                // A first CPU reading, so that this answer has rates.
                prime_rates(&places(agent).await);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let snap = snapshot(agent).await;
            Some(json_body(&summary(&agent.cfg.node_name, &snap)))
        }
        ["metrics"] => Some(prom(kubelet_metrics(agent).await)),
        ["metrics", "resource"] => Some(prom(resource_metrics(&snapshot(agent).await))),
        ["metrics", "cadvisor"] => Some(prom(cadvisor_metrics(&snapshot(agent).await))),
        _ => None,
    }
}

fn json_body(v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(full(serde_json::to_vec_pretty(v).unwrap_or_default()))
        .expect("valid response")
}

fn prom(text: String) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
        .body(full(text))
        .expect("valid response")
}

// ---- reading the machine ----

fn read(p: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

fn num(p: impl AsRef<Path>) -> Option<u64> {
    read(p)?.trim().parse().ok()
}

fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// The `memory.stat` keys of one cgroup version: inactive file, RSS, faults, major faults.
struct MemoryKeys {
    inactive_file: &'static str,
    rss: &'static str,
    page_faults: &'static str,
    major_page_faults: &'static str,
}

const V2_KEYS: MemoryKeys = MemoryKeys {
    inactive_file: "inactive_file",
    rss: "anon",
    page_faults: "pgfault",
    major_page_faults: "pgmajfault",
};

const V1_KEYS: MemoryKeys = MemoryKeys {
    inactive_file: "total_inactive_file",
    rss: "total_rss",
    page_faults: "total_pgfault",
    major_page_faults: "total_pgmajfault",
};

impl Usage {
    /// From a cgroup's CPU time, memory in use, `memory.stat` and limit (if any).
    fn of(cpu_ns: u64, memory: u64, stat: &str, keys: &MemoryKeys, limit: Option<u64>) -> Usage {
        let key = |k| keyed(stat, k).unwrap_or(0);
        let working_set = memory.saturating_sub(key(keys.inactive_file));
        Usage {
            cpu_ns,
            memory,
            working_set,
            rss: key(keys.rss),
            page_faults: key(keys.page_faults),
            major_page_faults: key(keys.major_page_faults),
            available: limit.map(|l| l.saturating_sub(working_set)),
        }
    }
}

/// CPU and memory of a cgroup (path relative to the cgroup root); None when it is gone.
pub fn cgroup_usage(rel: &str) -> Option<Usage> {
    let rel = rel.trim_start_matches('/');
    let root = Path::new("/sys/fs/cgroup");
    if cgroup_v2() {
        let d = root.join(rel);
        let cpu = read(d.join("cpu.stat"))?;
        let limit = read(d.join("memory.max")).and_then(|s| s.trim().parse::<u64>().ok());
        return Some(Usage::of(
            keyed(&cpu, "usage_usec").unwrap_or(0) * 1000,
            num(d.join("memory.current")).unwrap_or(0),
            &read(d.join("memory.stat")).unwrap_or_default(),
            &V2_KEYS,
            limit,
        ));
    }
    let cpu_ns = ["cpuacct", "cpu,cpuacct", "cpu"]
        .iter()
        .find_map(|h| num(root.join(h).join(rel).join("cpuacct.usage")))?;
    let m = root.join("memory").join(rel);
    // v1 reports "no limit" as a huge number.
    let limit = num(m.join("memory.limit_in_bytes")).filter(|l| *l < (1 << 62));
    Some(Usage::of(
        cpu_ns,
        num(m.join("memory.usage_in_bytes")).unwrap_or(0),
        &read(m.join("memory.stat")).unwrap_or_default(),
        &V1_KEYS,
        limit,
    ))
}

fn cgroup_pids(rel: &str) -> u64 {
    let rel = rel.trim_start_matches('/');
    let dir = if cgroup_v2() {
        Path::new("/sys/fs/cgroup").join(rel)
    } else {
        Path::new("/sys/fs/cgroup/pids").join(rel)
    };
    num(dir.join("pids.current")).unwrap_or(0)
}

fn mem_field(text: &str, key: &str) -> u64 {
    machine::meminfo_field(text, key).unwrap_or(0)
}

/// The node as a whole, from /proc.
fn node_usage() -> Usage {
    let stat = read("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .map(|l| {
            // user nice system idle iowait irq softirq steal
            l.split_whitespace()
                .skip(1)
                .enumerate()
                .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6 | 7))
                .filter_map(|(_, v)| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mem = read("/proc/meminfo").unwrap_or_default();
    let vm = read("/proc/vmstat").unwrap_or_default();
    let total = mem_field(&mem, "MemTotal");
    let usage = total.saturating_sub(mem_field(&mem, "MemFree"));
    Usage {
        cpu_ns: ticks * (1_000_000_000 / hz),
        memory: usage,
        working_set: usage.saturating_sub(mem_field(&mem, "Inactive(file)")),
        rss: mem_field(&mem, "AnonPages"),
        page_faults: keyed(&vm, "pgfault").unwrap_or(0),
        major_page_faults: keyed(&vm, "pgmajfault").unwrap_or(0),
        available: Some(mem_field(&mem, "MemAvailable")),
    }
}

/// Interfaces of a network namespace (`/proc/<pid>/net/dev`), loopback left out.
pub fn net_dev(text: &str) -> Vec<Net> {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let name = name.trim();
            if name == "lo" {
                return None;
            }
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            (f.len() >= 16).then(|| Net {
                name: name.to_string(),
                rx_bytes: f[0],
                rx_errors: f[2],
                tx_bytes: f[8],
                tx_errors: f[10],
            })
        })
        .collect()
}

/// Bytes (allocated blocks) and inodes under a directory, not crossing into other filesystems.
/// Bounded: a tree of more than a million entries is reported as far as it was walked.
fn du(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::symlink_metadata(path) else {
        return (0, 0);
    };
    let dev = top.dev();
    let (mut bytes, mut inodes) = (top.blocks() * 512, 1u64);
    let mut stack = vec![path.to_path_buf()];
    let mut budget = 1_000_000u32;
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            budget = budget.saturating_sub(1);
            if budget == 0 {
                return (bytes, inodes);
            }
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            bytes += m.blocks() * 512;
            inodes += 1;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

/// What a directory uses, on the filesystem that holds it.
fn dir_fs(path: &Path, on: &Fs) -> Fs {
    let (used, inodes_used) = du(path);
    Fs {
        used,
        inodes_used,
        ..on.clone()
    }
}

/// Walks of big trees (the image store) are reused for a while.
fn cached_du(path: &Path) -> (u64, u64) {
    type Walks = HashMap<PathBuf, (Instant, (u64, u64))>;
    static CACHE: OnceLock<Mutex<Walks>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some((at, v)) = cache.lock().ok().and_then(|c| c.get(path).cloned()) {
        if at.elapsed() < Duration::from_secs(30) {
            return v;
        }
    }
    let v = du(path);
    if let Ok(mut c) = cache.lock() {
        c.insert(path.to_path_buf(), (Instant::now(), v));
    }
    v
}

fn boot_time() -> String {
    let stat = read("/proc/stat").unwrap_or_default();
    let secs = keyed(&stat, "btime").unwrap_or(0) as i64;
    k3rs_runtime::shim::rfc3339(secs, 0)
}

// ---- one snapshot of everything ----

/// What one pod is, where its things are, as read from its shim.
struct PodPlace {
    pod: Arc<Pod>,
    cgroup: String,
    /// Every container the shim has (running or not).
    containers: Vec<ContainerStatus>,
}

impl PodPlace {
    fn container_cgroup(&self, id: &str) -> String {
        format!("{}/{id}", self.cgroup.trim_end_matches('/'))
    }

    fn running(&self) -> impl Iterator<Item = &ContainerStatus> {
        self.containers
            .iter()
            .filter(|c| c.state == ContainerState::Running)
    }
}

async fn places(agent: &Agent) -> Vec<PodPlace> {
    let mut out = Vec::new();
    for pod in local_pods(agent) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let Ok(shim) = ShimClient::connect(&agent.cfg.shims_dir().join(&uid)).await else {
            continue;
        };
        let containers = shim.list().await.unwrap_or_default();
        out.push(PodPlace {
            cgroup: container::pod_cgroup(&agent.cfg.cgroup_root, &pod),
            pod,
            containers,
        });
    }
    out
}

fn image_of(pod: &Pod, name: &str) -> String {
    let spec = pod.spec.as_ref();
    spec.into_iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .map(|c| (c.name.clone(), c.image.clone()))
                .chain(
                    s.ephemeral_containers
                        .iter()
                        .flatten()
                        .map(|c| (c.name.clone(), c.image.clone())),
                )
                .collect::<Vec<_>>()
        })
        .find(|(n, _)| n == name)
        .and_then(|(_, i)| i)
        .unwrap_or_default()
}

fn sample(agent: &Agent, places: &[PodPlace]) -> Snapshot {
    let cfg = &agent.cfg;
    let fs = statvfs(&cfg.data_dir);
    let mut image_fs = statvfs(&cfg.images_dir());
    let (used, inodes_used) = cached_du(&cfg.content_dir());
    image_fs.used = used;
    image_fs.inodes_used = inodes_used;
    let log_fs = statvfs(&cfg.pod_log_dir);
    let mut pods = Vec::new();
    for p in places {
        let md = &p.pod.metadata;
        let (name, namespace, uid) = (
            md.name.clone().unwrap_or_default(),
            md.namespace.clone().unwrap_or_default(),
            md.uid.clone().unwrap_or_default(),
        );
        let containers: Vec<ContainerSample> = p
            .running()
            .map(|c| {
                let cg = p.container_cgroup(&c.id);
                let upper =
                    bundle_dir(&cfg.containers_dir().join(&uid), &c.name, c.attempt).join("upper");
                let logs = c
                    .log_path
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                ContainerSample {
                    name: c.name.clone(),
                    id: c.id.clone(),
                    image: image_of(&p.pod, &c.name),
                    start: c.started_at.clone().unwrap_or_else(|| c.created_at.clone()),
                    usage: cgroup_usage(&cg).unwrap_or_default(),
                    rootfs: dir_fs(&upper, &fs),
                    logs: dir_fs(&logs, &log_fs),
                }
            })
            .collect();
        let net = p
            .running()
            .find_map(|c| c.pid)
            .and_then(|pid| read(format!("/proc/{pid}/net/dev")))
            .map(|t| net_dev(&t))
            .unwrap_or_default();
        let mut volumes = Vec::new();
        let vdir = cfg.pods_dir().join(&uid).join("volumes");
        for plugin in std::fs::read_dir(&vdir).into_iter().flatten().flatten() {
            for v in std::fs::read_dir(plugin.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = v.path();
                let on = statvfs(&path);
                volumes.push((
                    v.file_name().to_string_lossy().to_string(),
                    dir_fs(&path, &on),
                ));
            }
        }
        volumes.sort_by(|a, b| a.0.cmp(&b.0));
        pods.push(PodSample {
            start: p
                .pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            usage: cgroup_usage(&p.cgroup).unwrap_or_default(),
            processes: cgroup_pids(&p.cgroup),
            name,
            namespace,
            uid,
            net,
            containers,
            volumes,
        });
    }
    Snapshot {
        time: crate::agent::now_rfc3339(),
        node: node_usage(),
        boot: boot_time(),
        net: net_dev(&read("/proc/self/net/dev").unwrap_or_default()),
        fs,
        image_fs,
        pods,
        pid_max: machine::pid_max(),
        procs: machine::process_count(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1),
        memory_total: mem_field(&read("/proc/meminfo").unwrap_or_default(), "MemTotal"),
    }
}

async fn snapshot(agent: &Arc<Agent>) -> Snapshot {
    let places = places(agent).await;
    let a = agent.clone();
    tokio::task::spawn_blocking(move || sample(&a, &places))
        .await
        .unwrap_or_default()
}

// ---- CPU rates between reads ----

/// Records a CPU reading of the node, the pods and their running containers under the keys
/// `summary` uses, without a snapshot's filesystem and network walks.
fn prime_rates(places: &[PodPlace]) {
    rate("node", node_usage().cpu_ns);
    for p in places {
        if let Some(u) = cgroup_usage(&p.cgroup) {
            rate(
                &pod_key(&p.pod.metadata.uid.clone().unwrap_or_default()),
                u.cpu_ns,
            );
        }
        for c in p.running() {
            if let Some(u) = cgroup_usage(&p.container_cgroup(&c.id)) {
                rate(&c.id, u.cpu_ns);
            }
        }
    }
}

fn pod_key(uid: &str) -> String {
    format!("pod/{uid}")
}

/// Cumulative CPU readings by key, to turn the next reading into a rate.
fn rate(key: &str, cpu_ns: u64) -> Option<u64> {
    static LAST: OnceLock<Mutex<HashMap<String, (Instant, u64)>>> = OnceLock::new();
    let mut last = LAST.get_or_init(Default::default).lock().ok()?;
    let now = Instant::now();
    let prev = last.insert(key.to_string(), (now, cpu_ns));
    if last.len() > 10_000 {
        last.retain(|_, (t, _)| t.elapsed() < Duration::from_secs(600));
    }
    let (t, v) = prev?;
    let dt = now.duration_since(t).as_nanos() as u64;
    (dt > 0 && cpu_ns >= v).then(|| ((cpu_ns - v) as u128 * 1_000_000_000 / dt as u128) as u64)
}

// ---- Summary API ----

fn cpu_json(key: &str, u: &Usage, time: &str) -> Value {
    let mut v = json!({"time": time, "usageCoreNanoSeconds": u.cpu_ns});
    if let Some(r) = rate(key, u.cpu_ns) {
        v["usageNanoCores"] = json!(r);
    }
    v
}

fn memory_json(u: &Usage, time: &str) -> Value {
    let mut v = json!({
        "time": time,
        "usageBytes": u.memory,
        "workingSetBytes": u.working_set,
        "rssBytes": u.rss,
        "pageFaults": u.page_faults,
        "majorPageFaults": u.major_page_faults,
    });
    if let Some(a) = u.available {
        v["availableBytes"] = json!(a);
    }
    v
}

fn fs_json(f: &Fs, time: &str) -> Value {
    json!({
        "time": time,
        "availableBytes": f.available,
        "capacityBytes": f.capacity,
        "usedBytes": f.used,
        "inodesFree": f.inodes_free,
        "inodes": f.inodes,
        "inodesUsed": f.inodes_used,
    })
}

fn net_json(list: &[Net], time: &str) -> Value {
    let ifaces: Vec<Value> = list
        .iter()
        .map(|n| {
            json!({"name": n.name, "rxBytes": n.rx_bytes, "rxErrors": n.rx_errors,
                   "txBytes": n.tx_bytes, "txErrors": n.tx_errors})
        })
        .collect();
    // The default interface: eth0 in a pod, else the busiest.
    let main = list
        .iter()
        .find(|n| n.name == "eth0")
        .or_else(|| list.iter().max_by_key(|n| n.rx_bytes + n.tx_bytes));
    let mut v = json!({"time": time, "interfaces": ifaces});
    if let (Some(m), Some(o)) = (main, v.as_object_mut()) {
        o.insert("name".into(), json!(m.name));
        o.insert("rxBytes".into(), json!(m.rx_bytes));
        o.insert("rxErrors".into(), json!(m.rx_errors));
        o.insert("txBytes".into(), json!(m.tx_bytes));
        o.insert("txErrors".into(), json!(m.tx_errors));
    }
    v
}

fn summary(node_name: &str, s: &Snapshot) -> Value {
    let t = s.time.as_str();
    let pods: Vec<Value> = s
        .pods
        .iter()
        .map(|p| {
            let containers: Vec<Value> = p
                .containers
                .iter()
                .map(|c| {
                    json!({
                        "name": c.name,
                        "startTime": c.start,
                        "cpu": cpu_json(&c.id, &c.usage, t),
                        "memory": memory_json(&c.usage, t),
                        "rootfs": fs_json(&c.rootfs, t),
                        "logs": fs_json(&c.logs, t),
                    })
                })
                .collect();
            let volumes: Vec<Value> = p
                .volumes
                .iter()
                .map(|(name, f)| {
                    let mut v = fs_json(f, t);
                    v["name"] = json!(name);
                    v
                })
                .collect();
            let eph_used: u64 = p
                .containers
                .iter()
                .map(|c| c.rootfs.used + c.logs.used)
                .sum::<u64>()
                + p.volumes.iter().map(|(_, f)| f.used).sum::<u64>();
            let eph = Fs {
                used: eph_used,
                inodes_used: p
                    .containers
                    .iter()
                    .map(|c| c.rootfs.inodes_used + c.logs.inodes_used)
                    .sum(),
                ..s.fs.clone()
            };
            json!({
                "podRef": {"name": p.name, "namespace": p.namespace, "uid": p.uid},
                "startTime": p.start,
                "containers": containers,
                "cpu": cpu_json(&pod_key(&p.uid), &p.usage, t),
                "memory": memory_json(&p.usage, t),
                "network": net_json(&p.net, t),
                "volume": volumes,
                "ephemeral-storage": fs_json(&eph, t),
                "process_stats": {"process_count": p.processes},
            })
        })
        .collect();
    json!({
        "node": {
            "nodeName": node_name,
            "startTime": s.boot,
            "cpu": cpu_json("node", &s.node, t),
            "memory": memory_json(&s.node, t),
            "network": net_json(&s.net, t),
            "fs": fs_json(&s.fs, t),
            "runtime": {"imageFs": fs_json(&s.image_fs, t), "containerFs": fs_json(&s.fs, t)},
            "rlimit": {"time": t, "maxpid": s.pid_max, "curproc": s.procs},
        },
        "pods": pods,
    })
}

// ---- Prometheus ----

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes one metric family: HELP, TYPE and samples `(labels, value)`.
fn family(out: &mut String, name: &str, help: &str, ty: &str, samples: &[(String, String)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {ty}");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

fn secs(ns: u64) -> String {
    format!("{:.9}", ns as f64 / 1e9)
}

fn unix(ts: &str) -> String {
    ts.parse::<jiff::Timestamp>()
        .map(|t| t.as_second().to_string())
        .unwrap_or_else(|_| "0".into())
}

fn resource_metrics(s: &Snapshot) -> String {
    let mut o = String::new();
    let ms = jiff::Timestamp::now().as_millisecond();
    let with_ts = |v: String| format!("{v} {ms}");
    let cl = |p: &PodSample, c: &ContainerSample| {
        format!(
            "container=\"{}\",namespace=\"{}\",pod=\"{}\"",
            esc(&c.name),
            esc(&p.namespace),
            esc(&p.name)
        )
    };
    let pl = |p: &PodSample| {
        format!(
            "namespace=\"{}\",pod=\"{}\"",
            esc(&p.namespace),
            esc(&p.name)
        )
    };
    let per_c = |f: &dyn Fn(&ContainerSample) -> String| -> Vec<(String, String)> {
        s.pods
            .iter()
            .flat_map(|p| p.containers.iter().map(move |c| (p, c)))
            .map(|(p, c)| (cl(p, c), with_ts(f(c))))
            .collect()
    };
    family(
        &mut o,
        "container_cpu_usage_seconds_total",
        "[STABLE] Cumulative cpu time consumed by the container in core-seconds",
        "counter",
        &per_c(&|c| secs(c.usage.cpu_ns)),
    );
    family(
        &mut o,
        "container_memory_working_set_bytes",
        "[STABLE] Current working set of the container in bytes",
        "gauge",
        &per_c(&|c| c.usage.working_set.to_string()),
    );
    family(
        &mut o,
        "container_start_time_seconds",
        "[STABLE] Start time of the container since unix epoch in seconds",
        "gauge",
        &per_c(&|c| unix(&c.start)),
    );
    family(
        &mut o,
        "node_cpu_usage_seconds_total",
        "[STABLE] Cumulative cpu time consumed by the node in core-seconds",
        "counter",
        &[(String::new(), with_ts(secs(s.node.cpu_ns)))],
    );
    family(
        &mut o,
        "node_memory_working_set_bytes",
        "[STABLE] Current working set of the node in bytes",
        "gauge",
        &[(String::new(), with_ts(s.node.working_set.to_string()))],
    );
    let per_p = |f: &dyn Fn(&PodSample) -> String| -> Vec<(String, String)> {
        s.pods.iter().map(|p| (pl(p), with_ts(f(p)))).collect()
    };
    family(
        &mut o,
        "pod_cpu_usage_seconds_total",
        "[STABLE] Cumulative cpu time consumed by the pod in core-seconds",
        "counter",
        &per_p(&|p| secs(p.usage.cpu_ns)),
    );
    family(
        &mut o,
        "pod_memory_working_set_bytes",
        "[STABLE] Current working set of the pod in bytes",
        "gauge",
        &per_p(&|p| p.usage.working_set.to_string()),
    );
    family(
        &mut o,
        "resource_scrape_error",
        "[STABLE] 1 if there was an error while getting container metrics, 0 otherwise",
        "gauge",
        &[(String::new(), "0".into())],
    );
    o
}

fn cadvisor_metrics(s: &Snapshot) -> String {
    let mut o = String::new();
    let labels = |p: &PodSample, c: &ContainerSample| {
        format!(
            "container=\"{}\",id=\"/kubepods/pod{}/{}\",image=\"{}\",name=\"{}\",namespace=\"{}\",pod=\"{}\"",
            esc(&c.name),
            esc(&p.uid),
            esc(&c.id),
            esc(&c.image),
            esc(&c.id),
            esc(&p.namespace),
            esc(&p.name)
        )
    };
    let per_c = |f: &dyn Fn(&ContainerSample) -> String| -> Vec<(String, String)> {
        s.pods
            .iter()
            .flat_map(|p| p.containers.iter().map(move |c| (labels(p, c), f(c))))
            .collect()
    };
    family(
        &mut o,
        "container_cpu_usage_seconds_total",
        "Cumulative cpu time consumed in seconds.",
        "counter",
        &per_c(&|c| secs(c.usage.cpu_ns)),
    );
    family(
        &mut o,
        "container_memory_usage_bytes",
        "Current memory usage in bytes, including all memory regardless of when it was accessed",
        "gauge",
        &per_c(&|c| c.usage.memory.to_string()),
    );
    family(
        &mut o,
        "container_memory_working_set_bytes",
        "Current working set in bytes.",
        "gauge",
        &per_c(&|c| c.usage.working_set.to_string()),
    );
    family(
        &mut o,
        "container_memory_rss",
        "Size of RSS in bytes.",
        "gauge",
        &per_c(&|c| c.usage.rss.to_string()),
    );
    family(
        &mut o,
        "container_fs_usage_bytes",
        "Number of bytes that are consumed by the container on this filesystem.",
        "gauge",
        &per_c(&|c| c.rootfs.used.to_string()),
    );
    family(
        &mut o,
        "container_start_time_seconds",
        "Start time of the container since unix epoch in seconds.",
        "gauge",
        &per_c(&|c| unix(&c.start)),
    );
    let per_if = |f: &dyn Fn(&Net) -> u64| -> Vec<(String, String)> {
        s.pods
            .iter()
            .flat_map(|p| {
                p.net.iter().map(move |n| {
                    (
                        format!(
                            "container=\"\",id=\"/kubepods/pod{}\",interface=\"{}\",namespace=\"{}\",pod=\"{}\"",
                            esc(&p.uid),
                            esc(&n.name),
                            esc(&p.namespace),
                            esc(&p.name)
                        ),
                        f(n).to_string(),
                    )
                })
            })
            .collect()
    };
    family(
        &mut o,
        "container_network_receive_bytes_total",
        "Cumulative count of bytes received",
        "counter",
        &per_if(&|n| n.rx_bytes),
    );
    family(
        &mut o,
        "container_network_transmit_bytes_total",
        "Cumulative count of bytes transmitted",
        "counter",
        &per_if(&|n| n.tx_bytes),
    );
    family(
        &mut o,
        "machine_cpu_cores",
        "Number of logical CPU cores.",
        "gauge",
        &[(String::new(), s.cpus.to_string())],
    );
    family(
        &mut o,
        "machine_memory_bytes",
        "Amount of memory installed on the machine.",
        "gauge",
        &[(String::new(), s.memory_total.to_string())],
    );
    o
}

/// The kubelet's own metrics: what it runs, and the process.
async fn kubelet_metrics(agent: &Arc<Agent>) -> String {
    let places = places(agent).await;
    let mut states: HashMap<&str, u64> = HashMap::new();
    for c in places.iter().flat_map(|p| &p.containers) {
        let k = match c.state {
            ContainerState::Running => "running",
            ContainerState::Exited => "exited",
            ContainerState::Created => "created",
        };
        *states.entry(k).or_default() += 1;
    }
    let mut o = String::new();
    family(
        &mut o,
        "kubelet_node_name",
        "[ALPHA] The node's name. The count is always 1.",
        "gauge",
        &[(
            format!("node=\"{}\"", esc(&agent.cfg.node_name)),
            "1".into(),
        )],
    );
    family(
        &mut o,
        "kubelet_running_pods",
        "[ALPHA] Number of pods that have a running pod sandbox",
        "gauge",
        &[(String::new(), places.len().to_string())],
    );
    let mut by_state: Vec<(String, String)> = ["running", "exited", "created"]
        .iter()
        .map(|k| {
            (
                format!("container_state=\"{k}\""),
                states.get(k).copied().unwrap_or(0).to_string(),
            )
        })
        .collect();
    by_state.sort();
    family(
        &mut o,
        "kubelet_running_containers",
        "[ALPHA] Number of containers currently running",
        "gauge",
        &by_state,
    );
    // The process itself.
    let stat = read("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let (hz, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
        )
    };
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // After the command: state is field 0; utime 11, stime 12, starttime 19, rss 21.
    let cpu = (field(11) + field(12)) as f64 / hz;
    let btime = keyed(&read("/proc/stat").unwrap_or_default(), "btime").unwrap_or(0) as f64;
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    family(
        &mut o,
        "process_cpu_seconds_total",
        "Total user and system CPU time spent in seconds.",
        "counter",
        &[(String::new(), format!("{cpu:.2}"))],
    );
    family(
        &mut o,
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        "gauge",
        &[(String::new(), (field(21) * page).to_string())],
    );
    family(
        &mut o,
        "process_open_fds",
        "Number of open file descriptors.",
        "gauge",
        &[(String::new(), fds.to_string())],
    );
    family(
        &mut o,
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        "gauge",
        &[(
            String::new(),
            format!("{:.2}", btime + field(19) as f64 / hz),
        )],
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_are_read_from_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  \
eth0:    5000      10    2    0    0     0          0         0     7000      12    3    0    0     0       0          0\n";
        assert_eq!(
            net_dev(text),
            vec![Net {
                name: "eth0".into(),
                rx_bytes: 5000,
                rx_errors: 2,
                tx_bytes: 7000,
                tx_errors: 3
            }]
        );
    }

    #[test]
    fn the_node_and_this_process_have_usage() {
        let n = node_usage();
        assert!(n.cpu_ns > 0 && n.memory > 0 && n.working_set <= n.memory);
        assert!(n.available.unwrap_or(0) > 0);
        let (bytes, inodes) = du(Path::new(env!("CARGO_MANIFEST_DIR")).join("src").as_path());
        assert!(bytes > 0 && inodes > 10);
    }

    #[test]
    fn cpu_rates_come_from_two_readings() {
        assert_eq!(rate("test-key", 1_000), None);
        std::thread::sleep(Duration::from_millis(20));
        let r = rate("test-key", 1_000 + 10_000_000).unwrap();
        // 10 ms of CPU in ≥ 20 ms: at most half a core.
        assert!(r > 0 && r <= 500_000_000, "{r}");
    }

    #[test]
    fn prometheus_families_have_help_type_and_escaped_labels() {
        let mut o = String::new();
        family(
            &mut o,
            "m",
            "help",
            "gauge",
            &[(format!("pod=\"{}\"", esc("a\"b")), "1".into())],
        );
        assert_eq!(o, "# HELP m help\n# TYPE m gauge\nm{pod=\"a\\\"b\"} 1\n");
    }
}
