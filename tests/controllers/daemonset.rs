//! DaemonSets on hollow nodes: one pod per node that fits (taints, tolerations, node
//! selectors), what `kubectl get ds` shows, rolling updates (`kubectl set image`, `rollout
//! status/history/undo`), surge updates, nodes that leave or change, and failed pods.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cluster::Cluster;
use crate::hollow::{jsonpath, wait_for, Hollow};

/// Generous: a slow 2-core machine runs several clusters at once.
const LONG: Duration = Duration::from_secs(180);

/// A DaemonSet of one container named after it, labelled `app=<name>`, with `spec` merged into
/// the DaemonSet's spec and `pod_spec` into its pod template's spec.
fn apply_daemonset(c: &Cluster, name: &str, spec: Value, pod_spec: Value) {
    let mut ds = json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": name, "image": format!("registry.local/{name}:1")}]},
            },
        },
    });
    merge(&mut ds["spec"], &spec);
    merge(&mut ds["spec"]["template"]["spec"], &pod_spec);
    c.ok_stdin(&["apply", "-f", "-"], &ds.to_string());
}

fn merge(into: &mut Value, from: &Value) {
    if let (Some(a), Some(b)) = (into.as_object_mut(), from.as_object()) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
}

/// What a test looks at in a daemon pod.
#[derive(Debug, Clone)]
struct PodView {
    name: String,
    /// Its node, or the node its affinity targets before binding.
    node: String,
    ready: bool,
    terminating: bool,
    image: String,
}

fn daemon_pods(c: &Cluster, app: &str) -> Vec<PodView> {
    try_daemon_pods(c, app).unwrap_or_default()
}

/// The pods, or `None` when kubectl failed.
fn try_daemon_pods(c: &Cluster, app: &str) -> Option<Vec<PodView>> {
    let out = c.kubectl(&["get", "pods", "-l", &format!("app={app}"), "-o", "json"]);
    if !out.status.success() {
        return None;
    }
    let list: Value = serde_json::from_slice(&out.stdout).ok()?;
    let pods = list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let bound = p["spec"]["nodeName"].as_str().unwrap_or_default();
            let target = p.pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms/0/matchFields/0/values/0")
                .and_then(Value::as_str)
                .unwrap_or_default();
            PodView {
                name: p["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                node: if bound.is_empty() { target } else { bound }.to_string(),
                ready: p["status"]["conditions"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True")),
                terminating: p["metadata"]["deletionTimestamp"].is_string(),
                image: p["spec"]["containers"][0]["image"].as_str().unwrap_or_default().to_string(),
            }
        })
        .collect();
    Some(pods)
}

/// Nodes with a ready, not terminating daemon pod of `image`, when every pod is one such (and
/// there is one per node); `None` while anything else is around.
fn settled_nodes(c: &Cluster, app: &str, image: &str) -> Option<Vec<String>> {
    let pods = daemon_pods(c, app);
    let ok = pods
        .iter()
        .all(|p| p.ready && !p.terminating && p.image == image);
    let mut nodes: Vec<String> = pods.into_iter().map(|p| p.node).collect();
    nodes.sort();
    let n = nodes.len();
    nodes.dedup();
    (ok && nodes.len() == n).then_some(nodes)
}

