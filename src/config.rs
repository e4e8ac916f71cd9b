//! `k3rs server` configuration: flags, `K3RS_*` environment variables and a YAML config file
//! with the same keys as the long flags. Precedence: flag > environment > config file > default.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};

/// Default config file, read when it exists and `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/k3rs/config.yaml";
pub const DEFAULT_KUBECONFIG: &str = "/etc/k3rs/k3rs.yaml";

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Config file with the same keys as the long flags.
    #[arg(long, short = 'c', env = "K3RS_CONFIG_FILE")]
    pub config: Option<PathBuf>,
    /// Directory holding all state.
    #[arg(
        long,
        short = 'd',
        env = "K3RS_DATA_DIR",
        default_value = "/var/lib/k3rs"
    )]
    pub data_dir: PathBuf,
    /// Address the API server listens on.
    #[arg(long, env = "K3RS_BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// HTTPS port of the API server (and supervisor).
    #[arg(long, env = "K3RS_HTTPS_LISTEN_PORT", default_value_t = 6443)]
    pub https_listen_port: u16,
    /// Address advertised to other nodes (default: the node's primary address).
    #[arg(long, env = "K3RS_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<IpAddr>,
    /// Extra hostname or IP in the serving certificate (repeatable).
    #[arg(long = "tls-san", env = "K3RS_TLS_SAN", value_delimiter = ',')]
    pub tls_san: Vec<String>,
    /// Where to write the admin kubeconfig.
    #[arg(long, short = 'o', env = "K3RS_KUBECONFIG_OUTPUT", default_value = DEFAULT_KUBECONFIG)]
    pub write_kubeconfig: PathBuf,
    /// File mode of the written kubeconfig (octal).
    #[arg(long, env = "K3RS_KUBECONFIG_MODE", default_value = "0600")]
    pub write_kubeconfig_mode: String,
    /// Pod network.
    #[arg(long, env = "K3RS_CLUSTER_CIDR", default_value = "10.42.0.0/16")]
    pub cluster_cidr: String,
    /// Service network.
    #[arg(long, env = "K3RS_SERVICE_CIDR", default_value = "10.43.0.0/16")]
    pub service_cidr: String,
    /// Cluster DNS service address.
    #[arg(long, env = "K3RS_CLUSTER_DNS", default_value = "10.43.0.10")]
    pub cluster_dns: IpAddr,
    /// Cluster DNS domain.
    #[arg(long, env = "K3RS_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// NodePort range.
    #[arg(
        long,
        env = "K3RS_SERVICE_NODE_PORT_RANGE",
        default_value = "30000-32767"
    )]
    pub service_node_port_range: String,
    /// Do not run the embedded agent.
    #[arg(long, env = "K3RS_DISABLE_AGENT")]
    pub disable_agent: bool,
    /// Reach the embedded agent's kubelet API over HTTPS on :10250, as other nodes' (default:
    /// in memory, no TLS: logs, exec and port-forward to this node cost less).
    #[arg(long, env = "K3RS_KUBELET_OVER_NETWORK")]
    pub kubelet_over_network: bool,
    /// How long events are kept (e.g. 1h, 30m, 90s).
    #[arg(long, env = "K3RS_EVENT_TTL", default_value = "1h")]
    pub event_ttl: String,
    /// How long a node may go without renewing its Lease (or posting status) before it is
    /// marked Unknown and tainted unreachable (e.g. 50s, 40s, 1m).
    #[arg(long, env = "K3RS_NODE_MONITOR_GRACE_PERIOD", default_value = "50s")]
    pub node_monitor_grace_period: String,
    /// Agent: the node's name (default: the hostname).
    #[arg(long, env = "K3RS_NODE_NAME")]
    pub node_name: Option<String>,
    /// Agent: the node's InternalIP (default: --advertise-address).
    #[arg(long, env = "K3RS_NODE_IP")]
    pub node_ip: Option<IpAddr>,
    /// Agent: a label to register the node with, key=value (repeatable).
    #[arg(long = "node-label", env = "K3RS_NODE_LABEL", value_delimiter = ',')]
    pub node_label: Vec<String>,
    /// Agent: a taint to register the node with, key=value:Effect (repeatable).
    #[arg(long = "node-taint", env = "K3RS_NODE_TAINT", value_delimiter = ',')]
    pub node_taint: Vec<String>,
    /// Agent: a kubelet setting, name=value: max-pods, system-reserved, kube-reserved,
    /// eviction-hard, image-gc-high-threshold, image-gc-low-threshold (repeatable).
    #[arg(long = "kubelet-arg", env = "K3RS_KUBELET_ARG")]
    pub kubelet_arg: Vec<String>,
    /// Agent: directory of static pod manifests (default: <data-dir>/agent/pod-manifests).
    #[arg(long, env = "K3RS_POD_MANIFESTS")]
    pub pod_manifests: Option<PathBuf>,
    /// Agent: runtime state (shim sockets, namespaces).
    #[arg(long, env = "K3RS_RUN_DIR", default_value = "/run/k3rs")]
    pub run_dir: PathBuf,
    /// Agent: where container logs are written.
    #[arg(long, env = "K3RS_POD_LOG_DIR", default_value = "/var/log/pods")]
    pub pod_log_dir: PathBuf,
    /// Agent: the cgroup under which pods run.
    #[arg(long, env = "K3RS_CGROUP_ROOT", default_value = "/k3rs")]
    pub cgroup_root: String,
    /// Agent: the pod network's bridge.
    #[arg(long, env = "K3RS_POD_BRIDGE", default_value = "k3rs0")]
    pub pod_bridge: String,
    /// Agent: registries configuration (mirrors, auth, TLS).
    #[arg(
        long,
        env = "K3RS_PRIVATE_REGISTRY",
        default_value = "/etc/k3rs/registries.yaml"
    )]
    pub private_registry: PathBuf,
}

