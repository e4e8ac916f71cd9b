//! One pod's worker: sandbox (shim + network) → volumes → images → init containers in order →
//! containers (restart policy, CrashLoopBackOff) → probes → status; and graceful termination
//! (preStop, SIGTERM, grace period, SIGKILL) followed by a full clean-up.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k3rs_runtime::images::{ImageRecord, PullAuth};
use k3rs_runtime::shim::{ContainerState, ContainerStatus, ShimClient};
use k8s_openapi::api::core::v1::{Container, LifecycleHandler, Pod, Probe};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use super::container::{self, PodFiles};
use super::events::Involved;
use super::probes::{self, ProbeKind, ProbeOutcome, ProbeTracker};
use super::status::{self, ContainerView, PodView};
use super::Agent;
use crate::rest::status_code;

const BACKOFF_INITIAL: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A container that ran this long has its crash back-off forgotten.
const BACKOFF_RESET: Duration = Duration::from_secs(600);

pub type ProbeResults = Arc<Mutex<HashMap<(String, ProbeKind), (String, bool)>>>;

pub struct Worker {
    pub agent: Arc<Agent>,
    pub uid: String,
    pub rx: watch::Receiver<Option<Arc<Pod>>>,
    pub wake: Arc<Notify>,
    pub evict: Arc<Mutex<Option<String>>>,
    shim: Option<ShimClient>,
    pod_ip: Option<Ipv4Addr>,
    volumes: Option<BTreeMap<String, PathBuf>>,
    volumes_refreshed: Instant,
    files: PodFiles,
    backoff: HashMap<String, (Instant, Duration)>,
    image_backoff: HashMap<String, (Instant, Duration, String)>,
    waiting: HashMap<String, (String, String)>,
    images: HashMap<String, ImageRecord>,
    probes: HashMap<String, (String, Vec<tokio::task::JoinHandle<()>>)>,
    results: ProbeResults,
    killing: Arc<Mutex<std::collections::HashSet<String>>>,
    last_posted: Option<Value>,
    start_time: String,
    forced: Option<(String, String, String)>,
    terminal_done: bool,
    /// Container statuses as the API had them when the worker began (adoption after restart).
    initial_ready: HashMap<String, bool>,
}

fn involved(pod: &Pod, field_path: Option<String>) -> Involved {
    Involved {
        kind: "Pod",
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        field_path,
    }
}

/// An event's `fieldPath` for a container, in the list it belongs to (as upstream's).
fn container_path(pod: &Pod, name: &str) -> Option<String> {
    let spec = pod.spec.as_ref();
    let list = if spec.is_some_and(|s| s.init_containers.iter().flatten().any(|c| c.name == name)) {
        "initContainers"
    } else if spec.is_some_and(|s| {
        s.ephemeral_containers
            .iter()
            .flatten()
            .any(|c| c.name == name)
    }) {
        "ephemeralContainers"
    } else {
        "containers"
    };
    Some(format!("spec.{list}{{{name}}}"))
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}_{}({})",
        pod.metadata.name.clone().unwrap_or_default(),
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.uid.clone().unwrap_or_default()
    )
}

fn spec_of(pod: &Pod) -> k8s_openapi::api::core::v1::PodSpec {
    pod.spec.clone().unwrap_or_default()
}

