//! Pod lifecycle on a real node: preStop before SIGTERM within the grace period, a daemon
//! killed with -9 adopting its running containers, and a clean slate after deleting
//! everything.

use std::time::{Duration, Instant};

use crate::node::Node;

const T: Duration = Duration::from_secs(90);

#[test]
fn pre_stop_runs_before_sigterm_within_the_grace_period() {
    let n = Node::start();
    let out = n.dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    n.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: graceful}}
spec:
  terminationGracePeriodSeconds: 20
  volumes: [{{name: out, hostPath: {{path: "{}", type: Directory}}}}]
  containers:
  - name: main
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "trap 'echo term >> /out/events; exit 0' TERM; echo started >> /out/events; while true; do sleep 0.2; done"]
    volumeMounts: [{{name: out, mountPath: /out}}]
    lifecycle:
      preStop:
        exec: {{command: ["sh", "-c", "echo prestop >> /out/events; sleep 1"]}}
"#,
        out.display()
    ));
    n.wait_phase("graceful", "Running", T);
    n.wait_for("the container to start", T, || {
        std::fs::read_to_string(out.join("events"))
            .unwrap_or_default()
            .contains("started")
    });
    let t0 = Instant::now();
    n.ok(&["delete", "pod", "graceful", "--wait=true", "--timeout=60s"]);
    let took = t0.elapsed();
    let events = std::fs::read_to_string(out.join("events")).unwrap();
    assert_eq!(events, "started\nprestop\nterm\n");
    assert!(
        took < Duration::from_secs(20),
        "deletion took {took:?}, beyond the grace period"
    );
}

#[test]
fn a_killed_daemon_adopts_its_running_containers() {
    let mut n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: survivor}
spec:
  containers:
  - name: main
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo up; sleep 3600"]
    readinessProbe:
      exec: {command: ["true"]}
      periodSeconds: 1
"#,
    );
    n.wait_ready("survivor", T);
    let id = n.pod_field("survivor", "{.status.containerStatuses[0].containerID}");
    let ip = n.pod_field("survivor", "{.status.podIP}");
    let shims = n.shim_pids();
    assert_eq!(shims.len(), 1);
    n.kill9();
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: kill(pid, 0) only checks that the shim process still exists.
    assert_eq!(
        unsafe { libc::kill(shims[0], 0) },
        0,
        "the shim died with the daemon"
    );
    n.boot();
    n.wait_node_ready();
    // Give the agent time to sync the pod again; nothing may restart.
    std::thread::sleep(Duration::from_secs(5));
    n.wait_ready("survivor", T);
    assert_eq!(
        n.pod_field("survivor", "{.status.containerStatuses[0].containerID}"),
        id
    );
    assert_eq!(
        n.pod_field("survivor", "{.status.containerStatuses[0].restartCount}"),
        "0"
    );
    assert_eq!(n.pod_field("survivor", "{.status.podIP}"), ip);
    assert_eq!(n.shim_pids(), shims);
    // And the adopted pod still goes away cleanly.
    n.ok(&[
        "delete",
        "pod",
        "survivor",
        "--grace-period=1",
        "--wait=true",
        "--timeout=60s",
    ]);
    n.wait_for("the shim to exit", T, || n.shim_pids().is_empty());
}

#[test]
fn deleting_everything_leaves_nothing_behind() {
    let n = Node::start();
    n.ok(&["create", "configmap", "c1", "--from-literal=a=b"]);
    n.apply(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: many}
spec:
  replicas: 3
  selector: {matchLabels: {app: many}}
  template:
    metadata: {labels: {app: many}}
    spec:
      terminationGracePeriodSeconds: 2
      volumes:
      - {name: scratch, emptyDir: {medium: Memory, sizeLimit: 8Mi}}
      - {name: cfg, configMap: {name: c1}}
      containers:
      - name: main
        image: busybox
        imagePullPolicy: IfNotPresent
        command: ["sleep", "3600"]
        resources: {limits: {memory: 64Mi, cpu: 100m}}
        volumeMounts: [{name: scratch, mountPath: /scratch}, {name: cfg, mountPath: /cfg}]
"#,
    );
    n.wait_for("3 running pods", T, || {
        n.jsonpath(&["pods", "-l", "app=many"], "{.items[*].status.phase}")
            == "Running Running Running"
    });
    assert_eq!(n.shim_pids().len(), 3);
    assert!(!n.mounts().is_empty());
    n.ok(&["delete", "deployment", "many"]);
    n.wait_for("no pods", T, || {
        n.jsonpath(&["pods"], "{.items[*].metadata.name}")
            .is_empty()
    });
    n.wait_for("every shim gone", T, || {
        n.shim_pids().is_empty()
            && std::fs::read_dir(n.run_dir().join("pods"))
                .map(|d| d.count())
                .unwrap_or(0)
                == 0
    });
    assert_eq!(n.mounts(), Vec::<String>::new(), "mounts left");
    assert_eq!(n.veths(), Vec::<String>::new(), "veths left");
    assert_eq!(
        n.cgroups_left(),
        Vec::<std::path::PathBuf>::new(),
        "cgroups left"
    );
    assert_eq!(n.cgroup_pids(), Vec::<i32>::new(), "processes left");
    // No IP is still allocated (IPAM files name the pod they belong to).
    let mut held = Vec::new();
    let ipam = n.data_dir().join("agent/ipam");
    fn walk(d: &std::path::Path, held: &mut Vec<String>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, held);
            } else {
                let name = e.file_name().to_string_lossy().to_string();
                if name.parse::<std::net::Ipv4Addr>().is_ok() {
                    held.push(name);
                }
            }
        }
    }
    walk(&ipam, &mut held);
    assert_eq!(held, Vec::<String>::new(), "IP allocations left");
}