/// The validated server configuration. The network settings are checked now and used by the
/// allocators and the agent (later issues).
#[derive(Debug, Clone)]
#[allow(dead_code)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub bind_address: IpAddr,
    pub https_listen_port: u16,
    pub advertise_address: IpAddr,
    pub tls_san: Vec<String>,
    pub write_kubeconfig: PathBuf,
    pub write_kubeconfig_mode: u32,
    pub cluster_cidr: Cidr,
    pub service_cidr: Cidr,
    pub cluster_dns: IpAddr,
    pub cluster_domain: String,
    pub service_node_port_range: (u16, u16),
    pub disable_agent: bool,
    pub kubelet_over_network: bool,
    pub event_ttl: std::time::Duration,
    pub node_monitor_grace_period: std::time::Duration,
    pub node_name: String,
    pub node_ip: IpAddr,
    pub node_labels: Vec<(String, String)>,
    pub node_taints: Vec<(String, String, String)>,
    pub kubelet_args: Vec<(String, String)>,
    pub pod_manifests: PathBuf,
    pub run_dir: PathBuf,
    pub pod_log_dir: PathBuf,
    pub cgroup_root: String,
    pub pod_bridge: String,
    pub private_registry: PathBuf,
}

/// Parses `1h`, `30m`, `90s`, `1h30m` (and a bare number of seconds).
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Some(std::time::Duration::from_secs(n));
    }
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        total += n * match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
    }
    if !num.is_empty() {
        return None;
    }
    Some(std::time::Duration::from_secs(total))
}

/// An IPv4 network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr> {
        let (a, p) = s
            .split_once('/')
            .with_context(|| format!("{s:?} is not a CIDR (expected e.g. 10.42.0.0/16)"))?;
        let addr: Ipv4Addr = a.parse().with_context(|| format!("{s:?}: bad address"))?;
        let prefix: u8 = p
            .parse()
            .with_context(|| format!("{s:?}: bad prefix length"))?;
        if prefix > 30 {
            bail!("{s:?}: prefix length must be at most 30");
        }
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        let net = u32::from(addr) & mask;
        if net != u32::from(addr) {
            bail!(
                "{s:?}: host bits are set (did you mean {}/{prefix}?)",
                Ipv4Addr::from(net)
            );
        }
        Ok(Cidr { addr, prefix })
    }

    /// The n-th address of the network (1 = first usable).
    pub fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr).wrapping_add(n))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr)
    }
}

