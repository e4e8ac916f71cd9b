//! API server benchmark (`make bench`): cold and warm start to /readyz, idle RSS and RSS holding
//! 10,000 configmaps, create throughput over HTTPS at 1/16/64 clients, LIST of 10,000 pods (JSON
//! and Table), and watch delivery with 100 watchers. Prints Markdown.
//!
//! `K3RS_BENCH_DIR` chooses where data goes; `K3RS_BENCH_QUICK=1` runs a smaller version.

#![allow(clippy::print_stdout)]

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};

mod common;
use common::{mib, ms, pct, Server};
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use kube::Client;

fn quick() -> bool {
    std::env::var_os("K3RS_BENCH_QUICK").is_some()
}

fn cm(name: String) -> ConfigMap {
    serde_json::from_value(
        serde_json::json!({"metadata": {"name": name}, "data": {"v": "x".repeat(1000)}}),
    )
    .unwrap()
}

fn pod(name: String) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": "bench", "tier": "web"}},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36", "command": ["sleep", "3600"], "ports": [{"containerPort": 80}],
                  "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}
    }))
    .unwrap()
}

async fn creates(
    client: &Client,
    clients: usize,
    total: usize,
    prefix: &str,
) -> (f64, Duration, Duration) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let per = total / clients;
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let api = api.clone();
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per);
                for i in 0..per {
                    let t = Instant::now();
                    api.create(&PostParams::default(), &cm(format!("{prefix}-{c}-{i}")))
                        .await
                        .unwrap();
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
    (rate, pct(&mut lat, 0.5), pct(&mut lat, 0.99))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let q = quick();
    let mut out = String::new();
    let w = &mut out;
    writeln!(
        w,
        "### API server ({})\n",
        if q { "quick run" } else { "full run" }
    )
    .ok();

    // Start times and idle memory.
    let mut s = Server::new();
    let cold = s.start();
    std::thread::sleep(Duration::from_secs(2));
    let idle = s.rss();
    s.stop();
    let warm = s.start();
    writeln!(w, "- Start to `/readyz` 200: cold (new data dir, CA and certificates generated) **{}**, warm (existing data dir) **{}**.", ms(cold), ms(warm)).ok();
    writeln!(w, "- RSS idle after start: **{}**.", mib(idle)).ok();

    let n_cm = if q { 1000 } else { 10_000 };
    let (figures, rss_full) = rt.block_on(async {
        let client = s.client().await;
        let mut figures = Vec::new();
        for clients in [1, 16, 64] {
            let total = if q {
                320
            } else if clients == 1 {
                2000
            } else {
                6400
            };
            figures.push((
                clients,
                creates(&client, clients, total, &format!("c{clients}")).await,
            ));
        }
        // Fill up to n_cm configmaps in total, then measure memory.
        let have: usize = figures
            .iter()
            .map(|(c, _)| {
                if q {
                    320 / c * c
                } else if *c == 1 {
                    2000
                } else {
                    6400 / c * c
                }
            })
            .sum();
        if have < n_cm {
            creates(&client, 64, n_cm - have, "fill").await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        (figures, s.rss())
    });
    writeln!(
        w,
        "- RSS holding {n_cm} configmaps of 1 KiB: **{}**.\n",
        mib(rss_full)
    )
    .ok();
    writeln!(
        w,
        "| creates of 1 KiB configmaps over HTTPS (kube-rs client) | throughput | p50 | p99 |"
    )
    .ok();
    writeln!(w, "|---|---|---|---|").ok();
    for (clients, (rate, p50, p99)) in &figures {
        writeln!(
            w,
            "| {clients} client{} | {rate:.0}/s | {} | {} |",
            if *clients == 1 { "" } else { "s" },
            ms(*p50),
            ms(*p99)
        )
        .ok();
    }

    // LIST of pods, as JSON and as a Table.
    let n_pods = if q { 1000 } else { 10_000 };
    let (json_lat, table_lat, watch) = rt.block_on(async {
        let client = s.client().await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        let per = n_pods / 64;
        let tasks: Vec<_> = (0..64)
            .map(|c| {
                let pods = pods.clone();
                tokio::spawn(async move {
                    for i in 0..per {
                        pods.create(&PostParams::default(), &pod(format!("p-{c}-{i}")))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let mut json_lat = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            let l = pods.list(&ListParams::default()).await.unwrap();
            json_lat.push(t.elapsed());
            assert_eq!(l.items.len(), per * 64);
        }
        let mut table_lat = Vec::new();
        for _ in 0..5 {
            let req = http::Request::get("/api/v1/namespaces/default/pods")
                .header(
                    "accept",
                    "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
                )
                .body(Vec::new())
                .unwrap();
            let t = Instant::now();
            let v: serde_json::Value = client.request(req).await.unwrap();
            table_lat.push(t.elapsed());
            assert_eq!(v["rows"].as_array().unwrap().len(), per * 64);
        }
        // Watch delivery: 100 watchers on configmaps in a namespace of their own.
        let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        let _ = ns
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": "watched"}}))
                    .unwrap(),
            )
            .await;
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "watched");
        let rv = cms
            .list(&ListParams::default())
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        let sent: Arc<parking_lot::Mutex<std::collections::HashMap<String, Instant>>> =
            Arc::default();
        let writes = if q { 50 } else { 200 };
        let mut watchers = Vec::new();
        for _ in 0..100 {
            let cms = cms.clone();
            let rv = rv.clone();
            watchers.push(tokio::spawn(async move {
                use futures::StreamExt;
                let mut got = Vec::with_capacity(writes);
                let mut stream = cms
                    .watch(&WatchParams::default(), &rv)
                    .await
                    .unwrap()
                    .boxed();
                while got.len() < writes {
                    match stream.next().await {
                        Some(Ok(WatchEvent::Added(o))) => {
                            got.push((o.metadata.name.unwrap(), Instant::now()))
                        }
                        Some(Ok(_)) => {}
                        other => panic!("watch ended: {other:?}"),
                    }
                }
                got
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        for i in 0..writes {
            let name = format!("w{i}");
            sent.lock().insert(name.clone(), Instant::now());
            cms.create(&PostParams::default(), &cm(name)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut lat = Vec::new();
        for wt in watchers {
            for (name, at) in wt.await.unwrap() {
                lat.push(at.saturating_duration_since(sent.lock()[&name]));
            }
        }
        (json_lat, table_lat, lat)
    });
    let (mut json_lat, mut table_lat, mut watch) = (json_lat, table_lat, watch);
    writeln!(w, "\n- LIST of {n_pods} pods (kube-rs, one request): JSON median **{}**, worst {}; as a Table (what `kubectl get pods` asks for) median **{}**.", ms(pct(&mut json_lat, 0.5)), ms(pct(&mut json_lat, 1.0)), ms(pct(&mut table_lat, 0.5))).ok();
    writeln!(w, "- Watch delivery, 100 watchers, from issuing the create to the event arriving (so including the create): p50 **{}**, p99 **{}**.", ms(pct(&mut watch, 0.5)), ms(pct(&mut watch, 0.99))).ok();
    s.stop();
    println!("{out}");
}
