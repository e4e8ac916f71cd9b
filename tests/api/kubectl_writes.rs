//! Writing with kubectl: the four patch types, label/annotate/set image/scale, edit, server-side
//! apply conflicts, diff, finalizers with --wait, watches, and custom resources.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::kubectl_basics::{MANIFEST, WIDGET};

fn setup() -> Cluster {
    let c = Cluster::start();
    let f = c.write("app.yaml", MANIFEST);
    c.ok(&["apply", "-f", f.to_str().unwrap()]);
    c
}

fn get(c: &Cluster, args: &[&str], jsonpath: &str) -> String {
    let mut a: Vec<&str> = vec!["get"];
    a.extend_from_slice(args);
    let jp = format!("jsonpath={jsonpath}");
    a.extend_from_slice(&["-o", &jp]);
    c.ok(&a)
}

#[test]
fn patches_of_every_type_and_the_commands_built_on_them_work() {
    let c = setup();
    let d = ["deploy", "web", "-n", "demo"];
    assert!(c
        .ok(&[
            "patch",
            "deploy",
            "web",
            "-n",
            "demo",
            "-p",
            r#"{"spec":{"replicas":3}}"#
        ])
        .contains("patched"));
    c.ok(&[
        "patch",
        "deploy",
        "web",
        "-n",
        "demo",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"labels":{"x":"y"}}}"#,
    ]);
    c.ok(&[
        "patch",
        "deploy",
        "web",
        "-n",
        "demo",
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":4}]"#,
    ]);
    assert_eq!(
        get(
            &c,
            &d,
            "{.spec.replicas} {.metadata.labels.x} {.metadata.generation}"
        ),
        "4 y 3"
    );
    // Strategic merge keeps other containers' fields and merges by name.
    c.ok(&["patch", "deploy", "web", "-n", "demo", "-p", r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","env":[{"name":"A","value":"1"}]}]}}}}"#]);
    assert_eq!(get(&c, &d, "{.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].env[0].name}"), "busybox:1.36 A");
    c.ok(&["label", "cm", "cfg", "-n", "demo", "tier=fe"]);
    c.ok(&["annotate", "cm", "cfg", "-n", "demo", "note=hi"]);
    assert_eq!(
        get(
            &c,
            &["cm", "cfg", "-n", "demo"],
            "{.metadata.labels.tier} {.metadata.annotations.note}"
        ),
        "fe hi"
    );
    c.ok(&["label", "cm", "cfg", "-n", "demo", "tier-"]);
    assert_eq!(
        get(&c, &["cm", "cfg", "-n", "demo"], "{.metadata.labels}"),
        ""
    );
    c.ok(&[
        "set",
        "image",
        "deploy/web",
        "web=busybox:1.37",
        "-n",
        "demo",
    ]);
    c.ok(&["scale", "deploy", "web", "-n", "demo", "--replicas=1"]);
    assert_eq!(
        get(
            &c,
            &d,
            "{.spec.template.spec.containers[0].image} {.spec.replicas}"
        ),
        "busybox:1.37 1"
    );
    // A stale resourceVersion conflicts.
    let stale = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"cfg","namespace":"demo","resourceVersion":"1"},"data":{"a":"2"}}"#;
    let err = c.fails_stdin(&["replace", "-f", "-"], stale);
    assert!(err.contains("Operation cannot be fulfilled on configmaps \"cfg\": the object has been modified; please apply your changes to the latest version and try again"), "{err}");
}