fn yaml_scalar(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn from_config_file(args: &mut ServerArgs, matches: &ArgMatches, path: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: serde_yaml::Value = serde_yaml::from_str(&text)
        .with_context(|| format!("{}: not valid YAML", path.display()))?;
    let map = match doc {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => return Ok(()),
        _ => bail!(
            "{}: expected a mapping of flag names to values",
            path.display()
        ),
    };
    for (k, v) in map {
        let key = k
            .as_str()
            .with_context(|| format!("{}: keys must be strings", path.display()))?
            .to_string();
        let id = key.replace('-', "_");
        // Flags and environment variables win over the file.
        let known = matches.try_contains_id(&id).is_ok();
        let overridden = known
            && matches!(
                matches.value_source(&id),
                Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
            );
        if overridden {
            continue;
        }
        let bad = |what: &str| anyhow::anyhow!("{}: {key}: {what}", path.display());
        let s = || yaml_scalar(&v).ok_or_else(|| bad("expected a single value"));
        match id.as_str() {
            "data_dir" => args.data_dir = s()?.into(),
            "bind_address" => {
                args.bind_address = s()?.parse().map_err(|_| bad("not an IP address"))?
            }
            "https_listen_port" => {
                args.https_listen_port = s()?.parse().map_err(|_| bad("not a port"))?
            }
            "advertise_address" => {
                args.advertise_address = Some(s()?.parse().map_err(|_| bad("not an IP address"))?)
            }
            "tls_san" => {
                args.tls_san = match &v {
                    serde_yaml::Value::Sequence(items) => items
                        .iter()
                        .map(|i| yaml_scalar(i).ok_or_else(|| bad("expected strings")))
                        .collect::<Result<_>>()?,
                    _ => s()?.split(',').map(|x| x.trim().to_string()).collect(),
                }
            }
            "write_kubeconfig" => args.write_kubeconfig = s()?.into(),
            "write_kubeconfig_mode" => args.write_kubeconfig_mode = s()?,
            "cluster_cidr" => args.cluster_cidr = s()?,
            "service_cidr" => args.service_cidr = s()?,
            "cluster_dns" => {
                args.cluster_dns = s()?.parse().map_err(|_| bad("not an IP address"))?
            }
            "cluster_domain" => args.cluster_domain = s()?,
            "service_node_port_range" => args.service_node_port_range = s()?,
            "event_ttl" => args.event_ttl = s()?,
            "node_monitor_grace_period" => args.node_monitor_grace_period = s()?,
            "node_name" => args.node_name = Some(s()?),
            "node_ip" => args.node_ip = Some(s()?.parse().map_err(|_| bad("not an IP address"))?),
            "node_label" | "node_taint" | "kubelet_arg" => {
                let list: Vec<String> = match &v {
                    serde_yaml::Value::Sequence(items) => items
                        .iter()
                        .map(|i| yaml_scalar(i).ok_or_else(|| bad("expected strings")))
                        .collect::<Result<_>>()?,
                    _ => vec![s()?],
                };
                match id.as_str() {
                    "node_label" => args.node_label = list,
                    "node_taint" => args.node_taint = list,
                    _ => args.kubelet_arg = list,
                }
            }
            "pod_manifests" => args.pod_manifests = Some(s()?.into()),
            "run_dir" => args.run_dir = s()?.into(),
            "pod_log_dir" => args.pod_log_dir = s()?.into(),
            "cgroup_root" => args.cgroup_root = s()?,
            "pod_bridge" => args.pod_bridge = s()?,
            "private_registry" => args.private_registry = s()?.into(),
            "disable_agent" => {
                args.disable_agent = s()?.parse().map_err(|_| bad("expected true or false"))?
            }
            "kubelet_over_network" => {
                args.kubelet_over_network =
                    s()?.parse().map_err(|_| bad("expected true or false"))?
            }
            "config" => bail!(
                "{}: `config` cannot be set inside a config file",
                path.display()
            ),
            _ => bail!("{}: unknown key {key:?}", path.display()),
        }
    }
    Ok(())
}

impl ServerArgs {
    /// Parses `k3rs server` arguments (as clap matched them) and merges the config file.
    pub fn resolve(matches: &ArgMatches) -> Result<ServerConfig> {
        let mut args = ServerArgs::from_arg_matches(matches)?;
        let file = match &args.config {
            Some(p) => Some(p.clone()),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => Some(DEFAULT_CONFIG_FILE.into()),
            None => None,
        };
        if let Some(path) = file {
            from_config_file(&mut args, matches, &path)?;
        }
        args.validate()
    }

    fn validate(self) -> Result<ServerConfig> {
        let cluster_cidr = Cidr::parse(&self.cluster_cidr).context("--cluster-cidr")?;
        let service_cidr = Cidr::parse(&self.service_cidr).context("--service-cidr")?;
        if let IpAddr::V4(dns) = self.cluster_dns {
            if !service_cidr.contains(dns) {
                bail!(
                    "--cluster-dns {} is outside --service-cidr {service_cidr}",
                    self.cluster_dns
                );
            }
        }
        let (lo, hi) = self
            .service_node_port_range
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
            .filter(|(a, b)| a <= b)
            .with_context(|| {
                format!(
                    "--service-node-port-range {:?}: expected FROM-TO, e.g. 30000-32767",
                    self.service_node_port_range
                )
            })?;
        let mode = u32::from_str_radix(self.write_kubeconfig_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .with_context(|| {
                format!(
                    "--write-kubeconfig-mode {:?}: expected an octal file mode such as 0600 or 644",
                    self.write_kubeconfig_mode
                )
            })?;
        if self.cluster_domain.is_empty() || self.cluster_domain.starts_with('.') {
            bail!("--cluster-domain {:?} is not a domain", self.cluster_domain);
        }
        let event_ttl = parse_duration(&self.event_ttl)
            .filter(|d| d.as_secs() > 0)
            .with_context(|| {
                format!(
                    "--event-ttl {:?}: expected a duration such as 1h, 30m or 90s",
                    self.event_ttl
                )
            })?;
        let node_monitor_grace_period = parse_duration(&self.node_monitor_grace_period)
            .filter(|d| d.as_secs() > 0)
            .with_context(|| {
                format!(
                    "--node-monitor-grace-period {:?}: expected a duration such as 50s or 1m",
                    self.node_monitor_grace_period
                )
            })?;
        let advertise_address = self.advertise_address.unwrap_or_else(primary_address);
        let node_name = self.node_name.clone().unwrap_or_else(hostname);
        if node_name.is_empty()
            || node_name.len() > 253
            || !node_name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        {
            bail!("--node-name {node_name:?}: must be a lowercase DNS subdomain (letters, digits, '-', '.')");
        }
        let node_labels = self
            .node_label
            .iter()
            .filter(|l| !l.is_empty())
            .map(|l| {
                l.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .with_context(|| format!("--node-label {l:?}: expected key=value"))
            })
            .collect::<Result<Vec<_>>>()?;
        let node_taints = self
            .node_taint
            .iter()
            .filter(|t| !t.is_empty())
            .map(|t| parse_taint(t))
            .collect::<Result<Vec<_>>>()?;
        let kubelet_args = self
            .kubelet_arg
            .iter()
            .filter(|a| !a.is_empty())
            .map(|a| {
                a.trim_start_matches("--")
                    .split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .with_context(|| {
                        format!("--kubelet-arg {a:?}: expected name=value, e.g. max-pods=50")
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let pod_manifests = self
            .pod_manifests
            .clone()
            .unwrap_or_else(|| self.data_dir.join("agent").join("pod-manifests"));
        if !self.cgroup_root.starts_with('/') {
            bail!("--cgroup-root {:?}: must start with /", self.cgroup_root);
        }
        Ok(ServerConfig {
            data_dir: self.data_dir,
            bind_address: self.bind_address,
            https_listen_port: self.https_listen_port,
            advertise_address,
            tls_san: self.tls_san,
            write_kubeconfig: self.write_kubeconfig,
            write_kubeconfig_mode: mode,
            cluster_cidr,
            service_cidr,
            cluster_dns: self.cluster_dns,
            cluster_domain: self.cluster_domain,
            service_node_port_range: (lo, hi),
            disable_agent: self.disable_agent,
            kubelet_over_network: self.kubelet_over_network,
            event_ttl,
            node_monitor_grace_period,
            node_name,
            node_ip: self.node_ip.unwrap_or(advertise_address),
            node_labels,
            node_taints,
            kubelet_args,
            pod_manifests,
            run_dir: self.run_dir,
            pod_log_dir: self.pod_log_dir,
            cgroup_root: self.cgroup_root,
            pod_bridge: self.pod_bridge,
            private_registry: self.private_registry,
        })
    }
}

/// Parses a taint `key=value:Effect` or `key:Effect` into (key, value, effect).
pub fn parse_taint(t: &str) -> Result<(String, String, String)> {
    let (kv, effect) = t
        .rsplit_once(':')
        .with_context(|| format!("--node-taint {t:?}: expected key=value:Effect"))?;
    if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        bail!("--node-taint {t:?}: effect must be NoSchedule, PreferNoSchedule or NoExecute");
    }
    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
    if k.is_empty() {
        bail!("--node-taint {t:?}: empty key");
    }
    Ok((k.to_string(), v.to_string(), effect.to_string()))
}

/// The address the kernel would use to reach the outside world, without sending anything
/// (a connected UDP socket); 127.0.0.1 when there is no route.
pub fn primary_address() -> IpAddr {
    let probe = || -> Option<IpAddr> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        // connect() on UDP only selects a route and source address; no packet is sent.
        s.connect("192.0.2.1:9").ok()?;
        Some(s.local_addr().ok()?.ip())
    };
    probe().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).to_lowercase()
}

impl ServerConfig {
    /// Every name and address the serving certificate must cover.
    pub fn serving_sans(&self) -> BTreeSet<String> {
        let mut sans: BTreeSet<String> = [
            "localhost",
            "127.0.0.1",
            "::1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        sans.insert(format!("kubernetes.default.svc.{}", self.cluster_domain));
        sans.insert(self.service_cidr.nth(1).to_string());
        sans.insert(hostname());
        sans.insert(self.advertise_address.to_string());
        if !self.bind_address.is_unspecified() {
            sans.insert(self.bind_address.to_string());
        }
        sans.extend(self.tls_san.iter().filter(|s| !s.is_empty()).cloned());
        sans
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir.join("server").join("tls")
    }

    pub fn db_dir(&self) -> PathBuf {
        self.data_dir.join("server").join("db")
    }
}

#[cfg(test)]
fn server_command() -> clap::Command {
    ServerArgs::augment_args(clap::Command::new("server"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ServerConfig> {
        let m = server_command()
            .try_get_matches_from(std::iter::once("server").chain(args.iter().copied()))?;
        ServerArgs::resolve(&m)
    }

    #[test]
    fn defaults_follow_k3s() {
        let c = parse(&["--config", "/dev/null"]).unwrap();
        assert_eq!(c.https_listen_port, 6443);
        assert_eq!(c.cluster_cidr.to_string(), "10.42.0.0/16");
        assert_eq!(c.service_cidr.nth(1).to_string(), "10.43.0.1");
        assert_eq!(c.service_node_port_range, (30000, 32767));
        assert_eq!(c.write_kubeconfig_mode, 0o600);
        assert_eq!(
            c.node_monitor_grace_period,
            std::time::Duration::from_secs(50)
        );
        assert!(c
            .serving_sans()
            .contains("kubernetes.default.svc.cluster.local"));
        assert!(c.serving_sans().contains("10.43.0.1"));
    }

    #[test]
    fn config_file_sets_what_flags_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.yaml");
        std::fs::write(
            &f,
            "https-listen-port: 7443\ntls-san:\n  - a.example\n  - 192.0.2.7\ncluster-domain: corp.local\ndata-dir: /x\n",
        )
        .unwrap();
        let c = parse(&["--config", f.to_str().unwrap(), "--data-dir", "/flag"]).unwrap();
        assert_eq!(c.https_listen_port, 7443);
        assert_eq!(c.tls_san, vec!["a.example", "192.0.2.7"]);
        assert_eq!(c.cluster_domain, "corp.local");
        assert_eq!(c.data_dir, PathBuf::from("/flag"), "the flag wins");
    }

    #[test]
    fn bad_values_are_refused_with_the_fix() {
        let e = parse(&["--config", "/dev/null", "--cluster-cidr", "10.42.0.1/16"]).unwrap_err();
        assert!(
            format!("{e:#}").contains("did you mean 10.42.0.0/16"),
            "{e:#}"
        );
        let e = parse(&["--config", "/dev/null", "--service-node-port-range", "5-1"]).unwrap_err();
        assert!(format!("{e:#}").contains("expected FROM-TO"), "{e:#}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "no-such-flag: 1\n").unwrap();
        let e = parse(&["--config", f.to_str().unwrap()]).unwrap_err();
        assert!(
            format!("{e:#}").contains("unknown key \"no-such-flag\""),
            "{e:#}"
        );
    }
}
