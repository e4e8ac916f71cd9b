//! Reading with kubectl: default namespaces, apply, every output format, describe, explain,
//! discovery commands, health, and a restart that keeps everything.

use crate::cluster::Cluster;

pub const MANIFEST: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: demo
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: demo
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: busybox:1.36
        command: ["httpd", "-f"]
        ports:
        - containerPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  selector: {app: web}
  ports:
  - port: 80
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: cfg
  namespace: demo
data:
  a: "1"
---
apiVersion: v1
kind: Secret
metadata:
  name: creds
  namespace: demo
stringData:
  password: hunter2
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1}
"#;

pub const WIDGET: &str = r#"
apiVersion: example.com/v1
kind: Widget
metadata: {name: w1, namespace: demo}
spec: {size: 3}
"#;

#[test]
fn a_new_server_has_the_four_default_namespaces() {
    let c = Cluster::start();
    let out = c.ok(&["get", "ns", "-o", "name"]);
    let mut names: Vec<&str> = out.lines().collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "namespace/default",
            "namespace/kube-node-lease",
            "namespace/kube-public",
            "namespace/kube-system"
        ]
    );
    let table = c.ok(&["get", "ns"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("STATUS") && table.contains("AGE") && table.contains("Active"),
        "{table}"
    );
}