/// `kubectl get ds <name>` columns DESIRED CURRENT READY UP-TO-DATE AVAILABLE NODE-SELECTOR.
fn ds_columns(c: &Cluster, name: &str) -> Vec<String> {
    let out = c.kubectl(&["get", "ds", name, "--no-headers"]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip(1)
        .take(6)
        .map(str::to_string)
        .collect()
}

fn wait_columns(c: &Cluster, name: &str, want: [&str; 5]) {
    wait_for(
        c,
        &format!("kubectl get ds {name} to show {want:?}"),
        LONG,
        || {
            ds_columns(c, name)
                .get(..5)
                .is_some_and(|cols| cols == want)
        },
    );
}

fn wait_settled(c: &Cluster, app: &str, image: &str, nodes: &[&str]) {
    wait_for(
        c,
        &format!("one ready {image} pod on each of {nodes:?}"),
        LONG,
        || settled_nodes(c, app, image).is_some_and(|n| n == nodes),
    );
}

fn rollout_status(c: &Cluster, name: &str) -> String {
    c.ok(&["rollout", "status", &format!("ds/{name}"), "--timeout=180s"])
}

/// Revision numbers `kubectl rollout history` lists.
fn history(c: &Cluster, name: &str) -> Vec<String> {
    c.ok(&["rollout", "history", &format!("ds/{name}")])
        .lines()
        .skip_while(|l| !l.starts_with("REVISION"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn daemonset_skips_tainted_node_until_tolerated_and_rolls_out_updates() {
    let c = Cluster::start();
    let _plain = Hollow::start(&c, &["node-a", "node-b"], &[]);
    let _tainted = Hollow::start(&c, &["node-c"], &["--taint", "dedicated=infra:NoSchedule"]);
    apply_daemonset(&c, "agent", json!({}), json!({}));

    wait_settled(&c, "agent", "registry.local/agent:1", &["node-a", "node-b"]);
    wait_columns(&c, "agent", ["2", "2", "2", "2", "2"]);
    let pods = daemon_pods(&c, "agent");
    assert_eq!(
        pods.len(),
        2,
        "exactly one pod per untainted node: {pods:?}"
    );
    assert!(pods.iter().all(|p| p.name.starts_with("agent-")));
    let labels = jsonpath(&c, &["pods", &pods[0].name], "{.metadata.labels}");
    assert!(labels.contains("controller-revision-hash"), "{labels}");
    assert!(labels.contains("pod-template-generation"), "{labels}");
    let events = c.ok(&[
        "get",
        "events",
        "--field-selector",
        "reason=SuccessfulCreate",
    ]);
    assert!(events.contains("Created pod: agent-"), "{events}");

    // Tolerating the taint puts a pod on the tainted node too (and rolls the others).
    c.ok(&[
        "patch",
        "ds",
        "agent",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"spec":{"tolerations":[{"key":"dedicated","operator":"Equal","value":"infra","effect":"NoSchedule"}]}}}}"#,
    ]);
    wait_settled(
        &c,
        "agent",
        "registry.local/agent:1",
        &["node-a", "node-b", "node-c"],
    );
    wait_columns(&c, "agent", ["3", "3", "3", "3", "3"]);
    rollout_status(&c, "agent");

    // A new image rolls through every node.
    c.ok(&[
        "annotate",
        "ds",
        "agent",
        "kubernetes.io/change-cause=image 2",
    ]);
    c.ok(&["set", "image", "ds/agent", "agent=registry.local/agent:2"]);
    let out = rollout_status(&c, "agent");
    assert!(out.contains("successfully rolled out"), "{out}");
    wait_settled(
        &c,
        "agent",
        "registry.local/agent:2",
        &["node-a", "node-b", "node-c"],
    );
    wait_columns(&c, "agent", ["3", "3", "3", "3", "3"]);
    assert_eq!(history(&c, "agent"), vec!["1", "2", "3"]);
    let listed = c.ok(&["rollout", "history", "ds/agent"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with('3') && l.contains("image 2")),
        "{listed}"
    );

    // Undo goes back to the previous template, which becomes the newest revision.
    c.ok(&["rollout", "undo", "ds/agent"]);
    rollout_status(&c, "agent");
    wait_settled(
        &c,
        "agent",
        "registry.local/agent:1",
        &["node-a", "node-b", "node-c"],
    );
    assert_eq!(history(&c, "agent"), vec!["1", "3", "4"]);
}

#[test]
fn daemonset_pod_goes_with_its_deleted_node() {
    let c = Cluster::start();
    let _nodes = Hollow::start(&c, &["keep-1", "drop-1"], &[]);
    apply_daemonset(&c, "logs", json!({}), json!({}));
    wait_settled(&c, "logs", "registry.local/logs:1", &["drop-1", "keep-1"]);

    c.ok(&["delete", "node", "drop-1"]);
    wait_for(&c, "the daemon pod of the deleted node to go", LONG, || {
        let pods = daemon_pods(&c, "logs");
        pods.len() == 1 && pods[0].node == "keep-1"
    });
    wait_columns(&c, "logs", ["1", "1", "1", "1", "1"]);
}

#[test]
fn daemonset_follows_node_labels_and_replaces_failed_pods() {
    let c = Cluster::start();
    let _edge = Hollow::start(&c, &["edge-1"], &["--label", "role=edge"]);
    let _core = Hollow::start(&c, &["core-1"], &[]);
    apply_daemonset(
        &c,
        "edge",
        json!({}),
        json!({"nodeSelector": {"role": "edge"}}),
    );
    wait_settled(&c, "edge", "registry.local/edge:1", &["edge-1"]);
    wait_columns(&c, "edge", ["1", "1", "1", "1", "1"]);
    assert_eq!(ds_columns(&c, "edge")[5], "role=edge");

    // A node that gains the label gets a pod; one that loses it loses its pod.
    c.ok(&["label", "node", "core-1", "role=edge"]);
    wait_settled(&c, "edge", "registry.local/edge:1", &["core-1", "edge-1"]);
    wait_columns(&c, "edge", ["2", "2", "2", "2", "2"]);
    c.ok(&["label", "node", "core-1", "role-"]);
    wait_settled(&c, "edge", "registry.local/edge:1", &["edge-1"]);
    wait_columns(&c, "edge", ["1", "1", "1", "1", "1"]);

    // A failed pod is deleted and replaced by a new one.
    let failed = daemon_pods(&c, "edge")[0].name.clone();
    c.ok(&[
        "patch",
        "pod",
        &failed,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Failed"}}"#,
    ]);
    wait_for(&c, "a new pod in place of the failed one", LONG, || {
        let pods = daemon_pods(&c, "edge");
        pods.len() == 1 && pods[0].name != failed && pods[0].ready && pods[0].node == "edge-1"
    });
    let events = c.ok(&[
        "get",
        "events",
        "--field-selector",
        "reason=FailedDaemonPod",
    ]);
    assert!(events.contains(&failed), "{events}");
}

#[test]
fn daemonset_surge_update_keeps_a_ready_pod_on_every_node() {
    let c = Cluster::start();
    let _nodes = Hollow::start(&c, &["s-1", "s-2", "s-3"], &["--startup-delay-ms", "300"]);
    apply_daemonset(
        &c,
        "surge",
        json!({
            "minReadySeconds": 1,
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        }),
        json!({}),
    );
    let all = ["s-1", "s-2", "s-3"];
    wait_settled(&c, "surge", "registry.local/surge:1", &all);
    wait_columns(&c, "surge", ["3", "3", "3", "3", "3"]);

    c.ok(&["set", "image", "ds/surge", "surge=registry.local/surge:2"]);
    // Until every node runs the new image, no node is ever without a ready pod, and no node
    // has more than one new pod beside its old one.
    let deadline = Instant::now() + LONG;
    loop {
        assert!(
            Instant::now() < deadline,
            "surge update did not finish in {LONG:?}"
        );
        let Some(pods) = try_daemon_pods(&c, "surge") else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let mut by_node: BTreeMap<&str, Vec<&PodView>> = BTreeMap::new();
        for p in &pods {
            by_node.entry(p.node.as_str()).or_default().push(p);
        }
        for n in all {
            let on = by_node.get(n).cloned().unwrap_or_default();
            assert!(
                on.iter().any(|p| p.ready),
                "node {n} has no ready daemon pod during a surge update: {pods:?}"
            );
            assert!(on.len() <= 2, "more than two pods on {n}: {pods:?}");
        }
        if settled_nodes(&c, "surge", "registry.local/surge:2").is_some_and(|n| n == all) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = rollout_status(&c, "surge");
    assert!(out.contains("successfully rolled out"), "{out}");
    wait_columns(&c, "surge", ["3", "3", "3", "3", "3"]);
}
