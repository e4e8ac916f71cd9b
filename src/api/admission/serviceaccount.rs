//! ServiceAccount admission for new pods (upstream's `ServiceAccount` plug-in): the pod runs as
//! `spec.serviceAccountName` (default `default`, mirrored into the deprecated
//! `spec.serviceAccount`), which must exist; unless `automountServiceAccountToken` is false (on
//! the pod, else on the service account) every container and init container mounts the
//! projected `kube-api-access-<suffix>` volume (token, cluster CA, namespace) read-only at
//! `/var/run/secrets/kubernetes.io/serviceaccount`; the account's imagePullSecrets are copied
//! when the pod names none.
//!
//! The lookup is cheap (the watch cache, then one store read on a miss). A `default` account
//! missing from a namespace created a moment ago is looked up again for up to ~2 s, as upstream
//! does, while the service account controller creates it.

use std::time::Duration;

use serde_json::{json, Value};

use crate::api::objects;
use crate::api::status::{ApiError, ApiResult};
use crate::api::tokens;

pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const VOLUME_PREFIX: &str = "kube-api-access-";
/// The token lifetime of mounted tokens (upstream's warn-only bound token expiry).
const MOUNTED_TOKEN_EXPIRATION: i64 = 3607;
/// Look-ups of a missing `default` account (upstream tries 10 times, 100–200 ms apart).
const DEFAULT_ATTEMPTS: u32 = 12;
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Admits a new pod in `ns`.
pub async fn admit_pod(st: &crate::api::ApiState, ns: &str, pod: &mut Value) -> ApiResult<()> {
    if pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(MIRROR_ANNOTATION))
        .is_some()
    {
        return Ok(());
    }
    let sa_name = service_account_name(pod);
    if !pod["spec"].is_object() {
        pod["spec"] = json!({});
    }
    pod["spec"]["serviceAccountName"] = json!(sa_name);
    pod["spec"]["serviceAccount"] = json!(sa_name);
    let sa = match find(st, ns, &sa_name).await? {
        Some(sa) => sa,
        None => return Err(not_found(pod, ns, &sa_name)),
    };
    mutate(pod, &sa, &objects::random_suffix());
    Ok(())
}

