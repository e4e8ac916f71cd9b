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
    // Health and version need no credentials; a bad token is refused everywhere, as upstream.
    let base = format!("https://127.0.0.1:{}", c.port);
    let code = |extra: &[&str], path: &str| -> String {
        let out = std::process::Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(extra)
            .arg(format!("{base}{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(code(&[], "/readyz"), "200");
    assert_eq!(code(&[], "/version"), "200");
    assert_eq!(code(&[], "/api"), "401");
    let bad = ["-H", "Authorization: Bearer not-a-valid-token"];
    assert_eq!(code(&bad, "/readyz"), "401");
}

/// A raw HTTPS request with the admin credentials (for cases kubectl cannot express).
fn curl(c: &Cluster, args: &[&str]) -> (u16, serde_json::Value) {
    let kc = std::fs::read_to_string(c.kubeconfig()).unwrap();
    let field = |name: &str| -> Vec<u8> {
        use std::io::Read;
        let b64 = kc
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))
            .unwrap()
            .trim()
            .to_string();
        let mut out = Vec::new();
        std::process::Command::new("base64")
            .arg("-d")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map(|mut ch| {
                use std::io::Write;
                ch.stdin.take().unwrap().write_all(b64.as_bytes()).unwrap();
                ch.stdout.take().unwrap().read_to_end(&mut out).unwrap();
                ch.wait().unwrap();
            })
            .unwrap();
        out
    };
    let cert = c.write(
        "admin.crt",
        &String::from_utf8(field("client-certificate-data")).unwrap(),
    );
    let key = c.write(
        "admin.key",
        &String::from_utf8(field("client-key-data")).unwrap(),
    );
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sk", "-o", "-", "-w", "\n%{http_code}", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(args);
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (
        code.parse().unwrap(),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn oversized_unsupported_and_disallowed_requests_get_upstream_codes() {
    let c = Cluster::start();
    let base = format!("https://127.0.0.1:{}", c.port);
    let big = c.write(
        "big.json",
        &format!(
            r#"{{"metadata":{{"name":"big"}},"data":{{"a":"{}"}}}}"#,
            "x".repeat(4 << 20)
        ),
    );
    let (code, status) = curl(
        &c,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &format!("@{}", big.display()),
            &format!("{base}/api/v1/namespaces/default/configmaps"),
        ],
    );
    assert_eq!(code, 413, "{status}");
    assert_eq!(status["reason"], "RequestEntityTooLarge");
    let (code, status) = curl(
        &c,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: text/csv",
            "-d",
            "a,b",
            &format!("{base}/api/v1/namespaces/default/configmaps"),
        ],
    );
    assert_eq!(code, 415, "{status}");
    assert_eq!(status["reason"], "UnsupportedMediaType");
    let (code, status) = curl(
        &c,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            "{}",
            &format!("{base}/api/v1/namespaces/default/configmaps/x"),
        ],
    );
    assert_eq!(code, 405, "{status}");
    assert_eq!(status["reason"], "MethodNotAllowed");
    let (code, status) = curl(
        &c,
        &[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"metadata":{"name":"x","namespace":"other"}}"#,
            &format!("{base}/api/v1/namespaces/default/configmaps/x"),
        ],
    );
    assert_eq!(code, 400, "{status}");
    let (code, status) = curl(
        &c,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            "[1,2]",
            &format!("{base}/api/v1/namespaces/default/configmaps"),
        ],
    );
    assert_eq!(code, 400, "{status}");
    assert_eq!(status["kind"], "Status");
    let (code, _) = curl(
        &c,
        &[&format!(
            "{base}/api/v1/namespaces/default/configmaps?fieldSelector=spec.x%3Dy"
        )],
    );
    assert_eq!(code, 400);
    let (code, status) = curl(
        &c,
        &[&format!(
            "{base}/api/v1/namespaces/default/configmaps?limit=1&continue=garbage"
        )],
    );
    assert_eq!(code, 400, "{status}");
}
