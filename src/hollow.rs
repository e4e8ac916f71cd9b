//! `k3rs hollow-nodes` — a TEST TOOL, not a kubelet: it registers fake nodes with the given
//! capacity, labels and taints, renews their Leases, and moves pods bound to them through their
//! lifecycle (Running and Ready with a pod IP; Succeeded/Failed when the command clearly ends,
//! e.g. `exit 1`, `true`, `sleep 5`; deleted when marked for deletion), as kubemark and kwok do.
//! No container ever runs. Stopping the process is how a test loses a node.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::rest::{status_code, RestClient, Target};

#[derive(Debug, Clone, Args)]
pub struct HollowArgs {
    /// Kubeconfig of the server to join.
    #[arg(long)]
    pub kubeconfig: std::path::PathBuf,
    /// Node names (comma-separated); or use --count with --name-prefix.
    #[arg(long, value_delimiter = ',')]
    pub names: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub count: usize,
    #[arg(long, default_value = "hollow-")]
    pub name_prefix: String,
    #[arg(long, default_value = "4")]
    pub cpu: String,
    #[arg(long, default_value = "8Gi")]
    pub memory: String,
    #[arg(long, default_value = "110")]
    pub pods: String,
    #[arg(long, default_value = "50Gi")]
    pub ephemeral_storage: String,
    /// Extra node label (repeatable, key=value).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Node taint (repeatable, key=value:Effect).
    #[arg(long = "taint")]
    pub taints: Vec<String>,
    /// How long a started pod takes to become Running and Ready.
    #[arg(long, default_value_t = 0)]
    pub startup_delay_ms: u64,
    /// How often node Leases are renewed (the kubelet's 10 s; tests with a short
    /// --node-monitor-grace-period use less).
    #[arg(long, default_value_t = 10_000)]
    pub lease_renew_interval_ms: u64,
}

fn now() -> String {
    crate::api::objects::now_rfc3339()
}

fn micro_now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
        .to_string()
}

fn parse_taint(s: &str) -> Result<Value> {
    let (kv, effect) = s
        .rsplit_once(':')
        .with_context(|| format!("taint {s:?}: expected key=value:Effect"))?;
    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
    Ok(json!({"key": k, "value": v, "effect": effect}))
}

/// What a container's command says about how it ends (the emulation of the test tool).
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    RunsForever,
    Exits { code: i64, after: Duration },
}

