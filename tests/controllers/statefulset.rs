//! StatefulSets on hollow nodes, driven through kubectl: ordered creation and scale-down (proved
//! from the order of watch events), rolling updates with `kubectl rollout status/history/undo`,
//! partitions, Parallel pod management, and claims from `volumeClaimTemplates` with their
//! retention policy.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::cluster::Cluster;
use crate::hollow::{jsonpath, wait_for, Hollow};

const LONG: Duration = Duration::from_secs(120);

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: None
  selector:
    app: web
  ports:
  - port: 80
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: web
spec:
  serviceName: web
  replicas: 3
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: nginx
        image: nginx:1
        volumeMounts:
        - name: data
          mountPath: /data
  volumeClaimTemplates:
  - metadata:
      name: data
    spec:
      accessModes: ["ReadWriteOnce"]
      resources:
        requests:
          storage: 1Gi
"#;

/// One line of a pod watch.
#[derive(Debug)]
struct Event {
    kind: String,
    name: String,
    deleting: bool,
    ready: bool,
    image: String,
}

/// `kubectl get pods -w --output-watch-events` in the background (killed by PID when dropped),
/// one line per event in a file.
struct PodWatch {
    child: Child,
    out: std::path::PathBuf,
}

impl PodWatch {
    /// Starts the watch and waits until its initial list is done (it shows the pod `marker`,
    /// which must exist), so that every later change is seen in order.
    fn start(c: &Cluster, marker: &str) -> PodWatch {
        let out = c.path().join(format!("watch-{marker}.log"));
        let file = std::fs::File::create(&out).unwrap();
        let child = Command::new("kubectl")
            .args([
                "get",
                "pods",
                "--watch",
                "--output-watch-events",
                "-o",
                "jsonpath={.type}|{.object.metadata.name}|{.object.metadata.deletionTimestamp}|{.object.status.conditions[?(@.type==\"Ready\")].status}|{.object.spec.containers[0].image}{\"\\n\"}",
            ])
            .env("KUBECONFIG", c.kubeconfig())
            .env("HOME", c.path())
            .env_remove("KUBECTL_KUBERC")
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("starting kubectl get pods --watch");
        let w = PodWatch { child, out };
        wait_for(c, "the pod watch to list", LONG, || {
            w.events().iter().any(|e| e.name == marker)
        });
        w
    }

    fn events(&self) -> Vec<Event> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('|').collect();
                (f.len() == 5).then(|| Event {
                    kind: f[0].to_string(),
                    name: f[1].to_string(),
                    deleting: !f[2].is_empty(),
                    ready: f[3] == "True",
                    image: f[4].to_string(),
                })
            })
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Position of the first event matching `f`, failing with the whole log if there is none.
fn first(w: &PodWatch, evs: &[Event], what: &str, f: impl Fn(&Event) -> bool) -> usize {
    evs.iter()
        .position(f)
        .unwrap_or_else(|| panic!("no watch event for {what}:\n{}", w.log()))
}

fn pod_names(c: &Cluster, selector: &str) -> Vec<String> {
    let mut v: Vec<String> = jsonpath(
        c,
        &["pods", "-l", selector],
        "{range .items[*]}{.metadata.name}{\"\\n\"}{end}",
    )
    .lines()
    .map(str::to_string)
    .collect();
    v.sort();
    v
}

fn images(c: &Cluster, selector: &str) -> Vec<String> {
    jsonpath(
        c,
        &["pods", "-l", selector],
        "{range .items[*]}{.metadata.name}={.spec.containers[0].image}{\"\\n\"}{end}",
    )
    .lines()
    .map(str::to_string)
    .collect()
}

fn exists(c: &Cluster, kind: &str, name: &str) -> bool {
    c.kubectl(&["get", kind, name]).status.success()
}

/// Waits for the StatefulSet's rollout and returns what kubectl printed.
fn rollout_status(c: &Cluster, sts: &str) -> String {
    c.ok(&["rollout", "status", sts, "--timeout=180s"])
}

