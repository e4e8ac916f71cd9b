//! Service accounts as a user sees them through kubectl: every namespace's `default` account
//! and `kube-root-ca.crt`, the token volume admission adds to pods, `kubectl create token`, and
//! those tokens authenticating against the API server (`kubectl auth whoami`) until their
//! account or bound pod goes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use crate::cluster::Cluster;
use crate::hollow::{jsonpath, wait_for};

const LONG: Duration = Duration::from_secs(60);

fn json(c: &Cluster, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(&c.ok(&a)).unwrap()
}

/// The cluster CA (PEM), from the admin kubeconfig.
fn cluster_ca(c: &Cluster) -> String {
    let b64 = c.ok(&[
        "config",
        "view",
        "--raw",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ]);
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .unwrap(),
    )
    .unwrap()
}

/// A kubeconfig that authenticates with `token` only (no client certificate).
fn token_kubeconfig(c: &Cluster, name: &str, token: &str) -> PathBuf {
    let ca = c.ok(&[
        "config",
        "view",
        "--raw",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ]);
    c.write(
        name,
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority-data: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
            c.port,
            ca.trim()
        ),
    )
}

/// kubectl with a token kubeconfig: (success, stdout, stderr).
fn as_token(c: &Cluster, kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
    let out = c.kubectl_env(args, &[("KUBECONFIG", kubeconfig.to_str().unwrap())]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn claims(token: &str) -> Value {
    let payload = token.trim().split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn every_namespace_keeps_a_default_service_account_and_the_root_ca() {
    let c = Cluster::start();
    let ca = cluster_ca(&c);
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        wait_for(&c, &format!("{ns}'s default account and CA"), LONG, || {
            c.kubectl(&["-n", ns, "get", "serviceaccount", "default"])
                .status
                .success()
                && c.kubectl(&["-n", ns, "get", "configmap", "kube-root-ca.crt"])
                    .status
                    .success()
        });
    }
    c.ok(&["create", "namespace", "team"]);
    wait_for(&c, "team's default account and CA", LONG, || {
        jsonpath(
            &c,
            &["-n", "team", "serviceaccount", "default"],
            "{.metadata.name}",
        ) == "default"
            && jsonpath(
                &c,
                &["-n", "team", "configmap", "kube-root-ca.crt"],
                "{.data.ca\\.crt}",
            ) == ca
    });
    let cm = json(&c, &["-n", "team", "get", "configmap", "kube-root-ca.crt"]);
    assert!(
        cm["metadata"]["annotations"]["kubernetes.io/description"]
            .as_str()
            .unwrap()
            .starts_with("Contains a CA bundle"),
        "{cm}"
    );

    // Deleted: re-created (a new object).
    let uid = jsonpath(&c, &["-n", "team", "sa", "default"], "{.metadata.uid}");
    c.ok(&["-n", "team", "delete", "serviceaccount", "default"]);
    wait_for(&c, "the default account to come back", LONG, || {
        let now = jsonpath(&c, &["-n", "team", "sa", "default"], "{.metadata.uid}");
        !now.is_empty() && now != uid
    });
    // Changed or deleted: restored.
    c.ok(&[
        "-n",
        "team",
        "patch",
        "configmap",
        "kube-root-ca.crt",
        "--type=merge",
        "-p",
        r#"{"data":{"ca.crt":"not a CA"}}"#,
    ]);
    wait_for(&c, "the CA to be restored", LONG, || {
        jsonpath(
            &c,
            &["-n", "team", "configmap", "kube-root-ca.crt"],
            "{.data.ca\\.crt}",
        ) == ca
    });
    c.ok(&["-n", "team", "delete", "configmap", "kube-root-ca.crt"]);
    wait_for(&c, "the CA to be re-created", LONG, || {
        jsonpath(
            &c,
            &["-n", "team", "configmap", "kube-root-ca.crt"],
            "{.data.ca\\.crt}",
        ) == ca
    });

    // A terminating namespace is left to go.
    c.ok(&["delete", "namespace", "team", "--wait=false"]);
    wait_for(&c, "namespace team to go", LONG, || {
        !c.kubectl(&["get", "namespace", "team"]).status.success()
    });
}

#[test]
fn pods_run_as_their_service_account_with_the_token_volume_mounted() {
    let c = Cluster::start();
    // A pod created right after its namespace: admission waits for the default account.
    c.ok(&["create", "namespace", "apps"]);
    c.ok(&["-n", "apps", "run", "web", "--image=nginx"]);
    let pod = json(&c, &["-n", "apps", "get", "pod", "web"]);
    let spec = &pod["spec"];
    assert_eq!(spec["serviceAccountName"], "default", "{spec}");
    assert_eq!(spec["serviceAccount"], "default", "{spec}");
    let vols = spec["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 1, "{spec}");
    let vol = vols[0]["name"].as_str().unwrap();
    assert!(
        vol.starts_with("kube-api-access-") && vol.len() == "kube-api-access-".len() + 5,
        "{vol}"
    );
    let projected = &vols[0]["projected"];
    assert_eq!(projected["defaultMode"], 420);
    let sources = projected["sources"].as_array().unwrap();
    assert_eq!(sources[0]["serviceAccountToken"]["path"], "token");
    assert_eq!(sources[0]["serviceAccountToken"]["expirationSeconds"], 3607);
    assert_eq!(sources[1]["configMap"]["name"], "kube-root-ca.crt");
    assert_eq!(
        sources[2]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        spec["containers"][0]["volumeMounts"],
        serde_json::json!([{"name": vol, "readOnly": true,
                            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}])
    );

    // A named account must exist.
    let err = c.fails(&[
        "-n",
        "apps",
        "run",
        "ghosted",
        "--image=nginx",
        "--overrides",
        r#"{"spec":{"serviceAccountName":"ghost"}}"#,
    ]);
    assert!(
        err.contains(r#"pods "ghosted" is forbidden: error looking up service account apps/ghost: serviceaccount "ghost" not found"#),
        "{err}"
    );

    // An account that opts out of automounting: no volume; the pod can still opt in.
    c.ok(&["-n", "apps", "create", "serviceaccount", "quiet"]);
    c.ok(&[
        "-n",
        "apps",
        "patch",
        "serviceaccount",
        "quiet",
        "-p",
        r#"{"automountServiceAccountToken":false}"#,
    ]);
    c.ok(&[
        "-n",
        "apps",
        "run",
        "silent",
        "--image=nginx",
        "--overrides",
        r#"{"spec":{"serviceAccountName":"quiet"}}"#,
    ]);
    let spec = json(&c, &["-n", "apps", "get", "pod", "silent"])["spec"].clone();
    assert_eq!(spec["serviceAccountName"], "quiet");
    assert!(spec.get("volumes").is_none(), "{spec}");
    assert!(
        spec["containers"][0].get("volumeMounts").is_none(),
        "{spec}"
    );
}

#[test]
fn service_account_tokens_authenticate_until_their_account_or_pod_goes() {
    let c = Cluster::start();
    wait_for(&c, "the default account", LONG, || {
        c.kubectl(&["get", "serviceaccount", "default"])
            .status
            .success()
    });

    // `kubectl create token default` authenticates as the account.
    let token = c.ok(&["create", "token", "default"]);
    let cl = claims(&token);
    assert_eq!(cl["iss"], "https://kubernetes.default.svc.cluster.local");
    assert_eq!(cl["sub"], "system:serviceaccount:default:default");
    assert_eq!(
        cl["aud"],
        serde_json::json!(["https://kubernetes.default.svc.cluster.local"])
    );
    assert_eq!(
        cl["exp"].as_i64().unwrap() - cl["iat"].as_i64().unwrap(),
        3600
    );
    assert_eq!(cl["kubernetes.io"]["namespace"], "default");
    assert_eq!(
        cl["kubernetes.io"]["serviceaccount"]["uid"],
        jsonpath(&c, &["sa", "default"], "{.metadata.uid}").as_str()
    );
    let kc = token_kubeconfig(&c, "default-token.yaml", token.trim());
    let (ok, out, err) = as_token(&c, &kc, &["auth", "whoami", "-o", "json"]);
    assert!(ok, "{err}");
    let review: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        review["status"]["userInfo"]["username"],
        "system:serviceaccount:default:default"
    );
    assert_eq!(
        review["status"]["userInfo"]["groups"],
        serde_json::json!([
            "system:serviceaccounts",
            "system:serviceaccounts:default",
            "system:authenticated"
        ])
    );
    let (ok, _, err) = as_token(&c, &kc, &["get", "configmaps"]);
    assert!(ok, "{err}");
    let (ok, out, err) = as_token(
        &c,
        &kc,
        &["get", "--raw", "/.well-known/openid-configuration"],
    );
    assert!(ok, "{err}");
    let oidc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(oidc["issuer"], cl["iss"]);
    let (ok, out, err) = as_token(&c, &kc, &["get", "--raw", "/openid/v1/jwks"]);
    assert!(ok, "{err}");
    let jwks: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(jwks["keys"][0]["kty"], "EC");

    // Garbage, another audience: 401.
    let bad = token_kubeconfig(&c, "garbage.yaml", "not-a-token");
    let (ok, _, err) = as_token(&c, &bad, &["get", "configmaps"]);
    assert!(!ok);
    assert!(
        err.contains("You must be logged in to the server (Unauthorized)"),
        "{err}"
    );
    let vault = c.ok(&["create", "token", "default", "--audience", "vault"]);
    assert_eq!(claims(&vault)["aud"], serde_json::json!(["vault"]));
    let kv = token_kubeconfig(&c, "vault.yaml", vault.trim());
    let (ok, _, err) = as_token(&c, &kv, &["get", "configmaps"]);
    assert!(!ok && err.contains("Unauthorized"), "{err}");

    // Durations: at least 10 minutes.
    let short = c.ok(&["create", "token", "default", "--duration", "10m"]);
    let cl = claims(&short);
    assert_eq!(
        cl["exp"].as_i64().unwrap() - cl["iat"].as_i64().unwrap(),
        600
    );
    let err = c.fails(&["create", "token", "default", "--duration", "1m"]);
    assert!(
        err.contains(r#"TokenRequest.authentication.k8s.io "" is invalid: spec.expirationSeconds: Invalid value: 60: may not specify a duration less than 10 minutes"#),
        "{err}"
    );
    let err = c.fails(&["create", "token", "nobody"]);
    assert!(
        err.contains(r#"serviceaccounts "nobody" not found"#),
        "{err}"
    );

    // A token bound to a pod works while the pod lives.
    c.ok(&["create", "serviceaccount", "robot"]);
    c.ok(&[
        "run",
        "worker",
        "--image=nginx",
        "--overrides",
        r#"{"spec":{"serviceAccountName":"robot"}}"#,
    ]);
    let bound = c.ok(&[
        "create",
        "token",
        "robot",
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        "worker",
    ]);
    let cl = claims(&bound);
    assert_eq!(cl["kubernetes.io"]["pod"]["name"], "worker");
    assert_eq!(
        cl["kubernetes.io"]["pod"]["uid"],
        jsonpath(&c, &["pod", "worker"], "{.metadata.uid}").as_str()
    );
    let err = c.fails(&[
        "create",
        "token",
        "default",
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        "worker",
    ]);
    assert!(
        err.contains(r#"cannot bind token for serviceaccount "default" to pod running with different serviceaccount name."#),
        "{err}"
    );
    let kb = token_kubeconfig(&c, "bound.yaml", bound.trim());
    let (ok, _, err) = as_token(&c, &kb, &["get", "pods"]);
    assert!(ok, "{err}");
    let robot = c.ok(&["create", "token", "robot"]);
    let kr = token_kubeconfig(&c, "robot.yaml", robot.trim());
    let (ok, out, err) = as_token(&c, &kr, &["auth", "whoami"]);
    assert!(ok, "{err}");
    assert!(out.contains("system:serviceaccount:default:robot"), "{out}");

    c.ok(&["delete", "pod", "worker", "--grace-period=0", "--force"]);
    wait_for(&c, "the pod-bound token to be rejected", LONG, || {
        !as_token(&c, &kb, &["get", "pods"]).0
    });
    let (ok, _, err) = as_token(&c, &kr, &["get", "pods"]);
    assert!(
        ok,
        "the unbound token of the same account still works: {err}"
    );

    // Deleting the account invalidates its tokens.
    c.ok(&["delete", "serviceaccount", "robot"]);
    wait_for(&c, "robot's token to be rejected", LONG, || {
        let (ok, _, err) = as_token(&c, &kr, &["get", "pods"]);
        !ok && err.contains("Unauthorized")
    });
    // Re-created under the same name: a new uid, the old token stays invalid.
    c.ok(&["create", "serviceaccount", "robot"]);
    std::thread::sleep(Duration::from_millis(500));
    let (ok, _, _) = as_token(&c, &kr, &["get", "pods"]);
    assert!(
        !ok,
        "a token of the deleted account does not work for its successor"
    );
}
