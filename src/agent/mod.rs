//! The node agent: kubelet (node registration and status, per-pod workers, probes, volumes),
//! driving the runtime crate (images, per-pod shims) and the net crate (pod network). The agent
//! talks to the API server only over HTTPS with its node client certificate, exactly as a
//! remote agent does, even when it runs inside `k3rs server`.

pub mod container;
pub mod events;
pub mod kubelet;
pub mod kubelet_api;
pub mod node;
pub mod probes;
pub mod static_pods;
pub mod status;
pub mod volumes;
pub mod worker;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use parking_lot::Mutex;

use k3rs_runtime::images::{ImageStore, Registries};

use crate::config::{Cidr, ServerConfig};
use crate::rest::{RestClient, Target};

/// A byte amount or a share of a total (eviction thresholds: `100Mi`, `10%`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quantity {
    Bytes(u64),
    Percent(f64),
}

impl Quantity {
    pub fn resolve(&self, total: u64) -> u64 {
        match self {
            Quantity::Bytes(b) => *b,
            Quantity::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }

    fn parse(s: &str) -> Option<Quantity> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            return p.parse::<f64>().ok().map(Quantity::Percent);
        }
        crate::controllers::quantity::parse_bytes(s).map(Quantity::Bytes)
    }
}

/// Kubelet resource settings (`--kubelet-arg`).
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    pub max_pods: u64,
    pub reserved_cpu_millis: u64,
    pub reserved_memory: u64,
    pub reserved_ephemeral: u64,
    pub memory_available: Quantity,
    pub nodefs_available: Quantity,
    pub image_gc_high: u8,
    pub image_gc_low: u8,
    /// Container log rotation (`container-log-max-size`, `container-log-max-files`).
    pub container_log_max_size: u64,
    pub container_log_max_files: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_pods: 110,
            reserved_cpu_millis: 0,
            reserved_memory: 0,
            reserved_ephemeral: 0,
            memory_available: Quantity::Bytes(100 << 20),
            nodefs_available: Quantity::Percent(10.0),
            image_gc_high: 85,
            image_gc_low: 80,
            container_log_max_size: 0,
            container_log_max_files: 0,
        }
    }
}

impl Thresholds {
    pub fn from_args(args: &[(String, String)]) -> Result<Thresholds> {
        let mut t = Thresholds::default();
        for (k, v) in args {
            let bad = || anyhow::anyhow!("--kubelet-arg {k}={v}: invalid value");
            match k.as_str() {
                "max-pods" => t.max_pods = v.parse().map_err(|_| bad())?,
                "system-reserved" | "kube-reserved" => {
                    for part in v.split(',').filter(|p| !p.is_empty()) {
                        let (r, q) = part.split_once('=').ok_or_else(bad)?;
                        match r {
                            "cpu" => {
                                t.reserved_cpu_millis += crate::controllers::quantity::parse_millis(q)
                                    .ok_or_else(bad)? as u64
                            }
                            "memory" => {
                                t.reserved_memory += crate::controllers::quantity::parse_bytes(q)
                                    .ok_or_else(bad)?
                            }
                            "ephemeral-storage" => {
                                t.reserved_ephemeral += crate::controllers::quantity::parse_bytes(q)
                                    .ok_or_else(bad)?
                            }
                            "pid" => {}
                            _ => bail!("--kubelet-arg {k}: unknown resource {r:?} (cpu, memory, ephemeral-storage, pid)"),
                        }
                    }
                }
                "eviction-hard" => {
                    for part in v.split(',').filter(|p| !p.is_empty()) {
                        let (signal, q) = part.split_once('<').ok_or_else(bad)?;
                        let q = Quantity::parse(q).ok_or_else(bad)?;
                        match signal {
                            "memory.available" => t.memory_available = q,
                            "nodefs.available" => t.nodefs_available = q,
                            "imagefs.available" | "nodefs.inodesFree" | "imagefs.inodesFree"
                            | "pid.available" => {}
                            _ => bail!("--kubelet-arg eviction-hard: unknown signal {signal:?}"),
                        }
                    }
                }
                "image-gc-high-threshold" => t.image_gc_high = v.parse().map_err(|_| bad())?,
                "image-gc-low-threshold" => t.image_gc_low = v.parse().map_err(|_| bad())?,
                "container-log-max-size" => {
                    t.container_log_max_size = crate::controllers::quantity::parse_bytes(v)
                        .filter(|b| *b > 0)
                        .ok_or_else(bad)?
                }
                "container-log-max-files" => {
                    t.container_log_max_files = v.parse().ok().filter(|n| *n >= 2).ok_or_else(
                        || anyhow::anyhow!("--kubelet-arg {k}={v}: must be a number of at least 2"),
                    )?
                }
                _ => bail!(
                    "--kubelet-arg {k}: not supported (max-pods, system-reserved, kube-reserved, eviction-hard, image-gc-high-threshold, image-gc-low-threshold, container-log-max-size, container-log-max-files)"
                ),
            }
        }
        Ok(t)
    }
}

