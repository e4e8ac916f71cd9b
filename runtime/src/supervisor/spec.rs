//! The OCI runtime configuration (`config.json`) of one container, built from the plain
//! `ContainerConfig` and the pod sandbox's namespaces.

use std::path::Path;

use serde_json::{json, Value};

use super::{ContainerConfig, SandboxConfig};

/// containerd's default capability set.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability (privileged containers), in the kernel's numbering: a capability's
/// index here is its bit in `/proc/<pid>/status` masks.
pub const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The capability set after add/drop (`ALL` in either list as upstream).
pub fn capabilities(cfg: &ContainerConfig) -> Vec<String> {
    if cfg.privileged {
        return ALL_CAPS.iter().map(|s| s.to_string()).collect();
    }
    let mut caps: Vec<String> = if cfg.cap_add.iter().any(|c| c == "ALL") {
        ALL_CAPS.iter().map(|s| s.to_string()).collect()
    } else {
        DEFAULT_CAPS.iter().map(|s| s.to_string()).collect()
    };
    if cfg.cap_drop.iter().any(|c| c == "ALL") {
        caps.clear();
    }
    for c in &cfg.cap_add {
        if c != "ALL" && !caps.contains(c) && ALL_CAPS.contains(&c.as_str()) {
            caps.push(c.clone());
        }
    }
    caps.retain(|c| !cfg.cap_drop.contains(c));
    caps
}

/// Keeps the capabilities in `bounding` (a `CapBnd` mask): a process cannot hand out more
/// than it holds, and asking for more fails the container's start (as containerd gives
/// privileged containers "all current capabilities").
pub fn within_bounding_set(caps: Vec<String>, bounding: u64) -> Vec<String> {
    caps.into_iter()
        .filter(|c| {
            ALL_CAPS
                .iter()
                .position(|a| a == c)
                .is_some_and(|bit| bit < 64 && bounding & (1 << bit) != 0)
        })
        .collect()
}

/// This process's capability bounding set (`CapBnd`), all bits if unreadable.
pub fn current_bounding_set() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX)
}

/// The node's cgroup v1 hierarchies (directories under /sys/fs/cgroup, e.g. `memory`,
/// `cpu`, `unified`); none on a pure cgroup v2 node.
pub fn host_cgroup_hierarchies() -> Vec<String> {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return Vec::new();
    }
    let mut v: Vec<String> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The character and block devices under `dev` (recursively; not pts, shm, mqueue nor the
/// standard ones every container gets anyway) as OCI `linux.devices` entries.
pub fn host_devices(dev: &Path) -> Vec<Value> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    const STANDARD: &[&str] = &[
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "console",
    ];
    let mut out = Vec::new();
    let mut dirs = vec![(dev.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            let Ok(md) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let ft = md.file_type();
            if ft.is_dir() {
                if depth < 4 && !["pts", "shm", "mqueue"].contains(&name.as_str()) {
                    dirs.push((path, depth + 1));
                }
                continue;
            }
            let kind = if ft.is_char_device() {
                "c"
            } else if ft.is_block_device() {
                "b"
            } else {
                continue;
            };
            if depth == 0 && STANDARD.contains(&name.as_str()) {
                continue;
            }
            let Ok(rel) = path.strip_prefix(dev) else {
                continue;
            };
            out.push(json!({
                "path": Path::new("/dev").join(rel),
                "type": kind,
                "major": libc::major(md.rdev()),
                "minor": libc::minor(md.rdev()),
                "fileMode": md.mode() & 0o7777,
                "uid": md.uid(),
                "gid": md.gid(),
            }));
        }
    }
    out.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
    out
}

/// Syscalls the default profile refuses with EPERM: the kernel-, clock-, key-, module- and
/// accounting-level calls Docker's and containerd's default profiles also keep from
/// containers (a deny list: everything else is allowed).
pub const SECCOMP_DENIED: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "finit_module",
    "init_module",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "name_to_handle_at",
    "open_by_handle_at",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount2",
    "unshare",
    "userfaultfd",
];

/// The default seccomp profile (RuntimeDefault).
pub fn default_seccomp() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": SECCOMP_DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    })
}

/// Resolves the image's `USER` (`name`, `uid`, `uid:gid`, `name:group`) against the rootfs.
pub fn resolve_user(rootfs: &Path, user: &str) -> (u32, u32) {
    if user.is_empty() {
        return (0, 0);
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let group = std::fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
    let mut uid = 0;
    let mut gid = 0;
    match u.parse::<u32>() {
        Ok(n) => {
            uid = n;
            if let Some(l) = passwd.lines().find(|l| l.split(':').nth(2) == Some(u)) {
                gid = l
                    .split(':')
                    .nth(3)
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0);
            }
        }
        Err(_) => {
            if let Some(l) = passwd.lines().find(|l| l.split(':').next() == Some(u)) {
                uid = l
                    .split(':')
                    .nth(2)
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0);
                gid = l
                    .split(':')
                    .nth(3)
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0);
            }
        }
    }
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .lines()
                .find(|l| l.split(':').next() == Some(g))
                .and_then(|l| l.split(':').nth(2))
                .and_then(|x| x.parse().ok())
                .unwrap_or(0),
        };
    }
    (uid, gid)
}

