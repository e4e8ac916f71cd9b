//! The `k3rs.io/local-path` provisioner, as k3s's local-path-provisioner (an external
//! provisioner to the PV controller): for a claim the PV controller handed to it
//! (`volume.kubernetes.io/storage-provisioner`) and the scheduler placed
//! (`volume.kubernetes.io/selected-node`), it creates the volume object `pvc-<claim uid>`: a
//! `hostPath` directory `/var/lib/k3rs/storage/pvc-<uid>_<namespace>_<name>` pinned to that
//! node, pre-bound to the claim. The node agent creates the directory when a pod mounts it and
//! removes it when the volume object goes (reclaim policy `Delete`).
//!
//! Like the original, it refuses claims without a selected node (an `Immediate` class: a local
//! volume needs a node), claims with a selector, and access modes other than one node's.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::controllers::client::{name_of, namespace_of, uid_of};
use crate::controllers::scheduler::volumes::{claim_class, selected_node};

use super::binder::{
    annotation, claim_ref, Action, ANN_BETA_STORAGE_PROVISIONER, ANN_PROVISIONED_BY,
    ANN_STORAGE_PROVISIONER, LOCAL_PATH,
};

/// Where volumes live on a node.
pub const STORAGE_DIR: &str = "/var/lib/k3rs/storage";
/// The node label volumes are pinned by (the node's name when it lacks it).
const HOSTNAME: &str = "kubernetes.io/hostname";

/// The name of the volume provisioned for a claim (as upstream, `pvc-<uid>`).
pub fn volume_name(claim: &Value) -> String {
    format!("pvc-{}", uid_of(claim))
}

/// Whether the claim is this provisioner's to serve now (the library's `shouldProvision`).
pub fn wants(claim: &Value, class: Option<&Value>) -> bool {
    let asked = annotation(claim, ANN_STORAGE_PROVISIONER)
        .or_else(|| annotation(claim, ANN_BETA_STORAGE_PROVISIONER));
    let unbound = claim
        .pointer("/spec/volumeName")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty);
    let Some(class) = class else {
        return false;
    };
    let delayed = class["volumeBindingMode"] == "WaitForFirstConsumer";
    asked == Some(LOCAL_PATH)
        && unbound
        && class["provisioner"] == LOCAL_PATH
        && claim.pointer("/metadata/deletionTimestamp").is_none()
        && (!delayed || selected_node(claim).is_some())
}

/// Provisions a volume for `claim` (which [`wants`] says is ours) on `node` (the selected
/// node's object, when it exists). Nothing when the volume exists already.
pub fn provision(
    claim: &Arc<Value>,
    class: &Value,
    node: Option<&Value>,
    volume_exists: bool,
) -> Vec<Action> {
    if volume_exists {
        return Vec::new();
    }
    let key = format!("{}/{}", namespace_of(claim), name_of(claim));
    let event = |kind, reason, message| Action::Event {
        object: claim.clone(),
        kind,
        reason,
        message,
    };
    let mut out = vec![event(
        "Normal",
        "Provisioning",
        format!("External provisioner is provisioning volume for claim {key:?}"),
    )];
    match volume(claim, class, node) {
        Ok(pv) => {
            let name = name_of(&pv).to_string();
            out.push(Action::CreateVolume(pv));
            out.push(event(
                "Normal",
                "ProvisioningSucceeded",
                format!("Successfully provisioned volume {name}"),
            ));
        }
        Err(e) => out.push(event(
            "Warning",
            "ProvisioningFailed",
            format!(
                "failed to provision volume with StorageClass {:?}: {e}",
                claim_class(claim)
            ),
        )),
    }
    out
}

