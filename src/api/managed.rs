//! `metadata.managedFields`: the FieldsV1 set of fields an object carries, as upstream's
//! structured-merge-diff encodes it (`f:<field>`, `k:{<merge key>}` for keyed list items,
//! `v:<value>` for set items).

use serde_json::{json, Map, Value};

/// Metadata fields that are never owned.
const UNOWNED_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
    "generateName",
];

/// Keys that identify items of lists of objects (upstream merge keys).
const LIST_KEYS: &[&str] = &[
    "name",
    "containerPort",
    "port",
    "mountPath",
    "devicePath",
    "ip",
    "type",
    "key",
    "topologyKey",
];

/// A field path as FieldsV1 keys (`f:spec`, `k:{"name":"c"}`, `v:"x"`).
pub type FieldPath = Vec<String>;

/// Every leaf field of an object with its value (what a manager can own).
pub fn flatten(obj: &Value) -> std::collections::BTreeMap<FieldPath, Value> {
    let mut out = std::collections::BTreeMap::new();
    walk(obj, &mut Vec::new(), &mut out, true);
    out
}

/// Whether `k` is a field no manager owns at this place (`apiVersion`/`kind` at the top, the
/// system fields of `metadata`).
fn skipped(path: &FieldPath, k: &str, top: bool) -> bool {
    (top && (k == "apiVersion" || k == "kind"))
        || (path.len() == 1 && path[0] == "f:metadata" && UNOWNED_METADATA.contains(&k))
}

/// The merge key of a list item (`k:{"name":"c"}`), if the item has one.
fn item_key(i: &Value) -> Option<String> {
    let m = i.as_object()?;
    let k = LIST_KEYS
        .iter()
        .find(|k| m.get(**k).is_some_and(|v| v.is_string() || v.is_number()))?;
    let mut key = Map::new();
    key.insert((*k).to_string(), m[*k].clone());
    Some(format!("k:{}", Value::Object(key)))
}

fn is_keyed(items: &[Value]) -> bool {
    items.iter().all(|i| item_key(i).is_some())
}

fn walk(
    v: &Value,
    path: &mut FieldPath,
    out: &mut std::collections::BTreeMap<FieldPath, Value>,
    top: bool,
) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                if skipped(path, k, top) {
                    continue;
                }
                path.push(format!("f:{k}"));
                walk(c, path, out, false);
                path.pop();
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let primitive = items.iter().all(|i| !i.is_object() && !i.is_array());
            if is_keyed(items) {
                for i in items {
                    path.push(item_key(i).expect("keyed"));
                    walk(i, path, out, false);
                    path.pop();
                }
            } else if primitive && path.last().is_some_and(|p| p == "f:finalizers") {
                for i in items {
                    path.push(format!("v:{i}"));
                    out.insert(path.clone(), i.clone());
                    path.pop();
                }
            } else {
                out.insert(path.clone(), v.clone());
            }
        }
        other => {
            out.insert(path.clone(), other.clone());
        }
    }
}

/// The leaf fields that differ between `old` and `new` (as `flatten` would see them), and which
/// of them are gone in `new`. Walks both objects together and skips equal subtrees, so an
/// update that changes a few fields costs little however large the object is.
fn diff(
    old: &Value,
    new: &Value,
) -> (
    std::collections::BTreeSet<FieldPath>,
    std::collections::BTreeSet<FieldPath>,
) {
    fn sub(
        old: Option<&Value>,
        new: Option<&Value>,
        path: &mut FieldPath,
        top: bool,
        changed: &mut std::collections::BTreeSet<FieldPath>,
        removed: &mut std::collections::BTreeSet<FieldPath>,
    ) {
        if old == new {
            return;
        }
        match (old, new) {
            (Some(Value::Object(a)), Some(Value::Object(b))) if !a.is_empty() && !b.is_empty() => {
                for k in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
                    if skipped(path, k, top) {
                        continue;
                    }
                    path.push(format!("f:{k}"));
                    sub(a.get(k), b.get(k), path, false, changed, removed);
                    path.pop();
                }
            }
            (Some(Value::Array(a)), Some(Value::Array(b)))
                if !a.is_empty() && !b.is_empty() && is_keyed(a) && is_keyed(b) =>
            {
                let (ia, ib) = (keyed_index(a), keyed_index(b));
                for k in ia.keys().chain(ib.keys().filter(|k| !ia.contains_key(*k))) {
                    path.push(k.clone());
                    sub(
                        ia.get(k).copied(),
                        ib.get(k).copied(),
                        path,
                        false,
                        changed,
                        removed,
                    );
                    path.pop();
                }
            }
            _ => {
                // Different shapes (or leaves): compare their flattened forms.
                let flat = |v: Option<&Value>, path: &mut FieldPath| {
                    let mut out = std::collections::BTreeMap::new();
                    if let Some(v) = v {
                        walk(v, path, &mut out, top);
                    }
                    out
                };
                let fa = flat(old, path);
                let fb = flat(new, path);
                for (p, v) in &fa {
                    match fb.get(p) {
                        Some(w) if w == v => {}
                        Some(_) => {
                            changed.insert(p.clone());
                        }
                        None => {
                            changed.insert(p.clone());
                            removed.insert(p.clone());
                        }
                    }
                }
                for p in fb.keys().filter(|p| !fa.contains_key(*p)) {
                    changed.insert(p.clone());
                }
            }
        }
    }
    let mut changed = std::collections::BTreeSet::new();
    let mut removed = std::collections::BTreeSet::new();
    sub(
        Some(old),
        Some(new),
        &mut Vec::new(),
        true,
        &mut changed,
        &mut removed,
    );
    (changed, removed)
}

