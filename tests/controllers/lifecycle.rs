//! Cascading deletion (background, foreground, orphan), namespace deletion and scheduling
//! failures, through kubectl as a user would.

use std::time::Duration;

use crate::cluster::Cluster;
use crate::hollow::{jsonpath, wait_for, Hollow};

const LONG: Duration = Duration::from_secs(60);

fn names(c: &Cluster, what: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = jsonpath(c, what, "{range .items[*]}{.metadata.name}{\"\\n\"}{end}")
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn deploy(c: &Cluster, name: &str) {
    c.ok(&[
        "create",
        "deployment",
        name,
        "--image=nginx",
        "--replicas=2",
    ]);
    c.ok(&[
        "rollout",
        "status",
        &format!("deployment/{name}"),
        "--timeout=60s",
    ]);
}

#[test]
fn deleting_a_deployment_cascades_in_background_foreground_and_orphan_modes() {
    let c = Cluster::start();
    let _nodes = Hollow::start(&c, &["n1", "n2"], &[]);

    // Background (kubectl's default): the deployment goes at once, its ReplicaSet and pods
    // follow.
    deploy(&c, "bg");
    c.ok(&["delete", "deployment", "bg"]);
    wait_for(&c, "bg's ReplicaSet and pods to go", LONG, || {
        names(&c, &["rs", "-l", "app=bg"]).is_empty()
            && names(&c, &["pods", "-l", "app=bg"]).is_empty()
    });

    // Orphan: the ReplicaSet and its pods stay, without an owner.
    deploy(&c, "orph");
    c.ok(&["delete", "deployment", "orph", "--cascade=orphan"]);
    wait_for(&c, "orph to go", LONG, || {
        names(&c, &["deployment"]).iter().all(|n| n != "orph")
    });
    std::thread::sleep(Duration::from_secs(1));
    let rs = names(&c, &["rs", "-l", "app=orph"]);
    assert_eq!(rs.len(), 1, "the orphaned ReplicaSet stays: {rs:?}");
    assert_eq!(
        jsonpath(&c, &["rs", &rs[0]], "{.metadata.ownerReferences}"),
        "",
        "its owner reference is removed"
    );
    assert_eq!(names(&c, &["pods", "-l", "app=orph"]).len(), 2);

    // Foreground: the deployment stays (deletionTimestamp, foregroundDeletion finalizer) until
    // its dependents are gone; a finalizer on one pod holds it.
    deploy(&c, "fg");
    let pods = names(&c, &["pods", "-l", "app=fg"]);
    c.ok(&[
        "patch",
        "pod",
        &pods[0],
        "-p",
        r#"{"metadata":{"finalizers":["example.com/hold"]}}"#,
    ]);
    c.ok(&[
        "delete",
        "deployment",
        "fg",
        "--cascade=foreground",
        "--wait=false",
    ]);
    wait_for(&c, "the other fg pod to go", LONG, || {
        names(&c, &["pods", "-l", "app=fg"]).len() == 1
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        jsonpath(&c, &["deployment", "fg"], "{.metadata.finalizers}"),
        r#"["foregroundDeletion"]"#,
        "the owner waits for its dependents"
    );
    assert!(!jsonpath(&c, &["deployment", "fg"], "{.metadata.deletionTimestamp}").is_empty());
    c.ok(&[
        "patch",
        "pod",
        &pods[0],
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    wait_for(&c, "deployment fg to go after its dependents", LONG, || {
        names(&c, &["deployment"]).iter().all(|n| n != "fg")
            && names(&c, &["rs", "-l", "app=fg"]).is_empty()
            && names(&c, &["pods", "-l", "app=fg"]).is_empty()
    });
    // The orphans were untouched throughout.
    assert_eq!(names(&c, &["pods", "-l", "app=orph"]).len(), 2);
}

#[test]
fn deleting_a_namespace_removes_everything_in_it_including_custom_resources() {
    let c = Cluster::start();
    let _nodes = Hollow::start(&c, &["n1"], &[]);
    c.ok_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"#,
    );
    c.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/widgets.example.com",
        "--timeout=30s",
    ]);
    c.ok(&["create", "namespace", "doomed"]);
    c.ok(&[
        "-n",
        "doomed",
        "create",
        "deployment",
        "web",
        "--image=nginx",
        "--replicas=2",
    ]);
    c.ok(&[
        "-n",
        "doomed",
        "create",
        "configmap",
        "cfg",
        "--from-literal=a=b",
    ]);
    c.ok(&[
        "-n",
        "doomed",
        "create",
        "secret",
        "generic",
        "s",
        "--from-literal=a=b",
    ]);
    c.ok(&[
        "-n",
        "doomed",
        "create",
        "service",
        "clusterip",
        "svc",
        "--tcp=80:80",
    ]);
    c.ok_stdin(
        &["-n", "doomed", "apply", "-f", "-"],
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w1, finalizers: [example.com/hold]}\nspec: {size: 1}\n",
    );
    c.ok(&[
        "-n",
        "doomed",
        "rollout",
        "status",
        "deployment/web",
        "--timeout=60s",
    ]);

    c.ok(&["delete", "namespace", "doomed", "--wait=false"]);
    // The widget's finalizer holds the namespace in Terminating, with upstream's conditions.
    wait_for(
        &c,
        "the namespace to report its remaining finalizer",
        LONG,
        || {
            jsonpath(
            &c,
            &["namespace", "doomed"],
            "{.status.conditions[?(@.type==\"NamespaceFinalizersRemaining\")].message}",
        ) == "Some content in the namespace has finalizers remaining: example.com/hold in 1 resource instances"
        },
    );
    assert_eq!(
        jsonpath(&c, &["namespace", "doomed"], "{.status.phase}"),
        "Terminating"
    );
    let err = c.fails(&["-n", "doomed", "create", "configmap", "late"]);
    assert!(
        err.contains(
            "unable to create new content in namespace doomed because it is being terminated"
        ),
        "{err}"
    );
    wait_for(&c, "everything else in doomed to go", LONG, || {
        c.ok(&[
            "-n",
            "doomed",
            "get",
            "all,configmaps,secrets",
            "-o",
            "name",
        ])
        .lines()
        .all(|l| l == "configmap/kube-root-ca.crt")
    });
    c.ok(&[
        "-n",
        "doomed",
        "patch",
        "widget",
        "w1",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    wait_for(&c, "namespace doomed to go", LONG, || {
        !c.kubectl(&["get", "namespace", "doomed"]).status.success()
    });
    assert!(c.ok(&["get", "widgets", "-A", "-o", "name"]).is_empty());
}

#[test]
fn unschedulable_pod_reports_upstream_reasons_and_schedules_once_a_node_fits() {
    let c = Cluster::start();
    let _tainted = Hollow::start(&c, &["t1"], &["--taint", "dedicated=infra:NoSchedule"]);
    let _small = Hollow::start(&c, &["s1", "s2"], &["--cpu", "1"]);
    c.ok(&["run", "big", "--image=nginx", "--overrides", r#"{"spec":{"containers":[{"name":"big","image":"nginx","resources":{"requests":{"cpu":"2"}}}]}}"#]);
    let want = "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: infra}, 2 Insufficient cpu. preemption: 0/3 nodes are available: 1 Preemption is not helpful for scheduling, 2 No preemption victims found for incoming pod.";
    wait_for(&c, "the pod to be reported unschedulable", LONG, || {
        jsonpath(
            &c,
            &["pod", "big"],
            "{.status.conditions[?(@.type==\"PodScheduled\")].message}",
        ) == want
    });
    assert_eq!(
        jsonpath(
            &c,
            &["pod", "big"],
            "{.status.conditions[?(@.type==\"PodScheduled\")].reason}"
        ),
        "Unschedulable"
    );
    let events = c.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=big",
    ]);
    assert!(
        events.contains("FailedScheduling") && events.contains("Insufficient cpu"),
        "{events}"
    );
    assert_eq!(jsonpath(&c, &["pod", "big"], "{.spec.nodeName}"), "");

    // A node that fits joins: the pod is retried and lands there.
    let _large = Hollow::start(&c, &["l1"], &["--cpu", "4"]);
    wait_for(&c, "the pod to be scheduled on l1", LONG, || {
        jsonpath(&c, &["pod", "big"], "{.spec.nodeName}") == "l1"
    });
    wait_for(&c, "the pod to run", LONG, || {
        jsonpath(&c, &["pod", "big"], "{.status.phase}") == "Running"
    });
}

#[test]
fn a_pod_waits_for_its_claim_and_its_volume_node() {
    let c = Cluster::start();
    let _nodes = Hollow::start(&c, &["z1"], &["--label", "zone=a"]);
    let _other = Hollow::start(&c, &["z2"], &["--label", "zone=b"]);
    let pod = |name: &str, claim: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  containers:\n  - name: c\n    image: nginx\n  volumes:\n  - name: data\n    persistentVolumeClaim:\n      claimName: {claim}\n"
        )
    };
    let message = |name: &str| {
        jsonpath(
            &c,
            &["pod", name],
            "{.status.conditions[?(@.type==\"PodScheduled\")].message}",
        )
    };
    // A missing claim: no node, and preemption cannot help.
    c.ok_stdin(&["apply", "-f", "-"], &pod("early", "data"));
    let want = "0/2 nodes are available: persistentvolumeclaim \"data\" not found. preemption: 0/2 nodes are available: 2 Preemption is not helpful for scheduling.";
    wait_for(&c, "the missing claim to be reported", LONG, || {
        message("early") == want
    });
    // The claim arrives (with the default class, WaitForFirstConsumer): the pod is retried,
    // bound, and its node is written on the claim.
    c.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: data\nspec:\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Gi\n",
    );
    assert_eq!(
        jsonpath(&c, &["pvc", "data"], "{.spec.storageClassName}"),
        "local-path"
    );
    wait_for(&c, "the pod to be scheduled", LONG, || {
        !jsonpath(&c, &["pod", "early"], "{.spec.nodeName}").is_empty()
    });
    let node = jsonpath(&c, &["pod", "early"], "{.spec.nodeName}");
    wait_for(&c, "the claim to name the node", LONG, || {
        jsonpath(
            &c,
            &["pvc", "data"],
            "{.metadata.annotations.volume\\.kubernetes\\.io/selected-node}",
        ) == node
    });
    // A claim bound to a volume pinned to zone b only fits z2.
    c.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: pinned\nspec:\n  capacity:\n    storage: 1Gi\n  accessModes: [ReadWriteOnce]\n  hostPath:\n    path: /tmp/pinned\n  nodeAffinity:\n    required:\n      nodeSelectorTerms:\n      - matchExpressions:\n        - key: zone\n          operator: In\n          values: [b]\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: pinned\nspec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: \"\"\n  volumeName: pinned\n  resources:\n    requests:\n      storage: 1Gi\n",
    );
    c.ok_stdin(&["apply", "-f", "-"], &pod("zonal", "pinned"));
    wait_for(&c, "the pod to land on z2", LONG, || {
        jsonpath(&c, &["pod", "zonal"], "{.spec.nodeName}") == "z2"
    });
    // A class that binds immediately keeps the pod pending until something binds the claim.
    c.ok_stdin(
        &["apply", "-f", "-"],
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: now\nprovisioner: example.com/now\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: now\nspec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: now\n  resources:\n    requests:\n      storage: 1Gi\n",
    );
    c.ok_stdin(&["apply", "-f", "-"], &pod("immediate", "now"));
    let want = "0/2 nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: 0/2 nodes are available: 2 Preemption is not helpful for scheduling.";
    wait_for(&c, "the unbound claim to be reported", LONG, || {
        message("immediate") == want
    });
}
