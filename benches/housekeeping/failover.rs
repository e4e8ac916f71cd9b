//! Failover scenario of the housekeeping benchmark: a Deployment's replicas all on one hollow
//! node, three more nodes idle; the node's `hollow-nodes` process is killed, and the time until
//! every replica is Running again on the other nodes is measured. The floor is the node monitor
//! grace period G (until the node is marked Unknown and tainted unreachable) plus the pods'
//! unreachable `tolerationSeconds` T; what the control plane adds beyond G + T is the figure
//! (target ≤ 2 s).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use kube::runtime::watcher;

use crate::common::{secs, Server};

/// Node monitor grace period the server runs with.
const GRACE: Duration = Duration::from_secs(5);
/// The replicas' `tolerationSeconds` for the unreachable taint.
const TOLERATION: Duration = Duration::from_secs(2);
const REPLICAS: usize = 30;
const VICTIM: &str = "failover-victim";

fn deployment() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "failover"},
        "spec": {
            "replicas": REPLICAS,
            "selector": {"matchLabels": {"app": "failover"}},
            "template": {
                "metadata": {"labels": {"app": "failover"}},
                "spec": {
                    "tolerations": [
                        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": TOLERATION.as_secs()},
                        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": TOLERATION.as_secs()},
                    ],
                    "containers": [{"name": "c", "image": "nginx:1.27",
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}],
                },
            },
        },
    })
}

fn running_elsewhere(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && p.spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_some_and(|n| n != VICTIM)
}

fn running(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

async fn ready_status(nodes: &Api<Node>, name: &str) -> String {
    let Ok(n) = nodes.get(name).await else {
        return String::new();
    };
    n.status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status)
        .unwrap_or_default()
}

/// Runs the scenario on its own server and returns Markdown table rows
/// (`| what | figure |`) for the benchmark's report.
pub async fn failover() -> String {
    let mut server = Server::new();
    // The server takes the short grace period from its environment (flag > env > file).
    std::env::set_var(
        "K3RS_NODE_MONITOR_GRACE_PERIOD",
        format!("{}s", GRACE.as_secs()),
    );
    server.start();
    std::env::remove_var("K3RS_NODE_MONITOR_GRACE_PERIOD");
    let client = server.client().await;
    let leases = ["--lease-renew-interval-ms", "500"];
    let mut victim = Some(server.hollow(&[&["--names", VICTIM][..], &leases[..]].concat()));
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready_status(&nodes, VICTIM).await != "True" {
        assert!(
            Instant::now() < deadline,
            "the victim node did not register"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every replica on the victim (the only node), then the survivors join.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut stream = watcher(pods, watcher::Config::default().labels("app=failover")).boxed();
    let mut state: BTreeMap<String, Pod> = BTreeMap::new();
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deps.create(
        &PostParams::default(),
        &serde_json::from_value(deployment()).unwrap(),
    )
    .await
    .unwrap();
    let apply = |state: &mut BTreeMap<String, Pod>, ev: watcher::Event<Pod>| match ev {
        watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
            state.insert(p.metadata.name.clone().unwrap_or_default(), p);
        }
        watcher::Event::Delete(p) => {
            state.remove(&p.metadata.name.clone().unwrap_or_default());
        }
        _ => {}
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while state.values().filter(|p| running(p)).count() < REPLICAS {
        assert!(Instant::now() < deadline, "replicas not running in 5 min");
        if let Ok(Some(Ok(ev))) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await
        {
            apply(&mut state, ev);
        }
    }
    let survivors = server.hollow(
        &[
            &["--names", "failover-s1,failover-s2,failover-s3"][..],
            &leases[..],
        ]
        .concat(),
    );
    for s in ["failover-s1", "failover-s2", "failover-s3"] {
        while ready_status(&nodes, s).await != "True" {
            assert!(Instant::now() < deadline, "survivor {s} did not register");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Let the victim renew once more so the loss starts right after a renewal.
    tokio::time::sleep(Duration::from_millis(600)).await;

    // The loss.
    let t0 = Instant::now();
    drop(victim.take());
    let mut unknown_at = None;
    let mut first_evicted = None;
    let mut last_evicted = None;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let deadline = t0 + Duration::from_secs(300);
    loop {
        if state.values().filter(|p| running_elsewhere(p)).count() >= REPLICAS {
            break;
        }
        assert!(Instant::now() < deadline, "replicas not back within 5 min");
        tokio::select! {
            ev = stream.next() => {
                if let Some(Ok(ev)) = ev {
                    apply(&mut state, ev);
                }
                let evicted = state.values().filter(|p| p.metadata.deletion_timestamp.is_some()).count();
                if evicted > 0 {
                    first_evicted.get_or_insert_with(|| t0.elapsed());
                }
                if evicted >= REPLICAS && last_evicted.is_none() {
                    last_evicted = Some(t0.elapsed());
                }
            }
            _ = tick.tick(), if unknown_at.is_none() => {
                if ready_status(&nodes, VICTIM).await == "Unknown" {
                    unknown_at = Some(t0.elapsed());
                }
            }
        }
    }
    let total = t0.elapsed();
    let done = k8s_openapi::jiff::Timestamp::now();
    // The floor counts from the victim's last Lease renewal (the kill came a little later).
    let leases_api: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let last_renewal = leases_api
        .get(VICTIM)
        .await
        .ok()
        .and_then(|l| l.spec?.renew_time)
        .map(|t| t.0);
    drop(survivors);
    server.stop();
    let floor = GRACE + TOLERATION;
    let since_renewal = last_renewal
        .map(|r| Duration::from_millis((done.as_millisecond() - r.as_millisecond()).max(0) as u64));
    let overhead = since_renewal.unwrap_or(total).saturating_sub(floor);
    let opt = |d: Option<Duration>| d.map_or("—".to_string(), secs);
    let mut out = String::new();
    out.push_str(&format!(
        "| Failover: node lost → {REPLICAS} replicas Running elsewhere (grace G {}, toleration T {}) | {} |\n",
        secs(GRACE),
        secs(TOLERATION),
        secs(total)
    ));
    out.push_str(&format!(
        "| Failover overhead beyond G + T, from the node's last Lease renewal ({} before all Running) (target ≤ 2 s) | **{}** |\n",
        opt(since_renewal),
        secs(overhead)
    ));
    out.push_str(&format!(
        "| Failover phases: node Unknown / first eviction / all {REPLICAS} evicted (from the kill) | {} / {} / {} |\n",
        opt(unknown_at),
        opt(first_evicted),
        opt(last_evicted)
    ));
    out
}
