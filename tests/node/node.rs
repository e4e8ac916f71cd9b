//! A real single-node cluster for one test: `k3rs server` with its embedded agent, inside a
//! network namespace the test creates (the host's links, routes and iptables are never
//! touched), with its own data, run, log directories and cgroup root. Dropping it stops the
//! server, kills what it started (shims and containers, by PID and by cgroup), unmounts what
//! it mounted, removes its cgroups and the namespace. Needs root (CI is root).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const NODE_IP: &str = "10.250.0.1";

pub struct Node {
    pub dir: tempfile::TempDir,
    pub ns: String,
    pub port: u16,
    pub cgroup_root: String,
    pub name: String,
    child: Option<Child>,
    extra: Vec<String>,
}

fn rand_suffix() -> String {
    let mut b = [0u8; 4];
    let f = std::fs::File::open("/dev/urandom").unwrap();
    use std::io::Read;
    (&f).read_exact(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sh(cmd: &[&str]) -> Output {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn must(cmd: &[&str]) {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test images (built once per test binary by the project's script).
pub fn test_images() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("k3rs-test-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-test-images.sh");
        let out = Command::new("sh").arg(&script).arg(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "building test images: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

/// Runs a command inside a network namespace (setns in the child before exec).
pub fn in_netns(ns: &str, program: &str) -> Command {
    let mut c = Command::new(program);
    let path = format!("/run/netns/{ns}");
    // SAFETY: only async-signal-safe calls (open, setns, close) between fork and exec.
    unsafe {
        c.pre_exec(move || {
            let p = std::ffi::CString::new(path.clone()).unwrap();
            let fd = libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    c
}

fn free_port() -> u16 {
    // Inside a fresh namespace every port is free; pick one at random in a high range.
    20000 + (u16::from_str_radix(&rand_suffix()[..4], 16).unwrap() % 20000)
}

impl Node {
    pub fn start() -> Node {
        Node::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Node {
        let suffix = rand_suffix();
        let ns = format!("k3rs-n-{suffix}");
        must(&["ip", "netns", "add", &ns]);
        let dir = tempfile::Builder::new()
            .prefix("k3rs-node-")
            .tempdir()
            .unwrap();
        // From here on, Drop cleans up whatever fails.
        let mut n = Node {
            dir,
            ns: ns.clone(),
            port: free_port(),
            cgroup_root: format!("/k3rs-test-{suffix}"),
            name: "node1".into(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        // The node's own address, on one end of a veth pair inside the namespace.
        must(&[
            "ip", "-n", &ns, "link", "add", "node0", "type", "veth", "peer", "name", "node0p",
        ]);
        must(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "node0",
        ]);
        must(&["ip", "-n", &ns, "link", "set", "node0", "up"]);
        must(&["ip", "-n", &ns, "link", "set", "node0p", "up"]);
        let images = n.dir.path().join("data/agent/images");
        std::fs::create_dir_all(&images).unwrap();
        for e in std::fs::read_dir(test_images()).unwrap().flatten() {
            std::fs::copy(e.path(), images.join(e.file_name())).unwrap();
        }
        n.boot();
        n.wait_node_ready();
        n
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig.yaml")
    }

    /// Starts the server (again, on the same directories).
    pub fn boot(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = in_netns(&self.ns, env!("CARGO_BIN_EXE_k3rs"))
            .args([
                "server",
                "--config",
                "/dev/null",
                "--bind-address",
                "127.0.0.1",
            ])
            .arg("--https-listen-port")
            .arg(self.port.to_string())
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--write-kubeconfig")
            .arg(self.kubeconfig())
            .args(["--node-ip", NODE_IP, "--node-name", &self.name])
            // Test machines' disks may be nearly full: no pressure eviction or image GC
            // unless a test asks for it.
            .args([
                "--kubelet-arg",
                "eviction-hard=memory.available<1Mi,nodefs.available<1%",
                "--kubelet-arg",
                "image-gc-high-threshold=100",
            ])
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--pod-log-dir")
            .arg(self.log_dir())
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .arg("--private-registry")
            .arg(self.dir.path().join("registries.yaml"))
            .args(&self.extra)
            .env("K3RS_LOG", "info,k3rs=debug")
            .env("K3RS_SHIM_LOG", "info,libcontainer=debug,libcgroups=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting k3rs server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if self.kubeconfig().exists() {
                let out = self.kubectl(&["get", "--raw", "/readyz"]);
                if out.status.success() {
                    return;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("k3rs server exited early with {st}:\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "server not ready within 90s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_node_ready(&self) {
        self.wait_for("node Ready", Duration::from_secs(90), || {
            let out = self.kubectl(&[
                "get",
                "node",
                &self.name,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            String::from_utf8_lossy(&out.stdout).trim() == "True"
        });
    }

    /// SIGKILL of the server process (containers and shims keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the PID of our own unreaped child.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn cmd(&self, program: &str) -> Command {
        in_netns(&self.ns, program)
    }

    pub fn kubectl_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.cmd("kubectl");
        c.args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.dir.path())
            .env_remove("KUBECTL_KUBERC");
        c
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cmd(args).output().expect("running kubectl")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn apply(&self, yaml: &str) -> String {
        let mut child = self
            .kubectl_cmd(&["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(yaml.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl apply failed: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `kubectl get <what> -o jsonpath=<path>` (empty string when it fails).
    pub fn jsonpath(&self, what: &[&str], path: &str) -> String {
        let mut args: Vec<&str> = vec!["get"];
        args.extend_from_slice(what);
        let jp = format!("jsonpath={path}");
        args.extend_from_slice(&["-o", &jp]);
        let out = self.kubectl(&args);
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn pod_field(&self, pod: &str, path: &str) -> String {
        self.jsonpath(&["pod", pod], path)
    }

    /// Polls `cond` every 200 ms until it holds or `within` passes (then fails the test with
    /// the server log's tail and the pod list).
    pub fn wait_for(&self, what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        loop {
            if cond() {
                return;
            }
            if Instant::now() > deadline {
                let pods = self.kubectl(&["get", "pods", "-A", "-o", "wide"]);
                let logs = self.logs();
                let tail: String = logs
                    .lines()
                    .rev()
                    .take(80)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                panic!(
                    "timed out after {within:?} waiting for {what}\npods:\n{}\nserver log tail:\n{tail}",
                    String::from_utf8_lossy(&pods.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn wait_phase(&self, pod: &str, phase: &str, within: Duration) {
        self.wait_for(&format!("pod {pod} {phase}"), within, || {
            self.pod_field(pod, "{.status.phase}") == phase
        });
    }

    pub fn wait_ready(&self, pod: &str, within: Duration) {
        self.wait_for(&format!("pod {pod} Ready"), within, || {
            self.pod_field(pod, "{.status.conditions[?(@.type==\"Ready\")].status}") == "True"
        });
    }

    /// PIDs of the shims this node started.
    pub fn shim_pids(&self) -> Vec<i32> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.run_dir().join("pods")) {
            for e in rd.flatten() {
                if let Ok(s) = std::fs::read_to_string(e.path().join("shim.pid")) {
                    if let Ok(p) = s.trim().parse::<i32>() {
                        v.push(p);
                    }
                }
            }
        }
        v
    }

    /// Every process in this node's cgroups.
    pub fn cgroup_pids(&self) -> Vec<i32> {
        let mut v = Vec::new();
        for root in cgroup_dirs(&self.cgroup_root) {
            walk(&root, &mut |d| {
                if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
                    v.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
            });
        }
        v.sort();
        v.dedup();
        v
    }

    /// Mount points under this node's directories.
    pub fn mounts(&self) -> Vec<String> {
        let base = self.dir.path().to_string_lossy().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(String::from))
            .filter(|m| m.starts_with(&base))
            .collect()
    }

    /// Cgroup directories left under this node's cgroup root (any hierarchy).
    pub fn cgroups_left(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for root in cgroup_dirs(&self.cgroup_root) {
            walk(&root, &mut |d| {
                if d.join("pod").exists()
                    || d.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("pod"))
                {
                    v.push(d.to_path_buf());
                }
            });
        }
        v
    }

    /// Host-side veth interfaces in the node's namespace.
    pub fn veths(&self) -> Vec<String> {
        let out = self
            .cmd("ip")
            .args(["-o", "link", "show", "type", "veth"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                l.split(':')
                    .nth(1)
                    .map(|s| s.trim().split('@').next().unwrap_or("").to_string())
            })
            .filter(|n| n != "node0" && n != "node0p")
            .collect()
    }

    /// Fetches `http://<ip>:<port>/<path>` from inside the node's network namespace (a plain
    /// HTTP/1.0 GET from a thread that entered it); the body on a 200.
    pub fn fetch(&self, url: &str) -> Option<String> {
        let rest = url.strip_prefix("http://")?;
        let (hostport, path) = match rest.split_once('/') {
            Some((h, p)) => (h.to_string(), format!("/{p}")),
            None => (rest.to_string(), "/".to_string()),
        };
        let hostport = if hostport.contains(':') {
            hostport
        } else {
            format!("{hostport}:80")
        };
        let ns = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || -> Option<String> {
            use std::io::{Read, Write};
            let f = std::fs::File::open(&ns).ok()?;
            // SAFETY: setns on this short-lived thread only.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0
            {
                return None;
            }
            let addr: std::net::SocketAddr = hostport.parse().ok()?;
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").ok()?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).ok()?;
            let text = String::from_utf8_lossy(&buf).to_string();
            let (head, body) = text.split_once("\r\n\r\n")?;
            head.starts_with("HTTP/1.").then_some(())?;
            head.split_whitespace().nth(1).filter(|c| *c == "200")?;
            Some(body.to_string())
        })
        .join()
        .ok()
        .flatten()
    }
}

fn cgroup_dirs(root: &str) -> Vec<PathBuf> {
    let rel = root.trim_start_matches('/');
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in rd.flatten() {
            let p = e.path().join(rel);
            if p.is_dir() {
                v.push(p);
            }
        }
    }
    let unified = Path::new("/sys/fs/cgroup").join(rel);
    if unified.join("cgroup.procs").exists() && !v.contains(&unified) {
        v.push(unified);
    }
    v
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    f(dir);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), f);
            }
        }
    }
}

fn rmdir_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the shims said, for the failure report.
            if let Ok(rd) = std::fs::read_dir(self.run_dir().join("pods")) {
                for e in rd.flatten() {
                    let log =
                        std::fs::read_to_string(e.path().join("shim.log")).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(40).collect();
                    eprintln!(
                        "--- shim {} (last lines) ---\n{}",
                        e.file_name().to_string_lossy(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
        self.kill9();
        for pid in self.shim_pids() {
            // SAFETY: kill(2) on PIDs this node's shims recorded.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        for _ in 0..50 {
            let pids = self.cgroup_pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill(2) on processes inside this node's own cgroups.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut mounts = self.mounts();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let c = std::ffi::CString::new(m).unwrap();
            // SAFETY: unmounting a path under this test's own temporary directory.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
        for root in cgroup_dirs(&self.cgroup_root) {
            rmdir_tree(&root);
        }
        let _ = sh(&["ip", "netns", "del", &self.ns]);
    }
}
