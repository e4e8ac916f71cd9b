//! Static pods: manifests in `<data-dir>/agent/pod-manifests` (`--pod-manifests`) become
//! mirror pods named `<name>-<node>` bound to this node, with upstream's `kubernetes.io/config.*`
//! annotations and the Node as owner; a changed file replaces its pod, a removed file deletes
//! it. The kubelet then runs them like any other pod of the node.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::Agent;
use crate::rest::status_code;

const HASH_KEY: &str = "kubernetes.io/config.hash";
const MIRROR_KEY: &str = "kubernetes.io/config.mirror";

fn hash(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads one manifest file into the mirror pod to create (pure but for reading the file).
pub fn mirror_pod(path: &Path, text: &str, node: &str) -> Result<Value> {
    let mut pod: Value = serde_yaml::from_str(text)
        .with_context(|| format!("{}: not YAML or JSON", path.display()))?;
    if pod["kind"] != "Pod" {
        bail!("{}: kind must be Pod", path.display());
    }
    let name = pod["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .with_context(|| format!("{}: metadata.name is required", path.display()))?
        .to_string();
    let h = hash(format!("{node}\n{text}").as_bytes());
    let md = pod["metadata"].as_object_mut().context("metadata")?;
    md.insert("name".into(), json!(format!("{name}-{node}")));
    if md
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or("")
        .is_empty()
    {
        md.insert("namespace".into(), json!("default"));
    }
    for f in ["uid", "resourceVersion", "creationTimestamp"] {
        md.remove(f);
    }
    let ann = md
        .entry("annotations")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .context("annotations")?;
    ann.insert(HASH_KEY.into(), json!(h));
    ann.insert(MIRROR_KEY.into(), json!(h));
    ann.insert("kubernetes.io/config.source".into(), json!("file"));
    ann.insert(
        "kubernetes.io/config.seen".into(),
        json!(super::now_rfc3339()),
    );
    pod["spec"]["nodeName"] = json!(node);
    if pod["spec"]["priority"].is_null() && pod["spec"]["priorityClassName"].is_null() {
        // Upstream gives static pods no default priority class; nothing to add.
    }
    pod["apiVersion"] = json!("v1");
    pod.as_object_mut().map(|o| o.remove("status"));
    Ok(pod)
}

impl Agent {
    fn read_manifests(&self) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        let Ok(rd) = std::fs::read_dir(&self.cfg.pod_manifests) else {
            return out;
        };
        for e in rd.flatten() {
            let p = e.path();
            let ext = p.extension().and_then(|x| x.to_str()).unwrap_or_default();
            if !matches!(ext, "yaml" | "yml" | "json")
                || p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            match std::fs::read_to_string(&p)
                .map_err(anyhow::Error::from)
                .and_then(|t| mirror_pod(&p, &t, &self.cfg.node_name))
            {
                Ok(pod) => {
                    let key = format!(
                        "{}/{}",
                        pod["metadata"]["namespace"].as_str().unwrap_or_default(),
                        pod["metadata"]["name"].as_str().unwrap_or_default()
                    );
                    out.insert(key, pod);
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "static pod manifest"),
            }
        }
        out
    }

    async fn sync_static_pods(&self, node_uid: &str) -> Result<()> {
        let want = self.read_manifests();
        let list = self
            .client
            .get(&format!(
                "/api/v1/pods?fieldSelector=spec.nodeName%3D{}",
                self.cfg.node_name
            ))
            .await?;
        let mut have: BTreeMap<String, Value> = BTreeMap::new();
        for p in list["items"].as_array().cloned().unwrap_or_default() {
            if p["metadata"]["annotations"][MIRROR_KEY].is_string() {
                let key = format!(
                    "{}/{}",
                    p["metadata"]["namespace"].as_str().unwrap_or_default(),
                    p["metadata"]["name"].as_str().unwrap_or_default()
                );
                have.insert(key, p);
            }
        }
        for (key, p) in &have {
            let stale = match want.get(key) {
                None => true,
                Some(w) => {
                    w["metadata"]["annotations"][HASH_KEY] != p["metadata"]["annotations"][HASH_KEY]
                }
            };
            if stale && p["metadata"]["deletionTimestamp"].is_null() {
                let (ns, name) = key.split_once('/').unwrap_or_default();
                tracing::info!(pod = %key, "static pod manifest changed or removed: deleting its pod");
                let _ = self
                    .client
                    .delete(
                        &format!("/api/v1/namespaces/{ns}/pods/{name}"),
                        &json!({"gracePeriodSeconds": 30}),
                    )
                    .await;
            }
        }
        for (key, mut pod) in want {
            if have.contains_key(&key) {
                continue;
            }
            pod["metadata"]["ownerReferences"] = json!([{
                "apiVersion": "v1", "kind": "Node", "name": self.cfg.node_name,
                "uid": node_uid, "controller": true,
            }]);
            let ns = pod["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            match self
                .client
                .post(&format!("/api/v1/namespaces/{ns}/pods"), &pod)
                .await
            {
                Ok(_) => tracing::info!(pod = %key, "static pod created"),
                Err(e) if status_code(&e) == Some(409) => {}
                Err(e) => {
                    tracing::warn!(pod = %key, error = %format!("{e:#}"), "creating a static pod")
                }
            }
        }
        Ok(())
    }

    pub(super) async fn static_pod_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            let node_uid = match self
                .client
                .get(&format!("/api/v1/nodes/{}", self.cfg.node_name))
                .await
            {
                Ok(n) => n["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                Err(_) => continue,
            };
            if let Err(e) = self.sync_static_pods(&node_uid).await {
                tracing::debug!(error = %format!("{e:#}"), "static pods");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_becomes_a_mirror_pod_bound_to_the_node() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec:\n  containers: [{name: c, image: busybox}]\n";
        let p = mirror_pod(Path::new("/m/web.yaml"), text, "n1").unwrap();
        assert_eq!(p["metadata"]["name"], "web-n1");
        assert_eq!(p["metadata"]["namespace"], "default");
        assert_eq!(p["spec"]["nodeName"], "n1");
        assert_eq!(
            p["metadata"]["annotations"]["kubernetes.io/config.source"],
            "file"
        );
        let h = p["metadata"]["annotations"][HASH_KEY].clone();
        assert_eq!(p["metadata"]["annotations"][MIRROR_KEY], h);
        // The hash follows the content.
        let p2 = mirror_pod(
            Path::new("/m/web.yaml"),
            &text.replace("busybox", "other"),
            "n1",
        )
        .unwrap();
        assert_ne!(p2["metadata"]["annotations"][HASH_KEY], h);
        let err = mirror_pod(Path::new("/m/x.yaml"), "kind: Service\n", "n1").unwrap_err();
        assert!(err.to_string().contains("kind must be Pod"), "{err}");
    }
}