fn fate(c: &Value) -> Fate {
    let words: Vec<String> = ["command", "args"]
        .iter()
        .flat_map(|k| c[*k].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let text = words.join(" ");
    let mut tokens = text
        .split(|ch: char| ch.is_whitespace() || ch == ';' || ch == '&' || ch == '|')
        .filter(|t| !t.is_empty());
    let mut sleep = Duration::ZERO;
    let mut code = None;
    while let Some(t) = tokens.next() {
        match t {
            "sleep" => {
                if let Some(n) = tokens.next().and_then(|n| n.parse::<f64>().ok()) {
                    sleep += Duration::from_secs_f64(n);
                }
            }
            "exit" => code = Some(tokens.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
            "true" => code = code.or(Some(0)),
            "false" => code = Some(1),
            "echo" | "date" => code = code.or(Some(0)),
            _ => {}
        }
    }
    match code {
        Some(code) => Fate::Exits { code, after: sleep },
        None if sleep > Duration::ZERO => Fate::Exits {
            code: 0,
            after: sleep,
        },
        None => Fate::RunsForever,
    }
}

struct Node {
    name: String,
    index: usize,
    next_ip: Mutex<u32>,
    /// The node's `spec.podCIDR` (allocated by the server's node IPAM) once seen.
    pod_cidr: Mutex<Option<crate::config::Cidr>>,
}

struct Hollow {
    client: RestClient,
    args: HollowArgs,
    nodes: HashMap<String, Node>,
    /// Pods this tool already acted on, by uid: what it last did.
    handled: Mutex<BTreeMap<String, &'static str>>,
}

impl Hollow {
    fn node_object(&self, n: &Node) -> Value {
        let mut labels = json!({
            "kubernetes.io/hostname": n.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": crate::arch(),
            "k3rs.io/hollow": "true",
        });
        for l in &self.args.labels {
            if let Some((k, v)) = l.split_once('=') {
                labels[k] = json!(v);
            }
        }
        let taints: Vec<Value> = self
            .args
            .taints
            .iter()
            .filter_map(|t| parse_taint(t).ok())
            .collect();
        let res = json!({"cpu": self.args.cpu, "memory": self.args.memory, "pods": self.args.pods, "ephemeral-storage": self.args.ephemeral_storage});
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": n.name, "labels": labels, "annotations": {"k3rs.io/hollow-node": "test tool, not a kubelet"}},
            "spec": {"taints": taints},
            "status": {
                "capacity": res, "allocatable": res,
                "conditions": [
                    {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory", "message": "kubelet has sufficient memory available", "lastHeartbeatTime": now(), "lastTransitionTime": now()},
                    {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure", "message": "kubelet has no disk pressure", "lastHeartbeatTime": now(), "lastTransitionTime": now()},
                    {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID", "message": "kubelet has sufficient PID available", "lastHeartbeatTime": now(), "lastTransitionTime": now()},
                    {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status (hollow node)", "lastHeartbeatTime": now(), "lastTransitionTime": now()},
                ],
                "addresses": [{"type": "InternalIP", "address": format!("192.0.2.{}", n.index % 250 + 1)}, {"type": "Hostname", "address": n.name}],
                "nodeInfo": {
                    "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "hollow", "osImage": "k3rs hollow node (test tool)",
                    "containerRuntimeVersion": "hollow://0", "kubeletVersion": format!("{}-hollow", crate::api::KUBE_VERSION), "kubeProxyVersion": "",
                    "operatingSystem": "linux", "architecture": crate::arch(),
                },
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            },
        })
    }

    async fn register(&self, n: &Node) -> Result<()> {
        let obj = self.node_object(n);
        match self.client.post("/api/v1/nodes", &obj).await {
            Ok(_) => {}
            Err(e) if status_code(&e) == Some(409) => {
                self.client
                    .merge_patch(
                        &format!("/api/v1/nodes/{}/status", n.name),
                        &json!({"status": obj["status"]}),
                    )
                    .await?;
                self.client.merge_patch(&format!("/api/v1/nodes/{}", n.name), &json!({"metadata": {"labels": obj["metadata"]["labels"]}, "spec": obj["spec"]})).await?;
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    async fn renew_lease(&self, n: &Node) -> Result<()> {
        let path = format!(
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{}",
            n.name
        );
        let spec =
            json!({"holderIdentity": n.name, "leaseDurationSeconds": 40, "renewTime": micro_now()});
        match self.client.merge_patch(&path, &json!({"spec": spec})).await {
            Ok(_) => Ok(()),
            Err(e) if status_code(&e) == Some(404) => {
                let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": n.name, "namespace": "kube-node-lease"}, "spec": spec});
                self.client
                    .post(
                        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                        &lease,
                    )
                    .await
                    .map(|_| ())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads the node's podCIDR from the server (once it has one).
    async fn learn_pod_cidr(&self, n: &Node) -> Option<crate::config::Cidr> {
        if let Some(c) = *n.pod_cidr.lock() {
            return Some(c);
        }
        let node = self
            .client
            .get(&format!("/api/v1/nodes/{}", n.name))
            .await
            .ok()?;
        let c = crate::config::Cidr::parse(node.pointer("/spec/podCIDR")?.as_str()?).ok()?;
        *n.pod_cidr.lock() = Some(c);
        Some(c)
    }

    /// The next pod IP: from the node's podCIDR, or (a server without node IPAM) from
    /// 10.42.<node index>.0/24.
    async fn pod_ip(&self, n: &Node) -> String {
        let cidr = self.learn_pod_cidr(n).await;
        let mut g = n.next_ip.lock();
        *g += 1;
        match cidr {
            Some(c) => {
                let size = 1u32.checked_shl(32 - u32::from(c.prefix)).unwrap_or(0);
                // Skip the network address and the first host (the node's bridge).
                let hosts = size.saturating_sub(3).max(1);
                // The first pod gets .2, as on a real node.
                c.nth((*g - 1) % hosts + 2).to_string()
            }
            None => format!("10.42.{}.{}", n.index % 256, (*g - 1) % 250 + 2),
        }
    }

    /// Posts the node's status again when the server no longer has it Ready (the node
    /// controller marked it Unknown while this process was away or slow), as a kubelet does
    /// when its status differs from the server's.
    async fn repost_status_if_needed(&self, n: &Node) -> Result<()> {
        let node = self
            .client
            .get(&format!("/api/v1/nodes/{}", n.name))
            .await?;
        let ready = node
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().find(|c| c["type"] == "Ready"))
            .and_then(|c| c["status"].as_str())
            .unwrap_or_default()
            .to_string();
        if ready != "True" {
            let obj = self.node_object(n);
            self.client
                .merge_patch(
                    &format!("/api/v1/nodes/{}/status", n.name),
                    &json!({"status": obj["status"]}),
                )
                .await?;
        }
        Ok(())
    }

    async fn handle_pod(self: &Arc<Self>, pod: Value) {
        let node = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let Some(n) = self.nodes.get(&node) else {
            return;
        };
        let ns = pod
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let name = pod
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let uid = pod
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}");
        if pod.pointer("/metadata/deletionTimestamp").is_some() {
            if self.handled.lock().insert(uid.clone(), "deleted") == Some("deleted") {
                return;
            }
            let body = json!({"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}});
            if let Err(e) = self.client.delete(&path, &body).await {
                if status_code(&e) != Some(404) {
                    tracing::debug!(pod = %name, error = %e, "deleting");
                    self.handled.lock().remove(&uid);
                }
            }
            return;
        }
        let phase = pod
            .pointer("/status/phase")
            .and_then(Value::as_str)
            .unwrap_or("Pending");
        if (phase != "Pending" && phase != "Running") || self.handled.lock().contains_key(&uid) {
            return;
        }
        self.handled.lock().insert(uid.clone(), "started");
        // A pod already Running (this tool restarted): it keeps running from its start time.
        let running_since: Option<(String, Duration)> = (phase == "Running")
            .then(|| pod.pointer("/status/startTime").and_then(Value::as_str))
            .flatten()
            .and_then(|s| {
                let t: jiff::Timestamp = s.parse().ok()?;
                let ran = jiff::Timestamp::now().as_millisecond() - t.as_millisecond();
                Some((s.to_string(), Duration::from_millis(ran.max(0) as u64)))
            });
        if phase == "Running" && running_since.is_none() {
            return;
        }
        let delay = Duration::from_millis(self.args.startup_delay_ms);
        let ip = self.pod_ip(n).await;
        let host_ip = format!("192.0.2.{}", n.index % 250 + 1);
        let me = self.clone();
        tokio::spawn(async move {
            let containers: Vec<Value> = pod
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let (started, ran) = match running_since {
                Some(r) => r,
                None => {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    (now(), Duration::ZERO)
                }
            };
            let cond = |t: &str| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": started});
            if ran.is_zero() {
                let statuses: Vec<Value> = containers
                .iter()
                .map(|c| {
                    let image = c["image"].as_str().unwrap_or_default();
                    json!({"name": c["name"], "ready": true, "started": true, "restartCount": 0, "image": image,
                           "imageID": format!("hollow://{image}"), "containerID": format!("hollow://{uid}/{}", c["name"].as_str().unwrap_or_default()),
                           "state": {"running": {"startedAt": started}}})
                })
                .collect();
                let status = json!({"status": {
                    "phase": "Running", "hostIP": host_ip, "hostIPs": [{"ip": host_ip}], "podIP": ip, "podIPs": [{"ip": ip}], "startTime": started,
                    "conditions": [cond("PodReadyToStartContainers"), cond("Initialized"), cond("Ready"), cond("ContainersReady"), cond("PodScheduled")],
                    "containerStatuses": statuses,
                }});
                if let Err(e) = me
                    .client
                    .merge_patch(&format!("{path}/status"), &status)
                    .await
                {
                    tracing::debug!(pod = %name, error = %e, "starting");
                    me.handled.lock().remove(&uid);
                    return;
                }
            }
            // Commands that end (only where the pod does not restart them).
            let restart = pod
                .pointer("/spec/restartPolicy")
                .and_then(Value::as_str)
                .unwrap_or("Always");
            if restart == "Always" {
                return;
            }
            let fates: Vec<Fate> = containers.iter().map(fate).collect();
            if fates.contains(&Fate::RunsForever) {
                return;
            }
            let longest = fates
                .iter()
                .map(|f| match f {
                    Fate::Exits { after, .. } => *after,
                    Fate::RunsForever => Duration::ZERO,
                })
                .max()
                .unwrap_or_default();
            let code = fates
                .iter()
                .map(|f| match f {
                    Fate::Exits { code, .. } => *code,
                    Fate::RunsForever => 0,
                })
                .find(|c| *c != 0)
                .unwrap_or(0);
            tokio::time::sleep(longest.saturating_sub(ran).max(Duration::from_millis(50))).await;
            let finished = now();
            let statuses: Vec<Value> = containers
                .iter()
                .zip(&fates)
                .map(|(c, f)| {
                    let exit = match f { Fate::Exits { code, .. } => *code, Fate::RunsForever => 0 };
                    json!({"name": c["name"], "ready": false, "started": false, "restartCount": 0, "image": c["image"],
                           "imageID": format!("hollow://{}", c["image"].as_str().unwrap_or_default()),
                           "state": {"terminated": {"exitCode": exit, "reason": if exit == 0 { "Completed" } else { "Error" }, "startedAt": started, "finishedAt": finished}}})
                })
                .collect();
            let not = |t: &str| json!({"type": t, "status": "False", "reason": "PodCompleted", "lastProbeTime": null, "lastTransitionTime": finished});
            let status = json!({"status": {
                "phase": if code == 0 { "Succeeded" } else { "Failed" },
                "conditions": [not("Ready"), not("ContainersReady"), cond("Initialized"), cond("PodScheduled")],
                "containerStatuses": statuses,
            }});
            if let Err(e) = me
                .client
                .merge_patch(&format!("{path}/status"), &status)
                .await
            {
                tracing::debug!(pod = %name, error = %e, "finishing");
            }
        });
    }
}

pub async fn run(args: HollowArgs) -> Result<()> {
    let target = Target::from_kubeconfig(&args.kubeconfig)?;
    let mut names = args.names.clone();
    for i in 0..args.count {
        names.push(format!("{}{i}", args.name_prefix));
    }
    if names.is_empty() {
        anyhow::bail!("no nodes: give --names or --count");
    }
    for t in &args.taints {
        parse_taint(t)?;
    }
    let nodes: HashMap<String, Node> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                n.clone(),
                Node {
                    name: n.clone(),
                    index: i,
                    next_ip: Mutex::new(0),
                    pod_cidr: Mutex::new(None),
                },
            )
        })
        .collect();
    let h = Arc::new(Hollow {
        client: RestClient::new(target),
        args,
        nodes,
        handled: Mutex::new(BTreeMap::new()),
    });
    for n in h.nodes.values() {
        h.register(n)
            .await
            .with_context(|| format!("registering node {}", n.name))?;
        h.renew_lease(n).await?;
    }
    tracing::info!(
        nodes = h.nodes.len(),
        "hollow nodes registered (test tool: no containers run)"
    );
    {
        let h = h.clone();
        tokio::spawn(async move {
            let every = Duration::from_millis(h.args.lease_renew_interval_ms.max(100));
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                for n in h.nodes.values() {
                    if let Err(e) = h.renew_lease(n).await {
                        tracing::warn!(node = %n.name, error = %e, "renewing lease");
                    } else if let Err(e) = h.repost_status_if_needed(n).await {
                        tracing::warn!(node = %n.name, error = %e, "posting node status");
                    }
                }
            }
        });
    }
    // Pods: one watch for every node of this process.
    loop {
        // The server may restart under the test tool: keep retrying, as a kubelet does.
        let list = match h.client.get("/api/v1/pods").await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listing pods");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let rv = list
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("0")
            .to_string();
        for p in list["items"].as_array().cloned().unwrap_or_default() {
            h.handle_pod(p).await;
        }
        let mut rx = match h
            .client
            .watch(&format!(
                "/api/v1/pods?resourceVersion={rv}&allowWatchBookmarks=true"
            ))
            .await
        {
            Ok(rx) => rx,
            Err(e) => {
                tracing::warn!(error = %e, "watching pods");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(ev) = rx.recv().await {
            match ev["type"].as_str() {
                Some("ADDED") | Some("MODIFIED") => h.handle_pod(ev["object"].clone()).await,
                Some("ERROR") => break,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_tell_how_a_pod_ends() {
        assert_eq!(
            fate(&json!({"command": ["sh", "-c", "exit 3"]})),
            Fate::Exits {
                code: 3,
                after: Duration::ZERO
            }
        );
        assert_eq!(
            fate(&json!({"command": ["sleep", "2"]})),
            Fate::Exits {
                code: 0,
                after: Duration::from_secs(2)
            }
        );
        assert_eq!(
            fate(&json!({"command": ["sh", "-c", "sleep 1; false"]})),
            Fate::Exits {
                code: 1,
                after: Duration::from_secs(1)
            }
        );
        assert_eq!(
            fate(&json!({"command": ["httpd", "-f"]})),
            Fate::RunsForever
        );
        assert_eq!(
            fate(&json!({"args": ["echo", "hi"]})),
            Fate::Exits {
                code: 0,
                after: Duration::ZERO
            }
        );
    }
}
