//! From a Pod's container to the runtime's plain `ContainerConfig`: argv from the image and the
//! spec, environment (values, `$(VAR)` expansion, configMap/secret/field/resource references,
//! envFrom), mounts (volumes, /etc/hosts, resolv.conf, hostname, termination log), security
//! context and cgroup resources; plus the pod-level sandbox settings and QoS class.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use k3rs_runtime::images::ImageConfig;
use k3rs_runtime::shim::{ContainerConfig, Mount, SandboxConfig};
use k8s_openapi::api::core::v1::{Container, Pod, ResourceRequirements};

use crate::controllers::quantity::{parse_bytes, parse_millis};

/// The QoS class of a pod, as upstream computes it.
pub fn qos_class(pod: &Pod) -> &'static str {
    let spec = match &pod.spec {
        Some(s) => s,
        None => return "BestEffort",
    };
    let all: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in &all {
        let r = c.resources.clone().unwrap_or_default();
        let req = r.requests.unwrap_or_default();
        let lim = r.limits.unwrap_or_default();
        for res in ["cpu", "memory"] {
            let q = req.get(res).or(lim.get(res));
            if q.is_some() {
                any = true;
            }
            match (lim.get(res), req.get(res)) {
                (Some(l), Some(r)) if l.0 != r.0 => guaranteed = false,
                (Some(_), _) => {}
                (None, _) => guaranteed = false,
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// The pod's cgroup under the agent's cgroup root, by QoS class (as upstream's layout).
pub fn pod_cgroup(root: &str, pod: &Pod) -> String {
    let uid = pod
        .metadata
        .uid
        .clone()
        .unwrap_or_default()
        .replace('-', "_");
    let root = root.trim_end_matches('/');
    match qos_class(pod) {
        "Guaranteed" => format!("{root}/kubepods/pod{uid}"),
        "Burstable" => format!("{root}/kubepods/burstable/pod{uid}"),
        _ => format!("{root}/kubepods/besteffort/pod{uid}"),
    }
}

fn millis(r: &Option<ResourceRequirements>, which: &str, res: &str) -> Option<i128> {
    let r = r.as_ref()?;
    let m = if which == "limits" {
        &r.limits
    } else {
        &r.requests
    };
    m.as_ref()?.get(res).and_then(|q| parse_millis(&q.0))
}

fn bytes(r: &Option<ResourceRequirements>, which: &str, res: &str) -> Option<u64> {
    let r = r.as_ref()?;
    let m = if which == "limits" {
        &r.limits
    } else {
        &r.requests
    };
    m.as_ref()?.get(res).and_then(|q| parse_bytes(&q.0))
}

pub const CPU_PERIOD: u64 = 100_000;

/// cpu shares from the request (limit when no request), at least 2; quota from the limit.
pub fn cpu_shares_quota(r: &Option<ResourceRequirements>) -> (u64, Option<i64>) {
    let req = millis(r, "requests", "cpu").or_else(|| millis(r, "limits", "cpu"));
    let shares = match req {
        Some(m) => ((m as u64) * 1024 / 1000).max(2),
        None => 2,
    };
    let quota =
        millis(r, "limits", "cpu").map(|m| ((m as u64 * CPU_PERIOD) / 1000).max(1000) as i64);
    (shares, quota)
}

pub fn sandbox_config(pod: &Pod, cgroup_root: &str, state_dir: PathBuf) -> SandboxConfig {
    let spec = pod.spec.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let hostname = spec.hostname.clone().unwrap_or(name);
    let hostname: String = hostname.chars().take(63).collect();
    // Pod-level limits only when every container has one (as upstream).
    let all_cpu: Option<Vec<i128>> = spec
        .containers
        .iter()
        .map(|c| millis(&c.resources, "limits", "cpu"))
        .collect();
    let all_mem: Option<Vec<u64>> = spec
        .containers
        .iter()
        .map(|c| bytes(&c.resources, "limits", "memory"))
        .collect();
    let req_cpu: i128 = spec
        .containers
        .iter()
        .filter_map(|c| {
            millis(&c.resources, "requests", "cpu")
                .or_else(|| millis(&c.resources, "limits", "cpu"))
        })
        .sum();
    SandboxConfig {
        pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
        hostname,
        host_network: spec.host_network.unwrap_or(false),
        host_ipc: spec.host_ipc.unwrap_or(false),
        host_pid: spec.host_pid.unwrap_or(false),
        share_pid: spec.share_process_namespace.unwrap_or(false),
        cgroup_parent: pod_cgroup(cgroup_root, pod),
        state_dir,
        cpu_shares: Some(((req_cpu as u64) * 1024 / 1000).max(2)),
        cpu_quota: all_cpu
            .map(|v| ((v.iter().sum::<i128>() as u64 * CPU_PERIOD) / 1000).max(1000) as i64),
        memory_limit: all_mem.map(|v| v.iter().sum::<u64>() as i64),
    }
}

/// `$(VAR)` expansion as upstream: known names are replaced, `$$` escapes, unknown references
/// stay as written.
pub fn expand(s: &str, vars: &HashMap<String, String>) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'(' {
                if let Some(end) = s[i + 2..].find(')') {
                    let name = &s[i + 2..i + 2 + end];
                    if let Some(v) = vars.get(name) {
                        out.push_str(v);
                        i += end + 3;
                        continue;
                    }
                }
            }
        }
        let ch = s[i..].chars().next().unwrap_or('\0');
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    out
}

/// argv from the image config and the container's command/args, as upstream combines them.
pub fn argv(c: &Container, img: &ImageConfig, vars: &HashMap<String, String>) -> Vec<String> {
    let cmd = c.command.clone().unwrap_or_default();
    let args = c.args.clone().unwrap_or_default();
    let (mut a, b) = if !cmd.is_empty() {
        (cmd, args)
    } else if !args.is_empty() {
        (img.entrypoint.clone(), args)
    } else {
        (img.entrypoint.clone(), img.cmd.clone())
    };
    a.extend(b);
    a.into_iter().map(|x| expand(&x, vars)).collect()
}

/// Resolved pieces the pod worker fetched for a container.
#[derive(Debug, Default, Clone)]
pub struct PodFiles {
    pub hosts: Option<PathBuf>,
    pub resolv: Option<PathBuf>,
    pub hostname: Option<PathBuf>,
}

fn cap_name(c: &str) -> String {
    let up = c.to_ascii_uppercase();
    if up == "ALL" || up.starts_with("CAP_") {
        up
    } else {
        format!("CAP_{up}")
    }
}

/// Builds the runtime's description of one container. `env` is the resolved environment in
/// order (see `kubelet`'s env resolution); `volumes` maps volume names to host paths.
#[allow(clippy::too_many_arguments)]
pub fn container_config(
    pod: &Pod,
    c: &Container,
    attempt: u32,
    img: &ImageConfig,
    layers: Vec<PathBuf>,
    env: Vec<(String, String)>,
    volumes: &BTreeMap<String, PathBuf>,
    files: &PodFiles,
    termination_log: &Path,
    log_path: PathBuf,
) -> Result<ContainerConfig, String> {
    let spec = pod.spec.clone().unwrap_or_default();
    let vars: HashMap<String, String> = env.iter().cloned().collect();
    // Image env first, then the container's (later wins).
    let mut merged: Vec<(String, String)> = img
        .env
        .iter()
        .filter_map(|e| {
            e.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    for (k, v) in env {
        if let Some(e) = merged.iter_mut().find(|(mk, _)| *mk == k) {
            e.1 = v;
        } else {
            merged.push((k, v));
        }
    }
    if !merged.iter().any(|(k, _)| k == "HOSTNAME") {
        merged.push((
            "HOSTNAME".into(),
            spec.hostname
                .clone()
                .unwrap_or_else(|| pod.metadata.name.clone().unwrap_or_default()),
        ));
    }
    let mut mounts = Vec::new();
    for vm in c.volume_mounts.iter().flatten() {
        let base = volumes.get(&vm.name).ok_or_else(|| {
            format!(
                "volume {:?} of volumeMount {:?} is not prepared",
                vm.name, vm.mount_path
            )
        })?;
        let mut source = base.clone();
        let sub = vm
            .sub_path
            .clone()
            .or_else(|| vm.sub_path_expr.clone().map(|e| expand(&e, &vars)))
            .unwrap_or_default();
        if !sub.is_empty() {
            source =
                super::volumes::VolumeManager::sub_path(base, &sub).map_err(|e| e.to_string())?;
        }
        mounts.push(Mount {
            source,
            destination: vm.mount_path.clone(),
            read_only: vm.read_only.unwrap_or(false),
        });
    }
    fn has(mounts: &[Mount], dst: &str) -> bool {
        mounts.iter().any(|m| m.destination == dst)
    }
    let tpath = c
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    let extra = [
        (files.hosts.clone(), "/etc/hosts".to_string()),
        (files.resolv.clone(), "/etc/resolv.conf".to_string()),
        (files.hostname.clone(), "/etc/hostname".to_string()),
        (Some(termination_log.to_path_buf()), tpath),
    ];
    for (src, dst) in extra {
        if let Some(src) = src {
            if !dst.is_empty() && !has(&mounts, &dst) {
                mounts.push(Mount {
                    source: src,
                    destination: dst,
                    read_only: false,
                });
            }
        }
    }
    let psc = spec.security_context.clone().unwrap_or_default();
    let sc = c.security_context.clone().unwrap_or_default();
    let uid = sc.run_as_user.or(psc.run_as_user).map(|u| u as u32);
    let gid = sc.run_as_group.or(psc.run_as_group).map(|g| g as u32);
    let mut supplemental: Vec<u32> = psc
        .supplemental_groups
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|g| g as u32)
        .collect();
    if let Some(fs) = psc.fs_group {
        supplemental.push(fs as u32);
    }
    let privileged = sc.privileged.unwrap_or(false);
    let caps = sc.capabilities.clone().unwrap_or_default();
    let seccomp = sc
        .seccomp_profile
        .clone()
        .or(psc.seccomp_profile.clone())
        .map(|p| p.type_)
        .unwrap_or_else(|| "RuntimeDefault".into());
    let (cpu_shares, cpu_quota) = cpu_shares_quota(&c.resources);
    let memory_limit = bytes(&c.resources, "limits", "memory").map(|b| b as i64);
    let args = argv(c, img, &vars);
    if args.is_empty() {
        return Err("no command specified".into());
    }
    let cwd = c
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| {
            if img.working_dir.is_empty() {
                "/".into()
            } else {
                img.working_dir.clone()
            }
        });
    let mut annotations = BTreeMap::new();
    annotations.insert("io.kubernetes.container.name".into(), c.name.clone());
    annotations.insert(
        "io.kubernetes.container.image".into(),
        c.image.clone().unwrap_or_default(),
    );
    annotations.insert(
        "io.kubernetes.container.restartCount".into(),
        attempt.to_string(),
    );
    Ok(ContainerConfig {
        name: c.name.clone(),
        attempt,
        layers,
        args,
        env: merged
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        cwd,
        uid,
        gid,
        image_user: img.user.clone(),
        supplemental_gids: supplemental,
        mounts,
        privileged,
        cap_add: caps
            .add
            .unwrap_or_default()
            .iter()
            .map(|c| cap_name(c))
            .collect(),
        cap_drop: caps
            .drop
            .unwrap_or_default()
            .iter()
            .map(|c| cap_name(c))
            .collect(),
        no_new_privs: !privileged && sc.allow_privilege_escalation == Some(false),
        read_only_rootfs: sc.read_only_root_filesystem.unwrap_or(false),
        seccomp_default: !privileged && seccomp != "Unconfined",
        cpu_shares,
        cpu_quota,
        cpu_period: CPU_PERIOD,
        memory_limit,
        stdin: c.stdin.unwrap_or(false),
        tty: c.tty.unwrap_or(false),
        log_path,
        annotations,
        ..Default::default()
    })
}

/// /etc/hosts as upstream's kubelet writes it for a pod with its own network.
pub fn hosts_file(pod: &Pod, pod_ip: &str, cluster_domain: &str) -> String {
    let spec = pod.spec.clone().unwrap_or_default();
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let host = spec
        .hostname
        .clone()
        .unwrap_or_else(|| pod.metadata.name.clone().unwrap_or_default());
    let mut s = String::from(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    match &spec.subdomain {
        Some(sub) if !sub.is_empty() => s.push_str(&format!(
            "{pod_ip}\t{host}.{sub}.{ns}.svc.{cluster_domain}\t{host}\n"
        )),
        _ => s.push_str(&format!("{pod_ip}\t{host}\n")),
    }
    let aliases = spec.host_aliases.clone().unwrap_or_default();
    if !aliases.is_empty() {
        s.push_str("\n# Entries added by HostAliases.\n");
        for a in aliases {
            let names = a.hostnames.unwrap_or_default().join("\t");
            s.push_str(&format!("{}\t{names}\n", a.ip));
        }
    }
    s
}

/// The host's resolv.conf to hand to pods: systemd-resolved's upstream file when the usual
/// one points at a loopback stub (which a pod cannot reach).
pub fn host_resolv_conf() -> String {
    let main = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let loopback_only = main
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .all(|ns| ns.trim().starts_with("127.") || ns.trim() == "::1");
    if loopback_only {
        if let Ok(s) = std::fs::read_to_string("/run/systemd/resolve/resolv.conf") {
            return s;
        }
    }
    main
}

/// resolv.conf for the pod from dnsPolicy and dnsConfig.
pub fn resolv_conf(pod: &Pod, host: &str, cluster_dns: &str, cluster_domain: &str) -> String {
    let spec = pod.spec.clone().unwrap_or_default();
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let policy = spec
        .dns_policy
        .clone()
        .unwrap_or_else(|| "ClusterFirst".into());
    let host_net = spec.host_network.unwrap_or(false);
    let mut servers: Vec<String> = Vec::new();
    let mut searches: Vec<String> = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let host_servers: Vec<String> = host
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .map(|s| s.trim().to_string())
        .collect();
    let host_search: Vec<String> = host
        .lines()
        .filter_map(|l| l.trim().strip_prefix("search"))
        .flat_map(|s| s.split_whitespace().map(String::from).collect::<Vec<_>>())
        .collect();
    let host_options: Vec<String> = host
        .lines()
        .filter_map(|l| l.trim().strip_prefix("options"))
        .flat_map(|s| s.split_whitespace().map(String::from).collect::<Vec<_>>())
        .collect();
    let cluster = match policy.as_str() {
        "ClusterFirst" => !host_net,
        "ClusterFirstWithHostNet" => true,
        _ => false,
    };
    match policy.as_str() {
        "None" => {}
        _ if cluster => {
            servers.push(cluster_dns.to_string());
            searches.push(format!("{ns}.svc.{cluster_domain}"));
            searches.push(format!("svc.{cluster_domain}"));
            searches.push(cluster_domain.to_string());
            searches.extend(host_search);
            options.push("ndots:5".into());
        }
        _ => {
            servers = host_servers;
            searches = host_search;
            options = host_options;
        }
    }
    if let Some(dc) = &spec.dns_config {
        for s in dc.nameservers.iter().flatten() {
            if !servers.contains(s) {
                servers.push(s.clone());
            }
        }
        for s in dc.searches.iter().flatten() {
            if !searches.contains(s) {
                searches.push(s.clone());
            }
        }
        for o in dc.options.iter().flatten() {
            let text = match &o.value {
                Some(v) => format!("{}:{v}", o.name.clone().unwrap_or_default()),
                None => o.name.clone().unwrap_or_default(),
            };
            let name = o.name.clone().unwrap_or_default();
            options.retain(|x| x.split(':').next() != Some(name.as_str()));
            options.push(text);
        }
    }
    servers.truncate(3);
    searches.truncate(32);
    let mut out = String::new();
    if !searches.is_empty() {
        out.push_str(&format!("search {}\n", searches.join(" ")));
    }
    for s in servers {
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn qos_classes_follow_upstream() {
        let be = pod(json!({"metadata": {"uid": "u-1"}, "spec": {"containers": [{"name": "a"}]}}));
        assert_eq!(qos_class(&be), "BestEffort");
        let g = pod(
            json!({"metadata": {"uid": "u-1"}, "spec": {"containers": [{"name": "a",
            "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]}}),
        );
        assert_eq!(qos_class(&g), "Guaranteed");
        assert_eq!(pod_cgroup("/k3rs", &g), "/k3rs/kubepods/podu_1");
        let b = pod(
            json!({"metadata": {"uid": "u-1"}, "spec": {"containers": [{"name": "a",
            "resources": {"requests": {"cpu": "100m"}}}]}}),
        );
        assert_eq!(qos_class(&b), "Burstable");
        assert_eq!(pod_cgroup("/k3rs/", &b), "/k3rs/kubepods/burstable/podu_1");
    }

    #[test]
    fn cpu_limits_become_quota_and_requests_shares() {
        let r: Option<ResourceRequirements> = serde_json::from_value(json!({
            "requests": {"cpu": "250m"}, "limits": {"cpu": "500m"}}))
        .unwrap();
        assert_eq!(cpu_shares_quota(&r), (256, Some(50_000)));
        assert_eq!(cpu_shares_quota(&None), (2, None));
    }

    #[test]
    fn variables_expand_as_upstream() {
        let vars: HashMap<String, String> =
            [("A".to_string(), "x".to_string())].into_iter().collect();
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &vars), "x-$(B)-$(A)-$");
    }

    #[test]
    fn command_and_args_combine_with_the_image() {
        let img = ImageConfig {
            entrypoint: vec!["/ep".into()],
            cmd: vec!["c1".into()],
            ..Default::default()
        };
        let vars = HashMap::new();
        let c = |v: serde_json::Value| -> Container { serde_json::from_value(v).unwrap() };
        assert_eq!(argv(&c(json!({"name": "a"})), &img, &vars), ["/ep", "c1"]);
        assert_eq!(
            argv(&c(json!({"name": "a", "args": ["x"]})), &img, &vars),
            ["/ep", "x"]
        );
        assert_eq!(
            argv(&c(json!({"name": "a", "command": ["sh"]})), &img, &vars),
            ["sh"]
        );
    }

    #[test]
    fn cluster_first_resolv_conf() {
        let p = pod(
            json!({"metadata": {"namespace": "ns1"}, "spec": {"containers": [],
            "dnsConfig": {"options": [{"name": "ndots", "value": "2"}], "searches": ["x.y"]}}}),
        );
        let host = "nameserver 127.0.0.53\nsearch corp\n";
        assert_eq!(
            resolv_conf(&p, host, "10.43.0.10", "cluster.local"),
            "search ns1.svc.cluster.local svc.cluster.local cluster.local corp x.y\nnameserver 10.43.0.10\noptions ndots:2\n"
        );
        let d = pod(
            json!({"metadata": {"namespace": "ns1"}, "spec": {"containers": [], "dnsPolicy": "Default"}}),
        );
        assert_eq!(
            resolv_conf(&d, "nameserver 1.1.1.1\n", "10.43.0.10", "cluster.local"),
            "nameserver 1.1.1.1\n"
        );
    }

    #[test]
    fn hosts_file_names_the_pod() {
        let p = pod(
            json!({"metadata": {"name": "web-0", "namespace": "ns"}, "spec": {"containers": [],
            "hostname": "web-0", "subdomain": "web", "hostAliases": [{"ip": "1.2.3.4", "hostnames": ["a", "b"]}]}}),
        );
        let h = hosts_file(&p, "10.42.0.7", "cluster.local");
        assert!(
            h.contains("10.42.0.7\tweb-0.web.ns.svc.cluster.local\tweb-0\n"),
            "{h}"
        );
        assert!(
            h.ends_with("# Entries added by HostAliases.\n1.2.3.4\ta\tb\n"),
            "{h}"
        );
    }
}