fn keyed_index(items: &[Value]) -> std::collections::BTreeMap<String, &Value> {
    let mut m = std::collections::BTreeMap::new();
    for i in items {
        m.entry(item_key(i).expect("keyed")).or_insert(i);
    }
    m
}

/// Whether a FieldsV1 tree holds the leaf `path`.
fn tree_has(tree: &Value, path: &FieldPath) -> bool {
    let mut cur = tree;
    for el in path {
        match cur.get(el) {
            Some(next) => cur = next,
            None => return false,
        }
    }
    cur.as_object().is_some_and(|m| m.keys().all(|k| k == "."))
}

/// A set of field paths as a FieldsV1 tree.
pub fn to_tree<'a>(paths: impl IntoIterator<Item = &'a FieldPath>) -> Value {
    let mut root = Map::new();
    for p in paths {
        let mut cur = &mut root;
        for (i, el) in p.iter().enumerate() {
            let entry = cur.entry(el.clone()).or_insert_with(|| json!({}));
            if el.starts_with("k:") && i + 1 < p.len() {
                if let Some(m) = entry.as_object_mut() {
                    m.entry(".").or_insert_with(|| json!({}));
                }
            }
            cur = entry.as_object_mut().expect("tree nodes are objects");
        }
    }
    Value::Object(root)
}

