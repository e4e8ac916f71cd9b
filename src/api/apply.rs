//! Server-side apply (`application/apply-patch+yaml`): the applied configuration is merged into
//! the live object; fields the manager applied before and left out now are removed; a field
//! another manager owns with a different value is a conflict (409, naming fields and managers)
//! unless `force=true`, which takes ownership.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use hyper::{Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::api::managed::{display_path, flatten, from_tree, to_tree, FieldPath};
use crate::api::objects::{self, Part, WriteOpts};
use crate::api::resources::ResourceDef;
use crate::api::status::{ApiError, ApiResult};
use crate::api::{json_response_pub, ApiState, Body, User};

/// Merges an applied configuration into a live object: maps merge, keyed lists merge by key,
/// other lists and scalars are replaced.
fn merge(live: &Value, applied: &Value) -> Value {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            let mut out = l.clone();
            for (k, av) in a {
                let merged = match out.get(k) {
                    Some(lv) => merge(lv, av),
                    None => av.clone(),
                };
                out.insert(k.clone(), merged);
            }
            Value::Object(out)
        }
        (Value::Array(l), Value::Array(a)) => {
            let key = [
                "name",
                "containerPort",
                "port",
                "mountPath",
                "ip",
                "type",
                "uid",
            ]
            .into_iter()
            .find(|k| a.iter().chain(l.iter()).all(|i| i.get(*k).is_some()));
            match key {
                Some(k) if !a.is_empty() => {
                    let mut out: Vec<Value> = Vec::new();
                    for ai in a {
                        match l.iter().find(|li| li.get(k) == ai.get(k)) {
                            Some(li) => out.push(merge(li, ai)),
                            None => out.push(ai.clone()),
                        }
                    }
                    // Items others set stay after the applied ones.
                    for li in l {
                        if !a.iter().any(|ai| ai.get(k) == li.get(k)) {
                            out.push(li.clone());
                        }
                    }
                    Value::Array(out)
                }
                _ => applied.clone(),
            }
        }
        _ => applied.clone(),
    }
}

/// Removes one field path from an object (list items by their key).
fn remove_path(v: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if let Some(f) = first.strip_prefix("f:") {
        if let Some(m) = v.as_object_mut() {
            if rest.is_empty() {
                m.remove(f);
            } else if let Some(c) = m.get_mut(f) {
                remove_path(c, rest);
            }
        }
    } else if let Some(k) = first.strip_prefix("k:") {
        let key: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
        if let Some(a) = v.as_array_mut() {
            let pos = a
                .iter()
                .position(|i| key.iter().all(|(kk, kv)| i.get(kk) == Some(kv)));
            if let Some(p) = pos {
                if rest.is_empty() {
                    a.remove(p);
                } else {
                    remove_path(&mut a[p], rest);
                }
            }
        }
    } else if let Some(val) = first.strip_prefix("v:") {
        let want: Value = serde_json::from_str(val).unwrap_or(Value::Null);
        if let Some(a) = v.as_array_mut() {
            a.retain(|i| *i != want);
        }
    }
}

fn conflict_error(
    def: &ResourceDef,
    name: &str,
    conflicts: &BTreeMap<String, Vec<(FieldPath, String)>>,
) -> ApiError {
    let n: usize = conflicts.values().map(Vec::len).sum();
    let mut msg = format!(
        "Apply failed with {n} conflict{}: ",
        if n == 1 { "" } else { "s" }
    );
    let parts: Vec<String> = conflicts
        .iter()
        .map(|(mgr, fields)| {
            let api = &fields[0].1;
            if fields.len() == 1 {
                format!(
                    "conflict with \"{mgr}\" using {api}: {}",
                    display_path(&fields[0].0)
                )
            } else {
                let list: Vec<String> = fields
                    .iter()
                    .map(|(p, _)| format!("- {}", display_path(p)))
                    .collect();
                format!("conflicts with \"{mgr}\" using {api}:\n{}", list.join("\n"))
            }
        })
        .collect();
    msg.push_str(&parts.join("\n"));
    let mut e = ApiError::conflict(&def.group, &def.plural, name, "");
    e.message = msg;
    e.causes = conflicts
        .iter()
        .flat_map(|(mgr, fields)| {
            fields.iter().map(move |(p, _)| {
                crate::api::status::Cause::new(
                    "FieldManagerConflict",
                    display_path(p),
                    format!("conflict with \"{mgr}\""),
                )
            })
        })
        .collect();
    e
}

