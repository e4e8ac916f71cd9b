//! Persistent volumes through kubectl: static binding (the smallest volume that fits, shown
//! Bound on both sides), local-path provisioning on the node of a claim's first pod, and
//! reclaiming (Delete removes the volume, Retain keeps it Released).

use std::time::Duration;

use crate::cluster::Cluster;
use crate::hollow::{jsonpath, wait_for, Hollow};

const LONG: Duration = Duration::from_secs(90);

fn pv(name: &str, size: &str, class: &str) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {name}\nspec:\n  capacity:\n    storage: {size}\n  accessModes: [ReadWriteOnce]\n  storageClassName: \"{class}\"\n  hostPath:\n    path: /srv/{name}\n---\n"
    )
}

fn pvc(name: &str, size: &str, class: Option<&str>) -> String {
    let class = class
        .map(|c| format!("  storageClassName: \"{c}\"\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\nspec:\n  accessModes: [ReadWriteOnce]\n{class}  resources:\n    requests:\n      storage: {size}\n---\n"
    )
}

fn pod(name: &str, claim: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  containers:\n  - name: c\n    image: nginx\n    volumeMounts:\n    - name: data\n      mountPath: /data\n  volumes:\n  - name: data\n    persistentVolumeClaim:\n      claimName: {claim}\n"
    )
}

/// One row of `kubectl get <what> <name>` as column → value (cut at the header's column
/// starts, so that empty cells stay empty).
fn row(c: &Cluster, what: &str, name: &str) -> Vec<(String, String)> {
    let out = c.ok(&["get", what, name]);
    let mut lines = out.lines();
    let header = lines.next().unwrap_or_default();
    let line = lines.next().unwrap_or_default();
    let mut starts = vec![0];
    let b = header.as_bytes();
    for i in 2..b.len() {
        if b[i] != b' ' && b[i - 1] == b' ' && b[i - 2] == b' ' {
            starts.push(i);
        }
    }
    let cut = |s: &str, i: usize| -> String {
        let from = starts[i].min(s.len());
        let to = starts.get(i + 1).copied().unwrap_or(s.len()).min(s.len());
        s[from..to].trim().to_string()
    };
    (0..starts.len())
        .map(|i| (cut(header, i), cut(line, i)))
        .collect()
}