#[test]
fn edit_goes_through_an_editor_and_diff_reports_changes() {
    let c = setup();
    let editor = c.write(
        "editor.sh",
        "#!/bin/sh\nsed -i 's/replicas: 2/replicas: 5/' \"$1\"\n",
    );
    std::fs::set_permissions(&editor, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = c.kubectl_env(
        &["edit", "deploy", "web", "-n", "demo"],
        &[("EDITOR", editor.to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        get(&c, &["deploy", "web", "-n", "demo"], "{.spec.replicas}"),
        "5"
    );
    let same = c.write("same.yaml", MANIFEST);
    let changed = c.write(
        "changed.yaml",
        &MANIFEST.replace("image: busybox:1.36", "image: busybox:1.99"),
    );
    let out = c.kubectl(&["diff", "-f", changed.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "diff exits 1 on differences: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("-        image: busybox:1.36")
            && text.contains("+        image: busybox:1.99"),
        "{text}"
    );
    // The edit changed replicas, so the unmodified manifest differs too; after applying it,
    // diff is clean.
    c.ok(&["apply", "-f", same.to_str().unwrap()]);
    let out = c.kubectl(&["diff", "-f", same.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn server_side_apply_reports_conflicts_and_force_takes_ownership() {
    let c = Cluster::start();
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ssa, namespace: default}\ndata: {a: \"1\", b: \"2\"}\n";
    assert!(c
        .ok_stdin(&["apply", "--server-side", "-f", "-"], cm)
        .contains("configmap/ssa serverside-applied"));
    let mf = get(
        &c,
        &["cm", "ssa", "--show-managed-fields"],
        "{.metadata.managedFields[0].manager} {.metadata.managedFields[0].operation}",
    );
    assert_eq!(mf, "kubectl Apply");
    // Another manager changes a field...
    c.ok(&[
        "patch",
        "cm",
        "ssa",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"a":"9"}}"#,
    ]);
    // ...so applying a different value for it conflicts, naming the field and manager.
    let cm2 = cm.replace("a: \"1\"", "a: \"3\"");
    let err = c.fails_stdin(&["apply", "--server-side", "-f", "-"], &cm2);
    assert!(
        err.contains("Apply failed with 1 conflict: conflict with \"kubectl-patch\""),
        "{err}"
    );
    assert!(err.contains(".data.a"), "{err}");
    c.ok_stdin(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        &cm2,
    );
    assert_eq!(get(&c, &["cm", "ssa"], "{.data.a}"), "3");
    // Fields the applier drops are removed.
    let cm3 = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ssa, namespace: default}\ndata: {a: \"3\"}\n";
    c.ok_stdin(&["apply", "--server-side", "-f", "-"], cm3);
    assert_eq!(get(&c, &["cm", "ssa"], "{.data}"), r#"{"a":"3"}"#);
}

#[test]
fn finalizers_hold_deletion_until_removed_and_watches_see_every_change() {
    let c = Cluster::start();
    let mut watch = std::process::Command::new("kubectl")
        .args(["get", "cm", "-w", "--output-watch-events"])
        .env("KUBECONFIG", c.kubeconfig())
        .env("HOME", c.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    c.ok_stdin(&["apply", "-f", "-"], "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fin, namespace: default, finalizers: [example.com/hold]}\n");
    let out = c.ok(&["delete", "cm", "fin", "--wait=false"]);
    assert!(out.contains("configmap \"fin\" deleted"), "{out}");
    assert!(
        !get(&c, &["cm", "fin"], "{.metadata.deletionTimestamp}").is_empty(),
        "marked, not gone"
    );
    let waiter = std::process::Command::new("kubectl")
        .args(["wait", "--for=delete", "cm/fin", "--timeout=30s"])
        .env("KUBECONFIG", c.kubeconfig())
        .env("HOME", c.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    c.ok(&[
        "patch",
        "cm",
        "fin",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    let w = waiter.wait_with_output().unwrap();
    assert!(
        w.status.success(),
        "wait --for=delete: {}",
        String::from_utf8_lossy(&w.stderr)
    );
    let err = c.fails(&["get", "cm", "fin"]);
    assert!(err.contains("configmaps \"fin\" not found"), "{err}");
    // The watch saw it come, change and go.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = String::new();
    let mut stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    while Instant::now() < deadline && !out.contains("DELETED") {
        if let Ok(b) = rx.recv_timeout(Duration::from_millis(200)) {
            out.push_str(&String::from_utf8_lossy(&b));
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let events: Vec<&str> = out
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("fin"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(events.first(), Some(&"ADDED"), "{out}");
    assert!(events.contains(&"MODIFIED"), "{out}");
    assert_eq!(events.last(), Some(&"DELETED"), "{out}");
}

#[test]
fn deleting_a_namespace_removes_its_contents_and_deleting_a_crd_its_objects() {
    let c = setup();
    c.ok(&[
        "wait",
        "--for",
        "condition=established",
        "crd/widgets.example.com",
        "--timeout=20s",
    ]);
    c.ok_stdin(&["apply", "-f", "-"], WIDGET);
    assert!(c
        .ok(&["get", "widgets", "-n", "demo", "-o", "name"])
        .contains("widget.example.com/w1"));
    let bad = c.fails_stdin(&["apply", "-f", "-"], &WIDGET.replace("size: 3", "size: 0"));
    assert!(
        bad.contains("spec.size") && bad.contains("greater than or equal to 1"),
        "{bad}"
    );
    c.ok(&["delete", "crd", "widgets.example.com"]);
    // kubectl may still know the kind from its discovery cache; either way the server says no.
    let err = c.fails(&["get", "widgets", "-n", "demo"]);
    assert!(
        err.contains("the server doesn't have a resource type \"widgets\"")
            || err.contains("Unable to list \"example.com/v1, Resource=widgets\": the server could not find the requested resource"),
        "{err}"
    );
    assert!(c
        .ok(&["delete", "ns", "demo", "--timeout=30s"])
        .contains("namespace \"demo\" deleted"));
    let err = c.fails(&["get", "ns", "demo"]);
    assert!(err.contains("namespaces \"demo\" not found"), "{err}");
    assert_eq!(c.ok(&["get", "cm", "-n", "demo", "-o", "name"]), "");
}

#[test]
fn kubectl_create_subcommands_work_through_protobuf_bodies() {
    let c = Cluster::start();
    for args in [
        &[
            "create",
            "configmap",
            "c1",
            "--from-literal=a=1",
            "--from-literal=b=2",
        ][..],
        &["create", "secret", "generic", "s1", "--from-literal=p=x"],
        &[
            "create",
            "deployment",
            "d1",
            "--image=busybox:1.36",
            "--replicas=0",
            "--port=80",
        ],
        &["create", "namespace", "n1"],
        &["create", "serviceaccount", "sa1"],
        &["create", "job", "j1", "--image=busybox", "--", "echo", "hi"],
        &[
            "create",
            "cronjob",
            "cj1",
            "--image=busybox",
            "--schedule=*/5 * * * *",
        ],
        &[
            "run",
            "p1",
            "--image=busybox",
            "--labels=app=x",
            "--",
            "sleep",
            "3600",
        ],
        &["create", "service", "clusterip", "svc1", "--tcp=80:8080"],
        &["create", "role", "r1", "--verb=get", "--resource=pods"],
        &["create", "rolebinding", "rb1", "--role=r1", "--user=u"],
        &["create", "quota", "q1", "--hard=pods=3"],
        &["create", "priorityclass", "pc1", "--value=10"],
        &["create", "ingress", "ing1", "--rule=a.example/=svc1:80"],
    ] {
        let out = c.ok(args);
        assert!(out.contains("created"), "{args:?}: {out}");
    }
    assert_eq!(get(&c, &["cm", "c1"], "{.data.a}{.data.b}"), "12");
    assert_eq!(get(&c, &["secret", "s1"], "{.data.p}"), "eA==");
    assert_eq!(
        get(
            &c,
            &["deploy", "d1"],
            "{.spec.replicas} {.spec.template.spec.containers[0].ports[0].containerPort}"
        ),
        "0 80"
    );
    let y = c.ok(&["get", "deploy", "d1", "-o", "yaml"]);
    assert!(
        !y.contains("stdin: false") && !y.contains("creationTimestamp: \"1970"),
        "zero values are left out as JSON would:\n{y}"
    );
    assert_eq!(
        get(
            &c,
            &["job", "j1"],
            "{.spec.template.spec.containers[0].command}"
        ),
        r#"["echo","hi"]"#
    );
    assert_eq!(
        get(
            &c,
            &["pod", "p1"],
            "{.metadata.labels.app} {.spec.containers[0].args}"
        ),
        r#"x ["sleep","3600"]"#
    );
    assert_eq!(
        get(&c, &["svc", "svc1"], "{.spec.ports[0].targetPort}"),
        "8080"
    );
    assert_eq!(
        get(
            &c,
            &["ing", "ing1"],
            "{.spec.rules[0].host} {.spec.rules[0].http.paths[0].backend.service.name}"
        ),
        "a.example svc1"
    );
    assert_eq!(get(&c, &["priorityclass", "pc1"], "{.value}"), "10");
    // Typed deletes send protobuf DeleteOptions too.
    assert!(c.ok(&["delete", "cm", "c1"]).contains("deleted"));
}

#[test]
fn events_expire_after_the_event_ttl() {
    let c = Cluster::start_with(&["--event-ttl", "2s"]);
    let ev = "apiVersion: v1\nkind: Event\nmetadata: {name: e1, namespace: default}\ninvolvedObject: {kind: Pod, name: p, namespace: default}\nreason: Test\nmessage: hello\ntype: Normal\n";
    c.ok_stdin(&["create", "-f", "-"], ev);
    let listed = c.ok(&["get", "events", "-o", "name"]);
    assert!(listed.contains("event/e1"), "{listed}");
    let table = c.ok(&["get", "events"]);
    assert!(
        table.lines().next().unwrap().starts_with("LAST SEEN"),
        "{table}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if c.ok(&["get", "events", "-o", "name"]).trim().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the event did not expire");
        std::thread::sleep(Duration::from_millis(250));
    }
    // Other kinds are not affected.
    c.ok_stdin(
        &["create", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: stays}\n",
    );
    std::thread::sleep(Duration::from_secs(5));
    assert!(c
        .ok(&["get", "cm", "stays", "-o", "name"])
        .contains("stays"));
}
