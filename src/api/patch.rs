//! Patches: JSON patch (RFC 6902), JSON merge patch (RFC 7386), and strategic merge patch with
//! upstream's merge keys for built-in kinds and its directives (`$patch`, `$retainKeys`,
//! `$setElementOrder/<list>`, `$deleteFromPrimitiveList/<list>`, `null` deletes).

use serde_json::{Map, Value};

use crate::api::status::{ApiError, ApiResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<PatchType> {
        match ct.split(';').next().unwrap_or_default().trim() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }
}

pub fn json_patch(doc: &Value, patch: &Value) -> ApiResult<Value> {
    let p: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("the server rejected our request due to an error in our request: invalid JSON patch: {e}")))?;
    let mut out = doc.clone();
    json_patch::patch(&mut out, &p).map_err(|e| {
        // Upstream answers a failed test or a missing path with 422.
        ApiError::new(
            422,
            "Invalid",
            format!("the server rejected our request due to an error in our request: {e}"),
        )
    })?;
    Ok(out)
}

pub fn merge_patch(doc: &Value, patch: &Value) -> ApiResult<Value> {
    if !patch.is_object() {
        return Err(ApiError::bad_request("the server rejected our request due to an error in our request: a merge patch must be a JSON object"));
    }
    let mut out = doc.clone();
    json_patch::merge(&mut out, patch);
    Ok(out)
}

/// The merge key of a list field, by field name and (where names are shared) by the items.
fn merge_key(field: &str, items: &[&Value]) -> Option<&'static str> {
    let has = |k: &str| items.iter().any(|i| i.get(k).is_some());
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "readinessGates" => {
            if field == "readinessGates" {
                "conditionType"
            } else {
                "name"
            }
        }
        "ports" => {
            if has("containerPort") {
                "containerPort"
            } else {
                "port"
            }
        }
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "hostAliases" => "ip",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "topologySpreadConstraints" => "topologyKey",
        "resourceClaims" => "name",
        "schedulingGates" => "name",
        "taints" => "key",
        "addresses" => "type",
        "images" => return None,
        _ => return None,
    })
}

/// Primitive lists upstream merges (patchStrategy: merge) instead of replacing.
fn merges_primitives(field: &str) -> bool {
    matches!(field, "finalizers")
}

fn key_of<'a>(item: &'a Value, key: &str) -> Option<&'a Value> {
    item.get(key)
}

fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            for c in m.values_mut() {
                strip_directives(c);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

fn smp_map(orig: &Map<String, Value>, patch: &Map<String, Value>) -> ApiResult<Value> {
    if let Some(d) = patch.get("$patch").and_then(Value::as_str) {
        match d {
            "replace" => {
                let mut p = Value::Object(patch.clone());
                strip_directives(&mut p);
                return Ok(p);
            }
            "delete" => return Ok(Value::Null),
            "merge" => {}
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown patch type: {other:?} in map"
                )))
            }
        }
    }
    let mut out = orig.clone();
    if let Some(retain) = patch.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
        out.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, pv) in patch {
        if k.starts_with('$') {
            if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
                if let (Some(Value::Array(cur)), Some(del)) = (out.get_mut(field), pv.as_array()) {
                    cur.retain(|x| !del.contains(x));
                }
            }
            continue;
        }
        match pv {
            Value::Null => {
                out.remove(k);
            }
            Value::Object(pm) => {
                let merged = match out.get(k) {
                    Some(Value::Object(om)) => smp_map(om, pm)?,
                    _ => smp_map(&Map::new(), pm)?,
                };
                if merged.is_null() {
                    out.remove(k);
                } else {
                    out.insert(k.clone(), merged);
                }
            }
            Value::Array(pa) => {
                let order = patch
                    .get(&format!("$setElementOrder/{k}"))
                    .and_then(Value::as_array)
                    .cloned();
                let cur = out
                    .get(k)
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                out.insert(k.clone(), smp_list(k, &cur, pa, order.as_deref())?);
            }
            other => {
                out.insert(k.clone(), other.clone());
            }
        }
    }
    // A $setElementOrder without a patch of the list only reorders it.
    for (k, v) in patch {
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            if patch.contains_key(field) {
                continue;
            }
            if let (Some(Value::Array(cur)), Some(order)) = (out.get(field).cloned(), v.as_array())
            {
                out.insert(field.to_string(), reorder(field, &cur, order));
            }
        }
    }
    Ok(Value::Object(out))
}

fn reorder(field: &str, cur: &[Value], order: &[Value]) -> Value {
    let refs: Vec<&Value> = cur.iter().collect();
    let Some(key) = merge_key(field, &refs) else {
        // Primitive list: order is the list itself.
        let mut out: Vec<Value> = order.iter().filter(|x| cur.contains(x)).cloned().collect();
        out.extend(cur.iter().filter(|x| !order.contains(x)).cloned());
        return Value::Array(out);
    };
    let mut out = Vec::new();
    for o in order {
        if let Some(item) = cur.iter().find(|c| key_of(c, key) == key_of(o, key)) {
            out.push(item.clone());
        }
    }
    out.extend(
        cur.iter()
            .filter(|c| !order.iter().any(|o| key_of(c, key) == key_of(o, key)))
            .cloned(),
    );
    Value::Array(out)
}

