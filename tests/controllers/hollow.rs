//! Hollow nodes for a test: a `k3rs hollow-nodes` process (stopped by PID when dropped, which is
//! how a test loses its nodes), and polling helpers bounded in time.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::Cluster;

pub struct Hollow {
    child: Option<Child>,
}

impl Hollow {
    /// Starts hollow nodes named `names` with extra `k3rs hollow-nodes` flags (`--taint`,
    /// `--label`, `--cpu`, …) and waits until all are Ready.
    pub fn start(c: &Cluster, names: &[&str], args: &[&str]) -> Hollow {
        let log = std::fs::File::create(c.path().join(format!("hollow-{}.log", names.join("_"))))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_k3rs"))
            .arg("hollow-nodes")
            .arg("--kubeconfig")
            .arg(c.kubeconfig())
            .arg("--names")
            .arg(names.join(","))
            .args(args)
            .env("K3RS_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting k3rs hollow-nodes");
        let h = Hollow { child: Some(child) };
        for n in names {
            wait_for(
                c,
                &format!("node {n} Ready"),
                Duration::from_secs(30),
                || {
                    c.kubectl(&[
                        "get",
                        "node",
                        n,
                        "-o",
                        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                    ])
                    .stdout
                        == b"True"
                },
            );
        }
        h
    }

    /// Stops the hollow nodes (SIGKILL to the process by PID): they stop renewing and updating.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Hollow {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `cond` every 100 ms until it holds, failing the test after `timeout` with `what`.
pub fn wait_for(c: &Cluster, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() > deadline {
            let state = c.kubectl(&["get", "all,events", "-A", "-o", "wide"]);
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}\nserver log tail:\n{}",
                String::from_utf8_lossy(&state.stdout),
                tail(&c.logs(), 40)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `kubectl get … -o jsonpath=…` output (empty on error).
pub fn jsonpath(c: &Cluster, args: &[&str], path: &str) -> String {
    let mut a: Vec<&str> = vec!["get"];
    a.extend_from_slice(args);
    let jp = format!("jsonpath={path}");
    a.extend_from_slice(&["-o", &jp]);
    String::from_utf8_lossy(&c.kubectl(&a).stdout).into_owned()
}
