//! Pods running real containers: exit codes and logs, shared localhost and emptyDir, init
//! order, CrashLoopBackOff, OOMKilled, cgroup limits, env and configMap volumes.

use std::time::Duration;

use crate::node::Node;

const T: Duration = Duration::from_secs(60);

#[test]
fn a_pod_that_exits_with_a_code_shows_it_in_status_and_logs() {
    let n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: exiter}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo hello from k3rs; echo to stderr >&2; exit 3"]
"#,
    );
    n.wait_phase("exiter", "Failed", T);
    assert_eq!(
        n.pod_field(
            "exiter",
            "{.status.containerStatuses[0].state.terminated.exitCode}"
        ),
        "3",
        "{}",
        n.pod_field("exiter", "{.status}")
    );
    assert_eq!(
        n.pod_field(
            "exiter",
            "{.status.containerStatuses[0].state.terminated.reason}"
        ),
        "Error"
    );
    assert!(n
        .pod_field("exiter", "{.status.containerStatuses[0].containerID}")
        .starts_with("k3rs://"));
    // The CRI log file on the node has both streams.
    let uid = n.pod_field("exiter", "{.metadata.uid}");
    let log = n
        .log_dir()
        .join(format!("default_exiter_{uid}"))
        .join("main/0.log");
    let text = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    assert!(text.contains(" stdout F hello from k3rs"), "{text}");
    assert!(text.contains(" stderr F to stderr"), "{text}");
}

#[test]
fn two_containers_share_localhost_and_an_empty_dir() {
    let n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: pair}
spec:
  volumes: [{name: shared, emptyDir: {}}]
  containers:
  - name: server
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www && echo served-over-localhost > /www/index.html && httpd -f -p 8080 -h /www"]
  - name: client
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "until wget -q -O /data/got http://127.0.0.1:8080/; do sleep 0.2; done; sleep 3600"]
    volumeMounts: [{name: shared, mountPath: /data}]
  - name: reader
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "until [ -s /shared/got ]; do sleep 0.2; done; cat /shared/got; sleep 3600"]
    volumeMounts: [{name: shared, mountPath: /shared}]
"#,
    );
    n.wait_phase("pair", "Running", T);
    let uid = n.pod_field("pair", "{.metadata.uid}");
    let log = n
        .log_dir()
        .join(format!("default_pair_{uid}"))
        .join("reader/0.log");
    n.wait_for("the reader to print what the client fetched", T, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("served-over-localhost")
    });
}

#[test]
fn init_containers_run_in_order_before_the_app() {
    let n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: inits}
spec:
  volumes: [{name: work, emptyDir: {}}]
  initContainers:
  - name: first
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "sleep 1; echo first >> /work/order"]
    volumeMounts: [{name: work, mountPath: /work}]
  - name: second
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo second >> /work/order"]
    volumeMounts: [{name: work, mountPath: /work}]
  containers:
  - name: app
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo app >> /work/order; cat /work/order; sleep 3600"]
    volumeMounts: [{name: work, mountPath: /work}]
"#,
    );
    n.wait_phase("inits", "Running", T);
    assert_eq!(
        n.pod_field(
            "inits",
            "{.status.initContainerStatuses[*].state.terminated.reason}"
        ),
        "Completed Completed"
    );
    let uid = n.pod_field("inits", "{.metadata.uid}");
    let log = n
        .log_dir()
        .join(format!("default_inits_{uid}"))
        .join("app/0.log");
    n.wait_for("the app's log", T, || {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().filter_map(|l| l.splitn(4, ' ').nth(3)).collect();
        lines == ["first", "second", "app"]
    });
    assert_eq!(
        n.pod_field(
            "inits",
            "{.status.conditions[?(@.type==\"Initialized\")].status}"
        ),
        "True"
    );
}

#[test]
fn a_crashing_container_goes_into_crash_loop_back_off() {
    let n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: crasher}
spec:
  containers:
  - name: main
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo crashing; exit 1"]
"#,
    );
    n.wait_for("CrashLoopBackOff", T, || {
        n.pod_field(
            "crasher",
            "{.status.containerStatuses[0].state.waiting.reason}",
        ) == "CrashLoopBackOff"
    });
    let msg = n.pod_field(
        "crasher",
        "{.status.containerStatuses[0].state.waiting.message}",
    );
    assert!(
        msg.starts_with("back-off 10s restarting failed container=main pod=crasher_default("),
        "{msg}"
    );
    assert_eq!(
        n.pod_field(
            "crasher",
            "{.status.containerStatuses[0].lastState.terminated.exitCode}"
        ),
        "1"
    );
    // The back-off grows: the message moves on to 20s after the next restart.
    n.wait_for("a 20s back-off", T, || {
        n.pod_field(
            "crasher",
            "{.status.containerStatuses[0].state.waiting.message}",
        )
        .starts_with("back-off 20s")
    });
    let restarts: u32 = n
        .pod_field("crasher", "{.status.containerStatuses[0].restartCount}")
        .parse()
        .unwrap();
    assert!(restarts >= 2, "restartCount {restarts}");
    let get = n.ok(&["get", "pod", "crasher"]);
    assert!(get.contains("CrashLoopBackOff"), "{get}");
}

#[test]
fn a_memory_hog_is_oom_killed() {
    let n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: hog}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived"]
    resources: {limits: {memory: 32Mi}}
"#,
    );
    n.wait_phase("hog", "Failed", T);
    assert_eq!(
        n.pod_field(
            "hog",
            "{.status.containerStatuses[0].state.terminated.reason}"
        ),
        "OOMKilled"
    );
}

#[test]
fn cpu_limits_land_in_the_cgroup() {
    let n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: limited}
