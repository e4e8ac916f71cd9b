//! The per-pod shim for real: containers from a busybox layer through libcontainer, the
//! sandbox's namespaces, CRI logs, exit codes and OOM kills, kill, exec, adoption by a fresh
//! client and a shutdown that leaves nothing behind.
//!
//! Needs root (namespaces, overlay mounts, cgroups), as CI runs it. Every test has its own
//! shim, temp dirs and cgroup parent (`/k3rs-test/<random>`), removed by a guard even when the
//! test fails.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k3rs_runtime::shim::{
    ContainerConfig, ContainerState, ContainerStatus, Mount, SandboxConfig, ShimClient,
};

const T: Duration = Duration::from_secs(30);

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A one-layer image: busybox with its applets, /etc/passwd and /etc/group, /tmp.
fn busybox_layer(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static in /bin/busybox");
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    for d in ["etc", "tmp", "www"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::set_permissions(
        dir.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1001::/tmp:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("etc/group"),
        "root:x:0:\nweb:x:1001:\nstaff:x:50:\n",
    )
    .unwrap();
    std::fs::write(dir.join("www/index.html"), "hello from the server\n").unwrap();
}

/// One pod: its shim, dirs and cgroup parent. Dropping it shuts the shim down and removes
/// whatever is left (mounts, cgroups, the shim process, temp dirs).
struct Pod {
    root: tempfile::TempDir,
    dir: PathBuf,
    sandbox: SandboxConfig,
    shim: ShimClient,
    shim_pid: i32,
}

fn sandbox_config(root: &Path) -> SandboxConfig {
    let uid = random_hex(8);
    SandboxConfig {
        pod_uid: uid.clone(),
        hostname: "web-0".into(),
        host_network: false,
        host_ipc: false,
        host_pid: false,
        share_pid: false,
        cgroup_parent: format!("/k3rs-test/{}", random_hex(6)),
        state_dir: root.join("data/containers").join(&uid),
        cpu_shares: None,
        cpu_quota: None,
        memory_limit: None,
    }
}

impl Pod {
    async fn start() -> Pod {
        Pod::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut SandboxConfig)) -> Pod {
        let root = tempfile::tempdir().unwrap();
        busybox_layer(&root.path().join("layer"));
        let mut sandbox = sandbox_config(root.path());
        adjust(&mut sandbox);
        let dir = root.path().join("run/pods").join(&sandbox.pod_uid);
        let shim = ShimClient::start(
            Path::new(env!("CARGO_BIN_EXE_k3rs-runtime-shim")),
            &dir,
            &sandbox,
        )
        .await
        .expect("the shim starts");
        let shim_pid = shim.sandbox().await.unwrap().shim_pid;
        Pod {
            root,
            dir,
            sandbox,
            shim,
            shim_pid,
        }
    }

    fn log_path(&self, name: &str, attempt: u32) -> PathBuf {
        self.root
            .path()
            .join("logs")
            .join(format!("default_p_{}", self.sandbox.pod_uid))
            .join(name)
            .join(format!("{attempt}.log"))
    }

    fn container(&self, name: &str, script: &str) -> ContainerConfig {
        ContainerConfig {
            name: name.into(),
            attempt: 0,
            layers: vec![self.root.path().join("layer")],
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["GREETING=hi".into()],
            cwd: "/".into(),
            uid: None,
            gid: None,
            image_user: String::new(),
            supplemental_gids: vec![],
            mounts: vec![],
            privileged: false,
            cap_add: vec![],
            cap_drop: vec![],
            no_new_privs: true,
            read_only_rootfs: false,
            seccomp_default: true,
            cpu_shares: 2,
            cpu_quota: None,
            cpu_period: 100_000,
            memory_limit: None,
            stdin: false,
            tty: false,
            log_path: self.log_path(name, 0),
            annotations: [("k".to_string(), "v".to_string())].into(),
            ..Default::default()
        }
    }

    async fn status(&self, name: &str, attempt: u32) -> ContainerStatus {
        self.shim
            .list()
            .await
            .unwrap()
            .into_iter()
            .find(|c| c.name == name && c.attempt == attempt)
            .unwrap_or_else(|| panic!("no container {name} attempt {attempt}"))
    }

    async fn wait_exited(&self, name: &str) -> ContainerStatus {
        let deadline = Instant::now() + T;
        loop {
            let st = self.status(name, 0).await;
            if st.state == ContainerState::Exited {
                return st;
            }
            assert!(Instant::now() < deadline, "{name} still running: {st:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the container's log has a line containing `text`; returns the log.
    async fn wait_log(&self, name: &str, text: &str) -> String {
        let deadline = Instant::now() + T;
        loop {
            let log = std::fs::read_to_string(self.log_path(name, 0)).unwrap_or_default();
            if log.contains(text) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the log of {name}: {log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The container's cgroup directory in the hierarchy of `controller` (v1) or the unified one.
    fn cgroup_dir(&self, controller: &str, id: &str) -> PathBuf {
        let rel = format!(
            "{}/{id}",
            self.sandbox.cgroup_parent.trim_start_matches('/')
        );
        if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            Path::new("/sys/fs/cgroup").join(rel)
        } else {
            Path::new("/sys/fs/cgroup").join(controller).join(rel)
        }
    }
}

fn alive(pid: i32) -> bool {
    // Zombies count as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn wait_gone(pid: i32) -> bool {
    let deadline = Instant::now() + T;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Mount points under `dir` (from /proc/self/mountinfo).
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&prefix))
        .collect()
}

/// Every hierarchy's directory of a cgroup path that exists.
fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    let rel = rel.trim_start_matches('/');
    let mut v = Vec::new();
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        v.push(Path::new("/sys/fs/cgroup").join(rel));
    } else if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        v.extend(rd.flatten().map(|e| e.path().join(rel)));
    }
    v.retain(|p| p.is_dir());
    v
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

impl Drop for Pod {
    fn drop(&mut self) {
        // Synchronous shutdown over the socket (no runtime here), then whatever is left.
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(self.dir.join("shim.sock")) {
            let _ = s.set_read_timeout(Some(T));
            let _ = s.write_all(b"{\"op\":\"shutdown\"}\n");
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
        }
        if alive(self.shim_pid) {
            // SAFETY: killing the shim this test started, by its pid.
            unsafe {
                libc::kill(self.shim_pid, libc::SIGKILL);
            }
        }
        let mut left = mounts_under(self.root.path());
        left.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in left {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: unmounting a mount under this test's own temp dir.
                unsafe {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
        for d in cgroup_dirs(&self.sandbox.cgroup_parent) {
            for p in std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.parse::<i32>().ok())
            {
                // SAFETY: killing a process left in this test's own cgroup.
                unsafe {
                    libc::kill(p, libc::SIGKILL);
                }
            }
        }
        for d in cgroup_dirs(&self.sandbox.cgroup_parent) {
            rmdir_tree(&d);
        }
        // The shared parent goes when the last test is done with it.
        for d in cgroup_dirs("/k3rs-test") {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn cri_lines<'a>(log: &'a str, stream: &str) -> Vec<(&'a str, &'a str)> {
    log.lines()
        .filter_map(|l| {
            let mut it = l.splitn(4, ' ');
            let ts = it.next()?;
            assert!(
                ts.len() == 30 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
                "timestamp {ts:?} is RFC 3339 with nanoseconds"
            );
            (it.next()? == stream).then_some(())?;
            Some((it.next()?, it.next().unwrap_or("")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_exit_code_and_output_are_recorded_in_status_and_cri_log() {
    let pod = Pod::start().await;
    let st = pod
        .shim
        .run_container(&pod.container(
            "main",
            "echo $GREETING from $(hostname); echo oops >&2; exit 3",
        ))
        .await
        .unwrap();
    assert_eq!(st.id.len(), 64, "the id is 64 hex digits: {}", st.id);
    assert!(st.started_at.is_some() && st.pid.is_some());
    let st = pod.wait_exited("main").await;
    assert_eq!(st.exit_code, Some(3));
    assert_eq!(st.reason.as_deref(), Some("Error"));
    assert!(st.finished_at.is_some());
    assert_eq!(st.annotations.get("k").map(String::as_str), Some("v"));
    let log = pod.wait_log("main", "oops").await;
    assert_eq!(cri_lines(&log, "stdout"), [("F", "hi from web-0")]);
    assert_eq!(cri_lines(&log, "stderr"), [("F", "oops")]);
    // The statuses are on disk too, for anyone asking after a daemon restart.
    let state = std::fs::read_to_string(pod.dir.join("state.json")).unwrap();
    assert!(state.contains(&st.id), "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_ends_when_its_reader_does_as_sigpipe_is_at_its_default() {
    let pod = Pod::start().await;
    pod.shim
        .run_container(&pod.container(
            "main",
            "yes 0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789 | head -c 5m; echo pipeline-done",
        ))
        .await
        .unwrap();
    let st = pod.wait_exited("main").await;
    assert_eq!(st.exit_code, Some(0));
    // `yes` died of SIGPIPE once `head` had its 5 MiB; the shell went on.
    let log = pod.wait_log("main", "pipeline-done").await;
    assert!(log.len() > 5 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_exit_is_completed() {
    let pod = Pod::start().await;
    pod.shim
        .run_container(&pod.container("main", "true"))
        .await
        .unwrap();
    let st = pod.wait_exited("main").await;
    assert_eq!(
        (st.exit_code, st.reason.as_deref()),
        (Some(0), Some("Completed"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_of_a_pod_share_localhost_and_the_hostname() {
    let pod = Pod::start().await;
    pod.shim
        .run_container(&pod.container("server", "exec httpd -f -p 127.0.0.1:8080 -h /www"))
        .await
        .unwrap();
    // The client retries (bounded) until the server listens.
    pod.shim
        .run_container(&pod.container(
            "client",
            "for i in $(seq 1 100); do wget -q -O - http://127.0.0.1:8080/ && exit 0; sleep 0.1; done; exit 1",
        ))
        .await
        .unwrap();
    let st = pod.wait_exited("client").await;
    let log = std::fs::read_to_string(pod.log_path("client", 0)).unwrap();
    assert_eq!(st.exit_code, Some(0), "{log}");
    assert!(log.contains("stdout F hello from the server"), "{log}");
    // The sandbox's network namespace is the one the containers are in.
    let netns = pod.shim.sandbox().await.unwrap().netns.unwrap();
    let server_pid = pod.status("server", 0).await.pid.unwrap();
    assert_eq!(
        std::fs::metadata(&netns)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap(),
        std::fs::metadata(format!("/proc/{server_pid}/ns/net"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_delivers_sigterm_to_a_trap_and_sigkill_ends_anything() {
    let pod = Pod::start().await;
    pod.shim
        .run_container(&pod.container(
            "polite",
            "trap 'echo got TERM; exit 7' TERM; echo ready; while true; do sleep 0.1; done",
        ))
        .await
        .unwrap();
    pod.wait_log("polite", "ready").await;
    pod.shim.kill("polite", libc::SIGTERM).await.unwrap();
    let st = pod.wait_exited("polite").await;
    assert_eq!(st.exit_code, Some(7));
    pod.wait_log("polite", "stdout F got TERM").await;

    // PID 1 of its namespace ignores SIGTERM without a handler; SIGKILL still ends it.
    let st = pod
        .shim
        .run_container(&pod.container("stubborn", "exec sleep 1000"))
        .await
        .unwrap();
    let pid = st.pid.unwrap();
    pod.shim.kill("stubborn", libc::SIGKILL).await.unwrap();
    let st = pod.wait_exited("stubborn").await;
    assert_eq!(st.exit_code, Some(137));
    assert_eq!(st.reason.as_deref(), Some("Error"));
    assert!(wait_gone(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_over_its_limit_is_oom_killed() {
    let pod = Pod::start().await;
    let mut c = pod.container(
        "hog",
        "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
    );
    c.memory_limit = Some(20 << 20);
    pod.shim.run_container(&c).await.unwrap();
    let st = pod.wait_exited("hog").await;
    assert_eq!(st.reason.as_deref(), Some("OOMKilled"), "{st:?}");
    assert_eq!(st.exit_code, Some(137));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_and_memory_limits_land_in_the_container_and_pod_cgroups() {
    let pod = Pod::start_with(|s| {
        s.cpu_shares = Some(1024);
        s.cpu_quota = Some(150_000);
        s.memory_limit = Some(96 << 20);
    })
    .await;
    let mut c = pod.container("main", "exec sleep 1000");
    c.cpu_quota = Some(50_000);
    c.cpu_shares = 512;
    c.memory_limit = Some(64 << 20);
    let st = pod.shim.run_container(&c).await.unwrap();
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let read = |controller: &str, file: &str| {
        std::fs::read_to_string(pod.cgroup_dir(controller, &st.id).join(file))
            .unwrap_or_else(|e| panic!("{controller}/{file}: {e}"))
            .trim()
            .to_string()
    };
    if v2 {
        assert_eq!(read("", "cpu.max"), "50000 100000");
        assert_eq!(read("", "memory.max"), (64u64 << 20).to_string());
    } else {
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), "50000");
        assert_eq!(read("cpu", "cpu.cfs_period_us"), "100000");
        assert_eq!(read("cpu", "cpu.shares"), "512");
        assert_eq!(
            read("memory", "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
    }
    // The pod's own limits, on the container cgroups' parent.
    let pod_dir = |controller: &str| {
        let rel = pod.sandbox.cgroup_parent.trim_start_matches('/');
        if v2 {
            Path::new("/sys/fs/cgroup").join(rel)
        } else {
            Path::new("/sys/fs/cgroup").join(controller).join(rel)
        }
    };
    let read_pod = |controller: &str, file: &str| {
        std::fs::read_to_string(pod_dir(controller).join(file))
            .unwrap_or_else(|e| panic!("pod {controller}/{file}: {e}"))
            .trim()
            .to_string()
    };
    if v2 {
        assert_eq!(read_pod("", "cpu.max"), "150000 100000");
        assert_eq!(read_pod("", "cpu.weight"), "39");
        assert_eq!(read_pod("", "memory.max"), (96u64 << 20).to_string());
    } else {
        assert_eq!(read_pod("cpu", "cpu.cfs_quota_us"), "150000");
        assert_eq!(read_pod("cpu", "cpu.shares"), "1024");
        assert_eq!(
            read_pod("memory", "memory.limit_in_bytes"),
            (96u64 << 20).to_string()
        );
    }
    // The container's process is in that cgroup.
    let procs = read(if v2 { "" } else { "memory" }, "cgroup.procs");
    assert!(
        procs.lines().any(|l| l == st.pid.unwrap().to_string()),
        "{procs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shim_outlives_its_client_and_a_new_client_adopts_the_running_container() {
    let pod = Pod::start().await;
    let st = pod
        .shim
        .run_container(&pod.container("main", "exec sleep 1000"))
        .await
        .unwrap();
    let shims = k3rs_runtime::shim::list_shims(&pod.root.path().join("run/pods"));
    assert_eq!(shims, [(pod.sandbox.pod_uid.clone(), pod.dir.clone())]);
    // A new client, as a restarted daemon would make.
    let again = ShimClient::connect(&pod.dir).await.unwrap();
    assert_eq!(again.sandbox().await.unwrap().shim_pid, pod.shim_pid);
    let list = again.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, st.id);
    assert_eq!(list[0].pid, st.pid);
    assert_eq!(list[0].state, ContainerState::Running);
    assert!(alive(st.pid.unwrap()));
    // No shim, no adoption.
    assert!(
        ShimClient::connect(&pod.root.path().join("run/pods/nosuch"))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_returns_output_and_exit_code_and_times_out() {
    let pod = Pod::start().await;
    let mut c = pod.container("main", "echo $$ > /tmp/pid; exec sleep 1000");
    c.image_user = "web".into();
    c.cwd = "/www".into();
    pod.shim.run_container(&c).await.unwrap();
    let argv = |s: &str| vec!["sh".to_string(), "-c".to_string(), s.to_string()];
    // Bounded wait for the pid file (the container has just started).
    let deadline = Instant::now() + T;
    while !pod
        .shim
        .exec("main", &argv("test -s /tmp/pid"), T)
        .await
        .is_ok_and(|r| r.exit_code == 0)
    {
        assert!(Instant::now() < deadline, "no /tmp/pid");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The exec'd process is the container's: its namespaces, user, env and cwd.
    let r = pod
        .shim
        .exec(
            "main",
            &argv("cat /tmp/pid; hostname; id -u; echo $GREETING; pwd; echo err >&2; exit 5"),
            T,
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 5);
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "1\nweb-0\n1000\nhi\n/www\n"
    );
    assert_eq!(String::from_utf8_lossy(&r.stderr), "err\n");
    assert!(!r.timed_out);

    // The loop keeps serving while an exec is pending.
    let started = Instant::now();
    let slow = tokio::spawn({
        let shim = pod.shim.clone();
        async move {
            shim.exec(
                "main",
                &["sleep".into(), "30".into()],
                Duration::from_secs(2),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pod.shim.list().await.unwrap().len(), 1);
    let r = slow.await.unwrap().unwrap();
    assert!(r.timed_out);
    assert!(started.elapsed() < Duration::from_secs(20));
    // The container itself is untouched.
    assert_eq!(pod.status("main", 0).await.state, ContainerState::Running);

    assert!(pod.shim.exec("nosuch", &argv("true"), T).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_cannot_start_is_a_start_error() {
    let pod = Pod::start().await;
    let mut c = pod.container("main", "");
    c.args = vec!["/no/such/binary".into()];
    let st = pod.shim.run_container(&c).await.unwrap();
    assert_eq!(st.state, ContainerState::Exited);
    assert_eq!(st.exit_code, Some(128));
    assert_eq!(st.reason.as_deref(), Some("StartError"));
    assert!(st.message.as_deref().is_some_and(|m| !m.is_empty()));
    // Its rootfs is not left mounted.
    assert!(
        mounts_under(&pod.sandbox.state_dir).is_empty(),
        "{:?}",
        mounts_under(&pod.sandbox.state_dir)
    );
    // A later attempt of the same name runs.
    let mut c = pod.container("main", "exit 0");
    c.attempt = 1;
    let st = pod.shim.run_container(&c).await.unwrap();
    assert_eq!(st.attempt, 1);
    assert_eq!(pod.shim.list().await.unwrap().len(), 2);
    pod.shim.remove_container("main", 0).await.unwrap();
    let list = pod.shim.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].attempt, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_line_is_split_with_partial_tags() {
    let pod = Pod::start().await;
    pod.shim
        .run_container(&pod.container(
            "main",
            "head -c 20480 /dev/zero | tr '\\0' x; echo; echo short",
        ))
        .await
        .unwrap();
    pod.wait_exited("main").await;
    let log = pod.wait_log("main", "stdout F short").await;
    let lines = cri_lines(&log, "stdout");
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0].0, "P");
    assert_eq!(lines[1].0, "F");
    assert_eq!(lines[0].1.len() + lines[1].1.len(), 20480);
    assert!(lines[0].1.len() <= 16 * 1024);
    assert!(lines[0]
        .1
        .bytes()
        .chain(lines[1].1.bytes())
        .all(|b| b == b'x'));
    assert_eq!(lines[2], ("F", "short"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_mounts_and_read_only_rootfs_apply() {
    let pod = Pod::start().await;
    let vol = pod.root.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("data"), "from the host\n").unwrap();
    let mut c = pod.container(
        "main",
        "id -u; id -g; cat /vol/data; touch /x 2>/dev/null && echo rootfs-writable; touch /vol/y 2>/dev/null && echo vol-writable; touch /rw/z && echo rw-ok",
    );
    c.image_user = "web".into();
    c.read_only_rootfs = true;
    c.mounts = vec![
        Mount {
            source: vol.clone(),
            destination: "/vol".into(),
            read_only: true,
        },
        Mount {
            source: pod.root.path().join("rw"),
            destination: "/rw".into(),
            read_only: false,
        },
    ];
    std::fs::create_dir_all(pod.root.path().join("rw")).unwrap();
    std::fs::set_permissions(
        pod.root.path().join("rw"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    pod.shim.run_container(&c).await.unwrap();
    let st = pod.wait_exited("main").await;
    let log = std::fs::read_to_string(pod.log_path("main", 0)).unwrap();
    let out: Vec<&str> = cri_lines(&log, "stdout").into_iter().map(|l| l.1).collect();
    assert_eq!(out, ["1000", "1001", "from the host", "rw-ok"], "{log}");
    assert_eq!(st.exit_code, Some(0));
    assert!(pod.root.path().join("rw/z").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_pid_puts_the_pods_containers_in_one_pid_namespace() {
    let pod = Pod::start_with(|s| s.share_pid = true).await;
    pod.shim
        .run_container(&pod.container("sleeper", "exec sleep 777"))
        .await
        .unwrap();
    pod.shim
        .run_container(&pod.container(
            "looker",
            "for i in $(seq 1 100); do ps -o args | grep -q '^sleep 777' && exit 0; sleep 0.1; done; exit 1",
        ))
        .await
        .unwrap();
    let st = pod.wait_exited("looker").await;
    assert_eq!(
        st.exit_code,
        Some(0),
        "the other container's process is visible"
    );
    // Without share_pid each container has its own.
    let alone = Pod::start().await;
    alone
        .shim
        .run_container(&alone.container("sleeper", "exec sleep 777"))
        .await
        .unwrap();
    alone
        .shim
        .run_container(&alone.container("looker", "ps -o args | grep -q '^sleep 777'"))
        .await
        .unwrap();
    assert_eq!(alone.wait_exited("looker").await.exit_code, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_no_mount_cgroup_process_or_directory() {
    let pod = Pod::start_with(|s| s.share_pid = true).await;
    let running = pod
        .shim
        .run_container(&pod.container("main", "exec sleep 1000"))
        .await
        .unwrap();
    pod.shim
        .run_container(&pod.container("done", "exit 0"))
        .await
        .unwrap();
    pod.wait_exited("done").await;
    assert!(!mounts_under(pod.root.path()).is_empty());
    assert!(!cgroup_dirs(&pod.sandbox.cgroup_parent).is_empty());
    pod.shim.shutdown().await.unwrap();
    assert!(wait_gone(pod.shim_pid), "the shim exits");
    assert!(wait_gone(running.pid.unwrap()), "the container is killed");
    assert_eq!(mounts_under(pod.root.path()), Vec::<String>::new());
    assert_eq!(
        cgroup_dirs(&pod.sandbox.cgroup_parent),
        Vec::<PathBuf>::new()
    );
    assert!(!pod.dir.exists(), "the pod dir is removed");
    assert!(!pod.sandbox.state_dir.exists(), "the state dir is removed");
    // The log stays.
    assert!(pod.log_path("done", 0).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_seccomp_profile_applies_with_and_without_no_new_privs() {
    let pod = Pod::start().await;
    let cases = [
        // (name, no_new_privs, seccomp_default, privileged, expected Seccomp mode)
        (
            "nnp",
            true,
            true,
            false,
            if cfg!(feature = "seccomp") { 2 } else { 0 },
        ),
        (
            "privs",
            false,
            true,
            false,
            if cfg!(feature = "seccomp") { 2 } else { 0 },
        ),
        ("unconfined", false, false, false, 0),
        ("privileged", false, true, true, 0),
    ];
    for (name, nnp, seccomp, privileged, _) in cases {
        let mut c = pod.container(name, "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status");
        c.no_new_privs = nnp;
        c.seccomp_default = seccomp;
        c.privileged = privileged;
        pod.shim.run_container(&c).await.unwrap();
    }
    for (name, nnp, _, _, mode) in cases {
        let st = pod.wait_exited(name).await;
        assert_eq!(st.exit_code, Some(0), "{name}: {st:?}");
        let log = pod.wait_log(name, "Seccomp:").await;
        let out: Vec<String> = cri_lines(&log, "stdout")
            .into_iter()
            .map(|l| l.1.replace('\t', " "))
            .collect();
        assert_eq!(
            out,
            [
                format!("NoNewPrivs: {}", nnp as u8),
                format!("Seccomp: {mode}")
            ],
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_are_the_default_set_or_everything_the_node_has_when_privileged() {
    let pod = Pod::start().await;
    let script = "grep '^CapEff:' /proc/self/status";
    pod.shim
        .run_container(&pod.container("default", script))
        .await
        .unwrap();
    let mut c = pod.container(
        "privileged",
        "grep '^CapEff:' /proc/self/status; test -c /dev/kmsg && echo host-devices",
    );
    c.privileged = true;
    pod.shim.run_container(&c).await.unwrap();
    let mut c = pod.container("dropped", script);
    c.cap_drop = vec!["ALL".into()];
    c.cap_add = vec!["CAP_NET_ADMIN".into()];
    pod.shim.run_container(&c).await.unwrap();
    let ours = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:").map(|v| v.trim().to_string()))
        .unwrap();
    for (name, want) in [
        // containerd's (and Docker's) default set.
        ("default", "00000000a80425fb".to_string()),
        ("privileged", ours),
        ("dropped", format!("{:016x}", 1u64 << 12)),
    ] {
        let st = pod.wait_exited(name).await;
        assert_eq!(st.exit_code, Some(0), "{name}: {st:?}");
        let log = pod.wait_log(name, "CapEff").await;
        let mut lines = cri_lines(&log, "stdout");
        if name == "privileged" && Path::new("/dev/kmsg").exists() {
            // The node's devices are there too.
            assert_eq!(lines.pop(), Some(("F", "host-devices")), "{log}");
        }
        assert_eq!(
            lines,
            [("F", format!("CapEff:\t{want}").as_str())],
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_of_a_pod_share_dev_shm_and_see_their_own_cgroup() {
    let pod = Pod::start().await;
    pod.shim
        .run_container(&pod.container("writer", "echo shared > /dev/shm/note"))
        .await
        .unwrap();
    assert_eq!(pod.wait_exited("writer").await.exit_code, Some(0));
    let mut c = pod.container(
        "reader",
        "cat /dev/shm/note; cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max 2>/dev/null; d=/sys/fs/cgroup; [ -d $d/memory ] && d=$d/memory; mkdir $d/sub 2>/dev/null || echo ro",
    );
    c.memory_limit = Some(48 << 20);
    pod.shim.run_container(&c).await.unwrap();
    let st = pod.wait_exited("reader").await;
    let log = pod.wait_log("reader", "stdout F ro").await;
    let out: Vec<&str> = cri_lines(&log, "stdout").into_iter().map(|l| l.1).collect();
    let limit = (48u64 << 20).to_string();
    assert_eq!(out, ["shared", limit.as_str(), "ro"], "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_network_sandbox_uses_the_nodes_namespaces() {
    let pod = Pod::start_with(|s| {
        s.host_network = true;
        s.host_ipc = true;
    })
    .await;
    assert_eq!(pod.shim.sandbox().await.unwrap().netns, None);
    let st = pod
        .shim
        .run_container(&pod.container("main", "exec sleep 1000"))
        .await
        .unwrap();
    let ns = |pid: &str, kind: &str| std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap();
    let pid = st.pid.unwrap().to_string();
    assert_eq!(ns(&pid, "net"), ns("self", "net"));
    assert_eq!(ns(&pid, "ipc"), ns("self", "ipc"));
    assert_eq!(ns(&pid, "uts"), ns("self", "uts"));
    assert_ne!(ns(&pid, "pid"), ns("self", "pid"));
    assert_ne!(ns(&pid, "mnt"), ns("self", "mnt"));
}
