//! Node agent benchmark (`make bench`, needs root): a real single-node cluster (`k3rs server`
//! with its embedded agent) inside a network namespace this benchmark creates. Measures pod
//! startup latency (create → Running, image present) one pod at a time, 100 pods at once,
//! the server+agent's idle RSS and the shims' memory per pod; then the streaming figures
//! (exec round trip, port-forward throughput, `kubectl logs` of a 50 MiB log). Prints Markdown.
//!
//! `K3RS_BENCH_QUICK=1` runs a smaller version.

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams, WatchEvent, WatchParams};

#[path = "../tests/node/node.rs"]
#[allow(dead_code)]
mod node;

mod common;

#[path = "streaming/mod.rs"]
mod streaming;

use common::{mib, ms, pct, rss_of};

fn quick() -> bool {
    std::env::var_os("K3RS_BENCH_QUICK").is_some()
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"bench": "startup"}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "main", "image": "busybox", "imagePullPolicy": "IfNotPresent",
                            "command": ["sleep", "3600"]}],
        },
    }))
    .unwrap()
}

fn running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// Creates the pods and returns, per pod, the time from its create call to Running.
async fn start_pods(api: &Api<Pod>, names: &[String]) -> Vec<Duration> {
    let mut w = api
        .watch(&WatchParams::default().labels("bench=startup"), "0")
        .await
        .unwrap()
        .boxed();
    let mut started = std::collections::HashMap::new();
    let mut done = std::collections::HashMap::new();
    for n in names {
        started.insert(n.clone(), Instant::now());
        api.create(&PostParams::default(), &pod(n)).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while done.len() < names.len() {
        assert!(Instant::now() < deadline, "pods not running in time");
        let ev = tokio::time::timeout(Duration::from_secs(60), w.next())
            .await
            .expect("watch stalled")
            .expect("watch ended")
            .unwrap();
        if let WatchEvent::Added(p) | WatchEvent::Modified(p) = ev {
            let name = p.metadata.name.clone().unwrap_or_default();
            if running(&p) && !done.contains_key(&name) {
                if let Some(t) = started.get(&name) {
                    done.insert(name, t.elapsed());
                }
            }
        }
    }
    done.into_values().collect()
}

async fn delete_all(api: &Api<Pod>) {
    let _ = api
        .delete_collection(
            &DeleteParams::default().grace_period(0),
            &kube::api::ListParams::default().labels("bench=startup"),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !api
        .list(&kube::api::ListParams::default().labels("bench=startup"))
        .await
        .unwrap()
        .items
        .is_empty()
    {
        assert!(Instant::now() < deadline, "pods not deleted in time");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn shim_memory(n: &node::Node) -> (u64, u64, usize) {
    let pids = n.shim_pids();
    let (mut rss, mut pss) = (0, 0);
    for p in &pids {
        let s = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).unwrap_or_default();
        for l in s.lines() {
            let kb = |l: &str| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
                    * 1024
            };
            if l.starts_with("Rss:") {
                rss += kb(l);
            } else if l.starts_with("Pss:") {
                pss += kb(l);
            }
        }
    }
    (rss, pss, pids.len())
}

fn server_pid(n: &node::Node) -> u32 {
    // The server is the only k3rs process listening in the namespace; find it by its data dir.
    let want = n.data_dir().to_string_lossy().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(" server ") && cmd.contains(&want) {
            return pid;
        }
    }
    0
}

/// Container create+start+wait+delete through the shim against `runc run` of the same rootfs,
/// in the same run (N times each). Returns (ours per container, runc per container).
fn container_vs_runc(n: usize) -> Option<(Duration, Duration)> {
    use k3rs_runtime::images::ImageStore;
    use k3rs_runtime::shim::{ContainerConfig, ContainerState, SandboxConfig, ShimClient};
    let dir = tempfile::tempdir().ok()?;
    let store = ImageStore::open(&dir.path().join("content")).ok()?;
    let imgs = store
        .import_archive(&node::test_images().join("busybox.tar"))
        .ok()?;
    let layers = store.layer_dirs(&imgs[0]).ok()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let cg = format!("/k3rs-bench-{}", std::process::id());
    let ours = rt.block_on(async {
        let sb = SandboxConfig {
            pod_uid: "bench".into(),
            hostname: "bench".into(),
            cgroup_parent: format!("{cg}/podbench"),
            state_dir: dir.path().join("state"),
            ..Default::default()
        };
        let shim = ShimClient::start(
            std::path::Path::new(env!("CARGO_BIN_EXE_k3rs")),
            &dir.path().join("shim"),
            &sb,
        )
        .await
        .ok()?;
        let t = Instant::now();
        for i in 0..n {
            let cfg = ContainerConfig {
                name: "c".into(),
                attempt: i as u32,
                layers: layers.clone(),
                args: vec!["true".into()],
                env: vec![],
                cwd: "/".into(),
                uid: None,
                gid: None,
                image_user: String::new(),
                supplemental_gids: vec![],
                mounts: vec![],
                privileged: false,
                cap_add: vec![],
                cap_drop: vec![],
                no_new_privs: false,
                read_only_rootfs: false,
                seccomp_default: false,
                cpu_shares: 2,
                cpu_quota: None,
                cpu_period: 100_000,
                memory_limit: None,
                stdin: false,
                tty: false,
                log_path: dir.path().join(format!("logs/{i}.log")),
                annotations: Default::default(),
                ..Default::default()
            };
            shim.run_container(&cfg).await.ok()?;
            loop {
                let l = shim.list().await.ok()?;
                if l.iter()
                    .any(|c| c.attempt == i as u32 && c.state == ContainerState::Exited)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            shim.remove_container("c", i as u32).await.ok()?;
        }
        let d = t.elapsed() / n as u32;
        let _ = shim.shutdown().await;
        Some(d)
    })?;
    // runc on the same unpacked layer as a read-only rootfs.
    let bundle = dir.path().join("runc");
    std::fs::create_dir_all(&bundle).ok()?;
    let out = std::process::Command::new("runc")
        .arg("spec")
        .current_dir(&bundle)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).ok()?).ok()?;
    spec["process"]["terminal"] = serde_json::json!(false);
    spec["process"]["args"] = serde_json::json!(["true"]);
    spec["root"] = serde_json::json!({"path": layers[0], "readonly": true});
    spec["linux"]["cgroupsPath"] = serde_json::json!(format!("{cg}/runc"));
    spec["process"].as_object_mut()?.remove("rlimits");
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&spec).ok()?).ok()?;
    let t = Instant::now();
    for i in 0..n {
        let st = std::process::Command::new("runc")
            .args(["--root"])
            .arg(dir.path().join("runc-state"))
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("bench-{i}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        if !st.success() {
            return None;
        }
    }
    let runc = t.elapsed() / n as u32;
    for d in [
        "cpu", "memory", "pids", "cpuset", "cpuacct", "devices", "freezer", "blkio", "unified",
        "systemd",
    ] {
        let p = std::path::Path::new("/sys/fs/cgroup")
            .join(d)
            .join(cg.trim_start_matches('/'));
        let _ = std::fs::remove_dir(p.join("runc"));
        let _ = std::fs::remove_dir(p.join("podbench"));
        let _ = std::fs::remove_dir(p);
    }
    Some((ours, runc))
}

