//! Control-plane benchmark (`make bench`): scheduler throughput with 100 hollow nodes, for a
//! 5,000-replica ReplicaSet and for 5,000 pods queued before the nodes arrive, server RSS holding those 5,000 pods, and the time for a
//! 1,000-replica Deployment to be fully available. Prints Markdown.
//!
//! Hollow nodes (`k3rs hollow-nodes`, the test tool) mark bound pods Running and Ready, as
//! kubemark/kwok do; they run on the same machine and share its cores with the server.
//! `K3RS_BENCH_DIR` chooses where data goes; `K3RS_BENCH_QUICK=1` runs a smaller version.

#![allow(clippy::print_stdout)]

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher;

mod common;
use common::{mib, secs, Server};

fn quick() -> bool {
    std::env::var_os("K3RS_BENCH_QUICK").is_some()
}

fn workload(kind: &str, name: &str, replicas: usize) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "nginx:1.27",
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]},
            },
        },
    })
}

async fn wait_nodes(client: &kube::Client, n: usize) {
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let l = nodes.list(&ListParams::default()).await.unwrap();
        if l.items.len() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "hollow nodes did not register");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next object a watch adds or changes; `None` after 5 s without one (or for other events).
async fn next_applied<K>(
    stream: &mut futures::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>,
) -> Option<K> {
    match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
        Ok(Some(Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)))) => Some(o),
        Ok(Some(Ok(_))) | Err(_) => None,
        Ok(Some(Err(e))) => panic!("watch: {e}"),
        Ok(None) => panic!("watch ended"),
    }
}

struct Scheduling {
    /// From creating the ReplicaSet to the last pod bound.
    end_to_end: Duration,
    /// From the first pod bound to the last.
    binding_window: Duration,
    /// From creating the ReplicaSet to every pod Running.
    all_running: Duration,
    /// From creating the ReplicaSet to its last pod created.
    all_created: Duration,
}

/// Creates a ReplicaSet of `replicas` and watches its pods until all are bound and running.
async fn schedule_replicaset(client: &kube::Client, replicas: usize) -> Scheduling {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut stream = watcher(pods, watcher::Config::default().labels("app=sched")).boxed();
    // Wait for the (empty) initial list so that no event is missed.
    loop {
        if let Some(Ok(watcher::Event::InitDone)) = stream.next().await {
            break;
        }
    }
    let rs: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let t0 = Instant::now();
    rs.create(
        &PostParams::default(),
        &serde_json::from_value(workload("ReplicaSet", "sched", replicas)).unwrap(),
    )
    .await
    .unwrap();
    let mut seen: HashSet<String> = HashSet::new();
    let mut last_created = t0;
    let mut bound: HashSet<String> = HashSet::new();
    let mut running: HashSet<String> = HashSet::new();
    let mut first_bound = None;
    let mut last_bound = t0;
    let deadline = t0 + Duration::from_secs(600);
    while running.len() < replicas {
        assert!(
            Instant::now() < deadline,
            "pods not running within 10 minutes"
        );
        let Some(p) = next_applied(&mut stream).await else {
            continue;
        };
        let name = p.metadata.name.clone().unwrap_or_default();
        if seen.insert(name.clone()) {
            last_created = Instant::now();
        }
        let spec_node = p.spec.as_ref().and_then(|s| s.node_name.clone());
        if spec_node.is_some() && bound.insert(name.clone()) {
            first_bound.get_or_insert_with(Instant::now);
            last_bound = Instant::now();
        }
        if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
            running.insert(name);
        }
    }
    Scheduling {
        end_to_end: last_bound - t0,
        binding_window: last_bound - first_bound.unwrap_or(t0),
        all_running: t0.elapsed(),
        all_created: last_created - t0,
    }
}

/// Creates a Deployment of `replicas` and returns the time until it is fully available.
async fn deployment_available(client: &kube::Client, replicas: usize) -> Duration {
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let t0 = Instant::now();
    api.create(
        &PostParams::default(),
        &serde_json::from_value(workload("Deployment", "avail", replicas)).unwrap(),
    )
    .await
    .unwrap();
    let mut stream = watcher(
        api,
        watcher::Config::default().fields("metadata.name=avail"),
    )
    .boxed();
    let deadline = t0 + Duration::from_secs(600);
    loop {
        assert!(
            Instant::now() < deadline,
            "deployment not available in 10 minutes"
        );
        let Some(d) = next_applied(&mut stream).await else {
            continue;
        };
        let st = d.status.unwrap_or_default();
        if st.available_replicas == Some(replicas as i32)
            && st.updated_replicas == Some(replicas as i32)
            && st.observed_generation == d.metadata.generation
        {
            return t0.elapsed();
        }
    }
}

/// Creates `n` bare pods while no node exists (they wait, unschedulable), then lets `nodes`
/// hollow nodes register and returns the time from the first bind to the last: the scheduler
/// alone with a full queue, as upstream's scheduler_perf measures it.
async fn pending_pods(client: &kube::Client, n: usize) -> usize {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut made = 0;
    let mut batch = futures::stream::iter((0..n).map(|i| {
        let pods = pods.clone();
        async move {
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("queued-{i}"), "labels": {"app": "queued"}},
                "spec": {"containers": [{"name": "c", "image": "nginx:1.27",
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]},
            }))
            .unwrap();
            pods.create(&PostParams::default(), &pod).await.unwrap();
        }
    }))
    .buffer_unordered(32);
    while batch.next().await.is_some() {
        made += 1;
    }
    made
}

