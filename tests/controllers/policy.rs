//! Admission policies and disruption budgets as a user meets them through kubectl: resource
//! quotas refusing what exceeds them, limit range defaults and bounds, default tolerations,
//! and evictions (`kubectl drain`, the eviction subresource) held by PodDisruptionBudgets.

use std::time::Duration;

use serde_json::{json, Value};

use crate::cluster::Cluster;
use crate::hollow::{jsonpath, wait_for, Hollow};

const LONG: Duration = Duration::from_secs(90);

fn pod_yaml(name: &str, cpu: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  containers:
  - name: c
    image: nginx
    resources: {{requests: {{cpu: "{cpu}"}}}}
"#
    )
}

fn quota_used(c: &Cluster) -> Value {
    serde_json::from_str(&jsonpath(c, &["quota", "q"], "{.status.used}")).unwrap_or(Value::Null)
}

#[test]
fn a_quota_refuses_pods_beyond_its_limits_with_upstream_messages() {
    let c = Cluster::start();
    c.ok(&["create", "quota", "q", "--hard=pods=2,requests.cpu=1"]);
    wait_for(&c, "the quota controller to fill in usage", LONG, || {
        quota_used(&c) == json!({"pods": "0", "requests.cpu": "0"})
    });

    // A quota on cpu requires every container to state its request.
    let err = c.fails(&["run", "nocpu", "--image=nginx"]);
    assert!(
        err.contains(
            r#"pods "nocpu" is forbidden: failed quota: q: must specify requests.cpu for: nocpu"#
        ),
        "{err}"
    );

    c.ok_stdin(&["apply", "-f", "-"], &pod_yaml("p1", "400m"));
    c.ok_stdin(&["apply", "-f", "-"], &pod_yaml("p2", "400m"));
    wait_for(&c, "the quota to count both pods", LONG, || {
        quota_used(&c) == json!({"pods": "2", "requests.cpu": "800m"})
    });
    let err = c.fails_stdin(&["apply", "-f", "-"], &pod_yaml("p3", "400m"));
    assert!(
        err.contains(r#"Error from server (Forbidden): error when creating "STDIN": pods "p3" is forbidden: exceeded quota: q, requested: pods=1,requests.cpu=400m, used: pods=2,requests.cpu=800m, limited: pods=2,requests.cpu=1"#),
        "{err}"
    );

    // Deleting a pod gives its share back (the controller recounts).
    c.ok(&["delete", "pod", "p1", "--grace-period=0", "--force"]);
    wait_for(&c, "the quota to count one pod", LONG, || {
        quota_used(&c) == json!({"pods": "1", "requests.cpu": "400m"})
    });
    let err = c.fails_stdin(&["apply", "-f", "-"], &pod_yaml("p3", "700m"));
    assert!(
        err.contains("exceeded quota: q, requested: requests.cpu=700m, used: requests.cpu=400m, limited: requests.cpu=1"),
        "{err}"
    );
    c.ok_stdin(&["apply", "-f", "-"], &pod_yaml("p3", "600m"));
    wait_for(&c, "the quota to be full", LONG, || {
        quota_used(&c) == json!({"pods": "2", "requests.cpu": "1"})
    });
    let shown = c.ok(&["get", "quota", "q"]);
    assert!(shown.contains("pods: 2/2, requests.cpu: 1/1"), "{shown}");
}

#[test]
fn new_pods_get_limit_range_defaults_and_default_tolerations() {
    let c = Cluster::start();
    c.ok_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: v1
kind: LimitRange
metadata: {name: lr}
spec:
  limits:
  - type: Container
    default: {cpu: 500m, memory: 128Mi}
    defaultRequest: {cpu: 100m}
    max: {cpu: "1"}
"#,
    );
    c.ok(&["run", "web", "--image=nginx"]);
    let resources: Value = serde_json::from_str(&jsonpath(
        &c,
        &["pod", "web"],
        "{.spec.containers[0].resources}",
    ))
    .unwrap();
    assert_eq!(
        resources,
        json!({"limits": {"cpu": "500m", "memory": "128Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}})
    );
    assert_eq!(
        jsonpath(&c, &["pod", "web"], "{.metadata.annotations.kubernetes\\.io/limit-ranger}"),
        "LimitRanger plugin set: cpu, memory request for container web; cpu, memory limit for container web"
    );
    assert_eq!(
        jsonpath(&c, &["pod", "web"], "{.status.qosClass}"),
        "Burstable"
    );

    let err = c.fails(&["run", "big", "--image=nginx", "--overrides", r#"{"spec":{"containers":[{"name":"big","image":"nginx","resources":{"limits":{"cpu":"2"}}}]}}"#]);
    assert!(
        err.contains(
            r#"pods "big" is forbidden: maximum cpu usage per Container is 1, but limit is 2"#
        ),
        "{err}"
    );

    // DefaultTolerationSeconds.
    let tolerations: Value =
        serde_json::from_str(&jsonpath(&c, &["pod", "web"], "{.spec.tolerations}")).unwrap();
    assert_eq!(
        tolerations,
        json!([
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
        ])
    );
}

fn pdb_status(c: &Cluster) -> Value {
    serde_json::from_str(&jsonpath(c, &["pdb", "web"], "{.status}")).unwrap_or(Value::Null)
}

#[test]
fn evictions_and_drains_respect_pod_disruption_budgets() {
    let c = Cluster::start();
    let _nodes = Hollow::start(&c, &["n1", "n2", "n3"], &[]);
    c.ok(&[
        "create",
        "deployment",
        "web",
        "--image=nginx",
        "--replicas=2",
    ]);
    c.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    c.ok(&[
        "create",
        "pdb",
        "web",
        "--selector=app=web",
        "--min-available=2",
    ]);
    wait_for(&c, "the budget to see two healthy pods", LONG, || {
        let s = pdb_status(&c);
        s["currentHealthy"] == 2 && s["desiredHealthy"] == 2 && s["expectedPods"] == 2
    });
    let s = pdb_status(&c);
    assert_eq!(s["disruptionsAllowed"], 0);
    assert_eq!(s["conditions"][0]["reason"], "InsufficientPods");
    let shown = c.ok(&["get", "pdb", "web", "--no-headers"]);
    let cells: Vec<&str> = shown.split_whitespace().collect();
    assert_eq!(&cells[..4], &["web", "2", "N/A", "0"], "{shown}");

    // The eviction subresource refuses with 429 and the budget as the cause.
    let pod = jsonpath(&c, &["pods", "-l", "app=web"], "{.items[0].metadata.name}");
    let node = jsonpath(&c, &["pod", &pod], "{.spec.nodeName}");
    let eviction = format!(
        r#"{{"apiVersion":"policy/v1","kind":"Eviction","metadata":{{"name":"{pod}","namespace":"default"}}}}"#
    );
    let path = format!("/api/v1/namespaces/default/pods/{pod}/eviction");
    let err = c.fails_stdin(&["create", "--raw", &path, "-f", "-"], &eviction);
    assert!(
        err.contains("Error from server (TooManyRequests): Cannot evict pod as it would violate the pod's disruption budget."),
        "{err}"
    );

    // kubectl drain keeps retrying and gives up at its timeout; the pod stays.
    let out = c.kubectl(&["drain", &node, "--ignore-daemonsets", "--timeout=6s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Cannot evict pod as it would violate the pod's disruption budget."),
        "{stderr}"
    );
    assert_eq!(jsonpath(&c, &["pod", &pod], "{.metadata.name}"), pod);

    // Once the budget allows a disruption, the drain evicts the node's pods (their
    // replacements become healthy elsewhere, which allows the next one).
    c.ok(&[
        "patch",
        "pdb",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"minAvailable":1}}"#,
    ]);
    wait_for(&c, "the budget to allow one disruption", LONG, || {
        pdb_status(&c)["disruptionsAllowed"] == 1
    });
    let out = c.ok(&["drain", &node, "--ignore-daemonsets", "--timeout=120s"]);
    assert!(out.contains(&format!("pod/{pod} evicted")), "{out}");
    assert!(out.contains(&format!("node/{node} drained")), "{out}");
    wait_for(
        &c,
        "the deployment to be whole again off the drained node",
        LONG,
        || {
            let nodes = jsonpath(&c, &["pods", "-l", "app=web"], "{.items[*].spec.nodeName}");
            nodes.split_whitespace().count() == 2 && !nodes.split_whitespace().any(|n| n == node)
        },
    );
}
