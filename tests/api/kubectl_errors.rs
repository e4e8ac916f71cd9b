//! Bad input gets upstream's errors, as kubectl prints them.

use crate::cluster::Cluster;

#[test]
fn unknown_fields_bad_json_and_unknown_resources_are_refused_clearly() {
    let c = Cluster::start();
    let err = c.fails_stdin(
        &["apply", "-f", "-"],
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"},"spec":{"foo":1}}"#,
    );
    assert!(
        err.contains("strict decoding error: unknown field \"spec\""),
        "{err}"
    );
    let err = c.fails_stdin(
        &[
            "create",
            "--raw",
            "/api/v1/namespaces/default/configmaps",
            "-f",
            "-",
        ],
        "{bad json",
    );
    assert!(err.contains("Error from server (BadRequest)"), "{err}");
    let err = c.fails(&["get", "foos"]);
    assert!(
        err.contains("the server doesn't have a resource type \"foos\""),
        "{err}"
    );
    let err = c.fails(&["get", "--raw", "/apis/example.com/v1/nopes"]);
    assert!(
        err.contains("NotFound")
            || err.contains("the server could not find the requested resource"),
        "{err}"
    );
}

#[test]
fn invalid_objects_get_422_with_field_paths() {
    let c = Cluster::start();
    let err = c.fails_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: Bad_Name}\n",
    );
    assert!(err.contains("The ConfigMap \"Bad_Name\" is invalid: metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain"), "{err}");
    let dep = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {matchLabels: {app: a}}\n  template:\n    metadata: {labels: {app: b}}\n    spec: {containers: [{name: c, image: i}]}\n";
    let err = c.fails_stdin(&["apply", "-f", "-"], dep);
    assert!(
        err.contains("`selector` does not match template `labels`"),
        "{err}"
    );
    // Immutable fields.
    c.ok_stdin(&["apply", "-f", "-"], "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: busybox}]}\n");
    let err = c.fails(&[
        "patch",
        "pod",
        "p",
        "-p",
        r#"{"spec":{"containers":[{"name":"c","command":["sh"]}]}}"#,
    ]);
    assert!(
        err.contains("pod updates may not change fields other than"),
        "{err}"
    );
    c.ok(&["set", "image", "pod/p", "c=busybox:1.37"]);
}

#[test]
fn namespace_lifecycle_and_url_mismatches_are_refused() {
    let c = Cluster::start();
    let err = c.fails_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: missing}\n",
    );
    assert!(err.contains("namespaces \"missing\" not found"), "{err}");
    // A namespace being terminated accepts no new content (a finalizer keeps it terminating).
    c.ok_stdin(&["apply", "-f", "-"], "apiVersion: v1\nkind: Namespace\nmetadata: {name: going}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: held, namespace: going, finalizers: [example.com/hold]}\n");
    c.ok(&["delete", "ns", "going", "--wait=false"]);
    let err = c.fails_stdin(
        &["create", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: late, namespace: going}\n",
    );
    assert!(
        err.contains(
            "unable to create new content in namespace going because it is being terminated"
        ),
        "{err}"
    );
    let err = c.fails_stdin(
        &[
            "replace",
            "--raw",
            "/api/v1/namespaces/default/configmaps/a",
            "-f",
            "-",
        ],
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"b"}}"#,
    );
    assert!(
        err.contains("BadRequest") || err.contains("does not match"),
        "{err}"
    );
}

#[test]
fn requests_without_credentials_get_401() {
    let c = Cluster::start();
    let kc = std::fs::read_to_string(c.kubeconfig()).unwrap();
    let anon: String = kc
        .lines()
        .filter(|l| !l.contains("client-certificate-data") && !l.contains("client-key-data"))
        .map(|l| {
            if l.trim() == "user:" {
                "  user: {token: not-a-valid-token}".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let p = c.write("anon.yaml", &anon);
    let out = std::process::Command::new("kubectl")
        .args(["--kubeconfig", p.to_str().unwrap(), "get", "ns"])
        .env("HOME", c.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("You must be logged in to the server"), "{err}");
    // Health and version need no credentials.
    let out = std::process::Command::new("kubectl")
        .args([
            "--kubeconfig",
            p.to_str().unwrap(),
            "get",
            "--raw",
            "/readyz",
        ])
        .env("HOME", c.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