async fn bind_window(client: &kube::Client, n: usize) -> Duration {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut stream = watcher(pods, watcher::Config::default().labels("app=queued")).boxed();
    let mut bound: HashSet<String> = HashSet::new();
    let mut first = None;
    let mut last = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(600);
    while bound.len() < n {
        assert!(
            Instant::now() < deadline,
            "pods not bound within 10 minutes"
        );
        let Some(p) = next_applied(&mut stream).await else {
            continue;
        };
        let on_node = p.spec.as_ref().and_then(|s| s.node_name.clone()).is_some();
        if on_node && bound.insert(p.metadata.name.clone().unwrap_or_default()) {
            first.get_or_insert_with(Instant::now);
            last = Instant::now();
        }
    }
    last - first.unwrap_or(last)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let q = quick();
    let nodes = if q { 20 } else { 100 };
    let replicas = if q { 500 } else { 5000 };
    let deploy_replicas = if q { 200 } else { 1000 };
    let node_args = |n: usize| {
        vec![
            "--count".to_string(),
            n.to_string(),
            "--name-prefix".into(),
            "hollow-".into(),
            "--cpu".into(),
            "64".into(),
            "--memory".into(),
            "256Gi".into(),
            "--pods".into(),
            "110".into(),
        ]
    };
    let mut out = String::new();
    let w = &mut out;
    writeln!(
        w,
        "### Control plane on hollow nodes ({})\n",
        if q { "quick run" } else { "full run" }
    )
    .ok();

    // Scheduler throughput and memory holding the pods.
    let mut s = Server::new();
    s.start();
    let args = node_args(nodes);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let hollow = s.hollow(&args);
    let (sched, rss) = rt.block_on(async {
        let client = s.client().await;
        wait_nodes(&client, nodes).await;
        let sched = schedule_replicaset(&client, replicas).await;
        // Steady state: queues drained and freed memory returned (the server trims its heap
        // every 5 s), not the peak of the burst.
        tokio::time::sleep(Duration::from_secs(12)).await;
        (sched, s.rss())
    });
    let hollow_rss = hollow.rss();
    drop(hollow);
    s.stop();
    let e2e = replicas as f64 / sched.end_to_end.as_secs_f64();
    let window = replicas as f64 / sched.binding_window.as_secs_f64();
    writeln!(w, "- ReplicaSet of {replicas} on {nodes} hollow nodes: created → last pod bound **{}** = **{e2e:.0} pods/s** end to end (pod creation by the ReplicaSet controller included); first → last bind {} = **{window:.0} pods/s** bound; last pod created after {}; every pod Running after {}.", secs(sched.end_to_end), secs(sched.binding_window), secs(sched.all_created), secs(sched.all_running)).ok();
    writeln!(
        w,
        "- Server RSS holding {replicas} running pods: **{}** (the hollow-nodes process: {}).",
        mib(rss),
        mib(hollow_rss)
    )
    .ok();

    // The scheduler alone: pods waiting for nodes, then the nodes arrive.
    let mut s = Server::new();
    s.start();
    let queued = rt.block_on(async {
        let client = s.client().await;
        pending_pods(&client, replicas).await
    });
    let hollow = s.hollow(&args);
    let queue_window = rt.block_on(async {
        let client = s.client().await;
        bind_window(&client, queued).await
    });
    drop(hollow);
    s.stop();
    let queue_rate = queued as f64 / queue_window.as_secs_f64();
    writeln!(
        w,
        "- {queued} bare pods created while no node exists, then {nodes} hollow nodes register: first → last bind **{}** = **{queue_rate:.0} pods/s** (the scheduler with a full queue, as scheduler_perf measures).",
        secs(queue_window)
    )
    .ok();

    // Deployment availability on a fresh server.
    let mut s = Server::new();
    s.start();
    let hollow = s.hollow(&args);
    let avail = rt.block_on(async {
        let client = s.client().await;
        wait_nodes(&client, nodes).await;
        deployment_available(&client, deploy_replicas).await
    });
    drop(hollow);
    s.stop();
    writeln!(
        w,
        "- Deployment of {deploy_replicas} replicas on {nodes} hollow nodes: created → fully available (available = updated = {deploy_replicas}) **{}**.",
        secs(avail)
    )
    .ok();
    writeln!(w).ok();
    writeln!(w, "| target | result |").ok();
    writeln!(w, "|---|---|").ok();
    writeln!(
        w,
        "| ≥ 1,500 pods/s bound (upstream scheduler_perf floors 680–810/s) | {queue_rate:.0}/s with a full queue ({:.2}× the target); {e2e:.0}/s end to end behind the ReplicaSet controller ({:.2}×) |",
        queue_rate / 1500.0,
        e2e / 1500.0
    )
    .ok();
    writeln!(w, "| 1,000 replicas available ≤ 3 s | {} |", secs(avail)).ok();
    writeln!(w, "| RSS with 5,000 pods ≤ 150 MB | {} |", mib(rss)).ok();
    print!("{out}");
}
