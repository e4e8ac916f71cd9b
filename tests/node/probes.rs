//! Probes against real containers: a failing liveness probe restarts the container; a
//! readiness probe flips the Ready condition both ways.

use std::time::Duration;

use crate::node::Node;

const T: Duration = Duration::from_secs(90);

#[test]
fn a_failing_liveness_probe_restarts_the_container() {
    let n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: sick}
spec:
  containers:
  - name: web
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www; echo ok > /www/healthz; (sleep 3; rm /www/healthz) & exec httpd -f -p 8080 -h /www"]
    ports: [{name: http, containerPort: 8080}]
    livenessProbe:
      httpGet: {path: /healthz, port: http}
      periodSeconds: 1
      failureThreshold: 2
"#,
    );
    n.wait_for("a restart after the liveness probe failed", T, || {
        n.pod_field("sick", "{.status.containerStatuses[0].restartCount}")
            .parse::<u32>()
            .unwrap_or(0)
            >= 1
    });
    let events = n.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=sick",
        "-o",
        "custom-columns=REASON:.reason,MESSAGE:.message",
    ]);
    assert!(
        events.contains("Container web failed liveness probe, will be restarted"),
        "{events}"
    );
    assert!(
        events.contains("Liveness probe failed: HTTP probe failed with statuscode: 404"),
        "{events}"
    );
}

#[test]
fn readiness_flips_the_ready_condition() {
    let n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: flip}
spec:
  containers:
  - name: main
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "sleep 2; touch /tmp/ready; sleep 6; rm /tmp/ready; sleep 3600"]
    readinessProbe:
      exec: {command: ["cat", "/tmp/ready"]}
      periodSeconds: 1
"#,
    );
    n.wait_phase("flip", "Running", T);
    assert_eq!(
        n.pod_field("flip", "{.status.containerStatuses[0].ready}"),
        "false",
        "not ready before the probe passes"
    );
    n.wait_ready("flip", T);
    n.wait_for("Ready=False after the file is gone", T, || {
        n.pod_field("flip", "{.status.conditions[?(@.type==\"Ready\")].status}") == "False"
    });
    assert_eq!(
        n.pod_field("flip", "{.status.conditions[?(@.type==\"Ready\")].message}"),
        "containers with unready status: [main]"
    );
    assert_eq!(
        n.pod_field("flip", "{.status.containerStatuses[0].restartCount}"),
        "0"
    );
}