/// Everything the agent needs, from flags.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub node_ip: IpAddr,
    pub node_labels: Vec<(String, String)>,
    pub node_taints: Vec<(String, String, String)>,
    pub control_plane: bool,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub pod_log_dir: PathBuf,
    pub pod_manifests: PathBuf,
    /// The API server of this process reaches the kubelet API over the network, not in memory.
    pub kubelet_over_network: bool,
    pub cgroup_root: String,
    pub pod_bridge: String,
    pub private_registry: PathBuf,
    pub cluster_cidr: Cidr,
    pub service_cidr: Cidr,
    pub cluster_dns: IpAddr,
    pub cluster_domain: String,
    pub thresholds: Thresholds,
    pub kubeconfig: PathBuf,
    /// The binary re-executed as `k3rs shim`.
    pub exe: PathBuf,
}

impl AgentConfig {
    pub fn from_server(cfg: &ServerConfig, kubeconfig: PathBuf) -> Result<AgentConfig> {
        Ok(AgentConfig {
            node_name: cfg.node_name.clone(),
            node_ip: cfg.node_ip,
            node_labels: cfg.node_labels.clone(),
            node_taints: cfg.node_taints.clone(),
            control_plane: true,
            data_dir: cfg.data_dir.clone(),
            run_dir: cfg.run_dir.clone(),
            pod_log_dir: cfg.pod_log_dir.clone(),
            pod_manifests: cfg.pod_manifests.clone(),
            kubelet_over_network: cfg.kubelet_over_network,
            cgroup_root: cfg.cgroup_root.clone(),
            pod_bridge: cfg.pod_bridge.clone(),
            private_registry: cfg.private_registry.clone(),
            cluster_cidr: cfg.cluster_cidr,
            service_cidr: cfg.service_cidr,
            cluster_dns: cfg.cluster_dns,
            cluster_domain: cfg.cluster_domain.clone(),
            thresholds: Thresholds::from_args(&cfg.kubelet_args)?,
            kubeconfig,
            exe: std::env::current_exe().context("finding the k3rs binary")?,
        })
    }

    pub fn agent_dir(&self) -> PathBuf {
        self.data_dir.join("agent")
    }
    pub fn images_dir(&self) -> PathBuf {
        self.agent_dir().join("images")
    }
    pub fn content_dir(&self) -> PathBuf {
        self.agent_dir().join("content")
    }
    /// A pod's log directory (`<pod-log-dir>/<namespace>_<name>_<uid>`, as upstream's).
    pub fn pod_logs(&self, namespace: &str, name: &str, uid: &str) -> PathBuf {
        self.pod_log_dir.join(format!("{namespace}_{name}_{uid}"))
    }
    pub fn pods_dir(&self) -> PathBuf {
        self.agent_dir().join("pods")
    }
    pub fn containers_dir(&self) -> PathBuf {
        self.agent_dir().join("containers")
    }
    pub fn shims_dir(&self) -> PathBuf {
        self.run_dir.join("pods")
    }
}

pub fn now_rfc3339() -> String {
    crate::api::objects::now_rfc3339()
}

pub fn micro_now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
        .to_string()
}

