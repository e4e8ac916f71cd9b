//! What the benchmarks share: a `k3rs server` process on a loopback port with its own data dir
//! (under `K3RS_BENCH_DIR`), its kubeconfig and RSS, hollow nodes, and figure formatting.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::{Client, Config};

pub struct Server {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    pub fn new() -> Server {
        let base = std::env::var_os("K3RS_BENCH_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&base).unwrap();
        Server {
            dir: tempfile::Builder::new()
                .prefix("k3rs-bench-")
                .tempdir_in(base)
                .unwrap(),
            port: free_port(),
            child: None,
        }
    }

    /// Starts the server and returns the time until /readyz answered 200.
    pub fn start(&mut self) -> Duration {
        let t = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_k3rs"))
            .args([
                "server",
                "--disable-agent",
                "--config",
                "/dev/null",
                "--bind-address",
                "127.0.0.1",
            ])
            .arg("--https-listen-port")
            .arg(self.port.to_string())
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--write-kubeconfig")
            .arg(self.dir.path().join("kubeconfig.yaml"))
            .env("K3RS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        // /readyz needs no credentials: poll it with a raw TLS client (no verification needed
        // for timing; the kubeconfig is written only after the server is ready anyway).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if readyz(self.port) {
                return t.elapsed();
            }
            assert!(Instant::now() < deadline, "server did not become ready");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's PID.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }

    pub fn rss(&self) -> u64 {
        rss_of(self.child.as_ref().unwrap().id())
    }

    pub async fn client(&self) -> Client {
        let kc =
            kube::config::Kubeconfig::read_from(self.dir.path().join("kubeconfig.yaml")).unwrap();
        let cfg = Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        Client::try_from(cfg).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A /readyz probe over TLS without certificate checks (only timing matters here).
pub fn readyz(port: u16) -> bool {
    let out = Command::new("curl")
        .args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("https://127.0.0.1:{port}/readyz"),
        ])
        .output();
    matches!(out, Ok(o) if o.stdout == b"200")
}

pub fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

impl Server {
    pub fn kubeconfig(&self) -> std::path::PathBuf {
        self.dir.path().join("kubeconfig.yaml")
    }

    /// Starts `k3rs hollow-nodes` (the test tool) against this server with `args`.
    pub fn hollow(&self, args: &[&str]) -> Hollow {
        let child = Command::new(env!("CARGO_BIN_EXE_k3rs"))
            .arg("hollow-nodes")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .env("K3RS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Hollow { child }
    }
}

/// A hollow-nodes process, killed by PID when dropped.
pub struct Hollow {
    child: Child,
}

impl Hollow {
    pub fn rss(&self) -> u64 {
        rss_of(self.child.id())
    }
}

impl Drop for Hollow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Seconds since `t` as a readable figure.
pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
