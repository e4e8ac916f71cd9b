//! `kubectl debug` with ephemeral containers: added through `pods/ephemeralcontainers`, run
//! once in the pod's sandbox sharing the target container's processes, attachable, reported
//! in `ephemeralContainerStatuses`; removal and bad targets refused as upstream refuses them.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use crate::node::Node;

const T: Duration = Duration::from_secs(60);

/// PUTs `pod` to `dbg`'s ephemeralcontainers subresource, expects a refusal, returns its text.
fn replace_ephemeral_refused(n: &Node, pod: &serde_json::Value) -> String {
    let file = n.run_dir().join("ephemeral.json");
    std::fs::write(&file, pod.to_string()).unwrap();
    let out = n.kubectl(&[
        "replace",
        "--raw",
        "/api/v1/namespaces/default/pods/dbg/ephemeralcontainers",
        "-f",
        file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn kubectl_debug_runs_an_ephemeral_container_beside_the_target() {
    let n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: dbg}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo app-secret > /tmp/mark; exec sleep 3600"]
"#,
    );
    n.wait_phase("dbg", "Running", T);

    // Non-interactive: the debug container sees the target's processes and files.
    n.ok(&[
        "debug",
        "dbg",
        "--image=busybox",
        "--image-pull-policy=IfNotPresent",
        "--target=app",
        "-c",
        "peek",
        "--",
        "sh",
        "-c",
        "ps -o pid,args; cat /proc/1/root/tmp/mark",
    ]);
    n.wait_for("the ephemeral container to finish", T, || {
        n.pod_field(
            "dbg",
            "{.status.ephemeralContainerStatuses[?(@.name==\"peek\")].state.terminated.exitCode}",
        ) == "0"
    });
    let logs = n.ok(&["logs", "dbg", "-c", "peek"]);
    assert!(logs.contains("sleep 3600"), "{logs}");
    assert!(logs.contains("app-secret"), "{logs}");
    // It ran once; the pod's own container is untouched and still ready.
    assert_eq!(
        n.pod_field(
            "dbg",
            "{.status.ephemeralContainerStatuses[?(@.name==\"peek\")].restartCount}"
        ),
        "0"
    );
    assert_eq!(n.pod_field("dbg", "{.status.phase}"), "Running");
    // Its events name it where it is in the spec.
    let paths = n.ok(&[
        "get",
        "events",
        "-o",
        "jsonpath={.items[*].involvedObject.fieldPath}",
    ]);
    assert!(paths.contains("spec.ephemeralContainers{peek}"), "{paths}");
    assert!(paths.contains("spec.containers{app}"), "{paths}");
    assert_eq!(
        n.pod_field("dbg", "{.status.containerStatuses[0].ready}"),
        "true"
    );

    // Interactive: kubectl waits for it to run and attaches stdin.
    let mut child = n
        .kubectl_cmd(&[
            "debug",
            "-i",
            "dbg",
            "--image=busybox",
            "--image-pull-policy=IfNotPresent",
            "--target=app",
            "-c",
            "shell",
            "--",
            "sh",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        // Typed after the attach; kubectl buffers what comes before it.
        std::thread::sleep(Duration::from_secs(2));
        let _ =
            stdin.write_all(b"echo in-debug-$((6*7)); ps -o args | grep -c 'sleep 3600'\nexit\n");
    });
    let out = crate::streaming::wait_output(child, T);
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("in-debug-42"),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    n.wait_for("the interactive debug container to end", T, || {
        n.pod_field(
            "dbg",
            "{.status.ephemeralContainerStatuses[?(@.name==\"shell\")].state.terminated.reason}",
        ) == "Completed"
    });
    // The subresource as kubectl reads it, and upstream's refusals.
    let names = n.ok(&[
        "get",
        "--raw",
        "/api/v1/namespaces/default/pods/dbg/ephemeralcontainers",
    ]);
    assert!(
        names.contains("\"peek\"") && names.contains("\"shell\""),
        "{names}"
    );
    let pod: serde_json::Value = serde_json::from_str(&names).unwrap();
    let mut removed = pod.clone();
    removed["spec"]["ephemeralContainers"] = serde_json::json!([]);
    let err = replace_ephemeral_refused(&n, &removed);
    assert!(
        err.contains("existing ephemeral containers \\\"peek\\\" may not be removed")
            || err.contains("existing ephemeral containers \"peek\" may not be removed"),
        "{err}"
    );
    let mut bad = pod.clone();
    bad["spec"]["ephemeralContainers"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "name": "stray", "image": "busybox", "targetContainerName": "nope",
            "ports": [{"containerPort": 80}],
        }));
    let err = replace_ephemeral_refused(&n, &bad);
    assert!(err.contains("targetContainerName: Not found"), "{err}");
    assert!(
        err.contains("cannot be set for an Ephemeral Container"),
        "{err}"
    );
    // A copy of the pod with a debugging container beside the app, sharing its processes.
    n.ok(&[
        "debug",
        "dbg",
        "--copy-to=dbg-copy",
        "--image=busybox",
        "--image-pull-policy=IfNotPresent",
        "--share-processes",
        "-c",
        "extra",
        "--",
        "sh",
        "-c",
        "sleep 1; ps -o args; exec sleep 999",
    ]);
    n.wait_phase("dbg-copy", "Running", T);
    n.wait_for("the copy's debug container to list processes", T, || {
        n.kubectl(&["logs", "dbg-copy", "-c", "extra"])
            .stdout
            .windows(10)
            .any(|w| w == b"sleep 3600")
    });
    assert_eq!(
        n.pod_field("dbg-copy", "{.spec.containers[*].name}"),
        "app extra"
    );
    // A pod update cannot slip ephemeral containers in or out.
    let count = n.pod_field("dbg", "{.spec.ephemeralContainers[*].name}");
    assert_eq!(count, "peek shell");
}

#[test]
fn kubectl_debug_node_runs_a_pod_in_the_hosts_namespaces() {
    let n = Node::start();
    let out = n.kubectl(&[
        "debug",
        "node/node1",
        "--image=busybox",
        "--image-pull-policy=IfNotPresent",
        "--",
        "sh",
        "-c",
        "test -d /host/proc/1 && echo host-root; [ $(ls /proc | grep -c '^[0-9]') -gt 20 ] && echo host-pid",
    ]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    // "Creating debugging pod node-debugger-node1-xxxxx with container debugger on node node1."
    let pod = all
        .split_whitespace()
        .find(|w| w.starts_with("node-debugger-node1-"))
        .unwrap_or_else(|| panic!("no pod name in: {all}"))
        .to_string();
    n.wait_for("the node debugger to finish", T, || {
        n.pod_field(&pod, "{.status.phase}") == "Succeeded"
    });
    let logs = n.ok(&["logs", &pod]);
    assert_eq!(logs, "host-root\nhost-pid\n");
    assert_eq!(n.pod_field(&pod, "{.spec.hostPID}"), "true");
    assert_eq!(n.pod_field(&pod, "{.spec.hostNetwork}"), "true");
}