/// The running agent, shared by its tasks.
pub struct Agent {
    pub cfg: AgentConfig,
    pub client: RestClient,
    pub images: ImageStore,
    pub registries: Registries,
    pub net: tokio::sync::OnceCell<k3rs_net::PodNetwork>,
    pub volumes: volumes::VolumeManager,
    pub events: events::Recorder,
    pub pressure: Mutex<node::Pressure>,
    pub condition_since: Mutex<BTreeMap<String, (bool, String)>>,
    pub last_status: Mutex<String>,
    /// Image names imported from the air-gap directory: used without asking a registry.
    pub airgap_images: Mutex<HashSet<String>>,
    pub workers: Mutex<HashMap<String, kubelet::WorkerHandle>>,
    pub pod_ip: Mutex<HashMap<String, Ipv4Addr>>,
    /// hostPort mappings by pod uid (the node's whole table is applied at once).
    pub host_ports: Mutex<HashMap<String, Vec<k3rs_net::HostPortMapping>>>,
    pub pulls: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Issues the node's client certificate (CN `system:node:<name>`, O `system:nodes`) and writes
/// the agent's kubeconfig; returns its path.
pub fn write_node_kubeconfig(
    cfg: &ServerConfig,
    pki: &crate::pki::Pki,
    server_url: &str,
) -> Result<PathBuf> {
    let dir = cfg.data_dir.join("agent");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("kubelet.kubeconfig");
    let cert = crate::pki::issue(
        &pki.ca,
        &format!("system:node:{}", cfg.node_name),
        &["system:nodes"],
        &Default::default(),
        false,
        true,
    )?;
    crate::kubeconfig::write(
        &path,
        &crate::kubeconfig::render(server_url, &pki.ca.cert_pem, &cert),
        0o600,
    )?;
    // The kubelet API's serving certificate (node name and addresses) and the CA its clients'
    // certificates must chain to.
    let mut sans: std::collections::BTreeSet<String> = [
        cfg.node_name.clone(),
        cfg.node_ip.to_string(),
        "localhost".into(),
        "127.0.0.1".into(),
    ]
    .into_iter()
    .collect();
    sans.retain(|s| !s.is_empty());
    let serving = crate::pki::issue(
        &pki.ca,
        &format!("system:node:{}", cfg.node_name),
        &["system:nodes"],
        &sans,
        true,
        false,
    )?;
    crate::kubeconfig::write(&dir.join("serving-kubelet.crt"), &serving.cert_pem, 0o644)?;
    crate::kubeconfig::write(&dir.join("serving-kubelet.key"), &serving.key_pem, 0o600)?;
    crate::kubeconfig::write(&dir.join("client-ca.crt"), &pki.ca.cert_pem, 0o644)?;
    Ok(path)
}

/// Starts the agent; returns once the node is registered and the pod network is up. The
/// agent's tasks keep running in the background.
pub async fn start(cfg: AgentConfig) -> Result<Arc<Agent>> {
    for d in [
        cfg.agent_dir(),
        cfg.images_dir(),
        cfg.pods_dir(),
        cfg.containers_dir(),
        cfg.shims_dir(),
        cfg.pod_log_dir.clone(),
    ] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let target = Target::from_kubeconfig(&cfg.kubeconfig)?;
    let images = ImageStore::open(&cfg.content_dir())
        .with_context(|| format!("opening the image store in {}", cfg.content_dir().display()))?;
    let registries = Registries::load(&cfg.private_registry)
        .with_context(|| format!("reading {}", cfg.private_registry.display()))?;
    let client = RestClient::new(target.clone());
    let volumes = volumes::VolumeManager::new(
        RestClient::new(target.clone()),
        cfg.pods_dir(),
        cfg.data_dir.join("storage"),
        cfg.node_name.clone(),
    );
    let agent = Arc::new(Agent {
        events: events::Recorder::new(RestClient::new(target), &cfg.node_name),
        cfg,
        client,
        images,
        registries,
        net: tokio::sync::OnceCell::new(),
        volumes,
        pressure: Mutex::new(Default::default()),
        condition_since: Mutex::new(BTreeMap::new()),
        last_status: Mutex::new(String::new()),
        airgap_images: Mutex::new(HashSet::new()),
        workers: Mutex::new(HashMap::new()),
        pod_ip: Mutex::new(HashMap::new()),
        host_ports: Mutex::new(HashMap::new()),
        pulls: tokio::sync::Mutex::new(HashMap::new()),
    });
    agent.import_airgap_images().await;
    // The API server may still be starting: retry registration for a while.
    let mut tries = 0;
    loop {
        match agent.register().await {
            Ok(()) => break,
            Err(e) if tries < 100 => {
                tries += 1;
                tracing::debug!(error = %format!("{e:#}"), "registering the node; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
    agent.renew_lease().await.ok();
    agent.setup_network().await?;
    tokio::spawn(agent.clone().node_loop());
    tokio::spawn(agent.clone().airgap_loop());
    std::fs::create_dir_all(&agent.cfg.pod_manifests).ok();
    tokio::spawn(agent.clone().static_pod_loop());
    kubelet_api::spawn(agent.clone()).await?;
    kubelet::spawn(agent.clone()).await;
    Ok(agent)
}

impl Agent {
    /// Waits for the node's podCIDR (node IPAM) and brings up the pod network.
    async fn setup_network(self: &Arc<Self>) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let cidr = loop {
            let node = self
                .client
                .get(&format!("/api/v1/nodes/{}", self.cfg.node_name))
                .await
                .context("reading the node")?;
            if let Some(c) = node["spec"]["podCIDR"].as_str() {
                break c.to_string();
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the node got no spec.podCIDR within 60 s (is node IPAM running?)");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let pod_cidr: ipnet::Ipv4Net = cidr
            .parse()
            .with_context(|| format!("node podCIDR {cidr:?}"))?;
        let cluster: ipnet::Ipv4Net = self
            .cfg
            .cluster_cidr
            .to_string()
            .parse()
            .context("cluster CIDR")?;
        let net = k3rs_net::PodNetwork::new(k3rs_net::PodNetworkConfig {
            bridge: self.cfg.pod_bridge.clone(),
            pod_cidr,
            cluster_cidr: cluster,
            mtu: 1500,
            ipam_dir: self.cfg.agent_dir().join("ipam"),
            host_netns: None,
        })
        .await
        .context("setting up the pod network")?;
        let _ = self.net.set(net);
        tracing::info!(pod_cidr = %cidr, bridge = %self.cfg.pod_bridge, "pod network ready");
        Ok(())
    }

    /// Sets (or clears, with an empty list) a pod's hostPort mappings and applies the table.
    pub async fn set_host_ports(&self, uid: &str, ports: Vec<k3rs_net::HostPortMapping>) {
        let all: Vec<k3rs_net::HostPortMapping> = {
            let mut g = self.host_ports.lock();
            if ports.is_empty() {
                if g.remove(uid).is_none() {
                    return;
                }
            } else {
                g.insert(uid.to_string(), ports);
            }
            g.values().flatten().cloned().collect()
        };
        if let Some(net) = self.net.get() {
            if let Err(e) = net.set_host_ports(&all).await {
                tracing::warn!(error = %e, "applying hostPort rules");
            }
        }
    }

    pub async fn import_airgap_images(&self) {
        let store = self.images.clone();
        let dir = self.cfg.images_dir();
        let results = tokio::task::spawn_blocking(move || store.import_dir(&dir))
            .await
            .unwrap_or_default();
        let mut new = false;
        for r in results {
            match r {
                Ok(imgs) => {
                    let mut g = self.airgap_images.lock();
                    for i in imgs {
                        tracing::info!(image = ?i.names, "imported image");
                        g.extend(i.names.iter().cloned());
                        new = true;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "importing an image archive"),
            }
        }
        if new {
            *self.last_status.lock() = String::new();
        }
    }

    async fn airgap_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            self.import_airgap_images().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_args_parse_reservations_and_thresholds() {
        let args: Vec<(String, String)> = [
            ("max-pods", "50"),
            ("system-reserved", "cpu=100m,memory=100Mi"),
            ("kube-reserved", "cpu=150m,memory=156Mi"),
            (
                "eviction-hard",
                "memory.available<200Mi,nodefs.available<5%",
            ),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let t = Thresholds::from_args(&args).unwrap();
        assert_eq!(t.max_pods, 50);
        assert_eq!(t.reserved_cpu_millis, 250);
        assert_eq!(t.reserved_memory, 256 << 20);
        assert_eq!(t.memory_available, Quantity::Bytes(200 << 20));
        assert_eq!(t.nodefs_available, Quantity::Percent(5.0));
        let bad = Thresholds::from_args(&[("bogus".into(), "1".into())]).unwrap_err();
        assert!(bad.to_string().contains("not supported"), "{bad}");
        let bad = Thresholds::from_args(&[("max-pods".into(), "x".into())]).unwrap_err();
        assert!(bad.to_string().contains("invalid value"), "{bad}");
        let logs = Thresholds::from_args(&[
            ("container-log-max-size".into(), "50Mi".into()),
            ("container-log-max-files".into(), "3".into()),
        ])
        .unwrap();
        assert_eq!(
            (logs.container_log_max_size, logs.container_log_max_files),
            (50 << 20, 3)
        );
        let bad =
            Thresholds::from_args(&[("container-log-max-files".into(), "1".into())]).unwrap_err();
        assert!(bad.to_string().contains("at least 2"), "{bad}");
    }
}
