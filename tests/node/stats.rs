//! The kubelet's resource figures through the API server's node proxy: `stats/summary` with
//! CPU, memory, network and filesystem usage of the node, a pod and its container (read from
//! the real cgroups, network namespace and disks), and the Prometheus endpoints.

use std::time::Duration;

use serde_json::Value;

use crate::node::Node;

const T: Duration = Duration::from_secs(60);

fn summary(n: &Node) -> Value {
    let raw = n.ok(&["get", "--raw", "/api/v1/nodes/node1/proxy/stats/summary"]);
    serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{e}: {raw}"))
}

fn u(v: &Value, ptr: &str) -> u64 {
    v.pointer(ptr)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{ptr} in {v}"))
}

#[test]
fn stats_summary_and_metrics_report_real_usage() {
    let n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: st}
spec:
  terminationGracePeriodSeconds: 1
  volumes:
  - name: scratch
    emptyDir: {}
  containers:
  - name: app
    image: busybox
    imagePullPolicy: IfNotPresent
    volumeMounts: [{name: scratch, mountPath: /scratch}]
    command: ["sh", "-c", "dd if=/dev/zero of=/big bs=1M count=8 2>/dev/null; dd if=/dev/zero of=/scratch/f bs=1M count=3 2>/dev/null; echo written; i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo spun; sleep 3600"]
"#,
    );
    n.wait_phase("st", "Running", T);
    n.wait_for("the container to finish its work", T, || {
        n.kubectl(&["logs", "st"])
            .stdout
            .starts_with(b"written\nspun")
    });
    let s = summary(&n);
    // The node.
    assert_eq!(s["node"]["nodeName"], "node1");
    assert!(u(&s, "/node/cpu/usageCoreNanoSeconds") > 0);
    assert!(
        s.pointer("/node/cpu/usageNanoCores").is_some(),
        "a rate: {}",
        s["node"]["cpu"]
    );
    assert!(u(&s, "/node/memory/workingSetBytes") > 0);
    assert!(u(&s, "/node/memory/availableBytes") > 0);
    assert!(u(&s, "/node/fs/capacityBytes") >= u(&s, "/node/fs/availableBytes"));
    assert!(
        u(&s, "/node/runtime/imageFs/usedBytes") > 0,
        "images are stored"
    );
    assert!(u(&s, "/node/rlimit/maxpid") > u(&s, "/node/rlimit/curproc"));
    // The pod and its container.
    let pod = s["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["podRef"]["name"] == "st")
        .unwrap_or_else(|| panic!("pod st in {}", s["pods"]))
        .clone();
    assert_eq!(pod["podRef"]["namespace"], "default");
    let c = &pod["containers"][0];
    assert_eq!(c["name"], "app");
    // The shell's counting loop burnt CPU time; dd touched memory.
    assert!(
        u(c, "/cpu/usageCoreNanoSeconds") > 10_000_000,
        "{}",
        c["cpu"]
    );
    assert!(u(c, "/memory/usageBytes") > 0, "{}", c["memory"]);
    assert!(u(&pod, "/memory/workingSetBytes") > 0);
    // 8 MiB written into the container's writable layer, 3 MiB into the emptyDir.
    assert!(u(c, "/rootfs/usedBytes") >= 8 << 20, "{}", c["rootfs"]);
    assert!(u(c, "/logs/usedBytes") > 0, "{}", c["logs"]);
    let scratch = pod["volume"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "scratch")
        .unwrap_or_else(|| panic!("volume scratch in {}", pod["volume"]))
        .clone();
    assert!(u(&scratch, "/usedBytes") >= 3 << 20, "{scratch}");
    assert_eq!(pod["network"]["name"], "eth0", "{}", pod["network"]);
    assert!(u(&pod, "/ephemeral-storage/usedBytes") >= 11 << 20);
    assert!(u(&pod, "/process_stats/process_count") >= 1);

    // Prometheus.
    let resource = n.ok(&["get", "--raw", "/api/v1/nodes/node1/proxy/metrics/resource"]);
    assert!(
        resource.contains(
            "container_cpu_usage_seconds_total{container=\"app\",namespace=\"default\",pod=\"st\"}"
        ),
        "{resource}"
    );
    assert!(resource.contains("# TYPE node_memory_working_set_bytes gauge"));
    let cadvisor = n.ok(&["get", "--raw", "/api/v1/nodes/node1/proxy/metrics/cadvisor"]);
    assert!(cadvisor.contains("container_memory_working_set_bytes{container=\"app\""));
    assert!(cadvisor.contains("interface=\"eth0\""));
    let own = n.ok(&["get", "--raw", "/api/v1/nodes/node1/proxy/metrics"]);
    assert!(own.contains("kubelet_running_pods 1"), "{own}");
    assert!(own.contains("kubelet_running_containers{container_state=\"running\"} 1"));
}