#[test]
fn applying_a_manifest_twice_reports_unchanged_and_every_output_format_works() {
    let c = Cluster::start();
    let f = c.write("app.yaml", MANIFEST);
    let first = c.ok(&["apply", "-f", f.to_str().unwrap()]);
    for line in [
        "namespace/demo created",
        "deployment.apps/web created",
        "service/web created",
        "configmap/cfg created",
        "secret/creds created",
        "customresourcedefinition.apiextensions.k8s.io/widgets.example.com created",
    ] {
        assert!(first.contains(line), "missing {line:?} in:\n{first}");
    }
    c.ok(&[
        "wait",
        "--for",
        "condition=established",
        "crd/widgets.example.com",
        "--timeout=20s",
    ]);
    assert!(c
        .ok_stdin(&["apply", "-f", "-"], WIDGET)
        .contains("widget.example.com/w1 created"));
    let second = c.ok(&["apply", "-f", f.to_str().unwrap()]);
    // As upstream, a secret written with stringData reads back without it, so kubectl's
    // three-way patch is never empty: "configured" (and nothing changes on the server).
    assert_eq!(second.matches("unchanged").count(), 5, "{second}");
    assert!(second.contains("secret/creds configured"), "{second}");
    assert!(c
        .ok_stdin(&["apply", "-f", "-"], WIDGET)
        .contains("widget.example.com/w1 unchanged"));

    let wide = c.ok(&["get", "deploy", "-n", "demo", "-o", "wide"]);
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        vec![
            "NAME",
            "READY",
            "UP-TO-DATE",
            "AVAILABLE",
            "AGE",
            "CONTAINERS",
            "IMAGES",
            "SELECTOR"
        ]
    );
    assert!(
        wide.contains("busybox:1.36") && wide.contains("app=web") && wide.contains("0/2"),
        "{wide}"
    );
    let svc = c.ok(&["get", "svc", "-n", "demo"]);
    assert!(svc.lines().next().unwrap().contains("CLUSTER-IP"), "{svc}");
    assert!(svc.contains("80/TCP"), "{svc}");
    let secret = c.ok(&["get", "secret", "creds", "-n", "demo"]);
    assert!(
        secret.contains("Opaque") && secret.split_whitespace().any(|w| w == "1"),
        "stringData became one data key: {secret}"
    );
    let pw = c.ok(&[
        "get",
        "secret",
        "creds",
        "-n",
        "demo",
        "-o",
        "jsonpath={.data.password}",
    ]);
    assert_eq!(pw, "aHVudGVyMg==");

    let y = c.ok(&["get", "cm", "cfg", "-n", "demo", "-o", "yaml"]);
    assert!(
        y.contains("kind: ConfigMap") && y.contains("resourceVersion:") && y.contains("uid:"),
        "{y}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&c.ok(&["get", "deploy", "web", "-n", "demo", "-o", "json"])).unwrap();
    assert_eq!(
        j["spec"]["strategy"]["type"], "RollingUpdate",
        "defaults applied"
    );
    assert_eq!(
        j["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"],
        "IfNotPresent"
    );
    assert_eq!(j["metadata"]["generation"], 1);
    // Every namespace also gets the cluster CA's ConfigMap, as upstream (published shortly
    // after the namespace appears).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let jp = loop {
        let jp = c.ok(&[
            "get",
            "cm",
            "-n",
            "demo",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ]);
        if jp != "cfg" || std::time::Instant::now() > deadline {
            break jp;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(jp, "cfg kube-root-ca.crt");
    let cc = c.ok(&[
        "get",
        "deploy",
        "-n",
        "demo",
        "-o",
        "custom-columns=N:.metadata.name,R:.spec.replicas",
    ]);
    assert_eq!(
        cc.lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        vec!["web", "2"]
    );
    assert_eq!(
        c.ok(&["get", "svc,cm", "-n", "demo", "-o", "name"])
            .lines()
            .collect::<Vec<_>>(),
        vec!["service/web", "configmap/cfg", "configmap/kube-root-ca.crt"]
    );
    let all = c.ok(&["get", "all", "-n", "demo"]);
    assert!(
        all.contains("deployment.apps/web") && all.contains("service/web"),
        "{all}"
    );
    let wd = c.ok(&["get", "wd", "-n", "demo"]);
    assert_eq!(
        wd.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        vec!["NAME", "SIZE"]
    );
    assert!(wd.lines().nth(1).unwrap().starts_with("w1"), "{wd}");
    let labels = c.ok(&["get", "deploy", "-n", "demo", "--show-labels"]);
    assert!(labels.contains("app=web"), "{labels}");
    let allns = c.ok(&["get", "cm", "-A"]);
    assert!(
        allns.lines().next().unwrap().starts_with("NAMESPACE"),
        "{allns}"
    );
    let d = c.ok(&["describe", "cm", "cfg", "-n", "demo"]);
    assert!(
        d.contains("Name:         cfg") && d.contains("Namespace:    demo"),
        "{d}"
    );
}

#[test]
fn discovery_explain_version_and_health_answer_like_upstream() {
    let c = Cluster::start();
    let res = c.ok(&["api-resources"]);
    for want in [
        "pods ",
        "deployments ",
        "customresourcedefinitions",
        "leases",
        "endpointslices",
        "horizontalpodautoscalers",
    ] {
        assert!(res.contains(want), "api-resources lacks {want}:\n{res}");
    }
    let pods = res.lines().find(|l| l.starts_with("pods ")).unwrap();
    assert!(
        pods.contains(" po ")
            && pods.contains(" v1 ")
            && pods.contains("true")
            && pods.contains("Pod"),
        "{pods}"
    );
    let versions = c.ok(&["api-versions"]);
    for want in [
        "v1",
        "apps/v1",
        "batch/v1",
        "autoscaling/v2",
        "networking.k8s.io/v1",
        "apiextensions.k8s.io/v1",
    ] {
        assert!(
            versions.lines().any(|l| l == want),
            "api-versions lacks {want}"
        );
    }
    let v = c.ok(&["version", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert!(v["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap()
        .starts_with("v1.33."));
    let e = c.ok(&["explain", "deployment.spec"]);
    assert!(
        e.contains("KIND:       Deployment") && e.contains("replicas"),
        "{e}"
    );
    let e = c.ok(&["explain", "pods"]);
    assert!(e.contains("Pod is a collection of containers"), "{e}");
    let r = c.ok(&["get", "--raw", "/readyz?verbose"]);
    assert!(
        r.contains("[+]etcd ok") && r.contains("readyz check passed"),
        "{r}"
    );
    assert_eq!(c.ok(&["get", "--raw", "/livez"]), "ok");
    let m = c.ok(&["get", "--raw", "/metrics"]);
    assert!(m.contains("apiserver_request_total{"), "{m}");
}

#[test]
fn restart_keeps_objects_resource_versions_ca_and_kubeconfig() {
    let mut c = Cluster::start();
    c.ok_stdin(&["apply", "-f", "-"], "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: keep, namespace: default}\ndata: {k: v}\n");
    let before = c.ok(&[
        "get",
        "cm",
        "keep",
        "-o",
        "jsonpath={.metadata.resourceVersion}/{.metadata.uid}",
    ]);
    let kubeconfig = std::fs::read_to_string(c.kubeconfig()).unwrap();
    let ca = std::fs::read_to_string(c.data_dir().join("server/tls/server-ca.crt")).unwrap();
    c.stop();
    c.boot();
    let after = c.ok(&[
        "get",
        "cm",
        "keep",
        "-o",
        "jsonpath={.metadata.resourceVersion}/{.metadata.uid}",
    ]);
    assert_eq!(before, after);
    assert_eq!(std::fs::read_to_string(c.kubeconfig()).unwrap(), kubeconfig);
    assert_eq!(
        std::fs::read_to_string(c.data_dir().join("server/tls/server-ca.crt")).unwrap(),
        ca
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(c.kubeconfig()).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}
