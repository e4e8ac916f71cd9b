//! Housekeeping benchmark (`make bench`): control loops that keep the cluster's bookkeeping
//! current. Endpoints: a Service selecting a 1,000-replica Deployment on hollow nodes, and the
//! time from the last pod turning Ready to EndpointSlices listing all 1,000 endpoints ready.
//! Further scenarios live in `benches/housekeeping/` (each an async function returning Markdown
//! table rows). Prints Markdown.
//!
//! `K3RS_BENCH_DIR` chooses where data goes; `K3RS_BENCH_QUICK=1` runs a smaller version.

#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher;

mod common;
#[path = "housekeeping/failover.rs"]
mod failover;

use common::{ms, secs, Server};

fn quick() -> bool {
    std::env::var_os("K3RS_BENCH_QUICK").is_some()
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

fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Ready endpoint addresses of one slice.
fn slice_ready(s: &EndpointSlice) -> Vec<String> {
    s.endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses.first().cloned())
        .collect()
}

/// A Service over a Deployment of `replicas` on `nodes` hollow nodes: returns Markdown table
/// rows (`| what | figure |`).
async fn endpoints_figures(replicas: usize, nodes: usize) -> String {
    let mut server = Server::new();
    server.start();
    let args: Vec<String> = vec![
        "--count".into(),
        nodes.to_string(),
        "--name-prefix".into(),
        "hollow-".into(),
        "--cpu".into(),
        "64".into(),
        "--memory".into(),
        "256Gi".into(),
        "--pods".into(),
        "110".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let hollow = server.hollow(&args);
    let client = server.client().await;
    wait_nodes(&client, nodes).await;

    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    svcs.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({
            "metadata": {"name": "bench"},
            "spec": {"selector": {"app": "bench"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        }))
        .unwrap(),
    )
    .await
    .unwrap();

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let mut pod_stream = watcher(pods, watcher::Config::default().labels("app=bench")).boxed();
    let mut slice_stream = watcher(
        slices,
        watcher::Config::default().labels("kubernetes.io/service-name=bench"),
    )
    .boxed();
    // Both initial lists done before the Deployment exists, so no event is missed.
    loop {
        match pod_stream.next().await {
            Some(Ok(watcher::Event::InitDone)) => break,
            Some(Ok(_)) => {}
            other => panic!("pod watch: {other:?}"),
        }
    }
    loop {
        match slice_stream.next().await {
            Some(Ok(watcher::Event::InitDone)) => break,
            Some(Ok(_)) => {}
            other => panic!("slice watch: {other:?}"),
        }
    }

    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let t0 = Instant::now();
    deps.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({
            "metadata": {"name": "bench"},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "bench"}},
                "template": {
                    "metadata": {"labels": {"app": "bench"}},
                    "spec": {"containers": [{"name": "c", "image": "nginx:1.27",
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]},
                },
            },
        }))
        .unwrap(),
    )
    .await
    .unwrap();

    let mut ready: HashSet<String> = HashSet::new();
    let mut last_ready: Option<Instant> = None;
    let mut slice_state: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut complete: Option<Instant> = None;
    let deadline = t0 + Duration::from_secs(600);
    while complete.is_none() || last_ready.is_none() {
        assert!(
            Instant::now() < deadline,
            "endpoints not complete within 10 minutes ({} pods ready, {} endpoints ready)",
            ready.len(),
            slice_state.values().map(Vec::len).sum::<usize>()
        );
        tokio::select! {
            ev = pod_stream.next() => match ev {
                Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    if pod_ready(&p) {
                        if ready.insert(name) && ready.len() == replicas {
                            last_ready = Some(Instant::now());
                        }
                    } else {
                        ready.remove(&name);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("watch: {e}"),
                None => panic!("watch ended"),
            },
            ev = slice_stream.next() => match ev {
                Some(Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s))) => {
                    slice_state.insert(s.metadata.name.clone().unwrap_or_default(), slice_ready(&s));
                }
                Some(Ok(watcher::Event::Delete(s))) => {
                    slice_state.remove(&s.metadata.name.clone().unwrap_or_default());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("watch: {e}"),
                None => panic!("watch ended"),
            },
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let eps: HashSet<&String> = slice_state.values().flatten().collect();
        if eps.len() == replicas && complete.is_none() {
            complete = Some(Instant::now());
        }
    }
    let (complete, last_ready) = (complete.unwrap(), last_ready.unwrap());
    let lag = complete.saturating_duration_since(last_ready);
    let n_slices = slice_state.len();
    drop(hollow);
    server.stop();
    let mut out = String::new();
    writeln!(
        out,
        "| Endpoints: last of {replicas} pods Ready → EndpointSlices list all {replicas} ready (target ≤ 500 ms) | **{}** |",
        ms(lag)
    )
    .ok();
    writeln!(
        out,
        "| Endpoints: Deployment created → all {replicas} pods Ready / all endpoints in slices ({n_slices} slices, {nodes} hollow nodes) | {} / {} |",
        secs(last_ready - t0),
        secs(complete - t0)
    )
    .ok();
    out
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let q = quick();
    let (replicas, nodes) = if q { (200, 4) } else { (1000, 12) };
    let mut rows = String::new();
    rows.push_str(&rt.block_on(endpoints_figures(replicas, nodes)));
    rows.push_str(&rt.block_on(failover::failover()));
    let mut out = String::new();
    writeln!(
        out,
        "### Housekeeping loops on hollow nodes ({})\n",
        if q { "quick run" } else { "full run" }
    )
    .ok();
    writeln!(out, "| scenario | result |").ok();
    writeln!(out, "|---|---|").ok();
    out.push_str(&rows);
    print!("{out}");
}