fn main() {
    let quick = quick();
    let versus = container_vs_runc(if quick { 5 } else { 20 });
    // Logs kept whole up to 100 MiB, for the `kubectl logs` figure.
    let n = node::Node::start_with(&["--kubelet-arg=container-log-max-size=100Mi"]);
    // Enter the node's network namespace before any thread starts, so the client reaches the
    // server on its loopback.
    let f = std::fs::File::open(format!("/run/netns/{}", n.ns)).unwrap();
    // SAFETY: setns on the only thread of this process, with a namespace file we opened.
    assert_eq!(
        unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) },
        0
    );
    if std::env::var("K3RS_BENCH_ONLY").as_deref() == Ok("streaming") {
        // Only the streaming figures (for working on them).
        streaming::print(&streaming::measure(&n, quick));
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pid = server_pid(&n);
    std::thread::sleep(Duration::from_secs(3));
    let idle_rss = rss_of(pid);
    let kubeconfig = n.kubeconfig();
    let (one, burst, burst_n, burst_time) = rt.block_on(async move {
        let cfg = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap();
        let client = kube::Client::try_from(cfg).unwrap();
        let api: Api<Pod> = Api::namespaced(client, "default");
        // Warm-up: the first pod pays for unpacking the image's layer.
        start_pods(&api, &["warmup".to_string()]).await;
        delete_all(&api).await;
        let count = if quick { 10 } else { 50 };
        let mut one = Vec::new();
        for i in 0..count {
            let name = format!("one-{i}");
            one.extend(start_pods(&api, &[name]).await);
        }
        delete_all(&api).await;
        let burst_n = if quick { 30 } else { 100 };
        let names: Vec<String> = (0..burst_n).map(|i| format!("burst-{i}")).collect();
        let t = Instant::now();
        let burst = start_pods(&api, &names).await;
        let burst_time = t.elapsed();
        (one, burst, burst_n, burst_time)
    });
    let (shim_rss, shim_pss, shims) = shim_memory(&n);
    let loaded_rss = rss_of(pid);
    rt.block_on(async {
        let cfg = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(n.kubeconfig()).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap();
        let api: Api<Pod> = Api::namespaced(kube::Client::try_from(cfg).unwrap(), "default");
        delete_all(&api).await;
    });
    let stream_figures = streaming::measure(&n, quick);
    let mut one = one;
    let mut burst = burst;
    println!("### Node agent (issue 6)\n");
    println!("| figure | value | target |\n|---|---|---|");
    println!(
        "| pod startup, one at a time (n={}), p50 | {} | ≤ 150 ms |",
        one.len(),
        ms(pct(&mut one, 0.5))
    );
    println!(
        "| pod startup, one at a time, p99 | {} | ≤ 400 ms |",
        ms(pct(&mut one, 0.99))
    );
    println!(
        "| {burst_n} pods at once: all Running in | {:.2} s ({:.1} pods/s) | ≥ 30 pods/s |",
        burst_time.as_secs_f64(),
        burst_n as f64 / burst_time.as_secs_f64()
    );
    println!(
        "| {burst_n} pods at once: p50 / p99 startup | {} / {} | |",
        ms(pct(&mut burst, 0.5)),
        ms(pct(&mut burst, 0.99))
    );
    println!(
        "| server + agent idle RSS (no pods) | {} | ≤ 64 MB |",
        mib(idle_rss)
    );
    println!(
        "| server + agent RSS with {shims} pods | {} | |",
        mib(loaded_rss)
    );
    match versus {
        Some((ours, runc)) => println!(
            "| container create+start+wait+delete: k3rs shim / `runc run` | {} / {} (ratio {:.2}) | ratio ≤ 0.5 |",
            ms(ours),
            ms(runc),
            ours.as_secs_f64() / runc.as_secs_f64()
        ),
        None => println!("| container create+start+delete vs runc | not measured (runc missing or failed) | |"),
    }
    if shims > 0 {
        println!(
            "| shim memory per pod: RSS / PSS | {} / {} | ≤ 2 MB |",
            mib(shim_rss / shims as u64),
            mib(shim_pss / shims as u64)
        );
    }
    streaming::print(&stream_figures);
}
