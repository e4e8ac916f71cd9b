//! The shim process: one per pod, single-threaded (libcontainer forks), a poll(2) loop over
//! its socket, the containers' output pipes and a SIGCHLD self-pipe. It holds the sandbox's
//! namespaces (bind-mounted files), runs containers through libcontainer, writes their logs,
//! reaps them as their subreaper, and records exit codes and OOM kills.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use serde_json::{json, Value};

use super::logs::LogWriter;
use super::{
    spec, ContainerConfig, ContainerState, ContainerStatus, ExecResult, Request, Response,
    SandboxConfig, SandboxStatus,
};

static SIGPIPE_W: AtomicI32 = AtomicI32::new(-1);
/// The pause process of a shared PID namespace, for cleanup after a failed start.
static PAUSE: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_sigchld(_: libc::c_int) {
    let fd = SIGPIPE_W.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = [1u8];
        // SAFETY: write(2) is async-signal-safe; the pipe is non-blocking.
        unsafe {
            libc::write(fd, b.as_ptr().cast(), 1);
        }
    }
}

fn log(msg: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "{} shim: {msg}",
        super::now_rfc3339_nanos()
    );
}

struct Ctr {
    status: ContainerStatus,
    /// stdout and stderr (with a TTY: the terminal's master, and no stderr).
    pipes: [Option<OwnedFd>; 2],
    /// The container's stdin for attach: a pipe's write end, or the terminal's master.
    stdin: Option<OwnedFd>,
    tty: bool,
    /// Attached clients, sent the live output as frames.
    attachers: Vec<Attacher>,
    log: LogWriter,
    bundle: PathBuf,
    rootfs: PathBuf,
    oom_before: u64,
    cgroup: String,
}

/// An attached client's connection and what it has not taken yet.
struct Attacher {
    conn: UnixStream,
    pending: Vec<u8>,
}

/// Output an attached client lets pile up before it is dropped.
const ATTACH_BACKLOG: usize = 4 << 20;

impl Attacher {
    /// Writes what is pending; false when the client is gone or too far behind.
    fn flush(&mut self) -> bool {
        while !self.pending.is_empty() {
            match (&self.conn).write(&self.pending) {
                Ok(0) => return false,
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        self.pending.len() < ATTACH_BACKLOG
    }

    fn send(&mut self, stream: u8, data: &[u8]) -> bool {
        self.pending.push(stream);
        self.pending
            .extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.pending.extend_from_slice(data);
        self.flush()
    }
}

struct Shim {
    dir: PathBuf,
    cfg: SandboxConfig,
    lc_root: PathBuf,
    ctrs: Vec<Ctr>,
    /// pid → index into ctrs.
    pids: HashMap<i32, usize>,
    /// The init of the pod's shared PID namespace, if any.
    pause: Option<i32>,
}

/// Whether the machine runs the unified (v2) cgroup hierarchy.
pub fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// A container attempt's bundle (config, rootfs mount, overlay `upper`/`work`) under the
/// sandbox's state directory.
pub fn bundle_dir(state_dir: &Path, name: &str, attempt: u32) -> PathBuf {
    state_dir.join(format!("{name}-{attempt}"))
}

/// Every hierarchy's directory for a cgroup path.
fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    let rel = rel.trim_start_matches('/');
    if cgroup_v2() {
        return vec![Path::new("/sys/fs/cgroup").join(rel)];
    }
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in rd.flatten() {
            if e.path().is_dir() {
                v.push(e.path().join(rel));
            }
        }
    }
    v
}

fn oom_kills(cgroup: &str) -> u64 {
    let rel = cgroup.trim_start_matches('/');
    let (file, key) = if cgroup_v2() {
        (
            Path::new("/sys/fs/cgroup").join(rel).join("memory.events"),
            "oom_kill",
        )
    } else {
        (
            Path::new("/sys/fs/cgroup/memory")
                .join(rel)
                .join("memory.oom_control"),
            "oom_kill",
        )
    };
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(key))
                .then(|| it.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
        })
        .unwrap_or(0)
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

