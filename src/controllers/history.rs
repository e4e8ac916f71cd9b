//! ControllerRevisions: the revision history of StatefulSets and DaemonSets (what `kubectl
//! rollout history` lists and `kubectl rollout undo` patches back). A revision holds the pod
//! template as a strategic-merge patch (`{"spec":{"template":{…,"$patch":"replace"}}}`), is
//! named `<owner>-<hash>` and numbered with `revision`, as upstream's history package does.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::api::resources::ResourceDef;
use crate::api::status::ApiResult;
use crate::controllers::client::{controller_of, name_of, owner_ref, uid_of, Client};

pub const HASH_LABEL: &str = "controller.kubernetes.io/hash";

/// Upstream's alphabet for encoded hashes (no vowels, no ambiguous characters).
pub fn safe_encode(s: &str) -> String {
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    s.bytes()
        .map(|b| ALPHANUMS[b as usize % ALPHANUMS.len()] as char)
        .collect()
}

pub fn fnv32a(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The patch a revision stores for an owner: its pod template, replacing the whole template.
pub fn revision_data(owner: &Value) -> Value {
    let mut t = owner
        .pointer("/spec/template")
        .cloned()
        .unwrap_or(json!({}));
    if let Some(md) = t.get_mut("metadata").and_then(Value::as_object_mut) {
        md.remove("creationTimestamp");
    }
    t["$patch"] = json!("replace");
    json!({"spec": {"template": t}})
}

/// The hash naming a revision's data (with the owner's collision count).
pub fn revision_hash(data: &Value, collision_count: i64) -> String {
    let mut bytes = serde_json::to_vec(data).expect("JSON");
    if collision_count > 0 {
        bytes.extend_from_slice(&collision_count.to_le_bytes());
    }
    safe_encode(&fnv32a(&bytes).to_string())
}

pub fn revision_number(r: &Value) -> i64 {
    r.get("revision").and_then(Value::as_i64).unwrap_or(0)
}

/// The owner's revisions (controlled by it), oldest first.
pub fn owned(owner: &Value, revisions: &[Arc<Value>]) -> Vec<Arc<Value>> {
    let uid = uid_of(owner);
    let mut v: Vec<Arc<Value>> = revisions
        .iter()
        .filter(|r| controller_of(r).is_some_and(|c| c["uid"] == uid))
        .cloned()
        .collect();
    v.sort_by_key(|r| (revision_number(r), name_of(r).to_string()));
    v
}

/// The revision for the owner's current template: an existing one with the same data (renumbered
/// to be the newest if it was an older one, as after `rollout undo`), or a new one numbered
/// after the newest. Returns the revision.
pub async fn current_revision(
    client: &Client,
    def: &Arc<ResourceDef>,
    owner: &Value,
    revisions: &[Arc<Value>],
) -> ApiResult<Value> {
    let ns = owner.pointer("/metadata/namespace").and_then(Value::as_str);
    let data = revision_data(owner);
    let newest = revisions
        .iter()
        .map(|r| revision_number(r))
        .max()
        .unwrap_or(0);
    if let Some(same) = revisions.iter().rev().find(|r| r["data"] == data) {
        if revision_number(same) == newest {
            return Ok((**same).clone());
        }
        let mut r = (**same).clone();
        r["revision"] = json!(newest + 1);
        return client.update(def, ns, r).await;
    }
    let collision_count = owner
        .pointer("/status/collisionCount")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let hash = revision_hash(&data, collision_count);
    let mut labels = owner
        .pointer("/spec/template/metadata/labels")
        .cloned()
        .unwrap_or(json!({}));
    labels[HASH_LABEL] = json!(hash);
    let rev = json!({
        "apiVersion": "apps/v1",
        "kind": "ControllerRevision",
        "metadata": {
            "name": format!("{}-{hash}", name_of(owner)),
            "namespace": ns,
            "labels": labels,
            "ownerReferences": [owner_ref(owner, true)],
        },
        "data": data,
        "revision": newest + 1,
    });
    client.create(def, ns, rev).await
}

/// Revisions to delete so that at most `limit` old ones remain besides those in use (`live`
/// names), oldest first.
pub fn to_truncate<'a>(
    revisions: &'a [Arc<Value>],
    live: &[&str],
    limit: i64,
) -> Vec<&'a Arc<Value>> {
    let old: Vec<&Arc<Value>> = revisions
        .iter()
        .filter(|r| !live.contains(&name_of(r)))
        .collect();
    let excess = old.len().saturating_sub(limit.max(0) as usize);
    old.into_iter().take(excess).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(name: &str, n: i64) -> Arc<Value> {
        Arc::new(json!({"metadata": {"name": name}, "revision": n}))
    }

    #[test]
    fn revision_data_replaces_the_whole_template() {
        let owner = json!({"spec": {"template": {"metadata": {"labels": {"a": "b"}, "creationTimestamp": null}, "spec": {"containers": []}}}});
        let d = revision_data(&owner);
        assert_eq!(d["spec"]["template"]["$patch"], "replace");
        assert!(d["spec"]["template"]["metadata"]
            .get("creationTimestamp")
            .is_none());
        assert_ne!(revision_hash(&d, 0), revision_hash(&d, 1));
        assert!(revision_hash(&d, 0)
            .chars()
            .all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)));
    }

    #[test]
    fn truncation_keeps_live_revisions_and_the_newest_old_ones() {
        let revs = vec![rev("a", 1), rev("b", 2), rev("c", 3), rev("d", 4)];
        let gone: Vec<&str> = to_truncate(&revs, &["a", "d"], 1)
            .into_iter()
            .map(|r| name_of(r))
            .collect();
        assert_eq!(gone, vec!["b"]);
        assert!(to_truncate(&revs, &["d"], 10).is_empty());
    }
}