/// The paths of a FieldsV1 tree's leaves.
pub fn from_tree(tree: &Value) -> std::collections::BTreeSet<FieldPath> {
    fn walk(v: &Value, path: &mut FieldPath, out: &mut std::collections::BTreeSet<FieldPath>) {
        let Some(m) = v.as_object() else { return };
        let children: Vec<(&String, &Value)> =
            m.iter().filter(|(k, _)| k.as_str() != ".").collect();
        if children.is_empty() {
            if !path.is_empty() {
                out.insert(path.clone());
            }
            return;
        }
        for (k, c) in children {
            path.push(k.clone());
            walk(c, path, out);
            path.pop();
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(tree, &mut Vec::new(), &mut out);
    out
}

/// `.spec.template.spec.containers[name="web"].image`, as upstream prints conflicts.
pub fn display_path(p: &FieldPath) -> String {
    let mut s = String::new();
    for el in p {
        if let Some(f) = el.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = el.strip_prefix("k:") {
            let v: Value = serde_json::from_str(k).unwrap_or(Value::Null);
            let parts: Vec<String> = v
                .as_object()
                .map(|m| m.iter().map(|(a, b)| format!("{a}={b}")).collect())
                .unwrap_or_default();
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = el.strip_prefix("v:") {
            s.push_str(&format!("[{v}]"));
        }
    }
    s
}

/// Ownership after an Update by `manager` turned `old` into `new`: the manager gains every
/// field it changed and keeps the ones it had that still exist; others lose what changed.
/// Entries that own none of the changed fields are kept as they are.
pub fn update_ownership(
    entries: &[Value],
    manager: &str,
    api_version: &str,
    old: Option<&Value>,
    new: &Value,
    time: &str,
) -> Vec<Value> {
    let entry = |fields: Value| {
        json!({
            "manager": manager,
            "operation": "Update",
            "apiVersion": api_version,
            "time": time,
            "fieldsType": "FieldsV1",
            "fieldsV1": fields,
        })
    };
    let Some(old) = old else {
        let flat = flatten(new);
        return vec![entry(to_tree(flat.keys()))];
    };
    let (changed, removed) = diff(old, new);
    let mut out = Vec::new();
    let mut mine: std::collections::BTreeSet<FieldPath> = std::collections::BTreeSet::new();
    for e in entries {
        let is_mine = e["manager"].as_str() == Some(manager)
            && e["operation"].as_str() == Some("Update")
            && e.get("subresource").is_none();
        if is_mine {
            mine.extend(
                from_tree(&e["fieldsV1"])
                    .into_iter()
                    .filter(|p| !removed.contains(p)),
            );
            continue;
        }
        if !changed.iter().any(|p| tree_has(&e["fieldsV1"], p)) {
            out.push(e.clone());
            continue;
        }
        let kept: Vec<FieldPath> = from_tree(&e["fieldsV1"])
            .into_iter()
            .filter(|p| !changed.contains(p))
            .collect();
        if kept.is_empty() {
            continue;
        }
        let mut e = e.clone();
        e["fieldsV1"] = to_tree(&kept);
        out.push(e);
    }
    mine.extend(changed.into_iter().filter(|p| !removed.contains(p)));
    if !mine.is_empty() {
        out.push(entry(to_tree(&mine)));
    }
    out
}

#[cfg(test)]
mod ownership_tests {
    use super::*;

    /// The straightforward definition: flatten both objects and compare every leaf.
    fn reference_changes(
        old: &Value,
        new: &Value,
    ) -> (
        std::collections::BTreeSet<FieldPath>,
        std::collections::BTreeSet<FieldPath>,
    ) {
        let a = flatten(old);
        let b = flatten(new);
        let changed = b
            .iter()
            .filter(|(p, v)| a.get(*p) != Some(*v))
            .map(|(p, _)| p.clone())
            .chain(a.keys().filter(|p| !b.contains_key(*p)).cloned())
            .collect();
        let removed = a.keys().filter(|p| !b.contains_key(*p)).cloned().collect();
        (changed, removed)
    }

    #[test]
    fn diff_finds_the_same_changes_as_flattening_both_objects() {
        let base = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "resourceVersion": "1", "labels": {"a": "1", "b": "2"}, "finalizers": ["x", "y"],
                         "managedFields": [{"manager": "m"}]},
            "spec": {"containers": [{"name": "c", "image": "i:1", "ports": [{"containerPort": 80}], "args": ["a", "b"]}],
                     "nodeName": "", "tolerations": [{"key": "k", "operator": "Exists"}], "volumes": []},
            "status": {"conditions": [{"type": "Ready", "status": "False"}], "phase": "Pending", "podIPs": []},
        });
        let variants = [
            json!({"spec": {"nodeName": "n1"}}),
            json!({"metadata": {"labels": {"a": null, "c": "3"}, "resourceVersion": "2", "managedFields": null}}),
            json!({"metadata": {"finalizers": ["y", "z"]}}),
            json!({"spec": {"containers": [{"name": "c", "image": "i:2", "ports": [{"containerPort": 80}], "args": ["b"]}]}}),
            json!({"spec": {"containers": [{"name": "d", "image": "i:1"}]}}),
            json!({"spec": {"containers": ["odd"]}}),
            json!({"spec": {"volumes": [{"name": "v", "emptyDir": {}}]}}),
            json!({"status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}], "phase": "Running", "podIPs": [{"ip": "10.0.0.1"}]}}),
            json!({"status": {"conditions": null, "phase": null}}),
            json!({"spec": {"tolerations": {}}}),
            json!({"status": "gone"}),
        ];
        for v in variants {
            let mut new = base.clone();
            new = crate::api::patch::merge_patch(&new, &v).unwrap();
            assert_eq!(diff(&base, &new), reference_changes(&base, &new), "{v}");
            assert_eq!(
                diff(&new, &base),
                reference_changes(&new, &base),
                "reverse {v}"
            );
        }
    }

    #[test]
    fn updates_move_ownership_of_changed_fields() {
        let v1 = json!({"spec": {"replicas": 1, "paused": false}});
        let created = update_ownership(&[], "kubectl-create", "apps/v1", None, &v1, "t");
        assert_eq!(created.len(), 1);
        let v2 = json!({"spec": {"replicas": 3, "paused": false}});
        let after = update_ownership(&created, "kubectl-edit", "apps/v1", Some(&v1), &v2, "t");
        let create_set = from_tree(
            &after
                .iter()
                .find(|e| e["manager"] == "kubectl-create")
                .unwrap()["fieldsV1"],
        );
        let edit_set = from_tree(
            &after
                .iter()
                .find(|e| e["manager"] == "kubectl-edit")
                .unwrap()["fieldsV1"],
        );
        let replicas: FieldPath = vec!["f:spec".into(), "f:replicas".into()];
        assert!(edit_set.contains(&replicas));
        assert!(!create_set.contains(&replicas));
        assert!(create_set.contains(&vec!["f:spec".to_string(), "f:paused".to_string()]));
        assert_eq!(
            display_path(&vec![
                "f:spec".into(),
                "f:containers".into(),
                "k:{\"name\":\"web\"}".into(),
                "f:image".into()
            ]),
            ".spec.containers[name=\"web\"].image"
        );
    }
}
