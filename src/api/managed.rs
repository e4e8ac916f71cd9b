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
    fn walk(
        v: &Value,
        path: &mut FieldPath,
        out: &mut std::collections::BTreeMap<FieldPath, Value>,
        top: bool,
    ) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, c) in m {
                    if top && (k == "apiVersion" || k == "kind") {
                        continue;
                    }
                    if path.len() == 1
                        && path[0] == "f:metadata"
                        && UNOWNED_METADATA.contains(&k.as_str())
                    {
                        continue;
                    }
                    path.push(format!("f:{k}"));
                    walk(c, path, out, false);
                    path.pop();
                }
            }
            Value::Array(items) if !items.is_empty() => {
                let keyed = items.iter().all(|i| {
                    i.as_object().is_some_and(|m| {
                        LIST_KEYS
                            .iter()
                            .any(|k| m.get(*k).is_some_and(|v| v.is_string() || v.is_number()))
                    })
                });
                let primitive = items.iter().all(|i| !i.is_object() && !i.is_array());
                if keyed {
                    for i in items {
                        let m = i.as_object().expect("keyed items are objects");
                        let k = LIST_KEYS
                            .iter()
                            .find(|k| m.get(**k).is_some_and(|v| v.is_string() || v.is_number()))
                            .expect("has key");
                        let mut key = Map::new();
                        key.insert((*k).to_string(), m[*k].clone());
                        path.push(format!("k:{}", Value::Object(key)));
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
    let mut out = std::collections::BTreeMap::new();
    walk(obj, &mut Vec::new(), &mut out, true);
    out
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
pub fn update_ownership(
    entries: &[Value],
    manager: &str,
    api_version: &str,
    old: Option<&Value>,
    new: &Value,
    time: &str,
) -> Vec<Value> {
    let new_flat = flatten(new);
    let old_flat = old.map(flatten).unwrap_or_default();
    let changed: std::collections::BTreeSet<FieldPath> = new_flat
        .iter()
        .filter(|(p, v)| old_flat.get(*p) != Some(*v))
        .map(|(p, _)| p.clone())
        .chain(
            old_flat
                .keys()
                .filter(|p| !new_flat.contains_key(*p))
                .cloned(),
        )
        .collect();
    let mut out = Vec::new();
    let mut mine: std::collections::BTreeSet<FieldPath> = std::collections::BTreeSet::new();
    for e in entries {
        let is_mine = e["manager"].as_str() == Some(manager)
            && e["operation"].as_str() == Some("Update")
            && e.get("subresource").is_none();
        let set = from_tree(&e["fieldsV1"]);
        if is_mine {
            mine.extend(set.into_iter().filter(|p| new_flat.contains_key(p)));
            continue;
        }
        let kept: Vec<FieldPath> = set
            .into_iter()
            .filter(|p| !changed.contains(p) && new_flat.contains_key(p))
            .collect();
        if kept.is_empty() {
            continue;
        }
        let mut e = e.clone();
        e["fieldsV1"] = to_tree(&kept);
        out.push(e);
    }
    mine.extend(changed.into_iter().filter(|p| new_flat.contains_key(p)));
    if !mine.is_empty() || old.is_none() {
        let set: Vec<&FieldPath> = if old.is_none() {
            new_flat.keys().collect()
        } else {
            mine.iter().collect()
        };
        out.push(json!({
            "manager": manager,
            "operation": "Update",
            "apiVersion": api_version,
            "time": time,
            "fieldsType": "FieldsV1",
            "fieldsV1": to_tree(set),
        }));
    }
    out
}

#[cfg(test)]
mod ownership_tests {
    use super::*;

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