fn smp_list(
    field: &str,
    cur: &[Value],
    patch: &[Value],
    order: Option<&[Value]>,
) -> ApiResult<Value> {
    // A list-level `$patch: replace` item replaces the whole list.
    if patch.iter().any(|p| {
        p.get("$patch").and_then(Value::as_str) == Some("replace")
            && p.as_object().is_some_and(|m| m.len() == 1)
    }) {
        let mut out: Vec<Value> = patch
            .iter()
            .filter(|p| !(p.get("$patch").is_some() && p.as_object().is_some_and(|m| m.len() == 1)))
            .cloned()
            .collect();
        out.iter_mut().for_each(strip_directives);
        return Ok(Value::Array(out));
    }
    let all: Vec<&Value> = cur.iter().chain(patch.iter()).collect();
    let key = merge_key(field, &all);
    let result = match key {
        Some(key) if patch.iter().all(Value::is_object) => {
            let mut out: Vec<Value> = cur.to_vec();
            for p in patch {
                let pk = key_of(p, key);
                let pos = out
                    .iter()
                    .position(|c| key_of(c, key) == pk && pk.is_some());
                let directive = p.get("$patch").and_then(Value::as_str);
                match (pos, directive) {
                    (Some(i), Some("delete")) => {
                        out.remove(i);
                    }
                    (None, Some("delete")) => {}
                    (Some(i), Some("replace")) => {
                        let mut np = p.clone();
                        strip_directives(&mut np);
                        out[i] = np;
                    }
                    (Some(i), _) => {
                        let merged = match (&out[i], p) {
                            (Value::Object(om), Value::Object(pm)) => smp_map(om, pm)?,
                            _ => p.clone(),
                        };
                        out[i] = merged;
                    }
                    (None, _) => {
                        let mut np = p.clone();
                        if let Value::Object(pm) = p {
                            np = smp_map(&Map::new(), pm)?;
                        }
                        strip_directives(&mut np);
                        out.push(np);
                    }
                }
            }
            Value::Array(out)
        }
        _ if merges_primitives(field) => {
            let mut out: Vec<Value> = cur.to_vec();
            for p in patch {
                if !out.contains(p) {
                    out.push(p.clone());
                }
            }
            Value::Array(out)
        }
        _ => {
            let mut p = Value::Array(patch.to_vec());
            strip_directives(&mut p);
            p
        }
    };
    Ok(match (order, result) {
        (Some(order), Value::Array(items)) => reorder(field, &items, order),
        (_, r) => r,
    })
}

/// Applies a strategic merge patch.
pub fn strategic_merge(doc: &Value, patch: &Value) -> ApiResult<Value> {
    match (doc, patch) {
        (Value::Object(o), Value::Object(p)) => {
            let out = smp_map(o, p)?;
            if out.is_null() {
                return Err(ApiError::bad_request("a strategic merge patch may not delete the whole object"));
            }
            Ok(out)
        }
        _ => Err(ApiError::bad_request(
            "the server rejected our request due to an error in our request: a strategic merge patch must be a JSON object",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merge_merges_containers_by_name_and_env_by_name() {
        let doc = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
            {"name": "b", "image": "b:1"}]}});
        let p = json!({"spec": {"containers": [{"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "3"}, {"name": "Z", "$patch": "delete"}]}]}});
        let out = strategic_merge(&doc, &p).unwrap();
        assert_eq!(out["spec"]["containers"][0]["image"], "a:2");
        assert_eq!(
            out["spec"]["containers"][0]["env"],
            json!([{"name": "X", "value": "1"}, {"name": "Y", "value": "3"}])
        );
        assert_eq!(
            out["spec"]["containers"][1]["name"], "b",
            "untouched items stay"
        );
    }

    #[test]
    fn strategic_merge_directives() {
        let doc = json!({"metadata": {"labels": {"a": "1", "b": "2"}, "finalizers": ["x/y"]}, "spec": {"ports": [{"port": 80}, {"port": 443}], "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        let p = json!({
            "metadata": {"labels": {"a": null}, "finalizers": ["z/w"], "$deleteFromPrimitiveList/finalizers": ["x/y"]},
            "spec": {"$setElementOrder/ports": [{"port": 443}, {"port": 80}],
                     "strategy": {"$retainKeys": ["type"], "type": "Recreate"}}
        });
        let out = strategic_merge(&doc, &p).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["z/w"]));
        assert_eq!(out["spec"]["ports"], json!([{"port": 443}, {"port": 80}]));
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        let out = strategic_merge(
            &doc,
            &json!({"spec": {"ports": [{"$patch": "replace"}, {"port": 8080}]}}),
        )
        .unwrap();
        assert_eq!(out["spec"]["ports"], json!([{"port": 8080}]));
        let out = strategic_merge(
            &doc,
            &json!({"metadata": {"labels": {"$patch": "replace", "c": "3"}}}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"c": "3"}));
    }

    #[test]
    fn json_and_merge_patches() {
        let doc = json!({"a": {"b": 1}, "l": [1, 2]});
        assert_eq!(json_patch(&doc, &json!([{"op": "replace", "path": "/a/b", "value": 2}, {"op": "add", "path": "/l/-", "value": 3}])).unwrap(), json!({"a": {"b": 2}, "l": [1, 2, 3]}));
        assert_eq!(
            json_patch(&doc, &json!([{"op": "test", "path": "/a/b", "value": 9}]))
                .unwrap_err()
                .code,
            422
        );
        assert_eq!(
            merge_patch(&doc, &json!({"a": null, "c": 1})).unwrap(),
            json!({"l": [1, 2], "c": 1})
        );
    }
}