fn random_id() -> String {
    let mut b = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn umount(p: &Path) {
    if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
        // SAFETY: unmounting a path of our own; MNT_DETACH never blocks.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by pipe2.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Creates the pod's namespaces in a short-lived child and pins them with bind mounts.
fn create_sandbox(dir: &Path, cfg: &SandboxConfig) -> Result<(), String> {
    let ns_dir = dir.join("ns");
    std::fs::create_dir_all(&ns_dir).map_err(|e| e.to_string())?;
    let mut flags = 0;
    let mut kinds = Vec::new();
    if !cfg.host_network {
        flags |= libc::CLONE_NEWNET | libc::CLONE_NEWUTS;
        kinds.push("net");
        kinds.push("uts");
    }
    if !cfg.host_ipc {
        flags |= libc::CLONE_NEWIPC;
        kinds.push("ipc");
    }
    if flags == 0 {
        return Ok(());
    }
    for k in &kinds {
        let p = ns_dir.join(k);
        if !p.exists() {
            std::fs::write(&p, b"").map_err(|e| e.to_string())?;
        }
    }
    let hostname = std::ffi::CString::new(cfg.hostname.clone()).map_err(|e| e.to_string())?;
    let targets: Vec<(std::ffi::CString, std::ffi::CString)> = kinds
        .iter()
        .map(|k| {
            (
                std::ffi::CString::new(format!("/proc/self/ns/{k}")).unwrap_or_default(),
                std::ffi::CString::new(ns_dir.join(k).as_os_str().as_encoded_bytes())
                    .unwrap_or_default(),
            )
        })
        .collect();
    // `lo` of the new network namespace, brought up in the child (the net crate does it
    // again, harmlessly): containers of a pod talk over localhost from the start.
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut lo: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in lo.ifr_name.iter_mut().zip(b"lo") {
        *d = *s as libc::c_char;
    }
    // SAFETY: the shim is single-threaded; the child only makes raw syscalls and _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    if pid == 0 {
        // SAFETY: in the forked child: plain syscalls on data prepared before the fork.
        unsafe {
            if libc::unshare(flags) != 0 {
                libc::_exit(1);
            }
            if flags & libc::CLONE_NEWUTS != 0 {
                libc::sethostname(hostname.as_ptr(), hostname.as_bytes().len());
            }
            if flags & libc::CLONE_NEWNET != 0 {
                let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
                if s < 0 || libc::ioctl(s, libc::SIOCGIFFLAGS, &mut lo) != 0 {
                    libc::_exit(3);
                }
                lo.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                if libc::ioctl(s, libc::SIOCSIFFLAGS, &lo) != 0 {
                    libc::_exit(3);
                }
                libc::close(s);
            }
            for (src, dst) in &targets {
                if libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    libc::_exit(2);
                }
            }
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for the child we just forked.
    unsafe {
        libc::waitpid(pid, &mut status, 0);
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!(
            "creating the pod's namespaces failed (step {})",
            libc::WEXITSTATUS(status)
        ));
    }
    Ok(())
}

/// A pod-wide PID namespace (`shareProcessNamespace`): a pause process is its init, reaping
/// orphans; the namespace is pinned at `<dir>/ns/pid` for the containers to join. Returns the
/// pause process's pid (ours to reap: we are the subreaper of the child that forked it).
fn create_pid_sandbox(dir: &Path) -> Result<i32, String> {
    let target = dir.join("ns").join("pid");
    std::fs::write(&target, b"").map_err(|e| e.to_string())?;
    let target =
        std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let (r, w) = pipe().map_err(|e| e.to_string())?;
    // `/proc/<pid>/ns/pid` with room for any pid, formatted by the child without allocating.
    let mut src = [0u8; 32];
    // SAFETY: the shim is single-threaded; the children only make raw syscalls and _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    if pid == 0 {
        // SAFETY: in the forked child: plain syscalls on data prepared before the fork.
        unsafe {
            if libc::unshare(libc::CLONE_NEWPID) != 0 {
                libc::_exit(1);
            }
            let pause = libc::fork();
            if pause < 0 {
                libc::_exit(2);
            }
            if pause == 0 {
                // PID 1 of the pod: no descriptors of the shim, children reaped by the kernel.
                libc::close_range(3, libc::c_uint::MAX, 0);
                libc::signal(libc::SIGCHLD, libc::SIG_IGN);
                loop {
                    libc::pause();
                }
            }
            // No leading zeros: /proc refuses them.
            let mut digits = [0u8; 10];
            let mut k = digits.len();
            let mut n = pause as u32;
            loop {
                k -= 1;
                digits[k] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            let mut at = 0;
            for part in [&b"/proc/"[..], &digits[k..], &b"/ns/pid"[..]] {
                src[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            let ok = libc::mount(
                src.as_ptr().cast(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) == 0;
            let b = pause.to_ne_bytes();
            libc::write(w.as_raw_fd(), b.as_ptr().cast(), b.len());
            libc::_exit(if ok { 0 } else { 3 });
        }
    }
    drop(w);
    let mut status = 0;
    // SAFETY: waiting for the child we just forked.
    unsafe {
        libc::waitpid(pid, &mut status, 0);
    }
    let mut b = [0u8; 4];
    let got = (&std::fs::File::from(r)).read(&mut b).unwrap_or(0);
    let pause = (got == 4).then(|| i32::from_ne_bytes(b));
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        if let Some(p) = pause {
            // SAFETY: killing the pause process our child started.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
        return Err(format!(
            "creating the pod's PID namespace failed (step {})",
            libc::WEXITSTATUS(status)
        ));
    }
    pause.ok_or_else(|| "creating the pod's PID namespace: no pause process".to_string())
}

/// cgroup v1 cpu.shares (2..262144) as a v2 cpu.weight (1..10000), as runc converts them.
fn shares_to_weight(shares: u64) -> u64 {
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

fn setup_pod_cgroup(cfg: &SandboxConfig) {
    for d in cgroup_dirs(&cfg.cgroup_parent) {
        let _ = std::fs::create_dir_all(&d);
    }
    let rel = cfg.cgroup_parent.trim_start_matches('/');
    if cgroup_v2() {
        // The controllers must be on along the way down for the pod's files to exist (and
        // for libcontainer's children below it).
        let mut at = PathBuf::from("/sys/fs/cgroup");
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            let _ = std::fs::write(at.join("cgroup.subtree_control"), "+cpu +memory +pids");
            at.push(part);
        }
        let _ = std::fs::write(at.join("cgroup.subtree_control"), "+cpu +memory +pids");
        if let Some(s) = cfg.cpu_shares {
            let _ = std::fs::write(at.join("cpu.weight"), shares_to_weight(s).to_string());
        }
        if let Some(q) = cfg.cpu_quota {
            let _ = std::fs::write(at.join("cpu.max"), format!("{q} 100000"));
        }
        if let Some(m) = cfg.memory_limit {
            let _ = std::fs::write(at.join("memory.max"), m.to_string());
        }
        return;
    }
    let cpu = Path::new("/sys/fs/cgroup/cpu").join(rel);
    if let Some(s) = cfg.cpu_shares {
        let _ = std::fs::write(cpu.join("cpu.shares"), s.to_string());
    }
    if let Some(q) = cfg.cpu_quota {
        let _ = std::fs::write(cpu.join("cpu.cfs_period_us"), "100000");
        let _ = std::fs::write(cpu.join("cpu.cfs_quota_us"), q.to_string());
    }
    if let Some(m) = cfg.memory_limit {
        let _ = std::fs::write(
            Path::new("/sys/fs/cgroup/memory")
                .join(rel)
                .join("memory.limit_in_bytes"),
            m.to_string(),
        );
    }
}

/// Entry point of `k3rs shim --dir <dir>`: never returns.
pub fn shim_main(dir: &Path) -> ! {
    let code = match run(dir) {
        Ok(()) => 0,
        Err(e) => {
            log(&format!("fatal: {e}"));
            // Undo a half-made sandbox: nothing of it may outlive us.
            let pause = PAUSE.load(Ordering::Relaxed);
            if pause > 0 {
                // SAFETY: killing the pause process we started.
                unsafe {
                    libc::kill(pause, libc::SIGKILL);
                }
            }
            for k in ["net", "ipc", "uts", "pid"] {
                umount(&dir.join("ns").join(k));
            }
            umount(&dir.join("shm"));
            1
        }
    };
    std::process::exit(code)
}

fn run(dir: &Path) -> Result<(), String> {
    let cfg: SandboxConfig = serde_json::from_slice(
        &std::fs::read(dir.join("sandbox.json")).map_err(|e| format!("sandbox.json: {e}"))?,
    )
    .map_err(|e| format!("sandbox.json: {e}"))?;
    // Daemonize: the launcher exits at once; we live on in our own session.
    // SAFETY: still single-threaded; the parent only _exits.
    match unsafe { libc::fork() } {
        -1 => return Err(std::io::Error::last_os_error().to_string()),
        0 => {}
        _ => unsafe { libc::_exit(0) },
    }
    // SAFETY: prctl on ourselves: orphaned container processes are reparented to us.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    std::fs::write(dir.join("shim.pid"), std::process::id().to_string())
        .map_err(|e| e.to_string())?;
    create_sandbox(dir, &cfg)?;
    create_pod_shm(dir, &cfg)?;
    let pause = if cfg.share_pid && !cfg.host_pid {
        let p = create_pid_sandbox(dir)?;
        PAUSE.store(p, Ordering::Relaxed);
        Some(p)
    } else {
        None
    };
    setup_pod_cgroup(&cfg);
    let lc_root = dir.join("lc");
    std::fs::create_dir_all(&lc_root).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| e.to_string())?;
    let (sig_r, sig_w) = pipe().map_err(|e| e.to_string())?;
    set_nonblocking(sig_r.as_raw_fd());
    set_nonblocking(sig_w.as_raw_fd());
    SIGPIPE_W.store(sig_w.as_raw_fd(), Ordering::Relaxed);
    // SAFETY: installing an async-signal-safe handler for SIGCHLD.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigchld as *const () as usize;
        sa.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
        libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let sock = dir.join(super::SOCK);
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).map_err(|e| format!("binding {}: {e}", sock.display()))?;
    log(&format!("pod {} sandbox ready", cfg.pod_uid));
    let mut shim = Shim {
        dir: dir.to_path_buf(),
        cfg,
        lc_root,
        ctrs: Vec::new(),
        pids: HashMap::new(),
        pause,
    };
    loop {
        let mut fds = vec![
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sig_r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let mut which = Vec::new();
        for (i, c) in shim.ctrs.iter().enumerate() {
            for (s, p) in c.pipes.iter().enumerate() {
                if let Some(p) = p {
                    fds.push(libc::pollfd {
                        fd: p.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    which.push((i, s));
                }
            }
        }
        // Attached clients: readable means gone (they never send); writable when behind.
        let mut attached = Vec::new();
        for (i, c) in shim.ctrs.iter().enumerate() {
            for (k, a) in c.attachers.iter().enumerate() {
                let mut events = libc::POLLIN;
                if !a.pending.is_empty() {
                    events |= libc::POLLOUT;
                }
                fds.push(libc::pollfd {
                    fd: a.conn.as_raw_fd(),
                    events,
                    revents: 0,
                });
                attached.push((i, k));
            }
        }
        // SAFETY: fds is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if n < 0 {
            continue;
        }
        let base = 2 + which.len();
        let mut gone = Vec::new();
        for (k, (i, a)) in attached.iter().enumerate() {
            let rev = fds[base + k].revents;
            let Some(att) = shim.ctrs.get_mut(*i).and_then(|c| c.attachers.get_mut(*a)) else {
                continue;
            };
            if rev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 || !att.flush() {
                gone.push((*i, *a));
            }
        }
        for (i, a) in gone.into_iter().rev() {
            if let Some(c) = shim.ctrs.get_mut(i) {
                if a < c.attachers.len() {
                    c.attachers.remove(a);
                }
            }
        }
        for (k, (i, s)) in which.iter().enumerate() {
            if fds[k + 2].revents != 0 {
                shim.read_pipe(*i, *s);
            }
        }
        if fds[1].revents != 0 {
            let mut b = [0u8; 64];
            // SAFETY: reading our own non-blocking pipe.
            while unsafe { libc::read(sig_r.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) } > 0 {}
        }
        shim.reap();
        if fds[0].revents != 0 {
            if let Ok((conn, _)) = listener.accept() {
                if shim.serve(conn) {
                    log("shut down");
                    let _ = std::fs::remove_dir_all(&shim.dir);
                    return Ok(());
                }
            }
        }
    }
}

/// libcontainer's executor, after giving the process the signal state a program expects:
/// SIGPIPE at its default action (this binary, like every Rust program, ignores it, and an
/// ignored signal stays ignored across exec: `yes | head` would never end) and nothing blocked.
///
/// With `pty` (a socket inherited from the shim), the process also gets its terminal here,
/// inside the container: see [`open_container_pty`].
#[derive(Clone, Default)]
struct PodExecutor {
    pty: Option<RawFd>,
}

impl Executor for PodExecutor {
    fn exec(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorError> {
        // SAFETY: single-threaded container process about to exec; plain libc calls.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        }
        if let Some(sock) = self.pty {
            open_container_pty(sock)
                .map_err(|e| ExecutorError::Other(format!("allocating a terminal: {e}")))?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &oci_spec::runtime::Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

/// Opens a terminal from the container's own `/dev/ptmx` (its devpts, so `tty` and
/// `ttyname` find `/dev/pts/N`), makes it the controlling terminal of this process (a session
/// leader: libcontainer called setsid) on stdin, stdout and stderr, and sends the master over
/// `sock`. Runs in the container's process after every namespace, mount and credential change,
/// just before exec (libcontainer's console socket would open it before the mount namespace
/// is joined, on the host's devpts).
fn open_container_pty(sock: RawFd) -> Result<(), String> {
    let err = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: plain syscalls on descriptors this function opens; the process execs next.
    unsafe {
        let master = libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if master < 0 {
            return Err(err("opening /dev/ptmx"));
        }
        let unlock: libc::c_int = 0;
        if libc::ioctl(master, libc::TIOCSPTLCK as _, &unlock) < 0 {
            return Err(err("unlocking the terminal"));
        }
        let slave = libc::ioctl(
            master,
            libc::TIOCGPTPEER as _,
            libc::O_RDWR | libc::O_NOCTTY,
        );
        if slave < 0 {
            return Err(err("opening the terminal's slave"));
        }
        if libc::ioctl(slave, libc::TIOCSCTTY as _, 0) < 0 {
            return Err(err("making it the controlling terminal"));
        }
        for fd in 0..3 {
            if libc::dup2(slave, fd) < 0 {
                return Err(err("connecting stdio"));
            }
        }
        if slave > 2 {
            libc::close(slave);
        }
        super::stream::send_with_fds(sock, b"pty", &[master])
            .map_err(|e| format!("sending the terminal: {e}"))?;
        libc::close(master);
        libc::close(sock);
    }
    Ok(())
}

/// Receives the terminal a container's process opened (see [`open_container_pty`]); `ours` is
/// the shim's end of the pair, the other end already closed here so a process that dies first
/// reads as EOF.
fn receive_container_pty(ours: &std::os::unix::net::UnixStream) -> Result<OwnedFd, String> {
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    super::stream::recv_fd(ours.as_raw_fd())
        .map_err(|e| format!("the container's terminal never arrived: {e}"))
}

/// Mounts a container's overlay rootfs. `volatile` (Linux 5.10+, tried first) spares the
/// unmount a sync of the whole upper filesystem (hundreds of ms on a busy node, and a flush
/// of everyone's dirty data): the writable layer is thrown away with the container anyway.
fn mount_overlay(rootfs: &Path, opts: &str) -> Result<(), String> {
    let target =
        std::ffi::CString::new(rootfs.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let mut last = None;
    for o in [format!("{opts},volatile"), opts.to_string()] {
        let c_opts = std::ffi::CString::new(o).map_err(|e| e.to_string())?;
        // SAFETY: mounting an overlay on our own directory with NUL-terminated arguments.
        let rc = unsafe {
            libc::mount(
                c"overlay".as_ptr(),
                target.as_ptr(),
                c"overlay".as_ptr(),
                0,
                c_opts.as_ptr().cast(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        last = Some(std::io::Error::last_os_error());
    }
    Err(format!(
        "mounting the container's rootfs: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// Points the container's PID namespace at another process's (an ephemeral container
/// targeting a container of the pod).
fn join_pid_namespace(config: &mut Value, pid: i32) {
    let path = format!("/proc/{pid}/ns/pid");
    if let Some(ns) = config
        .pointer_mut("/linux/namespaces")
        .and_then(|v| v.as_array_mut())
    {
        ns.retain(|n| n["type"] != "pid");
        ns.push(json!({"type": "pid", "path": path}));
    }
}

/// The pod's /dev/shm: a tmpfs of its own (the host's with host IPC).
fn create_pod_shm(dir: &Path, cfg: &SandboxConfig) -> Result<(), String> {
    if cfg.host_ipc {
        return Ok(());
    }
    let shm = dir.join("shm");
    std::fs::create_dir_all(&shm).map_err(|e| e.to_string())?;
    let target =
        std::ffi::CString::new(shm.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: mounting a tmpfs on our own directory with NUL-terminated arguments.
    let rc = unsafe {
        libc::mount(
            c"shm".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=1777,size=65536k".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mounting the pod's /dev/shm: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

impl Shim {
    fn shm(&self) -> PathBuf {
        if self.cfg.host_ipc {
            PathBuf::from("/dev/shm")
        } else {
            self.dir.join("shm")
        }
    }

    fn read_pipe(&mut self, i: usize, s: usize) {
        let Some(c) = self.ctrs.get_mut(i) else {
            return;
        };
        let Some(fd) = c.pipes[s].as_ref() else {
            return;
        };
        let mut buf = [0u8; 65536];
        for _ in 0..16 {
            // SAFETY: reading into our buffer from a descriptor we own.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                let data = &buf[..n as usize];
                c.log.feed(s, data);
                c.attachers.retain_mut(|a| a.send(s as u8 + 1, data));
                continue;
            }
            let eof = n == 0 || {
                let e = std::io::Error::last_os_error();
                // A terminal whose last user is gone reads EIO.
                e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::Interrupted
            };
            if eof {
                c.log.flush(s);
                c.pipes[s] = None;
            }
            break;
        }
    }

    fn save(&self) {
        let list: Vec<&ContainerStatus> = self.ctrs.iter().map(|c| &c.status).collect();
        if let Ok(b) = serde_json::to_vec(&list) {
            let tmp = self.dir.join("state.json.tmp");
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(tmp, self.dir.join("state.json"));
            }
        }
    }

    fn reap(&mut self) {
        loop {
            let mut status = 0;
            // SAFETY: non-blocking wait for any child (we are the containers' subreaper).
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            let Some(i) = self.pids.remove(&pid) else {
                continue;
            };
            // Drain what the container wrote before it went.
            for s in 0..2 {
                self.read_pipe(i, s);
            }
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                255
            };
            let c = &mut self.ctrs[i];
            // Attached clients see the end; nobody writes to its stdin any more.
            for a in c.attachers.iter_mut() {
                a.flush();
            }
            c.attachers.clear();
            c.stdin = None;
            if c.tty {
                c.log.flush(0);
                c.pipes[0] = None;
            }
            let oom = oom_kills(&c.cgroup) > c.oom_before;
            c.status.state = ContainerState::Exited;
            c.status.exit_code = Some(code);
            c.status.finished_at = Some(super::now_rfc3339_nanos());
            c.status.reason = Some(
                if oom {
                    "OOMKilled"
                } else if code == 0 {
                    "Completed"
                } else {
                    "Error"
                }
                .into(),
            );
            log(&format!(
                "container {} ({}) exited with {code}",
                c.status.name, c.status.id
            ));
            self.save();
        }
    }

    /// Handles one connection; returns true when the shim should exit.
    fn serve(&mut self, conn: UnixStream) -> bool {
        // Bounded both ways: a stuck client must not hold the loop (and the logs) for long.
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
        let mut line = String::new();
        let mut r = BufReader::new(&conn);
        if r.read_line(&mut line).is_err() {
            return false;
        }
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                reply(&conn, Response::Err(format!("bad request: {e}")));
                return false;
            }
        };
        let mut exit = false;
        let resp = match req {
            Request::Sandbox => {
                let netns = (!self.cfg.host_network).then(|| self.dir.join("ns").join("net"));
                Response::Ok(json!(SandboxStatus {
                    pod_uid: self.cfg.pod_uid.clone(),
                    netns,
                    shim_pid: std::process::id() as i32,
                }))
            }
            Request::List => Response::Ok(json!(self
                .ctrs
                .iter()
                .map(|c| &c.status)
                .collect::<Vec<_>>())),
            Request::Run { config } => match self.run_container(&config) {
                Ok(st) => Response::Ok(json!(st)),
                Err(e) => Response::Err(e),
            },
            Request::Kill { name, signal } => match self.kill(&name, signal) {
                Ok(()) => Response::Ok(Value::Null),
                Err(e) => Response::Err(e),
            },
            Request::Remove { name, attempt } => {
                self.remove(&name, Some(attempt));
                Response::Ok(Value::Null)
            }
            Request::Exec {
                name,
                argv,
                timeout_ms,
            } => {
                self.exec(conn, &name, argv, Duration::from_millis(timeout_ms));
                return false;
            }
            Request::ExecStream {
                name,
                argv,
                tty,
                stdin,
            } => {
                self.exec_stream(conn, &name, argv, tty, stdin);
                return false;
            }
            Request::Attach { name, stdin } => {
                self.attach(conn, &name, stdin);
                return false;
            }
            Request::CloseStdin { name } => {
                if let Some(i) = self.latest(&name) {
                    if !self.ctrs[i].tty {
                        self.ctrs[i].stdin = None;
                    }
                }
                Response::Ok(Value::Null)
            }
            Request::Shutdown => {
                self.shutdown();
                exit = true;
                Response::Ok(Value::Null)
            }
        };
        reply(&conn, resp);
        exit
    }

    fn latest(&self, name: &str) -> Option<usize> {
        self.ctrs
            .iter()
            .enumerate()
            .filter(|(_, c)| c.status.name == name)
            .max_by_key(|(_, c)| c.status.attempt)
            .map(|(i, _)| i)
    }

    fn run_container(&mut self, cfg: &ContainerConfig) -> Result<ContainerStatus, String> {
        if cfg.layers.is_empty() {
            return Err("the image has no layers".into());
        }
        if let Some(i) = self.latest(&cfg.name) {
            if self.ctrs[i].status.attempt >= cfg.attempt
                && self.ctrs[i].status.state != ContainerState::Exited
            {
                return Ok(self.ctrs[i].status.clone());
            }
        }
        let id = random_id();
        let bundle = bundle_dir(&self.cfg.state_dir, &cfg.name, cfg.attempt);
        let _ = std::fs::remove_dir_all(&bundle);
        let rootfs = bundle.join("rootfs");
        for d in ["upper", "work", "rootfs"] {
            std::fs::create_dir_all(bundle.join(d)).map_err(|e| e.to_string())?;
        }
        let lower: Vec<String> = cfg
            .layers
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            bundle.join("upper").display(),
            bundle.join("work").display()
        );
        mount_overlay(&rootfs, &opts)?;
        let cgroup = format!("{}/{}", self.cfg.cgroup_parent.trim_end_matches('/'), id);
        let mut config = spec::build(
            cfg,
            &self.cfg,
            &self.dir.join("ns"),
            &self.shm(),
            &rootfs,
            &cgroup,
        );
        if let Some(target) = &cfg.pid_ns_of {
            let pid = self
                .latest(target)
                .filter(|i| self.ctrs[*i].status.state == ContainerState::Running)
                .and_then(|i| self.ctrs[i].status.pid);
            let Some(pid) = pid else {
                umount(&rootfs);
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(format!("the target container {target:?} is not running"));
            };
            join_pid_namespace(&mut config, pid);
        }
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&config).unwrap_or_default(),
        )
        .map_err(|e| e.to_string())?;
        let now = super::now_rfc3339_nanos();
        let mut status = ContainerStatus {
            name: cfg.name.clone(),
            attempt: cfg.attempt,
            id: id.clone(),
            state: ContainerState::Created,
            pid: None,
            created_at: now.clone(),
            started_at: None,
            finished_at: None,
            exit_code: None,
            reason: None,
            message: None,
            log_path: cfg.log_path.clone(),
            annotations: cfg.annotations.clone(),
        };
        let mut log = LogWriter::open(cfg.log_path.clone())
            .with_limits(cfg.log_max_size, cfg.log_max_files as usize);
        let (out_r, out_w) = pipe().map_err(|e| e.to_string())?;
        let (err_r, err_w) = pipe().map_err(|e| e.to_string())?;
        set_nonblocking(out_r.as_raw_fd());
        set_nonblocking(err_r.as_raw_fd());
        let devnull = std::fs::File::open("/dev/null").map_err(|e| e.to_string())?;
        // stdin: a pipe we keep the writing end of (for attach), or a terminal whose master
        // the container's process sends back (see `open_container_pty`).
        let (stdin_r, mut stdin_w) = if cfg.stdin && !cfg.tty {
            let (r, w) = pipe().map_err(|e| e.to_string())?;
            (r, Some(w))
        } else {
            (OwnedFd::from(devnull), None)
        };
        let pty = if cfg.tty {
            Some(std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?)
        } else {
            None
        };
        let executor = PodExecutor {
            pty: pty.as_ref().map(|(_, theirs)| theirs.as_raw_fd()),
        };
        let started = (|| -> Result<Container, String> {
            let mut c = ContainerBuilder::new(id.clone(), SyscallType::default())
                .with_executor(executor)
                .with_root_path(&self.lc_root)
                .map_err(|e| e.to_string())?
                .with_stdin(stdin_r)
                .with_stdout(out_w)
                .with_stderr(err_w)
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| e.to_string())?;
            c.start().map_err(|e| e.to_string())?;
            Ok(c)
        })();
        let started = started.and_then(|c| match pty {
            Some((ours, theirs)) => {
                drop(theirs);
                let master = receive_container_pty(&ours)?;
                Ok((c, Some(master)))
            }
            None => Ok((c, None)),
        });
        match started {
            Ok((c, master)) => {
                let pid = c.pid().map(|p| p.as_raw());
                let mut pipes = [Some(out_r), Some(err_r)];
                if let Some(m) = &master {
                    // The terminal carries all output; the pipes are unused.
                    let out = m.try_clone().map_err(|e| e.to_string())?;
                    set_nonblocking(out.as_raw_fd());
                    pipes = [Some(out), None];
                    stdin_w = Some(m.try_clone().map_err(|e| e.to_string())?);
                }
                status.state = ContainerState::Running;
                status.pid = pid;
                status.started_at = Some(super::now_rfc3339_nanos());
                let idx = self.ctrs.len();
                if let Some(p) = pid {
                    self.pids.insert(p, idx);
                }
                self.ctrs.push(Ctr {
                    status: status.clone(),
                    pipes,
                    stdin: stdin_w,
                    tty: cfg.tty,
                    attachers: Vec::new(),
                    log,
                    bundle,
                    rootfs,
                    oom_before: oom_kills(&cgroup),
                    cgroup,
                });
                log_line(&format!(
                    "container {} ({id}) started, pid {pid:?}",
                    cfg.name
                ));
            }
            Err(e) => {
                // Whatever the init wrote (e.g. exec errors) goes to the log too.
                let mut buf = [0u8; 8192];
                for fd in [&out_r, &err_r] {
                    // SAFETY: reading from our own non-blocking pipe.
                    let n =
                        unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if n > 0 {
                        log.feed(1, &buf[..n as usize]);
                    }
                }
                log.flush(1);
                if let Ok(mut c) = Container::load(self.lc_root.join(&id)) {
                    let _ = c.delete(true);
                }
                umount(&rootfs);
                let _ = std::fs::remove_dir_all(&bundle);
                status.state = ContainerState::Exited;
                status.exit_code = Some(128);
                status.reason = Some("StartError".into());
                status.message = Some(e.clone());
                status.started_at = Some(super::now_rfc3339_nanos());
                status.finished_at = status.started_at.clone();
                self.ctrs.push(Ctr {
                    status: status.clone(),
                    pipes: [None, None],
                    stdin: None,
                    tty: cfg.tty,
                    attachers: Vec::new(),
                    log,
                    bundle: PathBuf::new(),
                    rootfs: PathBuf::new(),
                    oom_before: 0,
                    cgroup,
                });
                log_line(&format!("container {} failed to start: {e}", cfg.name));
            }
        }
        self.save();
        Ok(status)
    }

    fn container_pids(&self, i: usize) -> Vec<i32> {
        let c = &self.ctrs[i];
        let mut v: Vec<i32> = Vec::new();
        for d in cgroup_dirs(&c.cgroup) {
            if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
                v.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        v.sort();
        v.dedup();
        v
    }

    fn kill(&mut self, name: &str, signal: i32) -> Result<(), String> {
        let i = self
            .latest(name)
            .ok_or_else(|| format!("no container {name:?}"))?;
        if self.ctrs[i].status.state != ContainerState::Running {
            return Ok(());
        }
        if signal == libc::SIGKILL {
            for p in self.container_pids(i) {
                // SAFETY: kill(2) on processes in this container's cgroup.
                unsafe {
                    libc::kill(p, libc::SIGKILL);
                }
            }
        }
        if let Some(pid) = self.ctrs[i].status.pid {
            // SAFETY: kill(2) on the container's init process, which we reap.
            unsafe {
                libc::kill(pid, signal);
            }
        }
        Ok(())
    }

    fn delete_at(&mut self, i: usize) {
        let c = &self.ctrs[i];
        if let Ok(mut lc) = Container::load(self.lc_root.join(&c.status.id)) {
            if let Err(e) = lc.delete(true) {
                log_line(&format!("deleting container {}: {e}", c.status.id));
            }
        }
        if !c.rootfs.as_os_str().is_empty() {
            umount(&c.rootfs);
        }
        if !c.bundle.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&c.bundle);
        }
        for d in cgroup_dirs(&c.cgroup) {
            rmdir_tree(&d);
        }
    }

    fn remove(&mut self, name: &str, attempt: Option<u32>) {
        let idx: Vec<usize> = self
            .ctrs
            .iter()
            .enumerate()
            .filter(|(_, c)| c.status.name == name && attempt.is_none_or(|a| c.status.attempt == a))
            .filter(|(_, c)| c.status.state != ContainerState::Running)
            .map(|(i, _)| i)
            .collect();
        for i in idx.iter().rev() {
            self.delete_at(*i);
            self.ctrs.remove(*i);
        }
        self.pids = self
            .ctrs
            .iter()
            .enumerate()
            .filter(|(_, c)| c.status.state == ContainerState::Running)
            .filter_map(|(i, c)| c.status.pid.map(|p| (p, i)))
            .collect();
        self.save();
    }

    fn shutdown(&mut self) {
        for i in 0..self.ctrs.len() {
            if self.ctrs[i].status.state == ContainerState::Running {
                let _ = self.kill(&self.ctrs[i].status.name.clone(), libc::SIGKILL);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self
            .ctrs
            .iter()
            .any(|c| c.status.state == ContainerState::Running)
            && Instant::now() < deadline
        {
            self.reap();
            std::thread::sleep(Duration::from_millis(10));
        }
        for i in 0..self.ctrs.len() {
            for s in 0..2 {
                self.read_pipe(i, s);
                self.ctrs[i].log.flush(s);
            }
            self.delete_at(i);
        }
        self.ctrs.clear();
        if let Some(p) = self.pause.take() {
            // SAFETY: killing and reaping the pause process (our child through the subreaper).
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            // SAFETY: as above.
            while unsafe { libc::waitpid(p, std::ptr::null_mut(), libc::WNOHANG) } == 0
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        for k in ["net", "ipc", "uts", "pid"] {
            umount(&self.dir.join("ns").join(k));
        }
        if !self.cfg.host_ipc {
            umount(&self.dir.join("shm"));
        }
        for d in cgroup_dirs(&self.cfg.cgroup_parent) {
            rmdir_tree(&d);
        }
        let _ = std::fs::remove_dir_all(&self.cfg.state_dir);
    }

    /// Runs a command in a running container; a forked child does the work and answers, so
    /// the loop keeps serving.
    fn exec(&mut self, conn: UnixStream, name: &str, argv: Vec<String>, timeout: Duration) {
        let Some(i) = self
            .latest(name)
            .filter(|i| self.ctrs[*i].status.state == ContainerState::Running)
        else {
            reply(
                &conn,
                Response::Err(format!("container {name:?} is not running")),
            );
            return;
        };
        let id = self.ctrs[i].status.id.clone();
        let bundle = self.ctrs[i].bundle.clone();
        let lc_root = self.lc_root.clone();
        // SAFETY: single-threaded; the child answers on `conn` and _exits.
        let pid = unsafe { libc::fork() };
        if pid != 0 {
            return; // parent (or fork failure: the client times out)
        }
        // SAFETY: in the child; subreaper so the exec'd process is ours to wait for.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
            libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        }
        let result = exec_in(&lc_root, &id, &bundle, argv, timeout);
        reply(
            &conn,
            match result {
                Ok(r) => Response::Ok(json!(r)),
                Err(e) => Response::Err(e),
            },
        );
        // SAFETY: leaving the forked child without running the parent's destructors.
        unsafe { libc::_exit(0) }
    }
}

impl Shim {
    fn running(&self, name: &str) -> Option<usize> {
        self.latest(name)
            .filter(|i| self.ctrs[*i].status.state == ContainerState::Running)
    }

    /// An interactive exec: a forked child starts it, hands its stdio to the client, waits
    /// for it and sends the exit code, so the loop keeps serving.
    fn exec_stream(
        &mut self,
        conn: UnixStream,
        name: &str,
        argv: Vec<String>,
        tty: bool,
        stdin: bool,
    ) {
        let Some(i) = self.running(name) else {
            send_header_error(&conn, format!("container {name:?} is not running"));
            return;
        };
        let id = self.ctrs[i].status.id.clone();
        let bundle = self.ctrs[i].bundle.clone();
        let lc_root = self.lc_root.clone();
        // SAFETY: single-threaded; the child answers on `conn` and _exits.
        let pid = unsafe { libc::fork() };
        if pid != 0 {
            return;
        }
        // SAFETY: in the child; subreaper so the exec'd process is ours to wait for.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
            libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        }
        let _ = conn.set_write_timeout(None);
        match start_exec_stream(&lc_root, &id, &bundle, argv, tty, stdin) {
            Ok((pid, named)) => {
                let hdr = super::stream::StreamHeader {
                    error: None,
                    tty,
                    fds: named.iter().map(|(n, _)| n.to_string()).collect(),
                };
                let raw: Vec<RawFd> = named.iter().map(|(_, f)| f.as_raw_fd()).collect();
                let sent = super::stream::send_with_fds(
                    conn.as_raw_fd(),
                    &serde_json::to_vec(&hdr).unwrap_or_default(),
                    &raw,
                );
                drop(named);
                if sent.is_err() {
                    // Nobody to talk to: do not leave the process behind.
                    // SAFETY: killing the process we started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                let code = wait_exit(pid);
                // Reap leftovers that were reparented to us.
                // SAFETY: non-blocking reaping of our own children.
                while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
                let mut w = &conn;
                let _ = w.write_all(
                    format!("{}\n", json!(super::stream::ExecExit { exit_code: code })).as_bytes(),
                );
            }
            Err(e) => send_header_error(&conn, e),
        }
        // SAFETY: leaving the forked child without running the parent's destructors.
        unsafe { libc::_exit(0) }
    }

    /// Sends the header (with a duplicate of the container's stdin when asked) and keeps
    /// the connection to forward the container's output to.
    fn attach(&mut self, conn: UnixStream, name: &str, stdin: bool) {
        let Some(i) = self.running(name) else {
            send_header_error(&conn, format!("container {name:?} is not running"));
            return;
        };
        let c = &mut self.ctrs[i];
        let dup = if stdin {
            c.stdin.as_ref().and_then(|f| f.try_clone().ok())
        } else {
            None
        };
        let hdr = super::stream::StreamHeader {
            error: None,
            tty: c.tty,
            fds: dup.iter().map(|_| "stdin".to_string()).collect(),
        };
        let raw: Vec<RawFd> = dup.iter().map(|f| f.as_raw_fd()).collect();
        if super::stream::send_with_fds(
            conn.as_raw_fd(),
            &serde_json::to_vec(&hdr).unwrap_or_default(),
            &raw,
        )
        .is_err()
        {
            return;
        }
        drop(dup);
        if conn.set_nonblocking(true).is_ok() {
            c.attachers.push(Attacher {
                conn,
                pending: Vec::new(),
            });
        }
    }
}

fn send_header_error(conn: &UnixStream, e: String) {
    let hdr = super::stream::StreamHeader {
        error: Some(e),
        ..Default::default()
    };
    let _ = super::stream::send_with_fds(
        conn.as_raw_fd(),
        &serde_json::to_vec(&hdr).unwrap_or_default(),
        &[],
    );
}

/// Blocks until `pid` ends; its exit code (128+signal when killed).
fn wait_exit(pid: i32) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                continue;
            };
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return 255;
        }
    }
}

type NamedFds = Vec<(&'static str, OwnedFd)>;

/// Starts `argv` in the container with fresh stdio; returns its pid and our ends of that
/// stdio (`stdin`, `stdout`, `stderr` pipes, or `pty`).
fn start_exec_stream(
    lc_root: &Path,
    id: &str,
    bundle: &Path,
    argv: Vec<String>,
    tty: bool,
    stdin: bool,
) -> Result<(i32, NamedFds), String> {
    let exec_id = format!("exec-{}", &random_id()[..16]);
    let process = exec_process_file(bundle, &exec_id, &argv, tty);
    let mut ours: NamedFds = Vec::new();
    let pty = if tty {
        Some(std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?)
    } else {
        None
    };
    let base = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_executor(PodExecutor {
            pty: pty.as_ref().map(|(_, theirs)| theirs.as_raw_fd()),
        })
        .with_root_path(lc_root)
        .map_err(|e| e.to_string())?;
    let base = if tty {
        base
    } else {
        let devnull = std::fs::File::open("/dev/null").map_err(|e| e.to_string())?;
        let stdin_fd = if stdin {
            let (r, w) = pipe().map_err(|e| e.to_string())?;
            ours.push(("stdin", w));
            r
        } else {
            OwnedFd::from(devnull)
        };
        let (out_r, out_w) = pipe().map_err(|e| e.to_string())?;
        let (err_r, err_w) = pipe().map_err(|e| e.to_string())?;
        ours.push(("stdout", out_r));
        ours.push(("stderr", err_r));
        base.with_stdin(stdin_fd)
            .with_stdout(out_w)
            .with_stderr(err_w)
    };
    let built = base
        .as_tenant()
        .with_container_args(argv)
        .with_process(process.clone())
        .with_detach(true)
        .build();
    if let Some(p) = &process {
        let _ = std::fs::remove_file(p);
    }
    let pid = built.map_err(|e| format!("exec {exec_id}: {e}"))?.as_raw();
    if let Some((pair_ours, theirs)) = pty {
        drop(theirs);
        ours.push(("pty", receive_container_pty(&pair_ours)?));
    }
    Ok((pid, ours))
}

fn log_line(s: &str) {
    log(s)
}

/// The container's own process settings (user, groups, env, cwd, capabilities, rlimits,
/// no_new_privs) with `argv` instead of its command, as `runc exec --process` takes them:
/// written to a file in the bundle, whose path is returned.
fn exec_process_file(bundle: &Path, exec_id: &str, argv: &[String], tty: bool) -> Option<PathBuf> {
    let spec: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).ok()?).ok()?;
    let mut process = spec.get("process")?.clone();
    process["args"] = json!(argv);
    process["terminal"] = json!(tty);
    let path = bundle.join(format!("{exec_id}.json"));
    std::fs::write(&path, serde_json::to_vec(&process).ok()?).ok()?;
    Some(path)
}

fn exec_in(
    lc_root: &Path,
    id: &str,
    bundle: &Path,
    argv: Vec<String>,
    timeout: Duration,
) -> Result<ExecResult, String> {
    let (out_r, out_w) = pipe().map_err(|e| e.to_string())?;
    let (err_r, err_w) = pipe().map_err(|e| e.to_string())?;
    set_nonblocking(out_r.as_raw_fd());
    set_nonblocking(err_r.as_raw_fd());
    let devnull = std::fs::File::open("/dev/null").map_err(|e| e.to_string())?;
    let exec_id = format!("exec-{}", &random_id()[..16]);
    let process = exec_process_file(bundle, &exec_id, &argv, false);
    let built = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_executor(PodExecutor::default())
        .with_root_path(lc_root)
        .map_err(|e| e.to_string())?
        .with_stdin(OwnedFd::from(devnull))
        .with_stdout(out_w)
        .with_stderr(err_w)
        .as_tenant()
        .with_container_args(argv)
        .with_process(process.clone())
        .with_detach(true)
        .build();
    if let Some(p) = &process {
        let _ = std::fs::remove_file(p);
    }
    let pid = built.map_err(|e| format!("exec {exec_id}: {e}"))?.as_raw();
    let deadline = Instant::now() + timeout;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let cap = 1 << 20;
    let mut code = None;
    let mut timed_out = false;
    loop {
        for (fd, buf) in [(&out_r, &mut out), (&err_r, &mut err)] {
            let mut b = [0u8; 16384];
            loop {
                // SAFETY: reading from our own non-blocking pipe.
                let n =
                    unsafe { libc::read(fd.as_fd().as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
                if n <= 0 {
                    break;
                }
                if buf.len() < cap {
                    buf.extend_from_slice(&b[..n as usize]);
                }
            }
        }
        if code.is_some() {
            break;
        }
        let mut status = 0;
        // SAFETY: non-blocking wait for the exec'd process (reparented to us).
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            code = Some(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            });
            continue; // one more drain
        }
        if r < 0 {
            // Not our child after all (should not happen): treat as gone.
            code = Some(255);
            continue;
        }
        if Instant::now() > deadline {
            // SAFETY: killing the process we started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            timed_out = true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Reap any other leftovers.
    // SAFETY: non-blocking reaping of our own children.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
    Ok(ExecResult {
        exit_code: code.unwrap_or(255),
        stdout: out,
        stderr: err,
        timed_out,
    })
}

fn reply(conn: &UnixStream, resp: Response) {
    let mut w = conn;
    if let Ok(b) = serde_json::to_vec(&resp) {
        let _ = w.write_all(&b);
    }
    let _ = conn.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_shares_convert_to_weights_as_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(0), 1);
    }
}