/// Which containers of which attempts the runtime has, by name.
/// The pod's ephemeral containers as containers (they have the same fields, less some that
/// validation keeps unset), for starting and reporting them like the others.
fn ephemeral_containers(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<Container> {
    spec.ephemeral_containers
        .iter()
        .flatten()
        .filter_map(|e| {
            let mut v = serde_json::to_value(e).ok()?;
            v.as_object_mut()?.remove("targetContainerName");
            serde_json::from_value(v).ok()
        })
        .collect()
}

fn by_name(list: &[ContainerStatus]) -> HashMap<String, Vec<ContainerStatus>> {
    let mut m: HashMap<String, Vec<ContainerStatus>> = HashMap::new();
    for c in list {
        m.entry(c.name.clone()).or_default().push(c.clone());
    }
    for v in m.values_mut() {
        v.sort_by_key(|c| c.attempt);
    }
    m
}

fn lifecycle_probe(h: &LifecycleHandler) -> Probe {
    Probe {
        exec: h.exec.clone(),
        http_get: h.http_get.clone(),
        tcp_socket: h.tcp_socket.clone(),
        ..Default::default()
    }
}

fn parse_time(s: &str) -> Option<jiff::Timestamp> {
    s.parse::<jiff::Timestamp>().ok()
}

impl Worker {
    pub fn new(agent: Arc<Agent>, uid: String, rx: watch::Receiver<Option<Arc<Pod>>>) -> Worker {
        let initial = rx.borrow().clone();
        let mut initial_ready = HashMap::new();
        let mut start_time = super::now_rfc3339();
        if let Some(p) = &initial {
            if let Some(st) = &p.status {
                for cs in st.container_statuses.iter().flatten() {
                    if let Some(id) = &cs.container_id {
                        initial_ready
                            .insert(id.trim_start_matches("k3rs://").to_string(), cs.ready);
                    }
                }
                if let Some(t) = &st.start_time {
                    start_time = t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
                }
            }
        }
        Worker {
            agent,
            uid,
            rx,
            wake: Arc::new(Notify::new()),
            evict: Arc::new(Mutex::new(None)),
            shim: None,
            pod_ip: None,
            volumes: None,
            volumes_refreshed: Instant::now(),
            files: PodFiles::default(),
            backoff: HashMap::new(),
            image_backoff: HashMap::new(),
            waiting: HashMap::new(),
            images: HashMap::new(),
            probes: HashMap::new(),
            results: Arc::new(Mutex::new(HashMap::new())),
            killing: Arc::new(Mutex::new(Default::default())),
            last_posted: None,
            start_time,
            forced: None,
            terminal_done: false,
            initial_ready,
        }
    }

    fn shim_dir(&self) -> PathBuf {
        self.agent.cfg.shims_dir().join(&self.uid)
    }

    fn pod_dir(&self) -> PathBuf {
        self.agent.cfg.pods_dir().join(&self.uid)
    }

    fn log_dir(&self, pod: &Pod) -> PathBuf {
        self.agent.cfg.pod_logs(
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default(),
            &self.uid,
        )
    }

    /// The worker's life: sync until the pod is deleted, then terminate and clean up.
    pub async fn run(mut self) {
        let mut last: Option<Arc<Pod>> = None;
        loop {
            let pod = self.rx.borrow_and_update().clone();
            match pod {
                None => {
                    self.terminate(last.as_deref(), Some(Duration::from_secs(2)))
                        .await;
                    break;
                }
                Some(p) if p.metadata.deletion_timestamp.is_some() => {
                    let grace = p
                        .metadata
                        .deletion_grace_period_seconds
                        .map(|g| Duration::from_secs(g.max(0) as u64));
                    self.terminate(Some(&p), grace).await;
                    self.finish_deletion(&p).await;
                    break;
                }
                Some(p) => {
                    let next = match self.sync(&p).await {
                        Ok(d) => d,
                        Err(e) => {
                            tracing::warn!(pod = %pod_key(&p), error = %e, "pod sync");
                            Duration::from_secs(2)
                        }
                    };
                    last = Some(p);
                    tokio::select! {
                        r = self.rx.changed() => {
                            if r.is_err() {
                                // The manager forgot the pod: treat it as deleted.
                                self.terminate(last.as_deref(), Some(Duration::from_secs(2))).await;
                                break;
                            }
                        }
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(next) => {}
                    }
                }
            }
        }
        self.agent.workers.lock().remove(&self.uid);
        self.agent.pod_ip.lock().remove(&self.uid);
    }

    async fn ensure_sandbox(&mut self, pod: &Pod) -> Result<(), String> {
        if self.shim.is_some() {
            return Ok(());
        }
        let dir = self.shim_dir();
        let spec = spec_of(pod);
        let shim = match ShimClient::connect(&dir).await {
            Ok(s) => s,
            Err(_) => {
                let cfg = container::sandbox_config(
                    pod,
                    &self.agent.cfg.cgroup_root,
                    self.agent.cfg.containers_dir().join(&self.uid),
                );
                ShimClient::start(&self.agent.cfg.exe, &dir, &cfg)
                    .await
                    .map_err(|e| format!("failed to create pod sandbox: {e}"))?
            }
        };
        let host_network = spec.host_network.unwrap_or(false);
        let ip = if host_network {
            match self.agent.cfg.node_ip {
                IpAddr::V4(v4) => v4,
                IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
            }
        } else {
            let sb = shim
                .sandbox()
                .await
                .map_err(|e| format!("failed to read pod sandbox: {e}"))?;
            let netns = sb
                .netns
                .ok_or_else(|| "pod sandbox has no network namespace".to_string())?;
            let net = self
                .agent
                .net
                .get()
                .ok_or_else(|| "pod network not ready".to_string())?;
            net.attach(&self.uid, &netns).await.map_err(|e| {
                format!(
                    "failed to set up sandbox network for pod {:?}: {e}",
                    pod_key(pod)
                )
            })?
        };
        self.shim = Some(shim);
        self.pod_ip = Some(ip);
        if !host_network {
            let mut maps = Vec::new();
            for c in spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
            {
                for p in c.ports.iter().flatten() {
                    let Some(hp) = p.host_port.filter(|h| *h > 0) else {
                        continue;
                    };
                    maps.push(k3rs_net::HostPortMapping {
                        host_ip: p.host_ip.as_deref().and_then(|h| h.parse().ok()),
                        host_port: hp as u16,
                        protocol: match p.protocol.as_deref() {
                            Some("UDP") => k3rs_net::Protocol::Udp,
                            Some("SCTP") => k3rs_net::Protocol::Sctp,
                            _ => k3rs_net::Protocol::Tcp,
                        },
                        pod_ip: ip,
                        container_port: p.container_port as u16,
                    });
                }
            }
            if !maps.is_empty() {
                self.agent.set_host_ports(&self.uid, maps).await;
            }
        }
        self.agent.pod_ip.lock().insert(self.uid.clone(), ip);
        // Per-pod /etc/hosts, resolv.conf, hostname.
        let dir = self.pod_dir();
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let hosts = if host_network {
            Some(PathBuf::from("/etc/hosts"))
        } else {
            let p = dir.join("etc-hosts");
            std::fs::write(
                &p,
                container::hosts_file(pod, &ip.to_string(), &self.agent.cfg.cluster_domain),
            )
            .map_err(|e| e.to_string())?;
            Some(p)
        };
        let resolv = dir.join("resolv.conf");
        std::fs::write(
            &resolv,
            container::resolv_conf(
                pod,
                &container::host_resolv_conf(),
                &self.agent.cfg.cluster_dns.to_string(),
                &self.agent.cfg.cluster_domain,
            ),
        )
        .map_err(|e| e.to_string())?;
        let hostname = dir.join("hostname");
        let hn = if host_network {
            crate::config::hostname()
        } else {
            spec.hostname
                .clone()
                .unwrap_or_else(|| pod.metadata.name.clone().unwrap_or_default())
        };
        std::fs::write(&hostname, format!("{hn}\n")).map_err(|e| e.to_string())?;
        self.files = PodFiles {
            hosts,
            resolv: Some(resolv),
            hostname: Some(hostname),
        };
        Ok(())
    }

    /// One pass over the pod; returns how soon to look again.
    async fn sync(&mut self, pod: &Pod) -> Result<Duration, String> {
        let spec = spec_of(pod);
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if self.terminal_done
            || (self.shim.is_none() && (phase == "Succeeded" || phase == "Failed"))
        {
            // Nothing runs for a finished pod; wait for its deletion.
            self.terminal_done = true;
            return Ok(Duration::from_secs(3600));
        }
        let evict = self.evict.lock().take();
        if let Some(msg) = evict {
            self.agent
                .events
                .record(&involved(pod, None), true, "Evicted", msg.clone());
            self.forced = Some(("Failed".into(), "Evicted".into(), msg));
            if let Some(shim) = self.shim.clone() {
                for c in shim.list().await.unwrap_or_default() {
                    if c.state == ContainerState::Running {
                        let _ = shim.kill(&c.name, libc::SIGKILL).await;
                        wait_exit(&shim, &c.name, &c.id, Duration::from_secs(5)).await;
                    }
                }
                let list = shim.list().await.unwrap_or_default();
                self.post_status(pod, &list).await;
            }
            self.release_sandbox(pod).await;
            self.terminal_done = true;
            return Ok(Duration::from_secs(3600));
        }
        if let Err(msg) = self.ensure_sandbox(pod).await {
            self.agent.events.record(
                &involved(pod, None),
                true,
                "FailedCreatePodSandBox",
                msg.clone(),
            );
            self.post_status(pod, &[]).await;
            return Ok(Duration::from_secs(5));
        }
        if self.volumes.is_none() {
            match self.agent.volumes.setup(pod).await {
                Ok(v) => {
                    self.volumes = Some(v);
                    self.volumes_refreshed = Instant::now();
                }
                Err(e) => {
                    self.agent.events.record(
                        &involved(pod, None),
                        true,
                        "FailedMount",
                        e.to_string(),
                    );
                    self.post_status(pod, &[]).await;
                    return Ok(Duration::from_secs(2));
                }
            }
        } else if self.volumes_refreshed.elapsed() > Duration::from_secs(20) {
            self.volumes_refreshed = Instant::now();
            if let Err(e) = self.agent.volumes.refresh(pod).await {
                tracing::debug!(pod = %pod_key(pod), error = %e, "refreshing volumes");
            }
        }
        let shim = self.shim.clone().ok_or("no sandbox")?;
        let list = shim.list().await.map_err(|e| e.to_string())?;
        let have = by_name(&list);
        let policy = spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into());
        let mut next = Duration::from_secs(1);

        // Init containers, in order.
        let mut init_ok = true;
        for c in spec.init_containers.iter().flatten() {
            let latest = have.get(&c.name).and_then(|v| v.last().cloned());
            match latest {
                Some(s) if s.state == ContainerState::Exited && s.exit_code == Some(0) => {
                    self.waiting.remove(&c.name);
                    continue;
                }
                Some(s) if s.state != ContainerState::Exited => {
                    init_ok = false;
                    break;
                }
                Some(s) => {
                    init_ok = false;
                    if policy == "Never" {
                        self.waiting.remove(&c.name);
                        break;
                    }
                    self.restart_or_backoff(pod, c, &s, &shim).await;
                    break;
                }
                None => {
                    init_ok = false;
                    self.start_container(pod, c, 0, &shim).await;
                    break;
                }
            }
        }
        if init_ok {
            for c in &spec.containers {
                let latest = have.get(&c.name).and_then(|v| v.last().cloned());
                match latest {
                    None => {
                        if self.waiting.get(&c.name).is_none_or(|(r, _)| {
                            r != "ErrImagePull"
                                && r != "ImagePullBackOff"
                                && r != "CreateContainerConfigError"
                        }) || self.image_backoff_over(c)
                        {
                            self.start_container(pod, c, 0, &shim).await;
                        } else if let Some((r, _)) = self.waiting.get(&c.name).cloned() {
                            if r == "ErrImagePull" || r == "ImagePullBackOff" {
                                self.image_backoff_waiting(pod, c);
                            }
                            if r == "CreateContainerConfigError" {
                                self.start_container(pod, c, 0, &shim).await;
                            }
                        }
                    }
                    Some(s) if s.state == ContainerState::Running => {
                        self.waiting.remove(&c.name);
                        self.ensure_probes(pod, c, &s, &shim);
                        self.check_liveness(pod, c, &s, &shim);
                        if let Some(started) = s.started_at.as_deref().and_then(parse_time) {
                            let ran = jiff::Timestamp::now().duration_since(started);
                            if ran.as_secs() as u64 >= BACKOFF_RESET.as_secs() {
                                self.backoff.remove(&c.name);
                            }
                        }
                    }
                    Some(s) if s.state == ContainerState::Exited => {
                        self.stop_probes(&c.name);
                        let restart = match policy.as_str() {
                            "Always" => true,
                            "OnFailure" => s.exit_code != Some(0),
                            _ => false,
                        };
                        if restart {
                            self.restart_or_backoff(pod, c, &s, &shim).await;
                        } else {
                            self.waiting.remove(&c.name);
                        }
                    }
                    Some(_) => {}
                }
            }
        }
        // Ephemeral containers run once, in the running pod, and are never restarted.
        if init_ok {
            for c in ephemeral_containers(&spec) {
                if have.contains_key(&c.name) {
                    continue;
                }
                let pulling_failed = self
                    .waiting
                    .get(&c.name)
                    .is_some_and(|(r, _)| r == "ErrImagePull" || r == "ImagePullBackOff");
                if pulling_failed && !self.image_backoff_over(&c) {
                    self.image_backoff_waiting(pod, &c);
                } else {
                    self.start_container(pod, &c, 0, &shim).await;
                }
            }
        }
        // Look again sooner while something is starting or a back-off ends soon.
        for (until, _) in self.backoff.values() {
            let left = until.saturating_duration_since(Instant::now());
            next = next.min(left.max(Duration::from_millis(100)));
        }
        let list = shim.list().await.map_err(|e| e.to_string())?;
        self.post_status(pod, &list).await;
        // A finished pod frees its sandbox (the statuses are in the API).
        let st = self
            .last_posted
            .as_ref()
            .and_then(|s| s["phase"].as_str().map(String::from));
        if matches!(st.as_deref(), Some("Succeeded") | Some("Failed")) {
            self.release_sandbox(pod).await;
            self.terminal_done = true;
        }
        Ok(next)
    }

    fn image_backoff_over(&self, c: &Container) -> bool {
        let img = c.image.clone().unwrap_or_default();
        self.image_backoff
            .get(&img)
            .is_none_or(|(until, _, _)| Instant::now() >= *until)
    }

    fn image_backoff_waiting(&mut self, pod: &Pod, c: &Container) {
        let img = c.image.clone().unwrap_or_default();
        // ErrImagePull stays visible for a moment after the failure, as upstream's next sync
        // comes a little later.
        if let Some((until, delay, _)) = self.image_backoff.get(&img) {
            if Instant::now() < *until - *delay + Duration::from_secs(3) {
                return;
            }
        }
        let msg = format!("Back-off pulling image {img:?}");
        if self.waiting.get(&c.name).map(|(r, _)| r.as_str()) != Some("ImagePullBackOff") {
            self.agent.events.record(
                &involved(pod, container_path(pod, &c.name)),
                false,
                "BackOff",
                msg.clone(),
            );
        }
        let _ = &msg;
        self.waiting
            .insert(c.name.clone(), ("ImagePullBackOff".into(), msg));
    }

    async fn restart_or_backoff(
        &mut self,
        pod: &Pod,
        c: &Container,
        s: &ContainerStatus,
        shim: &ShimClient,
    ) {
        let now = Instant::now();
        match self.backoff.get(&c.name).cloned() {
            Some((until, delay)) if now < until => {
                let msg = format!(
                    "back-off {}s restarting failed container={} pod={}",
                    delay.as_secs(),
                    c.name,
                    pod_key(pod)
                );
                if self.waiting.get(&c.name).map(|(r, _)| r.as_str()) != Some("CrashLoopBackOff") {
                    self.agent.events.record(
                        &involved(pod, container_path(pod, &c.name)),
                        true,
                        "BackOff",
                        "Back-off restarting failed container".to_string()
                            + &format!(" {} in pod {}", c.name, pod_key(pod)),
                    );
                }
                self.waiting
                    .insert(c.name.clone(), ("CrashLoopBackOff".into(), msg));
            }
            prev => {
                let delay = match prev {
                    Some((_, d)) => (d * 2).min(BACKOFF_MAX),
                    None => BACKOFF_INITIAL,
                };
                // The first restart is immediate; the next waits `delay`.
                self.backoff.insert(c.name.clone(), (now + delay, delay));
                // Keep two attempts (current and previous) around for logs and lastState.
                if s.attempt >= 1 {
                    let _ = shim.remove_container(&c.name, s.attempt - 1).await;
                }
                self.start_container(pod, c, s.attempt + 1, shim).await;
            }
        }
    }

    async fn resolve_image(
        &mut self,
        pod: &Pod,
        c: &Container,
    ) -> Result<ImageRecord, (String, String)> {
        let image = c.image.clone().unwrap_or_default();
        let inv = involved(pod, container_path(pod, &c.name));
        let reference = k3rs_runtime::images::normalize_reference(&image).map_err(|e| {
            (
                "InvalidImageName".to_string(),
                format!("Failed to apply default image tag {image:?}: {e}"),
            )
        })?;
        let policy = c.image_pull_policy.clone().unwrap_or_else(|| {
            if reference.ends_with(":latest") {
                "Always".into()
            } else {
                "IfNotPresent".into()
            }
        });
        let local = self.agent.images.get(&reference);
        let airgap = local.as_ref().is_some_and(|l| l.imported)
            || self.agent.airgap_images.lock().contains(&reference);
        match (policy.as_str(), local) {
            ("Never", Some(l)) | ("IfNotPresent", Some(l)) => {
                self.agent.events.record(
                    &inv,
                    false,
                    "Pulled",
                    format!("Container image {image:?} already present on machine"),
                );
                return Ok(l);
            }
            ("Always", Some(l)) if airgap => {
                self.agent.events.record(
                    &inv,
                    false,
                    "Pulled",
                    format!("Container image {image:?} already present on machine (imported)"),
                );
                return Ok(l);
            }
            ("Never", None) => {
                return Err((
                    "ErrImageNeverPull".into(),
                    format!("Container image {image:?} is not present with pull policy of Never"),
                ))
            }
            _ => {}
        }
        // One pull per image at a time on this node.
        let lock = {
            let mut g = self.agent.pulls.lock().await;
            g.entry(reference.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if policy != "Always" {
            if let Some(l) = self.agent.images.get(&reference) {
                return Ok(l);
            }
        }
        self.agent
            .events
            .record(&inv, false, "Pulling", format!("Pulling image {image:?}"));
        let started = Instant::now();
        let auth = self.pull_auth(pod).await;
        match self
            .agent
            .images
            .pull(&reference, &auth, &self.agent.registries)
            .await
        {
            Ok(rec) => {
                self.agent.events.record(
                    &inv,
                    false,
                    "Pulled",
                    format!(
                        "Successfully pulled image {image:?} in {:.3}s. Image size: {} bytes.",
                        started.elapsed().as_secs_f64(),
                        rec.size
                    ),
                );
                *self.agent.last_status.lock() = String::new();
                Ok(rec)
            }
            Err(e) => {
                let msg = format!("Failed to pull image {image:?}: {e}");
                self.agent.events.record(&inv, true, "Failed", msg.clone());
                self.agent
                    .events
                    .record(&inv, true, "Failed", "Error: ErrImagePull".into());
                Err(("ErrImagePull".into(), msg))
            }
        }
    }

    async fn pull_auth(&self, pod: &Pod) -> PullAuth {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let mut auth = PullAuth::default();
        for s in spec_of(pod).image_pull_secrets.iter().flatten() {
            let name = &s.name;
            if name.is_empty() {
                continue;
            }
            let Ok(sec) = self
                .agent
                .client
                .get(&format!("/api/v1/namespaces/{ns}/secrets/{name}"))
                .await
            else {
                continue;
            };
            let data = sec["data"][".dockerconfigjson"]
                .as_str()
                .or(sec["data"][".dockercfg"].as_str());
            if let Some(b64) = data {
                use base64::Engine;
                if let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64) {
                    if let Ok(a) = PullAuth::from_dockerconfigjson(&raw) {
                        auth.credentials.extend(a.credentials);
                    }
                }
            }
        }
        auth
    }

    /// The container's environment in order: env (with $(VAR) expansion) after envFrom.
    async fn resolve_env(&self, pod: &Pod, c: &Container) -> Result<Vec<(String, String)>, String> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let mut cache: HashMap<String, Option<Value>> = HashMap::new();
        let client = &self.agent.client;
        async fn get(
            client: &crate::rest::RestClient,
            cache: &mut HashMap<String, Option<Value>>,
            ns: &str,
            kind: &'static str,
            name: String,
        ) -> Option<Value> {
            let key = format!("{kind}/{name}");
            if let Some(v) = cache.get(&key) {
                return v.clone();
            }
            let v = client
                .get(&format!("/api/v1/namespaces/{ns}/{kind}/{name}"))
                .await
                .ok();
            cache.insert(key, v.clone());
            v
        }
        let mut out: Vec<(String, String)> = Vec::new();
        let mut vars: HashMap<String, String> = HashMap::new();
        // Service links for the API server, as upstream (other services come with the proxy).
        let api_ip = self.agent.cfg.service_cidr.nth(1).to_string();
        if spec_of(pod).enable_service_links.unwrap_or(true) || ns == "default" {
            for (k, v) in [
                ("KUBERNETES_SERVICE_HOST", api_ip.clone()),
                ("KUBERNETES_SERVICE_PORT", "443".into()),
                ("KUBERNETES_SERVICE_PORT_HTTPS", "443".into()),
                ("KUBERNETES_PORT", format!("tcp://{api_ip}:443")),
                ("KUBERNETES_PORT_443_TCP", format!("tcp://{api_ip}:443")),
                ("KUBERNETES_PORT_443_TCP_PROTO", "tcp".into()),
                ("KUBERNETES_PORT_443_TCP_PORT", "443".into()),
                ("KUBERNETES_PORT_443_TCP_ADDR", api_ip.clone()),
            ] {
                out.push((k.into(), v.clone()));
                vars.insert(k.into(), v);
            }
        }
        let set = |out: &mut Vec<(String, String)>,
                   vars: &mut HashMap<String, String>,
                   k: String,
                   v: String| {
            vars.insert(k.clone(), v.clone());
            if let Some(e) = out.iter_mut().find(|(ok, _)| *ok == k) {
                e.1 = v;
            } else {
                out.push((k, v));
            }
        };
        for ef in c.env_from.iter().flatten() {
            let prefix = ef.prefix.clone().unwrap_or_default();
            let (kind, name, optional) = if let Some(r) = &ef.config_map_ref {
                ("configmaps", r.name.clone(), r.optional.unwrap_or(false))
            } else if let Some(r) = &ef.secret_ref {
                ("secrets", r.name.clone(), r.optional.unwrap_or(false))
            } else {
                continue;
            };
            let obj = get(client, &mut cache, &ns, kind, name.clone()).await;
            let Some(obj) = obj else {
                if optional {
                    continue;
                }
                return Err(format!(
                    "{} {name:?} not found",
                    if kind == "configmaps" {
                        "configmap"
                    } else {
                        "secret"
                    }
                ));
            };
            if let Some(data) = obj["data"].as_object() {
                for (k, v) in data {
                    let v = v.as_str().unwrap_or_default();
                    let v = if kind == "secrets" {
                        decode_b64(v)
                    } else {
                        v.to_string()
                    };
                    set(&mut out, &mut vars, format!("{prefix}{k}"), v);
                }
            }
        }
        for e in c.env.iter().flatten() {
            let value = if let Some(v) = &e.value {
                container::expand(v, &vars)
            } else if let Some(vf) = &e.value_from {
                if let Some(r) = &vf.config_map_key_ref {
                    let obj = get(client, &mut cache, &ns, "configmaps", r.name.clone()).await;
                    match obj
                        .as_ref()
                        .and_then(|o| o["data"][&r.key].as_str().map(String::from))
                    {
                        Some(v) => v,
                        None if r.optional.unwrap_or(false) => continue,
                        None if obj.is_none() => {
                            return Err(format!("configmap {:?} not found", r.name))
                        }
                        None => {
                            return Err(format!(
                                "couldn't find key {} in ConfigMap {}/{}",
                                r.key, ns, r.name
                            ))
                        }
                    }
                } else if let Some(r) = &vf.secret_key_ref {
                    let obj = get(client, &mut cache, &ns, "secrets", r.name.clone()).await;
                    match obj
                        .as_ref()
                        .and_then(|o| o["data"][&r.key].as_str().map(decode_b64))
                    {
                        Some(v) => v,
                        None if r.optional.unwrap_or(false) => continue,
                        None if obj.is_none() => {
                            return Err(format!("secret {:?} not found", r.name))
                        }
                        None => {
                            return Err(format!(
                                "couldn't find key {} in Secret {}/{}",
                                r.key, ns, r.name
                            ))
                        }
                    }
                } else if let Some(f) = &vf.field_ref {
                    self.field_value(pod, &f.field_path)?
                } else if let Some(r) = &vf.resource_field_ref {
                    resource_value(pod, c, r, &self.agent.cfg.thresholds)?
                } else {
                    continue;
                }
            } else {
                String::new()
            };
            set(&mut out, &mut vars, e.name.clone(), value);
        }
        Ok(out)
    }

    fn field_value(&self, pod: &Pod, path: &str) -> Result<String, String> {
        let m = &pod.metadata;
        let label = |map: &Option<BTreeMap<String, String>>, key: &str| {
            map.as_ref()
                .and_then(|m| m.get(key).cloned())
                .unwrap_or_default()
        };
        let ip = self.pod_ip.map(|i| i.to_string()).unwrap_or_default();
        Ok(match path {
            "metadata.name" => m.name.clone().unwrap_or_default(),
            "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
            "metadata.uid" => m.uid.clone().unwrap_or_default(),
            "spec.nodeName" => self.agent.cfg.node_name.clone(),
            "spec.serviceAccountName" => spec_of(pod).service_account_name.unwrap_or_default(),
            "status.hostIP" | "status.hostIPs" => self.agent.cfg.node_ip.to_string(),
            "status.podIP" | "status.podIPs" => ip,
            p if p.starts_with("metadata.labels['") && p.ends_with("']") => {
                label(&m.labels, &p["metadata.labels['".len()..p.len() - 2])
            }
            p if p.starts_with("metadata.annotations['") && p.ends_with("']") => label(
                &m.annotations,
                &p["metadata.annotations['".len()..p.len() - 2],
            ),
            "metadata.labels" | "metadata.annotations" => {
                let map = if path == "metadata.labels" {
                    &m.labels
                } else {
                    &m.annotations
                };
                map.clone()
                    .unwrap_or_default()
                    .iter()
                    .map(|(k, v)| format!("{k}={v:?}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
            other => return Err(format!("unsupported fieldRef {other:?}")),
        })
    }

    /// Pulls the image, builds the runtime config and starts one container attempt.
    async fn start_container(&mut self, pod: &Pod, c: &Container, attempt: u32, shim: &ShimClient) {
        let inv = involved(pod, container_path(pod, &c.name));
        let image_key = c.image.clone().unwrap_or_default();
        let img = match self.resolve_image(pod, c).await {
            Ok(i) => {
                self.image_backoff.remove(&image_key);
                i
            }
            Err((reason, msg)) => {
                let delay = match self.image_backoff.get(&image_key) {
                    Some((_, d, _)) => (*d * 2).min(BACKOFF_MAX),
                    None => BACKOFF_INITIAL,
                };
                self.image_backoff.insert(
                    image_key.clone(),
                    (Instant::now() + delay, delay, msg.clone()),
                );
                self.waiting.insert(c.name.clone(), (reason, msg));
                return;
            }
        };
        self.images.insert(c.name.clone(), img.clone());
        let store = self.agent.images.clone();
        let img2 = img.clone();
        let layers = match tokio::task::spawn_blocking(move || store.layer_dirs(&img2)).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                self.waiting.insert(
                    c.name.clone(),
                    ("CreateContainerError".into(), e.to_string()),
                );
                return;
            }
            Err(e) => {
                self.waiting.insert(
                    c.name.clone(),
                    ("CreateContainerError".into(), e.to_string()),
                );
                return;
            }
        };
        let env = match self.resolve_env(pod, c).await {
            Ok(e) => e,
            Err(msg) => {
                self.agent
                    .events
                    .record(&inv, true, "Failed", format!("Error: {msg}"));
                self.waiting
                    .insert(c.name.clone(), ("CreateContainerConfigError".into(), msg));
                return;
            }
        };
        let log_dir = self.log_dir(pod).join(&c.name);
        let _ = std::fs::create_dir_all(&log_dir);
        let term_dir = self.pod_dir().join("containers").join(&c.name);
        let _ = std::fs::create_dir_all(&term_dir);
        let term_file = term_dir.join(format!("termination-log-{attempt}"));
        let _ = std::fs::write(&term_file, b"");
        let volumes = self.volumes.clone().unwrap_or_default();
        let mut cfg = match container::container_config(
            pod,
            c,
            attempt,
            &img.config,
            layers,
            env,
            &volumes,
            &self.files,
            &term_file,
            log_dir.join(format!("{attempt}.log")),
        ) {
            Ok(c) => c,
            Err(msg) => {
                self.agent
                    .events
                    .record(&inv, true, "Failed", format!("Error: {msg}"));
                self.waiting
                    .insert(c.name.clone(), ("CreateContainerConfigError".into(), msg));
                return;
            }
        };
        self.waiting.remove(&c.name);
        cfg.log_max_size = self.agent.cfg.thresholds.container_log_max_size;
        cfg.log_max_files = self.agent.cfg.thresholds.container_log_max_files;
        // An ephemeral container with a target shares that container's process namespace.
        cfg.pid_ns_of = pod
            .spec
            .iter()
            .flat_map(|s| s.ephemeral_containers.iter().flatten())
            .find(|e| e.name == c.name)
            .and_then(|e| e.target_container_name.clone())
            .filter(|t| !t.is_empty());
        match shim.run_container(&cfg).await {
            Ok(st) => {
                self.agent.events.record(
                    &inv,
                    false,
                    "Created",
                    format!("Created container {}", c.name),
                );
                if st.state == ContainerState::Exited && st.reason.as_deref() == Some("StartError")
                {
                    self.agent.events.record(
                        &inv,
                        true,
                        "Failed",
                        format!("Error: {}", st.message.clone().unwrap_or_default()),
                    );
                    return;
                }
                self.agent.events.record(
                    &inv,
                    false,
                    "Started",
                    format!("Started container {}", c.name),
                );
                if let Some(h) = c.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()) {
                    if let Err(msg) = self
                        .run_hook(pod, c, h, shim, Duration::from_secs(30))
                        .await
                    {
                        self.agent.events.record(
                            &inv,
                            true,
                            "FailedPostStartHook",
                            format!("PostStartHook failed: {msg}"),
                        );
                        let _ = shim.kill(&c.name, libc::SIGKILL).await;
                    }
                }
                self.ensure_probes(pod, c, &st, shim);
            }
            Err(e) => {
                let msg = e.to_string();
                self.agent
                    .events
                    .record(&inv, true, "Failed", format!("Error: {msg}"));
                self.waiting
                    .insert(c.name.clone(), ("CreateContainerError".into(), msg));
            }
        }
    }

    async fn run_hook(
        &self,
        pod: &Pod,
        c: &Container,
        h: &LifecycleHandler,
        shim: &ShimClient,
        timeout: Duration,
    ) -> Result<(), String> {
        if let Some(s) = &h.sleep {
            tokio::time::sleep(Duration::from_secs(s.seconds.max(0) as u64).min(timeout)).await;
            return Ok(());
        }
        let mut probe = lifecycle_probe(h);
        probe.timeout_seconds = Some(timeout.as_secs() as i32);
        let exec = exec_fn(shim.clone(), c.name.clone());
        let ip = self.pod_ip.map(IpAddr::V4);
        let _ = pod;
        match tokio::time::timeout(timeout, probes::probe_once(&probe, c, ip, &*exec)).await {
            Ok(ProbeOutcome::Success) => Ok(()),
            Ok(ProbeOutcome::Failure(m)) => Err(m),
            Err(_) => Err(format!("hook timed out after {}s", timeout.as_secs())),
        }
    }

    fn stop_probes(&mut self, name: &str) {
        if let Some((_, tasks)) = self.probes.remove(name) {
            for t in tasks {
                t.abort();
            }
        }
    }

    fn ensure_probes(&mut self, pod: &Pod, c: &Container, s: &ContainerStatus, shim: &ShimClient) {
        if self.probes.get(&c.name).is_some_and(|(id, _)| *id == s.id) {
            return;
        }
        self.stop_probes(&c.name);
        let mut tasks = Vec::new();
        let initial_ready = self.initial_ready.get(&s.id).copied();
        {
            let mut r = self.results.lock();
            r.retain(|(n, _), _| *n != c.name);
            let startup_ok = c.startup_probe.is_none() || initial_ready.is_some();
            r.insert(
                (c.name.clone(), ProbeKind::Startup),
                (s.id.clone(), startup_ok),
            );
            let ready = c.readiness_probe.is_none() || initial_ready == Some(true);
            r.insert(
                (c.name.clone(), ProbeKind::Readiness),
                (s.id.clone(), ready),
            );
            r.insert((c.name.clone(), ProbeKind::Liveness), (s.id.clone(), true));
        }
        for (kind, probe) in [
            (ProbeKind::Startup, c.startup_probe.clone()),
            (ProbeKind::Readiness, c.readiness_probe.clone()),
            (ProbeKind::Liveness, c.liveness_probe.clone()),
        ] {
            let Some(probe) = probe else { continue };
            let results = self.results.clone();
            let wake = self.wake.clone();
            let container = c.clone();
            let id = s.id.clone();
            let exec = exec_fn(shim.clone(), c.name.clone());
            let ip = self.pod_ip.map(IpAddr::V4);
            let events = self.agent.events.clone();
            let inv = involved(pod, container_path(pod, &c.name));
            let skip_delay = initial_ready.is_some();
            tasks.push(tokio::spawn(async move {
                let mut tracker = ProbeTracker::new(&probe, kind);
                if kind == ProbeKind::Readiness && skip_delay {
                    // Adopted after a restart: keep the ready state the API showed.
                } else {
                    tokio::time::sleep(tracker.initial_delay()).await;
                }
                loop {
                    // Liveness and readiness wait for the startup probe.
                    let startup_ok = results
                        .lock()
                        .get(&(container.name.clone(), ProbeKind::Startup))
                        .is_some_and(|(i, ok)| *i == id && *ok);
                    if kind == ProbeKind::Startup || startup_ok {
                        let outcome = tokio::time::timeout(
                            tracker.timeout() + Duration::from_secs(1),
                            probes::probe_once(&probe, &container, ip, &*exec),
                        )
                        .await
                        .unwrap_or_else(|_| ProbeOutcome::Failure("probe timed out".into()));
                        let ok = matches!(outcome, ProbeOutcome::Success);
                        if let ProbeOutcome::Failure(msg) = &outcome {
                            let what = match kind {
                                ProbeKind::Liveness => "Liveness",
                                ProbeKind::Readiness => "Readiness",
                                ProbeKind::Startup => "Startup",
                            };
                            events.record(
                                &inv,
                                true,
                                "Unhealthy",
                                format!("{what} probe failed: {msg}"),
                            );
                        }
                        if let Some(now) = tracker.observe(ok) {
                            results
                                .lock()
                                .insert((container.name.clone(), kind), (id.clone(), now));
                            wake.notify_one();
                            if kind == ProbeKind::Startup && now {
                                // Startup succeeded: it is not run again.
                                return;
                            }
                        }
                    }
                    tokio::time::sleep(tracker.period()).await;
                }
            }));
        }
        self.probes.insert(c.name.clone(), (s.id.clone(), tasks));
    }

    fn probe_ok(&self, name: &str, id: &str, kind: ProbeKind) -> bool {
        self.results
            .lock()
            .get(&(name.to_string(), kind))
            .map(|(i, ok)| i != id || *ok)
            .unwrap_or(true)
    }

    fn check_liveness(&mut self, pod: &Pod, c: &Container, s: &ContainerStatus, shim: &ShimClient) {
        let failed_live = !self.probe_ok(&c.name, &s.id, ProbeKind::Liveness);
        let startup = c.startup_probe.as_ref();
        let failed_startup = startup.is_some() && {
            // A startup probe that failed its threshold kills the container.
            let r = self
                .results
                .lock()
                .get(&(c.name.clone(), ProbeKind::Startup))
                .cloned();
            matches!(r, Some((ref i, false)) if *i == s.id) && self.startup_gave_up(c, s)
        };
        if !(failed_live || failed_startup) || self.killing.lock().contains(&s.id) {
            return;
        }
        self.killing.lock().insert(s.id.clone());
        let what = if failed_live { "liveness" } else { "startup" };
        self.agent.events.record(
            &involved(pod, container_path(pod, &c.name)),
            false,
            "Killing",
            format!(
                "Container {} failed {what} probe, will be restarted",
                c.name
            ),
        );
        let grace = Duration::from_secs(
            spec_of(pod)
                .termination_grace_period_seconds
                .unwrap_or(30)
                .max(0) as u64,
        );
        let shim = shim.clone();
        let name = c.name.clone();
        let id = s.id.clone();
        let killing = self.killing.clone();
        let wake = self.wake.clone();
        tokio::spawn(async move {
            let _ = shim.kill(&name, libc::SIGTERM).await;
            wait_exit(&shim, &name, &id, grace).await;
            let _ = shim.kill(&name, libc::SIGKILL).await;
            wait_exit(&shim, &name, &id, Duration::from_secs(5)).await;
            killing.lock().remove(&id);
            wake.notify_one();
        });
    }

    fn startup_gave_up(&self, c: &Container, s: &ContainerStatus) -> bool {
        let Some(p) = &c.startup_probe else {
            return false;
        };
        let budget = p.initial_delay_seconds.unwrap_or(0) as u64
            + p.period_seconds.unwrap_or(10).max(1) as u64
                * p.failure_threshold.unwrap_or(3).max(1) as u64;
        s.started_at
            .as_deref()
            .and_then(parse_time)
            .is_some_and(|t| jiff::Timestamp::now().duration_since(t).as_secs() as u64 >= budget)
    }

    fn views(
        &self,
        pod: &Pod,
        list: &[ContainerStatus],
        containers: &[Container],
    ) -> Vec<ContainerView> {
        let have = by_name(list);
        containers
            .iter()
            .map(|c| {
                let attempts = have.get(&c.name).cloned().unwrap_or_default();
                let current = attempts.last().cloned();
                let previous = if attempts.len() >= 2 {
                    attempts.get(attempts.len() - 2).cloned()
                } else {
                    None
                };
                let running = current
                    .as_ref()
                    .is_some_and(|s| s.state == ContainerState::Running);
                let id = current.as_ref().map(|s| s.id.clone()).unwrap_or_default();
                let started = running && self.probe_ok(&c.name, &id, ProbeKind::Startup);
                let ready = started && self.probe_ok(&c.name, &id, ProbeKind::Readiness);
                let mut waiting = self.waiting.get(&c.name).cloned();
                if waiting.is_none() && current.is_none() {
                    let init_pending = spec_of(pod)
                        .init_containers
                        .iter()
                        .flatten()
                        .any(|i| i.name != c.name)
                        && spec_of(pod).containers.iter().any(|x| x.name == c.name);
                    waiting = Some((
                        if init_pending {
                            "PodInitializing"
                        } else {
                            "ContainerCreating"
                        }
                        .into(),
                        String::new(),
                    ));
                }
                let img = self.images.get(&c.name);
                // The repo digest of the repository this container named.
                let repo = c
                    .image
                    .as_deref()
                    .and_then(|i| k3rs_runtime::images::normalize_reference(i).ok())
                    .map(|r| format!("{}@", k3rs_runtime::images::repository_of(&r)))
                    .unwrap_or_default();
                ContainerView {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    image_id: img
                        .map(|i| {
                            i.repo_digests
                                .iter()
                                .find(|d| d.starts_with(&repo))
                                .or(i.repo_digests.first())
                                .cloned()
                                .unwrap_or_else(|| i.id.clone())
                        })
                        .unwrap_or_default(),
                    current,
                    previous,
                    waiting,
                    ready,
                    started,
                }
            })
            .collect()
    }

    async fn post_status(&mut self, pod: &Pod, list: &[ContainerStatus]) {
        let spec = spec_of(pod);
        let mut init = self.views(
            pod,
            list,
            spec.init_containers.as_deref().unwrap_or_default(),
        );
        // Init containers that finished need no "waiting" noise.
        for v in init.iter_mut() {
            if v.waiting
                .as_ref()
                .is_some_and(|(r, _)| r == "PodInitializing")
            {
                v.waiting = Some(("PodInitializing".into(), String::new()));
            }
        }
        let containers = self.views(pod, list, &spec.containers);
        let mut ephemeral = self.views(pod, list, &ephemeral_containers(&spec));
        for v in ephemeral.iter_mut() {
            v.ready = false;
        }
        let view = PodView {
            init,
            containers,
            ephemeral,
            sandbox_ready: self.shim.is_some(),
            pod_ip: self
                .pod_ip
                .filter(|_| !spec.host_network.unwrap_or(false))
                .map(|i| i.to_string())
                .or_else(|| {
                    spec.host_network
                        .unwrap_or(false)
                        .then(|| self.agent.cfg.node_ip.to_string())
                }),
            host_ip: self.agent.cfg.node_ip.to_string(),
            start_time: self.start_time.clone(),
            qos_class: container::qos_class(pod).into(),
            forced: self.forced.clone(),
        };
        let mut st = status::pod_status(pod, &view);
        // Termination messages of exited containers.
        self.add_termination_messages(pod, &mut st);
        if self.last_posted.as_ref().map(without_times) == Some(without_times(&st)) {
            return;
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        match self
            .agent
            .client
            .merge_patch(
                &format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
                &json!({"metadata": {"uid": self.uid}, "status": st}),
            )
            .await
        {
            Ok(_) => self.last_posted = Some(st),
            Err(e) => tracing::debug!(pod = %pod_key(pod), error = %e, "posting pod status"),
        }
    }

    fn add_termination_messages(&self, pod: &Pod, st: &mut Value) {
        let Some(list) = st["containerStatuses"].as_array_mut() else {
            return;
        };
        let _ = pod;
        for cs in list {
            let name = cs["name"].as_str().unwrap_or_default().to_string();
            let restart = cs["restartCount"].as_i64().unwrap_or(0);
            let waiting = cs["state"].get("waiting").is_some();
            for field in ["state", "lastState"] {
                // lastState is the attempt before the current one, or the current one while
                // it waits to restart.
                let attempt = if field == "state" || waiting {
                    restart
                } else {
                    restart - 1
                };
                let Some(t) = cs[field].get_mut("terminated") else {
                    continue;
                };
                if t.get("message").is_some() {
                    continue;
                }
                let f = self
                    .pod_dir()
                    .join("containers")
                    .join(&name)
                    .join(format!("termination-log-{attempt}"));
                if let Ok(m) = std::fs::read_to_string(&f) {
                    if !m.is_empty() {
                        t["message"] = json!(m.chars().take(4096).collect::<String>());
                    }
                }
            }
        }
    }

    /// Stops every container gracefully (preStop, SIGTERM, grace, SIGKILL) and frees the
    /// sandbox: shim, network, volumes.
    async fn terminate(&mut self, pod: Option<&Pod>, grace: Option<Duration>) {
        if self.shim.is_none() {
            self.shim = ShimClient::connect(&self.shim_dir()).await.ok();
        }
        if let (Some(shim), Some(pod)) = (self.shim.clone(), pod) {
            let spec = spec_of(pod);
            let grace = grace.unwrap_or_else(|| {
                Duration::from_secs(
                    spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64
                )
            });
            let deadline = Instant::now() + grace;
            let list = shim.list().await.unwrap_or_default();
            let running: Vec<ContainerStatus> = list
                .into_iter()
                .filter(|c| c.state == ContainerState::Running)
                .collect();
            let mut tasks = Vec::new();
            for s in running {
                let c = spec
                    .containers
                    .iter()
                    .chain(spec.init_containers.iter().flatten())
                    .find(|c| c.name == s.name)
                    .cloned();
                let inv = involved(pod, container_path(pod, &s.name));
                self.agent.events.record(
                    &inv,
                    false,
                    "Killing",
                    format!("Stopping container {}", s.name),
                );
                let shim = shim.clone();
                let pre_stop = c
                    .as_ref()
                    .and_then(|c| c.lifecycle.as_ref())
                    .and_then(|l| l.pre_stop.clone());
                let ip = self.pod_ip.map(IpAddr::V4);
                let events = self.agent.events.clone();
                tasks.push(tokio::spawn(async move {
                    if let (Some(h), Some(c)) = (pre_stop, c.as_ref()) {
                        let left = deadline.saturating_duration_since(Instant::now());
                        let r = if let Some(sl) = &h.sleep {
                            tokio::time::sleep(
                                Duration::from_secs(sl.seconds.max(0) as u64).min(left),
                            )
                            .await;
                            Ok(())
                        } else {
                            let mut probe = lifecycle_probe(&h);
                            probe.timeout_seconds = Some(left.as_secs().max(1) as i32);
                            let exec = exec_fn(shim.clone(), s.name.clone());
                            match tokio::time::timeout(
                                left,
                                probes::probe_once(&probe, c, ip, &*exec),
                            )
                            .await
                            {
                                Ok(ProbeOutcome::Success) => Ok(()),
                                Ok(ProbeOutcome::Failure(m)) => Err(m),
                                Err(_) => Err("timed out".to_string()),
                            }
                        };
                        if let Err(m) = r {
                            events.record(
                                &inv,
                                true,
                                "FailedPreStopHook",
                                format!("PreStopHook failed: {m}"),
                            );
                        }
                    }
                    let _ = shim.kill(&s.name, libc::SIGTERM).await;
                    let left = deadline.saturating_duration_since(Instant::now());
                    wait_exit(&shim, &s.name, &s.id, left).await;
                    let _ = shim.kill(&s.name, libc::SIGKILL).await;
                    wait_exit(&shim, &s.name, &s.id, Duration::from_secs(5)).await;
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            // Final statuses (terminated) before the sandbox goes.
            if let Ok(list) = shim.list().await {
                if pod.metadata.deletion_timestamp.is_some() {
                    self.post_status(pod, &list).await;
                }
            }
        }
        for (_, (_, tasks)) in self.probes.drain() {
            for t in tasks {
                t.abort();
            }
        }
        if let Some(p) = pod {
            self.release_sandbox(p).await;
        } else {
            self.release_sandbox_by_uid().await;
        }
    }

    async fn release_sandbox(&mut self, pod: &Pod) {
        self.release_sandbox_by_uid().await;
        let _ = pod;
    }

    async fn release_sandbox_by_uid(&mut self) {
        if self.shim.is_none() {
            self.shim = ShimClient::connect(&self.shim_dir()).await.ok();
        }
        if let Some(shim) = self.shim.take() {
            if let Err(e) = shim.shutdown().await {
                tracing::warn!(pod_uid = %self.uid, error = %e, "stopping the pod's shim");
            }
        }
        self.agent.set_host_ports(&self.uid, Vec::new()).await;
        if let Some(net) = self.agent.net.get() {
            if let Err(e) = net.detach(&self.uid).await {
                tracing::warn!(pod_uid = %self.uid, error = %e, "releasing the pod network");
            }
        }
        if let Err(e) = self.agent.volumes.teardown(&self.uid).await {
            tracing::warn!(pod_uid = %self.uid, error = %e, "tearing down volumes");
        }
        let _ = std::fs::remove_dir_all(self.pod_dir());
        let _ = std::fs::remove_dir_all(self.agent.cfg.containers_dir().join(&self.uid));
        self.volumes = None;
    }

    /// After graceful termination of a pod being deleted: the final delete (grace 0) that
    /// removes it from the API, as upstream's status manager does.
    async fn finish_deletion(&mut self, pod: &Pod) {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let body = json!({
            "apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
            "preconditions": {"uid": self.uid},
        });
        for _ in 0..5 {
            match self
                .agent
                .client
                .delete(&format!("/api/v1/namespaces/{ns}/pods/{name}"), &body)
                .await
            {
                Ok(_) => return,
                Err(e) if matches!(status_code(&e), Some(404) | Some(409)) => return,
                Err(e) => {
                    tracing::debug!(pod = %pod_key(pod), error = %e, "final delete");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        // Remove the pod's logs with it.
        let _ = std::fs::remove_dir_all(self.log_dir(pod));
    }
}

/// A status without condition timestamps (which only follow the other fields).
fn without_times(s: &Value) -> Value {
    let mut s = s.clone();
    if let Some(cs) = s["conditions"].as_array_mut() {
        for c in cs {
            if let Some(o) = c.as_object_mut() {
                o.remove("lastTransitionTime");
                o.remove("lastProbeTime");
            }
        }
    }
    s
}

async fn wait_exit(shim: &ShimClient, name: &str, id: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let done = match shim.list().await {
            Ok(l) => l
                .iter()
                .find(|c| c.name == name && c.id == id)
                .is_none_or(|c| c.state == ContainerState::Exited),
            Err(_) => true,
        };
        if done || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub type ExecFn = dyn Fn(Vec<String>, Duration) -> BoxFuture<'static, Result<(i32, Vec<u8>), String>>
    + Send
    + Sync;

/// Exec in a container through the shim, for probes and hooks.
pub fn exec_fn(shim: ShimClient, name: String) -> Arc<ExecFn> {
    Arc::new(move |argv: Vec<String>, timeout: Duration| {
        let shim = shim.clone();
        let name = name.clone();
        Box::pin(async move {
            match shim.exec(&name, &argv, timeout).await {
                Ok(r) if r.timed_out => Err(format!("command {argv:?} timed out")),
                Ok(r) => {
                    let mut out = r.stdout;
                    out.extend_from_slice(&r.stderr);
                    Ok((r.exit_code, out))
                }
                Err(e) => Err(e.to_string()),
            }
        }) as BoxFuture<'static, Result<(i32, Vec<u8>), String>>
    })
}

fn decode_b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// resourceFieldRef values (limits default to the node's allocatable, as upstream).
fn resource_value(
    pod: &Pod,
    c: &Container,
    r: &k8s_openapi::api::core::v1::ResourceFieldSelector,
    t: &super::Thresholds,
) -> Result<String, String> {
    let target = match &r.container_name {
        Some(n) if !n.is_empty() => spec_of(pod)
            .containers
            .iter()
            .find(|x| &x.name == n)
            .cloned()
            .ok_or_else(|| format!("container {n:?} not found"))?,
        _ => c.clone(),
    };
    let res = target.resources.clone().unwrap_or_default();
    let (which, name) = r
        .resource
        .split_once('.')
        .ok_or_else(|| format!("unsupported resource {:?}", r.resource))?;
    let map = if which == "limits" {
        res.limits
    } else {
        res.requests
    };
    let q = map.and_then(|m| m.get(name).map(|q| q.0.clone()));
    let divisor = r
        .divisor
        .as_ref()
        .map(|d| d.0.clone())
        .unwrap_or_else(|| "1".into());
    let dm = crate::controllers::quantity::parse_milli(&divisor)
        .filter(|d| *d > 0)
        .unwrap_or(1000);
    let value_m = match (name, q) {
        (_, Some(q)) => crate::controllers::quantity::parse_milli(&q).unwrap_or(0),
        ("cpu", None) => {
            let m = super::node::Machine::read(std::path::Path::new("/"));
            (m.cpus as i128 * 1000 - t.reserved_cpu_millis as i128)
                * if which == "limits" { 1 } else { 0 }
        }
        ("memory", None) => {
            let m = super::node::Machine::read(std::path::Path::new("/"));
            if which == "limits" {
                (m.memory_bytes.saturating_sub(t.reserved_memory) as i128) * 1000
            } else {
                0
            }
        }
        _ => 0,
    };
    // Round up, as upstream.
    Ok(((value_m + dm - 1) / dm)
        .max(if value_m > 0 { 1 } else { 0 })
        .to_string())
}