/// Builds config.json for a container of the sandbox.
pub fn build(
    cfg: &ContainerConfig,
    sandbox: &SandboxConfig,
    ns_dir: &Path,
    shm: &Path,
    rootfs: &Path,
    cgroups_path: &str,
) -> Value {
    let (img_uid, img_gid) = resolve_user(rootfs, &cfg.image_user);
    let uid = cfg.uid.unwrap_or(img_uid);
    let gid = cfg
        .gid
        .unwrap_or(if cfg.uid.is_some() && cfg.image_user.is_empty() {
            0
        } else {
            img_gid
        });
    let caps = within_bounding_set(capabilities(cfg), current_bounding_set());
    // The shim's own hard limit (raising it needs more than this machine may grant).
    let nofile = {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills the struct we own.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
        r.rlim_max.min(1 << 20)
    };
    let mut env = cfg.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        );
    }
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        // The pod's /dev/shm, one for all its containers (they share the IPC namespace too).
        json!({"destination": "/dev/shm", "type": "bind", "source": shm, "options": ["rbind", "rprivate", "nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", if cfg.privileged { "rw" } else { "ro" }]}),
    ];
    for m in &cfg.mounts {
        let mut opts = vec!["rbind", "rprivate"];
        if m.read_only {
            opts.push("ro");
        }
        mounts.push(json!({
            "destination": m.destination,
            "type": "bind",
            "source": m.source,
            "options": opts,
        }));
    }
    let mut namespaces = vec![json!({"type": "mount"})];
    if sandbox.share_pid && !sandbox.host_pid {
        namespaces.push(json!({"type": "pid", "path": ns_dir.join("pid")}));
    } else if !sandbox.host_pid {
        namespaces.push(json!({"type": "pid"}));
    }
    if !sandbox.host_network {
        namespaces.push(json!({"type": "network", "path": ns_dir.join("net")}));
    }
    if !sandbox.host_ipc {
        namespaces.push(json!({"type": "ipc", "path": ns_dir.join("ipc")}));
    }
    if !sandbox.host_network {
        namespaces.push(json!({"type": "uts", "path": ns_dir.join("uts")}));
    }
    let mut cpu = json!({"shares": cfg.cpu_shares.max(2), "period": cfg.cpu_period});
    if let Some(q) = cfg.cpu_quota {
        cpu["quota"] = json!(q);
    }
    let mut resources = json!({
        "cpu": cpu,
        "devices": [{"allow": false, "access": "rwm"}],
    });
    if let Some(m) = cfg.memory_limit {
        resources["memory"] = json!({"limit": m});
    }
    if cfg.privileged {
        resources["devices"] = json!([{"allow": true, "access": "rwm"}]);
    } else {
        // The standard character devices.
        resources["devices"] = json!([
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 5, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 7, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 8, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 9, "access": "rwm"},
            {"allow": true, "type": "c", "major": 5, "minor": 0, "access": "rwm"},
            {"allow": true, "type": "c", "major": 5, "minor": 1, "access": "rwm"},
            {"allow": true, "type": "c", "major": 5, "minor": 2, "access": "rwm"},
            {"allow": true, "type": "c", "major": 136, "access": "rwm"},
        ]);
    }
    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": cgroups_path,
        "resources": resources,
    });
    if cfg.privileged {
        // Every device of the node, as upstream runtimes give privileged containers.
        linux["devices"] = json!(host_devices(Path::new("/dev")));
    }
    if cfg.seccomp_default && !cfg.privileged && cfg!(feature = "seccomp") {
        linux["seccomp"] = default_seccomp();
    }
    if !cfg.privileged {
        linux["maskedPaths"] = json!([
            "/proc/acpi",
            "/proc/asound",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/proc/scsi",
            "/sys/firmware",
            "/sys/devices/virtual/powercap",
        ]);
        let mut ro: Vec<String> = [
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger",
            "/sys/fs/cgroup",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // libcontainer bind-mounts each cgroup v1 hierarchy read-write whatever the options
        // say: each is made read-only on its own (the container must not raise its limits).
        ro.extend(
            host_cgroup_hierarchies()
                .into_iter()
                .map(|h| format!("/sys/fs/cgroup/{h}")),
        );
        linux["readonlyPaths"] = json!(ro);
    }
    let mut additional: Vec<u32> = cfg.supplemental_gids.clone();
    additional.sort();
    additional.dedup();
    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": cfg.tty,
            "user": {"uid": uid, "gid": gid, "additionalGids": additional},
            "args": cfg.args,
            "env": env,
            "cwd": if cfg.cwd.is_empty() { "/" } else { cfg.cwd.as_str() },
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
        },
        "root": {"path": rootfs, "readonly": cfg.read_only_rootfs},
        "mounts": mounts,
        "annotations": cfg.annotations,
        "linux": linux,
    });
    // Only when set: libcontainer reads any present value (even false) as "load the seccomp
    // filter after dropping capabilities", which fails without no_new_privs.
    if cfg.no_new_privs {
        spec["process"]["noNewPrivileges"] = json!(true);
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ContainerConfig {
        ContainerConfig {
            name: "c".into(),
            attempt: 0,
            layers: vec![],
            args: vec!["sh".into()],
            env: vec![],
            cwd: String::new(),
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
            log_path: Default::default(),
            annotations: Default::default(),
            ..Default::default()
        }
    }

    #[test]
    fn capabilities_follow_add_and_drop() {
        let mut c = cfg();
        c.cap_add = vec!["CAP_NET_ADMIN".into()];
        c.cap_drop = vec!["CAP_KILL".into()];
        let caps = capabilities(&c);
        assert!(caps.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(!caps.contains(&"CAP_KILL".to_string()));
        c.cap_drop = vec!["ALL".into()];
        c.cap_add = vec!["CAP_CHOWN".into()];
        assert_eq!(capabilities(&c), ["CAP_CHOWN"]);
        c.privileged = true;
        assert_eq!(capabilities(&c).len(), ALL_CAPS.len());
    }

    #[test]
    fn capabilities_outside_the_bounding_set_are_left_out() {
        assert_eq!(ALL_CAPS[0], "CAP_CHOWN");
        assert_eq!(ALL_CAPS[21], "CAP_SYS_ADMIN");
        assert_eq!(ALL_CAPS[24], "CAP_SYS_RESOURCE");
        assert_eq!(ALL_CAPS[40], "CAP_CHECKPOINT_RESTORE");
        let all: Vec<String> = ALL_CAPS.iter().map(|s| s.to_string()).collect();
        let kept = within_bounding_set(all.clone(), !(1 << 24));
        assert_eq!(kept.len(), ALL_CAPS.len() - 1);
        assert!(!kept.contains(&"CAP_SYS_RESOURCE".to_string()));
        assert_eq!(within_bounding_set(all, u64::MAX).len(), ALL_CAPS.len());
        assert!(current_bounding_set() & 1 != 0, "we run with CAP_CHOWN");
    }

    #[test]
    fn host_devices_are_listed_without_the_standard_ones() {
        let devs = host_devices(Path::new("/dev"));
        let paths: Vec<&str> = devs.iter().filter_map(|d| d["path"].as_str()).collect();
        assert!(!paths.contains(&"/dev/null"), "{paths:?}");
        assert!(paths.iter().all(|p| !p.starts_with("/dev/pts/")));
        for d in &devs {
            assert!(d["type"] == "c" || d["type"] == "b", "{d}");
        }
        if Path::new("/dev/kmsg").exists() {
            let kmsg = devs.iter().find(|d| d["path"] == "/dev/kmsg").unwrap();
            assert_eq!(
                (kmsg["major"].as_u64(), kmsg["minor"].as_u64()),
                (Some(1), Some(11))
            );
        }
    }

    #[test]
    fn no_new_privileges_is_present_only_when_set() {
        let sandbox = SandboxConfig::default();
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg();
        let spec = build(&c, &sandbox, d.path(), d.path(), d.path(), "/x");
        assert!(spec["process"].get("noNewPrivileges").is_none());
        c.no_new_privs = true;
        let spec = build(&c, &sandbox, d.path(), d.path(), d.path(), "/x");
        assert_eq!(spec["process"]["noNewPrivileges"], json!(true));
    }

    #[test]
    fn a_shared_pid_namespace_is_joined_by_path() {
        let d = tempfile::tempdir().unwrap();
        let pid_ns = |sandbox: &SandboxConfig| {
            build(&cfg(), sandbox, Path::new("/ns"), d.path(), d.path(), "/x")["linux"]
                ["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["type"] == "pid")
                .cloned()
        };
        let mut sandbox = SandboxConfig::default();
        assert_eq!(pid_ns(&sandbox), Some(json!({"type": "pid"})));
        sandbox.share_pid = true;
        assert_eq!(
            pid_ns(&sandbox),
            Some(json!({"type": "pid", "path": "/ns/pid"}))
        );
        sandbox.host_pid = true;
        assert_eq!(pid_ns(&sandbox), None);
    }

    #[test]
    fn image_users_resolve_against_the_rootfs() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nweb:x:1000:1001::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(d.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(resolve_user(d.path(), "web"), (1000, 1001));
        assert_eq!(resolve_user(d.path(), "1000"), (1000, 1001));
        assert_eq!(resolve_user(d.path(), "web:staff"), (1000, 50));
        assert_eq!(resolve_user(d.path(), "7:8"), (7, 8));
        assert_eq!(resolve_user(d.path(), ""), (0, 0));
    }
}