spec:
  containers:
  - name: main
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sleep", "3600"]
    resources: {requests: {cpu: 100m, memory: 16Mi}, limits: {cpu: 250m, memory: 64Mi}}
"#,
    );
    n.wait_phase("limited", "Running", T);
    assert_eq!(n.pod_field("limited", "{.status.qosClass}"), "Burstable");
    // Find the container's cgroup on the node: cfs quota 25000 per 100000 period.
    let uid = n.pod_field("limited", "{.metadata.uid}").replace('-', "_");
    let mut found = Vec::new();
    for base in [
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/cpu,cpuacct",
        "/sys/fs/cgroup",
    ] {
        let pod_dir = std::path::Path::new(base)
            .join(n.cgroup_root.trim_start_matches('/'))
            .join("kubepods/burstable")
            .join(format!("pod{uid}"));
        if let Ok(rd) = std::fs::read_dir(&pod_dir) {
            for e in rd.flatten().filter(|e| e.path().is_dir()) {
                for f in ["cpu.cfs_quota_us", "cpu.max"] {
                    if let Ok(s) = std::fs::read_to_string(e.path().join(f)) {
                        found.push(s.trim().to_string());
                    }
                }
            }
        }
    }
    assert!(
        found.iter().any(|s| s == "25000" || s == "25000 100000"),
        "cpu quota not found in the container cgroup: {found:?}"
    );
}

#[test]
fn env_comes_from_a_config_map_and_a_secret() {
    let n = Node::start();
    n.ok(&[
        "create",
        "configmap",
        "settings",
        "--from-literal=color=blue",
        "--from-literal=size=L",
    ]);
    n.ok(&[
        "create",
        "secret",
        "generic",
        "creds",
        "--from-literal=password=s3cr3t",
    ]);
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: envy, labels: {app: envy}}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo COLOR=$COLOR PASSWORD=$PASSWORD SIZE=$CFG_size POD=$POD_NAME APP=$APP GREETING=$GREETING"]
    env:
    - {name: COLOR, valueFrom: {configMapKeyRef: {name: settings, key: color}}}
    - {name: PASSWORD, valueFrom: {secretKeyRef: {name: creds, key: password}}}
    - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: APP, valueFrom: {fieldRef: {fieldPath: "metadata.labels['app']"}}}
    - {name: GREETING, value: "hi-$(POD_NAME)"}
    envFrom:
    - {prefix: CFG_, configMapRef: {name: settings}}
"#,
    );
    n.wait_phase("envy", "Succeeded", T);
    let uid = n.pod_field("envy", "{.metadata.uid}");
    let log = std::fs::read_to_string(
        n.log_dir()
            .join(format!("default_envy_{uid}"))
            .join("main/0.log"),
    )
    .unwrap();
    assert!(
        log.contains("COLOR=blue PASSWORD=s3cr3t SIZE=L POD=envy APP=envy GREETING=hi-envy"),
        "{log}"
    );
}

#[test]
fn a_missing_config_map_is_a_create_container_config_error() {
    let n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: nocfg}
spec:
  containers:
  - name: main
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sleep", "3600"]
    env: [{name: X, valueFrom: {configMapKeyRef: {name: nosuch, key: k}}}]
"#,
    );
    n.wait_for("CreateContainerConfigError", T, || {
        n.pod_field(
            "nocfg",
            "{.status.containerStatuses[0].state.waiting.reason}",
        ) == "CreateContainerConfigError"
    });
    assert_eq!(
        n.pod_field(
            "nocfg",
            "{.status.containerStatuses[0].state.waiting.message}"
        ),
        "configmap \"nosuch\" not found"
    );
}

#[test]
fn a_config_map_volume_update_reaches_the_running_pod() {
    let n = Node::start();
    n.ok(&[
        "create",
        "configmap",
        "live",
        "--from-literal=greeting=hello",
    ]);
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: watcher}
spec:
  volumes: [{name: cfg, configMap: {name: live}}]
  containers:
  - name: main
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "last=; while true; do v=$(cat /cfg/greeting); if [ \"$v\" != \"$last\" ]; then echo \"greeting=$v\"; last=$v; fi; sleep 0.5; done"]
    volumeMounts: [{name: cfg, mountPath: /cfg}]
"#,
    );
    n.wait_phase("watcher", "Running", T);
    let uid = n.pod_field("watcher", "{.metadata.uid}");
    let log = n
        .log_dir()
        .join(format!("default_watcher_{uid}"))
        .join("main/0.log");
    n.wait_for("the first value", T, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("greeting=hello")
    });
    n.ok(&[
        "patch",
        "configmap",
        "live",
        "-p",
        r#"{"data":{"greeting":"bonjour"}}"#,
    ]);
    n.wait_for("the update inside the pod", Duration::from_secs(90), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("greeting=bonjour")
    });
}

#[test]
fn containers_get_the_default_capabilities_and_drop_all_removes_them() {
    let n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: caps}
spec:
  restartPolicy: Never
  containers:
  - name: default
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "grep CapEff /proc/self/status"]
  - name: dropped
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "grep CapEff /proc/self/status"]
    securityContext: {capabilities: {drop: [ALL], add: [NET_BIND_SERVICE]}}
"#,
    );
    n.wait_phase("caps", "Succeeded", T);
    let uid = n.pod_field("caps", "{.metadata.uid}");
    let dir = n.log_dir().join(format!("default_caps_{uid}"));
    let default = std::fs::read_to_string(dir.join("default/0.log")).unwrap();
    // containerd's default capability set.
    assert!(default.contains("CapEff:\t00000000a80425fb"), "{default}");
    let dropped = std::fs::read_to_string(dir.join("dropped/0.log")).unwrap();
    assert!(dropped.contains("CapEff:\t0000000000000400"), "{dropped}");
}