#[allow(clippy::too_many_arguments)]
pub async fn server_side_apply(
    st: &Arc<ApiState>,
    def: &Arc<ResourceDef>,
    ns: Option<&str>,
    name: &str,
    mut applied: Value,
    part: Part,
    opts: &WriteOpts,
    force: bool,
    user: &User,
) -> ApiResult<Response<Body>> {
    if !applied.is_object() {
        return Err(ApiError::bad_request(
            "the applied configuration must be an object",
        ));
    }
    let body_name = applied
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if body_name.is_empty() {
        applied["metadata"]["name"] = json!(name);
    } else if body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    let manager = opts.field_manager.clone();
    let api_version = def.api_version();
    let now = objects::now_rfc3339();
    let applied_flat = flatten(&strip_meta(&applied));
    let applied_set: BTreeSet<FieldPath> = applied_flat.keys().cloned().collect();
    for _ in 0..8 {
        let live = match objects::get(st, def, ns, name).await {
            Ok(l) => Some(l),
            Err(e) if e.code == 404 => None,
            Err(e) => return Err(e),
        };
        let Some(live) = live else {
            // Apply creates.
            let mut obj = applied.clone();
            obj["metadata"]["managedFields"] = json!([{
                "manager": manager, "operation": "Apply", "apiVersion": api_version, "time": now,
                "fieldsType": "FieldsV1", "fieldsV1": to_tree(&applied_set),
            }]);
            match objects::create(st, def, ns, obj, opts, user).await {
                Ok((created, warnings)) => {
                    return Ok(json_response_pub(StatusCode::CREATED, &created, &warnings))
                }
                Err(e) if e.code == 409 && e.reason == "AlreadyExists" => continue,
                Err(e) => return Err(e),
            }
        };
        let live_rv = live
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .and_then(|r| r.parse::<i64>().ok())
            .unwrap_or(0);
        let live_flat = flatten(&strip_meta(&live));
        let entries: Vec<Value> = live
            .pointer("/metadata/managedFields")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        // Conflicts: fields we set to a different value that someone else owns.
        let mut conflicts: BTreeMap<String, Vec<(FieldPath, String)>> = BTreeMap::new();
        for e in &entries {
            let m = e["manager"].as_str().unwrap_or_default();
            if m == manager && e["operation"] == "Apply" {
                continue;
            }
            for p in from_tree(&e["fieldsV1"]) {
                if let Some(av) = applied_flat.get(&p) {
                    if live_flat.get(&p) != Some(av) {
                        conflicts
                            .entry(m.to_string())
                            .or_default()
                            .push((p, e["apiVersion"].as_str().unwrap_or_default().to_string()));
                    }
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(conflict_error(def, name, &conflicts));
        }
        let mut merged = merge(&live, &applied);
        // Fields we applied before and no longer apply go, unless someone else owns them.
        let previous: BTreeSet<FieldPath> = entries
            .iter()
            .filter(|e| e["manager"].as_str() == Some(&manager) && e["operation"] == "Apply")
            .flat_map(|e| from_tree(&e["fieldsV1"]))
            .collect();
        let others: BTreeSet<FieldPath> = entries
            .iter()
            .filter(|e| !(e["manager"].as_str() == Some(&manager) && e["operation"] == "Apply"))
            .flat_map(|e| from_tree(&e["fieldsV1"]))
            .collect();
        for p in previous.difference(&applied_set) {
            if !others.contains(p) {
                remove_path(&mut merged, p);
            }
        }
        // New ownership: ours is exactly what we applied; forced conflicts move to us.
        let forced: BTreeSet<FieldPath> = conflicts
            .values()
            .flatten()
            .map(|(p, _)| p.clone())
            .collect();
        let mut new_entries = Vec::new();
        for e in &entries {
            if e["manager"].as_str() == Some(&manager) && e["operation"] == "Apply" {
                continue;
            }
            let kept: Vec<FieldPath> = from_tree(&e["fieldsV1"])
                .into_iter()
                .filter(|p| !forced.contains(p))
                .collect();
            if kept.is_empty() {
                continue;
            }
            let mut e = e.clone();
            e["fieldsV1"] = to_tree(&kept);
            new_entries.push(e);
        }
        new_entries.push(json!({
            "manager": manager, "operation": "Apply", "apiVersion": api_version, "time": now,
            "fieldsType": "FieldsV1", "fieldsV1": to_tree(&applied_set),
        }));
        merged["metadata"]["managedFields"] = Value::Array(new_entries);
        if let Some(md) = merged.get_mut("metadata").and_then(Value::as_object_mut) {
            md.remove("resourceVersion");
        }
        match objects::update(
            st,
            def,
            ns,
            name,
            merged,
            part,
            opts,
            Some((live.clone(), live_rv)),
        )
        .await
        {
            Ok((out, warnings)) => return Ok(json_response_pub(StatusCode::OK, &out, &warnings)),
            Err(e) if e.code == 409 && e.reason == "Conflict" => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::stale(&def.group, &def.plural, name))
}

fn strip_meta(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(md) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        md.remove("managedFields");
    }
    if let Some(m) = v.as_object_mut() {
        m.remove("status");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_merge_keeps_others_list_items() {
        let live = json!({"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "side", "image": "s"}], "replicas": 1}});
        let applied = json!({"spec": {"containers": [{"name": "a", "image": "2"}]}});
        let m = merge(&live, &applied);
        assert_eq!(
            m["spec"]["containers"],
            json!([{"name": "a", "image": "2"}, {"name": "side", "image": "s"}])
        );
        assert_eq!(m["spec"]["replicas"], 1);
        let mut v = m.clone();
        remove_path(
            &mut v,
            &[
                "f:spec".into(),
                "f:containers".into(),
                "k:{\"name\":\"side\"}".into(),
            ],
        );
        assert_eq!(v["spec"]["containers"].as_array().unwrap().len(), 1);
    }
}
