//! Streaming figures (issue 7), measured on the benchmark's node: `kubectl exec … -- true`
//! round trips against kubectl's own start, port-forward throughput against fetching the same
//! file from the pod IP, and `kubectl logs` of a 50 MiB log.

use std::process::Stdio;
use std::time::{Duration, Instant};

use super::node::Node;

const T: Duration = Duration::from_secs(120);

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn timed(mut c: std::process::Command) -> Duration {
    let t = Instant::now();
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

/// (bytes, seconds) of the median-throughput download among `n` curl runs.
fn curl_median(node: &Node, url: &str, n: usize) -> (f64, f64) {
    let mut runs: Vec<(f64, f64)> = (0..n).map(|_| curl(node, url)).collect();
    runs.sort_by(|a, b| (a.0 / a.1).total_cmp(&(b.0 / b.1)));
    runs[n / 2]
}

/// (bytes, seconds) of a curl download.
fn curl(n: &Node, url: &str) -> (f64, f64) {
    let out = n
        .cmd("curl")
        .args([
            "-sS",
            "--max-time",
            "120",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{time_total}",
            url,
        ])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    let mut it = s
        .split_whitespace()
        .map(|x| x.parse::<f64>().unwrap_or(0.0));
    (it.next().unwrap_or(0.0), it.next().unwrap_or(0.0))
}

pub struct Figures {
    pub exec: Duration,
    pub kubectl_start: Duration,
    pub kubectl_get: Duration,
    pub direct_mibs: f64,
    pub forwarded_mibs: f64,
    pub forwarded_spdy_mibs: f64,
    pub logs_bytes: f64,
    pub logs_time: Duration,
}

pub fn measure(n: &Node, quick: bool) -> Figures {
    let big = if quick { 20 } else { 100 };
    n.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: stream-bench}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "head -c {big}m /dev/zero > /w/big && httpd -p 8080 -h /w && echo ready && sleep 3600"]
    volumeMounts: [{{name: w, mountPath: /w}}]
  volumes:
  - name: w
    emptyDir: {{medium: Memory, sizeLimit: 200Mi}}
---
apiVersion: v1
kind: Pod
metadata: {{name: log-bench}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: log
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "yes 0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789 | head -c 50m; echo LOG-DONE; sleep 3600"]
"#
    ));
    n.wait_phase("stream-bench", "Running", T);
    n.wait_phase("log-bench", "Running", T);
    n.wait_for("the file to be served", T, || {
        n.ok(&["logs", "stream-bench"]).contains("ready")
    });
    // exec round trip vs. kubectl starting (and one API request).
    let rounds = if quick { 5 } else { 20 };
    let (mut exec, mut start, mut get) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        exec.push(timed(n.kubectl_cmd(&[
            "exec",
            "stream-bench",
            "--",
            "true",
        ])));
        start.push(timed(n.kubectl_cmd(&["version", "--client"])));
        get.push(timed(n.kubectl_cmd(&[
            "get",
            "pod",
            "stream-bench",
            "-o",
            "name",
        ])));
    }
    // Throughput: the pod IP directly, then through kubectl port-forward.
    let ip = n.pod_field("stream-bench", "{.status.podIP}");
    let url = |host: &str| format!("http://{host}/big");
    // Medians of 5 transfers each: one 100 MiB transfer lasts a fraction of a second.
    let (b1, t1) = curl_median(n, &url(&format!("{ip}:8080")), 5);
    let mut forwarded = Vec::new();
    for (websockets, port) in [("true", "28080"), ("false", "28081")] {
        let mut pf = n
            .kubectl_cmd(&["port-forward", "pod/stream-bench", &format!("{port}:8080")])
            .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", websockets)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        {
            use std::io::Read;
            let mut out = pf.stdout.take().unwrap();
            let mut seen = String::new();
            let mut buf = [0u8; 256];
            while !seen.contains("Forwarding from") {
                let k = out.read(&mut buf).unwrap_or(0);
                assert!(k > 0, "kubectl port-forward did not start");
                seen.push_str(&String::from_utf8_lossy(&buf[..k]));
            }
            // kubectl reports each connection on stdout: keep reading it.
            std::thread::spawn(move || while out.read(&mut buf).unwrap_or(0) > 0 {});
        }
        forwarded.push(curl_median(n, &url(&format!("127.0.0.1:{port}")), 5));
        let _ = pf.kill();
        let _ = pf.wait();
    }
    let (b2, t2) = forwarded[0];
    let (b3, t3) = forwarded[1];
    assert!(
        b1 > 0.0 && b2 == b1 && b3 == b1,
        "downloads: {b1} direct, {b2} forwarded over WebSocket, {b3} over SPDY"
    );
    // kubectl logs of the 50 MiB log, written out to /dev/null.
    n.wait_for("the log to be written", T, || {
        n.ok(&["logs", "log-bench", "--tail=1"])
            .trim()
            .ends_with("LOG-DONE")
    });
    let t = Instant::now();
    let out = n.kubectl_cmd(&["logs", "log-bench"]).output().unwrap();
    let logs_time = t.elapsed();
    assert!(out.status.success());
    let _ = n.kubectl(&["delete", "pod", "stream-bench", "log-bench", "--wait=false"]);
    Figures {
        exec: median(&mut exec),
        kubectl_start: median(&mut start),
        kubectl_get: median(&mut get),
        direct_mibs: b1 / t1 / 1048576.0,
        forwarded_mibs: b2 / t2 / 1048576.0,
        forwarded_spdy_mibs: b3 / t3 / 1048576.0,
        logs_bytes: out.stdout.len() as f64,
        logs_time,
    }
}

pub fn print(f: &Figures) {
    println!("\n### Streaming (issue 7)\n");
    println!("| figure | value | target |\n|---|---|---|");
    println!(
        "| `kubectl exec … -- true`, median | {:.1} ms | |",
        f.exec.as_secs_f64() * 1e3
    );
    println!(
        "| kubectl's own start (`version --client`) / one API request (`get pod`), median | {:.1} ms / {:.1} ms | |",
        f.kubectl_start.as_secs_f64() * 1e3,
        f.kubectl_get.as_secs_f64() * 1e3
    );
    println!(
        "| exec round trip beyond kubectl's start | {:.1} ms | ≤ 100 ms |",
        (f.exec.saturating_sub(f.kubectl_start)).as_secs_f64() * 1e3
    );
    println!(
        "| port-forward throughput (WebSocket, kubectl's default) / direct to the pod IP, medians of 5 | {:.0} MiB/s / {:.0} MiB/s (ratio {:.2}) | ratio ≥ 0.5 |",
        f.forwarded_mibs,
        f.direct_mibs,
        f.forwarded_mibs / f.direct_mibs
    );
    println!(
        "| port-forward throughput over SPDY (`KUBECTL_PORT_FORWARD_WEBSOCKETS=false`) | {:.0} MiB/s (ratio {:.2}) | |",
        f.forwarded_spdy_mibs,
        f.forwarded_spdy_mibs / f.direct_mibs
    );
    println!(
        "| `kubectl logs` of a 50 MiB log | {:.1} MiB in {:.2} s ({:.0} MiB/s) | |",
        f.logs_bytes / 1048576.0,
        f.logs_time.as_secs_f64(),
        f.logs_bytes / 1048576.0 / f.logs_time.as_secs_f64()
    );
}