/// `spec.serviceAccountName`, else the deprecated `spec.serviceAccount`, else `default`.
pub fn service_account_name(pod: &Value) -> String {
    ["serviceAccountName", "serviceAccount"]
        .iter()
        .filter_map(|f| pod["spec"][f].as_str())
        .find(|s| !s.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
        .to_string()
}

async fn find(st: &crate::api::ApiState, ns: &str, name: &str) -> ApiResult<Option<Value>> {
    let attempts = if name == DEFAULT_SERVICE_ACCOUNT {
        DEFAULT_ATTEMPTS
    } else {
        1
    };
    for i in 0..attempts {
        if i > 0 {
            let ms = 100 + rand::random::<u64>() % 100;
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if let Some(sa) = tokens::lookup(st, "serviceaccounts", Some(ns), name).await? {
            return Ok(Some(sa));
        }
    }
    Ok(None)
}

/// Upstream's `pods "x" is forbidden: error looking up service account ns/sa: …` (a
/// generated name is reported by its prefix, as admission sees it before naming).
fn not_found(pod: &Value, ns: &str, sa: &str) -> ApiError {
    let md = &pod["metadata"];
    let name = md["generateName"]
        .as_str()
        .filter(|g| !g.is_empty())
        .or_else(|| md["name"].as_str())
        .unwrap_or_default();
    let mut e = ApiError::forbidden(format!(
        "pods \"{name}\" is forbidden: error looking up service account {ns}/{sa}: serviceaccount \"{sa}\" not found"
    ));
    e.name = Some(name.to_string()).filter(|n| !n.is_empty());
    e.kind = Some("pods".into());
    e
}

/// Whether the pod gets the token volume: the pod's choice, else the account's, else yes.
pub fn should_automount(sa: &Value, pod: &Value) -> bool {
    pod.pointer("/spec/automountServiceAccountToken")
        .and_then(Value::as_bool)
        .or_else(|| sa["automountServiceAccountToken"].as_bool())
        .unwrap_or(true)
}

/// The projected volume of the token, the cluster CA and the namespace.
pub fn token_volume(name: &str) -> Value {
    json!({
        "name": name,
        "projected": {
            "defaultMode": 420,
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": MOUNTED_TOKEN_EXPIRATION, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
            ],
        },
    })
}

/// The pure part of admission once the account is known: token volume and mounts, image pull
/// secrets. `suffix` names a new volume.
pub fn mutate(pod: &mut Value, sa: &Value, suffix: &str) {
    if should_automount(sa, pod) {
        mount_token(pod, suffix);
    }
    let spec = &mut pod["spec"];
    let has_pull_secrets = spec["imagePullSecrets"]
        .as_array()
        .is_some_and(|a| !a.is_empty());
    if !has_pull_secrets {
        if let Some(secrets) = sa["imagePullSecrets"].as_array().filter(|a| !a.is_empty()) {
            spec["imagePullSecrets"] = Value::Array(
                secrets
                    .iter()
                    .map(|s| json!({"name": s["name"].as_str().unwrap_or_default()}))
                    .collect(),
            );
        }
    }
}

fn mount_token(pod: &mut Value, suffix: &str) {
    let spec = &mut pod["spec"];
    let existing = spec["volumes"].as_array().and_then(|vs| {
        vs.iter()
            .filter_map(|v| v["name"].as_str())
            .find(|n| n.starts_with(VOLUME_PREFIX))
            .map(str::to_string)
    });
    let volume = existing
        .clone()
        .unwrap_or_else(|| format!("{VOLUME_PREFIX}{suffix}"));
    let mount = json!({"name": volume, "readOnly": true, "mountPath": TOKEN_MOUNT_PATH});
    let mut needed = false;
    for list in ["initContainers", "containers"] {
        let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for c in cs {
            let mounted = c["volumeMounts"]
                .as_array()
                .is_some_and(|ms| ms.iter().any(|m| m["mountPath"] == TOKEN_MOUNT_PATH));
            if mounted {
                continue;
            }
            if !c["volumeMounts"].is_array() {
                c["volumeMounts"] = json!([]);
            }
            if let Some(ms) = c["volumeMounts"].as_array_mut() {
                ms.push(mount.clone());
            }
            needed = true;
        }
    }
    if needed && existing.is_none() {
        if !spec["volumes"].is_array() {
            spec["volumes"] = json!([]);
        }
        if let Some(vs) = spec["volumes"].as_array_mut() {
            vs.push(token_volume(&volume));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: Value) -> Value {
        json!({"metadata": {"name": "p"}, "spec": spec})
    }

    #[test]
    fn every_container_mounts_the_projected_token_volume() {
        let mut p = pod(json!({
            "initContainers": [{"name": "i", "image": "x"}],
            "containers": [
                {"name": "a", "image": "x", "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                {"name": "b", "image": "x"},
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
        }));
        mutate(&mut p, &json!({"metadata": {"name": "default"}}), "abcde");
        let vols = p["spec"]["volumes"].as_array().unwrap();
        assert_eq!(vols.len(), 2);
        assert_eq!(vols[1], token_volume("kube-api-access-abcde"));
        assert_eq!(
            vols[1]["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"],
            3607
        );
        let mount = json!({"name": "kube-api-access-abcde", "readOnly": true,
                           "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"});
        assert_eq!(
            p["spec"]["initContainers"][0]["volumeMounts"],
            json!([mount])
        );
        assert_eq!(p["spec"]["containers"][0]["volumeMounts"][1], mount);
        assert_eq!(p["spec"]["containers"][1]["volumeMounts"], json!([mount]));
    }

    #[test]
    fn automount_follows_the_pod_then_the_service_account() {
        let sa_off = json!({"automountServiceAccountToken": false});
        let sa = json!({});
        let c = json!([{"name": "a", "image": "x"}]);
        let mut p = pod(json!({"containers": c}));
        mutate(&mut p, &sa_off, "abcde");
        assert!(p["spec"].get("volumes").is_none(), "the account opts out");
        let mut p = pod(json!({"containers": c, "automountServiceAccountToken": true}));
        mutate(&mut p, &sa_off, "abcde");
        assert_eq!(
            p["spec"]["volumes"].as_array().unwrap().len(),
            1,
            "the pod wins"
        );
        let mut p = pod(json!({"containers": c, "automountServiceAccountToken": false}));
        mutate(&mut p, &sa, "abcde");
        assert!(p["spec"].get("volumes").is_none(), "the pod opts out");
        assert!(p["spec"]["containers"][0].get("volumeMounts").is_none());
    }

    #[test]
    fn existing_mounts_at_the_token_path_and_existing_volumes_are_kept() {
        let mut p = pod(json!({
            "containers": [{"name": "a", "image": "x",
                "volumeMounts": [{"name": "mine", "mountPath": TOKEN_MOUNT_PATH}]}],
            "volumes": [{"name": "mine", "emptyDir": {}}],
        }));
        let before = p.clone();
        mutate(&mut p, &json!({}), "abcde");
        assert_eq!(p, before, "nothing to mount: no volume added");
        let mut p = pod(json!({
            "containers": [{"name": "a", "image": "x"}],
            "volumes": [token_volume("kube-api-access-zzzzz")],
        }));
        mutate(&mut p, &json!({}), "abcde");
        assert_eq!(p["spec"]["volumes"].as_array().unwrap().len(), 1);
        assert_eq!(
            p["spec"]["containers"][0]["volumeMounts"][0]["name"],
            "kube-api-access-zzzzz"
        );
    }

    #[test]
    fn image_pull_secrets_come_from_the_account_when_the_pod_has_none() {
        let sa = json!({"imagePullSecrets": [{"name": "reg"}]});
        let mut p = pod(json!({"containers": [{"name": "a", "image": "x"}]}));
        mutate(&mut p, &sa, "abcde");
        assert_eq!(p["spec"]["imagePullSecrets"], json!([{"name": "reg"}]));
        let mut p = pod(json!({"containers": [], "imagePullSecrets": [{"name": "own"}]}));
        mutate(&mut p, &sa, "abcde");
        assert_eq!(p["spec"]["imagePullSecrets"], json!([{"name": "own"}]));
    }

    #[test]
    fn names_and_the_forbidden_message() {
        assert_eq!(service_account_name(&pod(json!({}))), "default");
        assert_eq!(
            service_account_name(&pod(json!({"serviceAccount": "old"}))),
            "old"
        );
        assert_eq!(
            service_account_name(&pod(
                json!({"serviceAccountName": "new", "serviceAccount": "old"})
            )),
            "new"
        );
        let e = not_found(&pod(json!({})), "ns1", "robot");
        assert_eq!(e.code, 403);
        assert_eq!(
            e.message,
            "pods \"p\" is forbidden: error looking up service account ns1/robot: serviceaccount \"robot\" not found"
        );
        let gen = json!({"metadata": {"name": "web-abcde", "generateName": "web-"}});
        assert!(not_found(&gen, "ns1", "robot")
            .message
            .starts_with("pods \"web-\" is forbidden"));
    }
}
