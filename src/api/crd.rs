//! CustomResourceDefinitions: serving the kinds they define (every served version, one storage
//! version), their status conditions, structural-schema validation of custom objects, and
//! removal of the objects when the CRD goes.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::api::resources::{CrdInfo, Registry, ResourceDef};
use crate::api::status::{ApiError, ApiResult, Cause};

/// The resource definitions a CRD object serves.
pub fn defs_from_crd(crd: &Value) -> Vec<ResourceDef> {
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default().to_string();
    let names = &spec["names"];
    let plural = names["plural"].as_str().unwrap_or_default().to_string();
    let kind = names["kind"].as_str().unwrap_or_default().to_string();
    if group.is_empty() || plural.is_empty() || kind.is_empty() {
        return Vec::new();
    }
    let singular = names["singular"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| kind.to_lowercase());
    let list_kind = names["listKind"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{kind}List"));
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let short_names = strs(&names["shortNames"]);
    let categories = strs(&names["categories"]);
    let namespaced = spec["scope"].as_str() != Some("Cluster");
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    versions
        .iter()
        .filter(|v| v["served"].as_bool() != Some(false))
        .map(|v| {
            let version = v["name"].as_str().unwrap_or_default().to_string();
            let mut subresources = Vec::new();
            if v.pointer("/subresources/status").is_some() {
                subresources.push("status".to_string());
            }
            if v.pointer("/subresources/scale").is_some() {
                subresources.push("scale".to_string());
            }
            ResourceDef {
                group: group.clone(),
                version: version.clone(),
                kind: kind.clone(),
                list_kind: list_kind.clone(),
                plural: plural.clone(),
                singular: singular.clone(),
                short_names: short_names.clone(),
                categories: categories.clone(),
                namespaced,
                subresources,
                type_check: None,
                schema: None,
                schema_name: format!("{}.{version}.{kind}", reverse_group(&group)),
                storage_group: group.clone(),
                crd: Some(Arc::new(CrdInfo {
                    schema: v.pointer("/schema/openAPIV3Schema").cloned(),
                    printer_columns: v["additionalPrinterColumns"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default(),
                    scale: v.pointer("/subresources/scale").cloned(),
                })),
            }
        })
        .collect()
}

/// `example.com` → `com.example` (how upstream names CRD schemas in OpenAPI).
fn reverse_group(g: &str) -> String {
    let mut parts: Vec<&str> = g.split('.').collect();
    parts.reverse();
    parts.join(".")
}

/// Registers (or re-registers) the kinds of a CRD.
pub fn register(registry: &Registry, crd: &Value) {
    let group = crd
        .pointer("/spec/group")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let plural = crd
        .pointer("/spec/names/plural")
        .and_then(Value::as_str)
        .unwrap_or_default();
    registry.remove_crd(group, plural);
    for d in defs_from_crd(crd) {
        registry.add(d);
    }
}

/// Validation of a CRD object itself.
pub fn validate_crd(crd: &Value) -> Vec<Cause> {
    let mut out = Vec::new();
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec
        .pointer("/names/plural")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = crd
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if group.is_empty() {
        out.push(Cause::required("spec.group", ""));
    } else if !group.contains('.') {
        out.push(Cause::invalid(
            "spec.group",
            &spec["group"],
            "should be a domain with at least one dot",
        ));
    }
    if plural.is_empty() {
        out.push(Cause::required("spec.names.plural", ""));
    }
    if spec
        .pointer("/names/kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .is_empty()
    {
        out.push(Cause::required("spec.names.kind", ""));
    }
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        out.push(Cause::invalid(
            "metadata.name",
            &json!(name),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        out.push(Cause::required(
            "spec.versions",
            "must have exactly one version marked as storage version",
        ));
    } else if versions
        .iter()
        .filter(|v| v["storage"].as_bool() == Some(true))
        .count()
        != 1
    {
        out.push(Cause::invalid(
            "spec.versions",
            &json!(versions.len()),
            "must have exactly one version marked as storage version",
        ));
    }
    match spec["scope"].as_str() {
        Some("Namespaced" | "Cluster") => {}
        _ => out.push(Cause::not_supported(
            "spec.scope",
            &spec["scope"],
            &["Cluster", "Namespaced"],
        )),
    }
    out
}

/// The status a served CRD reports.
pub fn established_status(crd: &Value) -> Value {
    let now = crate::api::objects::now_rfc3339();
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter(|v| v["storage"].as_bool() == Some(true))
                .map(|v| v["name"].clone())
                .collect()
        })
        .unwrap_or_default();
    json!({
        "acceptedNames": crd.pointer("/spec/names").cloned().unwrap_or(json!({})),
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now},
        ],
        "storedVersions": stored,
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn validate_value(schema: &Value, v: &Value, path: &str, out: &mut Vec<Cause>) {
    if schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true)
    {
        if !matches!(v, Value::String(_) | Value::Number(_)) {
            out.push(Cause::invalid(
                path,
                v,
                &format!(
                    "{path} in body must be of type integer,string: {:?}",
                    type_name(v)
                ),
            ));
        }
        return;
    }
    if v.is_null() && schema.get("nullable").and_then(Value::as_bool) == Some(true) {
        return;
    }
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "integer" => type_name(v) == "integer",
            "number" => v.is_number(),
            other => type_name(v) == other,
        };
        if !ok {
            out.push(Cause::new(
                "FieldValueTypeInvalid",
                path,
                format!(
                    "Invalid value: {:?}: {path} in body must be of type {t}: {:?}",
                    type_name(v),
                    type_name(v)
                ),
            ));
            return;
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            let list: Vec<&str> = e.iter().filter_map(Value::as_str).collect();
            out.push(Cause::not_supported(path, v, &list));
        }
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            if n < min {
                out.push(Cause::invalid(
                    path,
                    v,
                    &format!("{path} in body should be greater than or equal to {min}"),
                ));
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            if n > max {
                out.push(Cause::invalid(
                    path,
                    v,
                    &format!("{path} in body should be less than or equal to {max}"),
                ));
            }
        }
    }
    if let Some(s) = v.as_str() {
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
            if (s.chars().count() as u64) < min {
                out.push(Cause::invalid(
                    path,
                    v,
                    &format!("{path} in body should be at least {min} chars long"),
                ));
            }
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
            if s.chars().count() as u64 > max {
                out.push(Cause::new(
                    "FieldValueTooLong",
                    path,
                    format!("Too long: may not be more than {max} bytes"),
                ));
            }
        }
    }
    match v {
        Value::Object(m) => {
            if let Some(req) = schema.get("required").and_then(Value::as_array) {
                for r in req.iter().filter_map(Value::as_str) {
                    if !m.contains_key(r) {
                        let p = if path.is_empty() {
                            r.to_string()
                        } else {
                            format!("{path}.{r}")
                        };
                        out.push(Cause::required(p, ""));
                    }
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            for (k, child) in m {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                if path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                if let Some(s) = props.and_then(|p| p.get(k)) {
                    validate_value(s, child, &p, out);
                } else if let Some(s) = schema.get("additionalProperties").filter(|a| a.is_object())
                {
                    validate_value(s, child, &p, out);
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate_value(s, item, &format!("{path}[{i}]"), out);
                }
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
                if items.len() as u64 > max {
                    out.push(Cause::new(
                        "FieldValueTooMany",
                        path,
                        format!("Too many: {}: must have at most {max} items", items.len()),
                    ));
                }
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
                if (items.len() as u64) < min {
                    out.push(Cause::invalid(
                        path,
                        v,
                        &format!("{path} in body should have at least {min} items"),
                    ));
                }
            }
        }
        _ => {}
    }
}

/// Validates a custom object against its version's structural schema.
pub fn validate_custom(def: &ResourceDef, crd: &CrdInfo, obj: &Value) -> ApiResult<()> {
    let Some(schema) = &crd.schema else {
        return Ok(());
    };
    let mut out = Vec::new();
    validate_value(schema, obj, "", &mut out);
    if out.is_empty() {
        Ok(())
    } else {
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        Err(ApiError::invalid(&def.group, &def.kind, name, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd() -> Value {
        json!({
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [
                    {"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                     "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object", "required": ["size"], "properties": {"size": {"type": "integer", "minimum": 1}, "color": {"type": "string", "enum": ["red", "blue"]}}}}}}},
                    {"name": "v1beta1", "served": true, "storage": false}
                ]}
        })
    }

    #[test]
    fn crds_serve_each_version_and_validate_objects() {
        let c = crd();
        assert!(validate_crd(&c).is_empty());
        let defs = defs_from_crd(&c);
        assert_eq!(defs.len(), 2);
        let v1 = &defs[0];
        assert_eq!(
            (v1.kind.as_str(), v1.plural.as_str(), v1.namespaced),
            ("Widget", "widgets", true)
        );
        assert!(v1.has_status());
        let info = v1.crd.clone().unwrap();
        assert!(validate_custom(v1, &info, &json!({"spec": {"size": 3, "color": "red"}})).is_ok());
        let e = validate_custom(
            v1,
            &info,
            &json!({"metadata": {"name": "w"}, "spec": {"size": "big", "color": "green"}}),
        )
        .unwrap_err();
        assert_eq!(e.code, 422);
        assert!(e.message.contains("spec.size"), "{}", e.message);
        assert!(e.message.contains("spec.color"), "{}", e.message);
        let e = validate_custom(v1, &info, &json!({"spec": {}})).unwrap_err();
        assert!(
            e.message.contains("spec.size: Required value"),
            "{}",
            e.message
        );
    }
}