#[test]
fn statefulset_creates_pods_in_order_updates_rolls_back_and_scales_down_in_reverse() {
    let c = Cluster::start();
    // Pods take a while to become ready, so that creating them in parallel would show.
    let _nodes = Hollow::start(&c, &["n1", "n2"], &["--startup-delay-ms", "1500"]);
    c.ok(&["run", "marker", "--image=busybox", "--", "sleep", "3600"]);
    let watch = PodWatch::start(&c, "marker");

    c.ok_stdin(&["apply", "-f", "-"], WEB);
    let out = rollout_status(&c, "sts/web");
    assert!(out.contains("roll out complete"), "{out}");
    wait_for(&c, "3 ready replicas", LONG, || {
        jsonpath(&c, &["sts", "web"], "{.status.readyReplicas}") == "3"
    });

    // Each pod was created only after its predecessor was running and ready.
    let evs = watch.events();
    for i in 0..3 {
        let added = first(&watch, &evs, &format!("web-{i} added"), |e| {
            e.kind == "ADDED" && e.name == format!("web-{i}")
        });
        assert!(
            !evs[added].ready,
            "web-{i} was ready when first seen: the watch started late\n{}",
            watch.log()
        );
        if i > 0 {
            let prev_ready = first(&watch, &evs, &format!("web-{} ready", i - 1), |e| {
                e.name == format!("web-{}", i - 1) && e.ready && !e.deleting
            });
            assert!(
                prev_ready < added,
                "web-{i} was created before web-{} was ready:\n{}",
                i - 1,
                watch.log()
            );
        }
    }

    // Identity: hostname, subdomain, labels, owner; storage: one claim per pod.
    for i in 0..3 {
        let pod = format!("web-{i}");
        let got = jsonpath(
            &c,
            &["pod", &pod],
            "{.spec.hostname} {.spec.subdomain} {.metadata.labels.statefulset\\.kubernetes\\.io/pod-name} {.metadata.labels.apps\\.kubernetes\\.io/pod-index} {.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name} {.spec.volumes[?(@.name==\"data\")].persistentVolumeClaim.claimName}",
        );
        assert_eq!(
            got,
            format!("{pod} web {pod} {i} StatefulSet/web data-{pod}"),
            "pod {pod}"
        );
        // The claim got the default StorageClass (WaitForFirstConsumer), and the scheduler
        // wrote the pod's node on it for the provisioner.
        let claim = format!("data-web-{i}");
        let node = jsonpath(&c, &["pod", &pod], "{.spec.nodeName}");
        assert_eq!(
            jsonpath(
                &c,
                &["pvc", &claim],
                "{.metadata.labels.app} {.spec.resources.requests.storage} {.spec.storageClassName} {.metadata.annotations.volume\\.kubernetes\\.io/selected-node}"
            ),
            format!("web 1Gi local-path {node}"),
            "claim {claim}"
        );
    }
    let revision = jsonpath(&c, &["sts", "web"], "{.status.updateRevision}");
    assert!(revision.starts_with("web-"), "{revision}");
    assert_eq!(
        jsonpath(
            &c,
            &["pods", "-l", "app=web"],
            "{.items[*].metadata.labels.controller-revision-hash}"
        ),
        format!("{revision} {revision} {revision}")
    );
    let events = c.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.kind=StatefulSet,involvedObject.name=web",
        "-o",
        "custom-columns=REASON:.reason,MESSAGE:.message",
    ]);
    assert!(
        events.contains("create Pod web-0 in StatefulSet web successful")
            && events.contains("create Claim data-web-2 Pod web-2 in StatefulSet web success"),
        "{events}"
    );

    // Rolling update: highest ordinal first, each replacement ready before the next goes.
    let mark = watch.events().len();
    c.ok(&["set", "image", "sts/web", "nginx=nginx:2"]);
    let out = rollout_status(&c, "sts/web");
    assert!(out.contains("roll out complete"), "{out}");
    wait_for(&c, "every pod at nginx:2", LONG, || {
        images(&c, "app=web") == ["web-0=nginx:2", "web-1=nginx:2", "web-2=nginx:2"]
    });
    wait_for(&c, "the update to complete", LONG, || {
        jsonpath(
            &c,
            &["sts", "web"],
            "{.status.currentRevision} {.status.updatedReplicas}",
        ) == format!(
            "{} 3",
            jsonpath(&c, &["sts", "web"], "{.status.updateRevision}")
        )
    });
    let evs = &watch.events()[mark..];
    let deleted = |i: usize| {
        first(&watch, evs, &format!("web-{i} deleted"), |e| {
            e.kind == "DELETED" && e.name == format!("web-{i}")
        })
    };
    let terminating = |i: usize| {
        first(&watch, evs, &format!("web-{i} terminating"), |e| {
            e.deleting && e.name == format!("web-{i}")
        })
    };
    let updated_ready = |i: usize| {
        first(&watch, evs, &format!("web-{i} ready at nginx:2"), |e| {
            e.name == format!("web-{i}") && e.ready && !e.deleting && e.image == "nginx:2"
        })
    };
    assert!(
        deleted(2) < updated_ready(2) && updated_ready(2) < terminating(1),
        "web-1 was replaced before web-2 was updated and ready:\n{}",
        watch.log()
    );
    assert!(
        deleted(1) < updated_ready(1) && updated_ready(1) < terminating(0),
        "web-0 was replaced before web-1 was updated and ready:\n{}",
        watch.log()
    );

    // History and undo (kubectl reads and patches back the ControllerRevisions).
    let history = c.ok(&["rollout", "history", "sts/web"]);
    let numbers: Vec<&str> = history
        .lines()
        .skip_while(|l| !l.starts_with("REVISION"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(numbers, ["1", "2"], "{history}");
    let detail = c.ok(&["rollout", "history", "sts/web", "--revision=1"]);
    assert!(detail.contains("nginx:1"), "{detail}");
    c.ok(&["rollout", "undo", "sts/web"]);
    rollout_status(&c, "sts/web");
    wait_for(&c, "every pod back at nginx:1", LONG, || {
        images(&c, "app=web") == ["web-0=nginx:1", "web-1=nginx:1", "web-2=nginx:1"]
    });
    let history = c.ok(&["rollout", "history", "sts/web"]);
    let numbers: Vec<&str> = history
        .lines()
        .skip_while(|l| !l.starts_with("REVISION"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        numbers,
        ["2", "3"],
        "the restored revision is renumbered:\n{history}"
    );
    assert_eq!(
        jsonpath(&c, &["sts", "web"], "{.status.updateRevision}"),
        revision,
        "undo returns to the first revision"
    );

    // Scale down: highest ordinal first, each gone before the next goes; claims stay.
    wait_for(&c, "3 ready replicas after the undo", LONG, || {
        jsonpath(
            &c,
            &["sts", "web"],
            "{.status.readyReplicas} {.status.currentReplicas}",
        ) == "3 3"
    });
    let mark = watch.events().len();
    c.ok(&["scale", "sts/web", "--replicas=1"]);
    wait_for(&c, "web-1 and web-2 gone", LONG, || {
        pod_names(&c, "app=web") == ["web-0"]
            && jsonpath(&c, &["sts", "web"], "{.status.replicas}") == "1"
    });
    let evs = &watch.events()[mark..];
    let deleted = first(&watch, evs, "web-2 deleted", |e| {
        e.kind == "DELETED" && e.name == "web-2"
    });
    let next = first(&watch, evs, "web-1 terminating", |e| {
        e.deleting && e.name == "web-1"
    });
    assert!(
        deleted < next,
        "web-1 was deleted before web-2 was gone:\n{}",
        watch.log()
    );
    assert!(
        !evs.iter().any(|e| e.name == "web-0" && e.deleting),
        "web-0 must stay:\n{}",
        watch.log()
    );
    for claim in ["data-web-0", "data-web-1", "data-web-2"] {
        assert!(exists(&c, "pvc", claim), "{claim} is retained by default");
    }
}

#[test]
fn statefulset_partition_updates_only_ordinals_at_or_above_it() {
    let c = Cluster::start();
    let _nodes = Hollow::start(&c, &["n1"], &[]);
    c.ok_stdin(&["apply", "-f", "-"], WEB);
    rollout_status(&c, "sts/web");
    c.ok(&[
        "patch",
        "sts",
        "web",
        "-p",
        r#"{"spec":{"updateStrategy":{"type":"RollingUpdate","rollingUpdate":{"partition":2}}}}"#,
    ]);
    c.ok(&["set", "image", "sts/web", "nginx=nginx:2"]);
    let out = rollout_status(&c, "sts/web");
    assert!(out.contains("partitioned roll out complete"), "{out}");
    wait_for(&c, "web-2 alone updated", LONG, || {
        images(&c, "app=web") == ["web-0=nginx:1", "web-1=nginx:1", "web-2=nginx:2"]
    });
    let (current, update) = (
        jsonpath(&c, &["sts", "web"], "{.status.currentRevision}"),
        jsonpath(&c, &["sts", "web"], "{.status.updateRevision}"),
    );
    assert_ne!(
        current, update,
        "the update is not complete below the partition"
    );
    assert_eq!(
        jsonpath(
            &c,
            &["sts", "web"],
            "{.status.currentReplicas} {.status.updatedReplicas}"
        ),
        "2 1"
    );

    // A pod below the partition comes back at the current revision.
    let uid = jsonpath(&c, &["pod", "web-0"], "{.metadata.uid}");
    c.ok(&["delete", "pod", "web-0", "--wait=false"]);
    wait_for(&c, "web-0 recreated and ready", LONG, || {
        let p = jsonpath(
            &c,
            &["pod", "web-0"],
            "{.metadata.uid} {.status.conditions[?(@.type==\"Ready\")].status}",
        );
        !p.is_empty() && !p.starts_with(&uid) && p.ends_with("True")
    });
    assert_eq!(
        jsonpath(
            &c,
            &["pod", "web-0"],
            "{.spec.containers[0].image} {.metadata.labels.controller-revision-hash}"
        ),
        format!("nginx:1 {current}")
    );

    // Lowering the partition finishes the update.
    c.ok(&[
        "patch",
        "sts",
        "web",
        "-p",
        r#"{"spec":{"updateStrategy":{"rollingUpdate":{"partition":0}}}}"#,
    ]);
    rollout_status(&c, "sts/web");
    wait_for(&c, "every pod updated", LONG, || {
        images(&c, "app=web") == ["web-0=nginx:2", "web-1=nginx:2", "web-2=nginx:2"]
            && jsonpath(&c, &["sts", "web"], "{.status.currentRevision}") == update
    });
}

#[test]
fn statefulset_parallel_creates_all_pods_and_claims_follow_the_retention_policy() {
    let c = Cluster::start();
    let db = WEB
        .replace("name: web", "name: db")
        .replace("app: web", "app: db")
        .replace("serviceName: web", "serviceName: db")
        .replace(
            "  replicas: 3\n",
            "  replicas: 3\n  podManagementPolicy: Parallel\n  persistentVolumeClaimRetentionPolicy:\n    whenScaled: Delete\n    whenDeleted: Delete\n",
        );
    // No nodes yet: the pods cannot start, yet Parallel creates all of them (OrderedReady
    // would wait for db-0).
    c.ok_stdin(&["apply", "-f", "-"], &db);
    wait_for(&c, "3 pending pods", LONG, || {
        pod_names(&c, "app=db") == ["db-0", "db-1", "db-2"]
    });
    assert_eq!(
        jsonpath(&c, &["pods", "-l", "app=db"], "{.items[*].status.phase}"),
        "Pending Pending Pending"
    );
    for i in 0..3 {
        let claim = format!("data-db-{i}");
        assert!(exists(&c, "pvc", &claim), "{claim}");
        assert_eq!(
            jsonpath(
                &c,
                &["pvc", &claim],
                "{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}"
            ),
            "StatefulSet/db",
            "whenDeleted=Delete: the set owns {claim}"
        );
    }
    let _nodes = Hollow::start(&c, &["n1"], &[]);
    wait_for(&c, "3 ready replicas", LONG, || {
        jsonpath(&c, &["sts", "db"], "{.status.readyReplicas}") == "3"
    });

    // whenScaled=Delete: the claims of removed pods go with them.
    c.ok(&["scale", "sts/db", "--replicas=1"]);
    wait_for(&c, "db-1, db-2 and their claims gone", LONG, || {
        pod_names(&c, "app=db") == ["db-0"]
            && !exists(&c, "pvc", "data-db-1")
            && !exists(&c, "pvc", "data-db-2")
    });
    assert!(exists(&c, "pvc", "data-db-0"));

    // Scaling up again makes fresh claims.
    c.ok(&["scale", "sts/db", "--replicas=2"]);
    wait_for(&c, "db-1 back with a claim", LONG, || {
        exists(&c, "pvc", "data-db-1")
            && jsonpath(&c, &["sts", "db"], "{.status.readyReplicas}") == "2"
    });

    // whenDeleted=Delete: deleting the set deletes its claims (through the garbage collector).
    c.ok(&["delete", "sts", "db"]);
    wait_for(&c, "pods, claims and revisions gone", LONG, || {
        pod_names(&c, "app=db").is_empty()
            && !exists(&c, "pvc", "data-db-0")
            && !exists(&c, "pvc", "data-db-1")
            && jsonpath(&c, &["controllerrevisions"], "{.items[*].metadata.name}").is_empty()
    });
}
