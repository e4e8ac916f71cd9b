//! Nodes as a user sees them: pod ranges from the node IPAM, a lost node turning Unknown and
//! unreachable with its pods evicted after their toleration and replaced elsewhere, cordon
//! taints, and a deleted node's pods removed.

use std::time::Duration;

use serde_json::Value;

use crate::cluster::Cluster;
use crate::hollow::{jsonpath, wait_for, Hollow};

const LONG: Duration = Duration::from_secs(90);
/// Lease renewals well inside the tests' 5 s grace period.
const FAST_LEASES: &[&str] = &["--lease-renew-interval-ms", "1000"];

fn get_json(c: &Cluster, args: &[&str]) -> Value {
    let mut a: Vec<&str> = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(&c.ok(&a)).unwrap()
}

fn pods(c: &Cluster, selector: &str) -> Vec<Value> {
    get_json(c, &["pods", "-l", selector])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn node_of(p: &Value) -> &str {
    p["spec"]["nodeName"].as_str().unwrap_or_default()
}

fn running_not_terminating(p: &Value) -> bool {
    p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
}

fn ready_status(c: &Cluster, node: &str) -> String {
    jsonpath(
        c,
        &["node", node],
        "{.status.conditions[?(@.type==\"Ready\")].status}",
    )
}

/// A Deployment whose pods tolerate unreachable/not-ready nodes for `seconds` only.
fn deploy(c: &Cluster, name: &str, replicas: u32, seconds: u32) {
    c.ok_stdin(
        &["apply", "-f", "-"],
        &format!(
            r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      terminationGracePeriodSeconds: 3
      tolerations:
      - {{key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: {seconds}}}
      - {{key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: {seconds}}}
      containers:
      - {{name: c, image: nginx}}
"#
        ),
    );
    c.ok(&[
        "rollout",
        "status",
        &format!("deployment/{name}"),
        "--timeout=90s",
    ]);
}

fn cidr_of(c: &Cluster, node: &str) -> String {
    jsonpath(c, &["node", node], "{.spec.podCIDR}")
}

/// Whether `ip` is inside the /24 `cidr`.
fn in_slash24(ip: &str, cidr: &str) -> bool {
    let net = cidr.strip_suffix(".0/24").unwrap_or("-");
    ip.rsplit_once('.').is_some_and(|(prefix, _)| prefix == net)
}

#[test]
fn nodes_get_distinct_pod_cidrs_kept_across_restarts_and_pods_get_ips_from_them() {
    let mut c = Cluster::start();
    let _a = Hollow::start(&c, &["a1", "a2"], &[]);
    wait_for(&c, "both nodes to get a podCIDR", LONG, || {
        !cidr_of(&c, "a1").is_empty() && !cidr_of(&c, "a2").is_empty()
    });
    let (a1, a2) = (cidr_of(&c, "a1"), cidr_of(&c, "a2"));
    assert_ne!(a1, a2);
    for cidr in [&a1, &a2] {
        assert!(
            cidr.starts_with("10.42.") && cidr.ends_with(".0/24"),
            "{cidr} is a /24 of the cluster CIDR"
        );
    }
    assert_eq!(
        jsonpath(&c, &["node", "a1"], "{.spec.podCIDRs}"),
        format!("[\"{a1}\"]")
    );

    // Pod IPs come from their node's range.
    c.ok(&[
        "create",
        "deployment",
        "web",
        "--image=nginx",
        "--replicas=4",
    ]);
    c.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    for p in pods(&c, "app=web") {
        let ip = p["status"]["podIP"].as_str().unwrap_or_default();
        let range = if node_of(&p) == "a1" { &a1 } else { &a2 };
        assert!(in_slash24(ip, range), "pod IP {ip} inside {range}");
    }

    // A restarted server keeps the ranges and does not hand them out again.
    c.stop();
    c.boot();
    let _b = Hollow::start(&c, &["b1"], &[]);
    wait_for(&c, "b1 to get a podCIDR", LONG, || {
        !cidr_of(&c, "b1").is_empty()
    });
    let b1 = cidr_of(&c, "b1");
    assert!(b1 != a1 && b1 != a2, "{b1} is a fresh range ({a1}, {a2})");
    assert_eq!(cidr_of(&c, "a1"), a1, "a range is immutable");
    assert_eq!(cidr_of(&c, "a2"), a2);

    // Cordon: the unschedulable taint comes and goes with it.
    let taints = |c: &Cluster| jsonpath(c, &["node", "b1"], "{.spec.taints[*].key}");
    c.ok(&["cordon", "b1"]);
    wait_for(&c, "b1 to be tainted unschedulable", LONG, || {
        taints(&c) == "node.kubernetes.io/unschedulable"
    });
    assert_eq!(
        jsonpath(&c, &["node", "b1"], "{.spec.taints[0].effect}"),
        "NoSchedule"
    );
    c.ok(&["uncordon", "b1"]);
    wait_for(&c, "b1's unschedulable taint to go", LONG, || {
        taints(&c).is_empty()
    });
}

#[test]
fn a_lost_node_turns_unknown_and_unreachable_and_its_pods_move_to_the_other_nodes() {
    let c = Cluster::start_with(&["--node-monitor-grace-period", "5s"]);
    // The Deployment first lands on the node that will be lost, then the others join.
    let mut lost = Hollow::start(&c, &["lost"], FAST_LEASES);
    deploy(&c, "app", 6, 2);
    let _others = Hollow::start(&c, &["s1", "s2"], FAST_LEASES);
    assert!(pods(&c, "app=app").iter().all(|p| node_of(p) == "lost"));
    // Healthy nodes stay Ready well past the grace period.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(ready_status(&c, "s1"), "True");
    assert_eq!(ready_status(&c, "lost"), "True");

    lost.stop();
    wait_for(&c, "node lost to turn Ready Unknown", LONG, || {
        ready_status(&c, "lost") == "Unknown"
    });
    let node = get_json(&c, &["node", "lost"]);
    for cond in node["status"]["conditions"].as_array().unwrap() {
        if cond["type"] == "Ready" {
            assert_eq!(cond["reason"], "NodeStatusUnknown");
            assert_eq!(cond["message"], "Kubelet stopped posting node status.");
        }
    }
    let out = c.ok(&["get", "node", "lost"]);
    assert!(out.contains("NotReady"), "{out}");
    // Its pods are marked not Ready; the node is tainted unreachable (both effects).
    wait_for(&c, "the lost node's pods to be not Ready", LONG, || {
        let ps = pods(&c, "app=app");
        ps.iter().filter(|p| node_of(p) == "lost").all(|p| {
            p["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "False")
            })
        })
    });
    let taints = get_json(&c, &["node", "lost"])["spec"]["taints"].clone();
    let mut effects: Vec<String> = taints
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["key"] == "node.kubernetes.io/unreachable")
        .map(|t| {
            assert!(t["timeAdded"].is_string(), "timeAdded set: {t}");
            t["effect"].as_str().unwrap().to_string()
        })
        .collect();
    effects.sort();
    assert_eq!(effects, ["NoExecute", "NoSchedule"]);

    // After their 2 s toleration the pods are evicted and replaced on the other nodes; the
    // evicted ones (no kubelet to confirm) go once their grace period has passed.
    wait_for(
        &c,
        "all 6 replicas Running on the other nodes",
        LONG,
        || {
            let ps = pods(&c, "app=app");
            ps.iter()
                .filter(|p| running_not_terminating(p) && node_of(p) != "lost")
                .count()
                == 6
                && ps.iter().all(|p| node_of(p) != "lost")
        },
    );
    let events = c.ok(&[
        "get",
        "events",
        "--field-selector",
        "reason=TaintManagerEviction",
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    assert!(
        events.contains("Marking for deletion Pod default/app-"),
        "{events}"
    );

    // The node comes back: Ready again and the taints go.
    let _back = Hollow::start(&c, &["lost"], FAST_LEASES);
    wait_for(&c, "the returning node's taints to go", LONG, || {
        jsonpath(&c, &["node", "lost"], "{.spec.taints}").is_empty()
            || jsonpath(&c, &["node", "lost"], "{.spec.taints}") == "[]"
    });
    assert_eq!(ready_status(&c, "lost"), "True");
}

#[test]
fn a_deleted_nodes_pods_are_removed_and_replaced() {
    let c = Cluster::start();
    let mut gone = Hollow::start(&c, &["gone"], &[]);
    deploy(&c, "svc", 3, 300);
    let _stay = Hollow::start(&c, &["stay"], &[]);
    gone.stop();
    c.ok(&["delete", "node", "gone"]);
    wait_for(
        &c,
        "the deleted node's pods to be replaced on stay",
        LONG,
        || {
            let ps = pods(&c, "app=svc");
            ps.len() == 3
                && ps
                    .iter()
                    .all(|p| node_of(p) == "stay" && running_not_terminating(p))
        },
    );
}
