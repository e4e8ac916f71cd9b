//! Node networking from plain inputs: the pod bridge, a veth pair per pod, host-local IPAM and
//! iptables rules applied in one `iptables-restore` batch. Knows nothing of the API objects.
//!
//! Every operation happens in the node's network namespace: the caller's, or `host_netns`
//! when given (tests run a whole node inside a namespace of their own).

mod ipam;
mod iptables;
mod link;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

pub use ipam::Ipam;
pub use iptables::{rules, HostPortMapping, Protocol};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("no free address left in {0}")]
    Exhausted(String),
    #[error("iptables-restore failed: {0}")]
    Iptables(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone)]
pub struct PodNetworkConfig {
    pub bridge: String,
    pub pod_cidr: ipnet::Ipv4Net,
    pub cluster_cidr: ipnet::Ipv4Net,
    pub mtu: u32,
    pub ipam_dir: PathBuf,
    /// Work in this network namespace instead of the caller's.
    pub host_netns: Option<PathBuf>,
}

pub struct PodNetwork {
    cfg: PodNetworkConfig,
    ipam: Ipam,
    host_ports: parking_lot::Mutex<Vec<HostPortMapping>>,
    /// The rules last applied; held across an apply so batches never interleave.
    last_rules: tokio::sync::Mutex<String>,
}

impl std::fmt::Debug for PodNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PodNetwork({} {})", self.cfg.bridge, self.cfg.pod_cidr)
    }
}

/// The host-side interface name of a pod's veth pair.
pub fn host_veth(pod_id: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, pod_id.as_bytes());
    let h: String = d.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("veth{h}")
}

impl PodNetwork {
    /// Ensures the bridge (gateway address, up), ip_forward and the iptables rules.
    pub async fn new(cfg: PodNetworkConfig) -> Result<PodNetwork, NetError> {
        if cfg.pod_cidr.prefix_len() > 30 {
            return Err(NetError::Invalid(format!(
                "pod CIDR {} is too small",
                cfg.pod_cidr
            )));
        }
        let ipam = Ipam::open(&cfg.ipam_dir, cfg.pod_cidr)?;
        let gw = ipam.gateway();
        link::ensure_bridge(
            cfg.host_netns.as_deref(),
            &cfg.bridge,
            gw,
            cfg.pod_cidr.prefix_len(),
            cfg.mtu,
        )
        .await?;
        link::sysctl(cfg.host_netns.as_deref(), "net/ipv4/ip_forward", "1")?;
        let n = PodNetwork {
            cfg,
            ipam,
            host_ports: parking_lot::Mutex::new(Vec::new()),
            last_rules: tokio::sync::Mutex::new(String::new()),
        };
        n.sync_rules().await?;
        Ok(n)
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.ipam.gateway()
    }

    async fn sync_rules(&self) -> Result<(), NetError> {
        let mut last = self.last_rules.lock().await;
        let text = rules(self.cfg.cluster_cidr, &self.host_ports.lock().clone());
        if *last == text {
            return Ok(());
        }
        iptables::apply(self.cfg.host_netns.as_deref(), &text).await?;
        *last = text;
        Ok(())
    }

    /// Gives the pod an address on the bridge through a veth pair (idempotent per pod id).
    pub async fn attach(&self, pod_id: &str, netns: &Path) -> Result<Ipv4Addr, NetError> {
        let ip = self.ipam.allocate(pod_id)?;
        let r = link::attach(
            self.cfg.host_netns.as_deref(),
            &self.cfg.bridge,
            &host_veth(pod_id),
            netns,
            ip,
            self.cfg.pod_cidr.prefix_len(),
            self.gateway(),
            self.cfg.mtu,
        )
        .await;
        if let Err(e) = r {
            let _ = link::delete_link(self.cfg.host_netns.as_deref(), &host_veth(pod_id)).await;
            let _ = self.ipam.release(pod_id);
            return Err(e);
        }
        Ok(ip)
    }

    /// Deletes the pod's veth (if any) and releases its address. Idempotent.
    pub async fn detach(&self, pod_id: &str) -> Result<(), NetError> {
        link::delete_link(self.cfg.host_netns.as_deref(), &host_veth(pod_id)).await?;
        self.ipam.release(pod_id)
    }

    /// Releases addresses held by pod ids not in `live`; returns how many.
    pub async fn release_stale(&self, live: &HashSet<String>) -> Result<usize, NetError> {
        let mut n = 0;
        for (_, id) in self.ipam.allocations() {
            if !live.contains(&id) {
                self.detach(&id).await?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Replaces the hostPort table.
    pub async fn set_host_ports(&self, ports: &[HostPortMapping]) -> Result<(), NetError> {
        *self.host_ports.lock() = ports.to_vec();
        self.sync_rules().await
    }

    /// The addresses handed out, with the pod id holding each.
    pub fn allocations(&self) -> Vec<(Ipv4Addr, String)> {
        self.ipam.allocations()
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<PodNetwork>();
}