fn col(row: &[(String, String)], name: &str) -> String {
    row.iter()
        .find(|(h, _)| h == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no column {name} in {row:?}"))
}

fn events_of(c: &Cluster, name: &str) -> String {
    jsonpath(
        c,
        &["events"],
        &format!("{{range .items[?(@.involvedObject.name==\"{name}\")]}}{{.reason}}: {{.message}}{{\"\\n\"}}{{end}}"),
    )
}

#[test]
fn a_claim_binds_the_smallest_volume_that_fits_and_a_retained_one_is_released() {
    let c = Cluster::start();
    let mut objects = pv("small", "1Gi", "manual");
    objects += &pv("fit", "5Gi", "manual");
    objects += &pv("big", "10Gi", "manual");
    objects += &pvc("claim", "3Gi", Some("manual"));
    objects += &pvc("nothing", "1Gi", Some(""));
    c.ok_stdin(&["apply", "-f", "-"], &objects);

    wait_for(&c, "the claim to be bound", LONG, || {
        jsonpath(&c, &["pvc", "claim"], "{.status.phase}") == "Bound"
    });
    let claim = row(&c, "pvc", "claim");
    assert_eq!(col(&claim, "STATUS"), "Bound");
    assert_eq!(
        col(&claim, "VOLUME"),
        "fit",
        "the smallest volume that fits"
    );
    assert_eq!(col(&claim, "CAPACITY"), "5Gi");
    assert_eq!(col(&claim, "ACCESS MODES"), "RWO");
    assert_eq!(col(&claim, "STORAGECLASS"), "manual");
    wait_for(&c, "the volume to show Bound", LONG, || {
        jsonpath(&c, &["pv", "fit"], "{.status.phase}") == "Bound"
    });
    let fit = row(&c, "pv", "fit");
    assert_eq!(col(&fit, "STATUS"), "Bound");
    assert_eq!(col(&fit, "CLAIM"), "default/claim");
    assert_eq!(col(&fit, "CAPACITY"), "5Gi");
    assert_eq!(col(&fit, "RECLAIM POLICY"), "Retain");
    assert_eq!(col(&fit, "STORAGECLASS"), "manual");
    assert_eq!(
        jsonpath(
            &c,
            &["pvc", "claim"],
            "{.metadata.annotations.pv\\.kubernetes\\.io/bind-completed} {.metadata.annotations.pv\\.kubernetes\\.io/bound-by-controller}"
        ),
        "yes yes"
    );
    assert_eq!(
        jsonpath(
            &c,
            &["pv", "fit"],
            "{.spec.claimRef.uid} {.metadata.annotations.pv\\.kubernetes\\.io/bound-by-controller}"
        ),
        format!("{} yes", jsonpath(&c, &["pvc", "claim"], "{.metadata.uid}"))
    );
    for other in ["small", "big"] {
        assert_eq!(col(&row(&c, "pv", other), "STATUS"), "Available", "{other}");
    }

    // Nothing fits a claim without a class: it stays Pending, with upstream's event.
    wait_for(&c, "the unmatched claim's event", LONG, || {
        events_of(&c, "nothing").contains(
            "FailedBinding: no persistent volumes available for this claim and no storage class is set",
        )
    });
    assert_eq!(col(&row(&c, "pvc", "nothing"), "STATUS"), "Pending");

    // A volume made for a named claim binds to it even when a better fit is free.
    c.ok_stdin(
        &["apply", "-f", "-"],
        &(pv("named", "2Gi", "manual") + &pvc("wants-named", "1Gi", Some("manual"))).replace(
            "  storageClassName: \"manual\"\n  resources",
            "  storageClassName: \"manual\"\n  volumeName: named\n  resources",
        ),
    );
    wait_for(&c, "the named volume to be bound", LONG, || {
        jsonpath(
            &c,
            &["pvc", "wants-named"],
            "{.status.phase} {.spec.volumeName}",
        ) == "Bound named"
    });

    // Deleting the claim releases its volume, which its Retain policy keeps.
    c.ok(&["delete", "pvc", "claim"]);
    wait_for(&c, "the volume to be released", LONG, || {
        jsonpath(&c, &["pv", "fit"], "{.status.phase}") == "Released"
    });
    std::thread::sleep(Duration::from_secs(2));
    let fit = row(&c, "pv", "fit");
    assert_eq!(col(&fit, "STATUS"), "Released");
    assert_eq!(col(&fit, "CLAIM"), "default/claim");
}

#[test]
fn a_waiting_claim_gets_a_local_path_volume_on_its_pods_node_that_goes_with_the_claim() {
    let c = Cluster::start();
    let _nodes = Hollow::start(&c, &["n1", "n2"], &[]);

    // A claim of the default class waits for its first consumer.
    c.ok_stdin(&["apply", "-f", "-"], &pvc("data", "2Gi", None));
    wait_for(&c, "the claim to wait for a consumer", LONG, || {
        events_of(&c, "data").contains(
            "WaitForFirstConsumer: waiting for first consumer to be created before binding",
        )
    });
    assert_eq!(col(&row(&c, "pvc", "data"), "STATUS"), "Pending");
    assert_eq!(c.ok(&["get", "pv", "-o", "name"]), "");

    // Its pod is scheduled; a volume is provisioned on that node and bound; the pod runs there.
    c.ok_stdin(&["apply", "-f", "-"], &pod("user", "data"));
    wait_for(&c, "the claim to be bound", LONG, || {
        jsonpath(&c, &["pvc", "data"], "{.status.phase}") == "Bound"
    });
    wait_for(&c, "the pod to run", LONG, || {
        jsonpath(&c, &["pod", "user"], "{.status.phase}") == "Running"
    });
    let node = jsonpath(&c, &["pod", "user"], "{.spec.nodeName}");
    let uid = jsonpath(&c, &["pvc", "data"], "{.metadata.uid}");
    let volume = format!("pvc-{uid}");
    let claim = row(&c, "pvc", "data");
    assert_eq!(col(&claim, "VOLUME"), volume);
    assert_eq!(col(&claim, "CAPACITY"), "2Gi");
    assert_eq!(col(&claim, "STORAGECLASS"), "local-path");
    let pv = row(&c, "pv", &volume);
    assert_eq!(col(&pv, "STATUS"), "Bound");
    assert_eq!(col(&pv, "CLAIM"), "default/data");
    assert_eq!(col(&pv, "RECLAIM POLICY"), "Delete");
    assert_eq!(col(&pv, "STORAGECLASS"), "local-path");
    assert_eq!(
        jsonpath(
            &c,
            &["pv", &volume],
            "{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].key}={.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]}"
        ),
        format!("kubernetes.io/hostname={node}")
    );
    assert_eq!(
        jsonpath(&c, &["pv", &volume], "{.spec.hostPath.path}"),
        format!("/var/lib/k3rs/storage/{volume}_default_data")
    );
    assert_eq!(
        jsonpath(
            &c,
            &["pv", &volume],
            "{.metadata.annotations.pv\\.kubernetes\\.io/provisioned-by}"
        ),
        "k3rs.io/local-path"
    );
    assert_eq!(
        jsonpath(
            &c,
            &["pvc", "data"],
            "{.metadata.annotations.volume\\.kubernetes\\.io/storage-provisioner}"
        ),
        "k3rs.io/local-path"
    );
    let events = events_of(&c, "data");
    assert!(
        events.contains(
            "Provisioning: External provisioner is provisioning volume for claim \"default/data\""
        ) && events.contains(&format!(
            "ProvisioningSucceeded: Successfully provisioned volume {volume}"
        )),
        "{events}"
    );

    // A class that retains its volumes.
    c.ok_stdin(
        &["apply", "-f", "-"],
        &("apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: keep\nprovisioner: k3rs.io/local-path\nreclaimPolicy: Retain\nvolumeBindingMode: WaitForFirstConsumer\n---\n".to_string()
            + &pvc("kept", "1Gi", Some("keep"))
            + &pod("keeper", "kept")),
    );
    wait_for(&c, "the retained claim to be bound", LONG, || {
        jsonpath(&c, &["pvc", "kept"], "{.status.phase}") == "Bound"
    });
    let kept = jsonpath(&c, &["pvc", "kept"], "{.spec.volumeName}");
    assert_eq!(col(&row(&c, "pv", &kept), "RECLAIM POLICY"), "Retain");

    // A claim in use is protected: deleting it leaves it terminating (and its volume bound)
    // until its pod is gone; then the Delete volume goes and the Retain one stays Released.
    c.ok(&["delete", "pvc", "data", "kept", "--wait=false"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        jsonpath(&c, &["pvc", "data"], "{.metadata.finalizers}"),
        "[\"kubernetes.io/pvc-protection\"]"
    );
    assert!(!jsonpath(&c, &["pvc", "data"], "{.metadata.deletionTimestamp}").is_empty());
    assert_eq!(col(&row(&c, "pv", &volume), "STATUS"), "Bound");
    assert_eq!(
        jsonpath(&c, &["pv", &volume], "{.metadata.finalizers}"),
        "[\"kubernetes.io/pv-protection\"]"
    );
    c.ok(&["delete", "pod", "user", "keeper", "--wait=false"]);
    wait_for(&c, "the claims to go", LONG, || {
        c.ok(&["get", "pvc", "-o", "name"]).is_empty()
    });
    wait_for(&c, "the Delete volume to go", LONG, || {
        !c.ok(&["get", "pv", "-o", "name"]).contains(&volume)
    });
    wait_for(&c, "the Retain volume to be released", LONG, || {
        jsonpath(&c, &["pv", &kept], "{.status.phase}") == "Released"
    });
    assert_eq!(col(&row(&c, "pv", &kept), "STATUS"), "Released");
}