fn volume(claim: &Value, class: &Value, node: Option<&Value>) -> Result<Value, String> {
    if claim
        .pointer("/spec/selector")
        .is_some_and(|s| !s.is_null())
    {
        return Err("claim.Spec.Selector is not supported".into());
    }
    let modes = &claim["spec"]["accessModes"];
    let one_node = |m: &Value| m == "ReadWriteOnce" || m == "ReadWriteOncePod";
    if !modes.as_array().is_some_and(|a| a.iter().all(one_node)) {
        return Err(
            "NodePath only supports ReadWriteOnce and ReadWriteOncePod (1 node) access modes"
                .into(),
        );
    }
    let mode = claim
        .pointer("/spec/volumeMode")
        .and_then(Value::as_str)
        .unwrap_or("Filesystem");
    if mode != "Filesystem" {
        return Err(format!("volume mode {mode} is not supported"));
    }
    let Some(node_name) = selected_node(claim) else {
        return Err("configuration error, no node was specified".into());
    };
    let Some(node) = node else {
        return Err(format!(
            "failed to get target node: nodes {node_name:?} not found"
        ));
    };
    let pinned = node
        .pointer("/metadata/labels")
        .and_then(|l| l.get(HOSTNAME))
        .and_then(Value::as_str)
        .unwrap_or(node_name);
    let name = volume_name(claim);
    let path = format!(
        "{STORAGE_DIR}/{name}_{}_{}",
        namespace_of(claim),
        name_of(claim)
    );
    let size = claim
        .pointer("/spec/resources/requests/storage")
        .cloned()
        .unwrap_or(Value::Null);
    if size.is_null() {
        return Err("claim has no storage request".into());
    }
    Ok(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": name,
            "annotations": {ANN_PROVISIONED_BY: LOCAL_PATH, "local.path.provisioner/selected-node": node_name},
        },
        "spec": {
            "capacity": {"storage": size},
            "accessModes": modes,
            "volumeMode": mode,
            "persistentVolumeReclaimPolicy": class["reclaimPolicy"].as_str().unwrap_or("Delete"),
            "storageClassName": claim_class(claim),
            "hostPath": {"path": path, "type": "DirectoryOrCreate"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": HOSTNAME, "operator": "In", "values": [pinned]}]},
            ]}},
            "claimRef": claim_ref(claim),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(extra: Value) -> Arc<Value> {
        let c = json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": "web", "uid": "1234", "resourceVersion": "9",
                         "annotations": {ANN_STORAGE_PROVISIONER: LOCAL_PATH, "volume.kubernetes.io/selected-node": "n1"}},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}},
                     "storageClassName": "local-path", "volumeMode": "Filesystem"},
        });
        Arc::new(crate::api::patch::merge_patch(&c, &extra).unwrap())
    }

    fn class(mode: &str) -> Value {
        json!({"metadata": {"name": "local-path"}, "provisioner": LOCAL_PATH, "reclaimPolicy": "Delete", "volumeBindingMode": mode})
    }

    #[test]
    fn a_placed_claim_gets_a_volume_pinned_to_its_node() {
        let c = claim(json!({}));
        let wffc = class("WaitForFirstConsumer");
        assert!(wants(&c, Some(&wffc)));
        let node = json!({"metadata": {"name": "n1", "labels": {HOSTNAME: "host-1"}}});
        let actions = provision(&c, &wffc, Some(&node), false);
        let Action::CreateVolume(pv) = &actions[1] else {
            panic!("{actions:?}")
        };
        assert_eq!(pv["metadata"]["name"], "pvc-1234");
        assert_eq!(
            pv["spec"]["hostPath"]["path"],
            "/var/lib/k3rs/storage/pvc-1234_web_data"
        );
        assert_eq!(pv["spec"]["capacity"]["storage"], "2Gi");
        assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Delete");
        assert_eq!(pv["spec"]["storageClassName"], "local-path");
        assert_eq!(pv["spec"]["claimRef"]["uid"], "1234");
        assert_eq!(
            pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
                ["values"],
            json!(["host-1"])
        );
        assert_eq!(
            pv["metadata"]["annotations"][ANN_PROVISIONED_BY],
            LOCAL_PATH
        );
        assert!(provision(&c, &wffc, Some(&node), true).is_empty());
    }

    #[test]
    fn claims_it_cannot_serve_fail_with_the_provisioners_reasons() {
        let failure = |c: &Arc<Value>, cls: &Value, node: Option<&Value>| match provision(
            c, cls, node, false,
        )
        .pop()
        {
            Some(Action::Event {
                reason: "ProvisioningFailed",
                message,
                ..
            }) => message,
            other => panic!("{other:?}"),
        };
        let node = json!({"metadata": {"name": "n1"}});
        // Immediate: local storage needs a node.
        let imm = class("Immediate");
        let c = claim(
            json!({"metadata": {"annotations": {"volume.kubernetes.io/selected-node": null}}}),
        );
        assert!(wants(&c, Some(&imm)));
        assert!(!wants(&c, Some(&class("WaitForFirstConsumer"))));
        assert_eq!(
            failure(&c, &imm, None),
            "failed to provision volume with StorageClass \"local-path\": configuration error, no node was specified"
        );
        let c = claim(json!({"spec": {"accessModes": ["ReadWriteMany"]}}));
        assert!(failure(&c, &imm, Some(&node)).ends_with("(1 node) access modes"));
        let c = claim(json!({"spec": {"selector": {"matchLabels": {"a": "b"}}}}));
        assert!(failure(&c, &imm, Some(&node)).ends_with("claim.Spec.Selector is not supported"));
        let c = claim(json!({}));
        assert!(failure(&c, &imm, None).ends_with("nodes \"n1\" not found"));
        // Claims of other provisioners, or bound ones, are not ours.
        let other = json!({"provisioner": "example.com/x", "volumeBindingMode": "Immediate"});
        assert!(!wants(&c, Some(&other)));
        assert!(!wants(
            &claim(json!({"spec": {"volumeName": "v"}})),
            Some(&imm)
        ));
    }
}
