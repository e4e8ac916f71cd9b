//! OpenAPI: the schemas of every served kind (built-in ones generated from k8s-openapi, custom
//! ones from their CRDs), the `/openapi/v3` documents kubectl uses for server-side validation
//! detection and `kubectl explain`, and the unknown-field walk behind `fieldValidation`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;
use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};

use crate::api::resources::{Registry, ResourceDef};

const REF_PREFIX: &str = "#/components/schemas/";

/// Rendered documents by path, with their hashes.
type RenderedDocs = BTreeMap<String, (String, Bytes)>;

/// Every schema definition, by upstream name.
pub struct Schemas {
    defs: Map<String, Value>,
    /// Rendered v3 documents by group/version path (`api/v1`, `apis/apps/v1`), and their
    /// hashes, rebuilt when the registry changes.
    docs: RwLock<(u64, RenderedDocs)>,
}

fn gvk(def: &ResourceDef) -> Value {
    json!({"group": def.group, "version": def.version, "kind": def.kind})
}

fn resolve<'a>(defs: &'a Map<String, Value>, mut s: &'a Value) -> &'a Value {
    for _ in 0..16 {
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            match r.strip_prefix(REF_PREFIX).and_then(|n| defs.get(n)) {
                Some(t) => {
                    s = t;
                    continue;
                }
                None => return s,
            }
        }
        if let Some(all) = s.get("allOf").and_then(Value::as_array) {
            if all.len() == 1 && s.get("properties").is_none() {
                s = &all[0];
                continue;
            }
        }
        return s;
    }
    s
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Removes fields the schema does not know, recording their paths.
fn prune(
    defs: &Map<String, Value>,
    schema: &Value,
    v: &mut Value,
    path: &str,
    out: &mut Vec<String>,
) {
    let s = resolve(defs, schema);
    if s.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true) {
        return;
    }
    let preserve = s
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true);
    match v {
        Value::Object(m) => {
            let props = s.get("properties").and_then(Value::as_object);
            let additional = s.get("additionalProperties").filter(|a| a.is_object());
            if props.is_none() && additional.is_none() {
                // A free-form object (RawExtension, preserve-unknown-fields, `type: object`).
                return;
            }
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                let child_path = join(path, &k);
                if let Some(ps) = props.and_then(|p| p.get(&k)) {
                    if let Some(child) = m.get_mut(&k) {
                        prune(defs, ps, child, &child_path, out);
                    }
                } else if let Some(a) = additional {
                    if let Some(child) = m.get_mut(&k) {
                        prune(defs, a, child, &child_path, out);
                    }
                } else if !preserve {
                    m.remove(&k);
                    out.push(child_path);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = s.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune(defs, item_schema, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// Drops empty maps and lists, as Go's `omitempty` does when upstream encodes an object
/// (empty structs stay: `emptyDir: {}` means something).
fn drop_empty(defs: &Map<String, Value>, schema: &Value, v: &mut Value) {
    let s = resolve(defs, schema);
    let Value::Object(m) = v else {
        if let (Value::Array(items), Some(item_schema)) = (v, s.get("items")) {
            for item in items.iter_mut() {
                drop_empty(defs, item_schema, item);
            }
        }
        return;
    };
    let props = s.get("properties").and_then(Value::as_object);
    let additional = s.get("additionalProperties").filter(|a| a.is_object());
    let keys: Vec<String> = m.keys().cloned().collect();
    for k in keys {
        let child_schema = props.and_then(|p| p.get(&k)).or(additional);
        let Some(cs) = child_schema else { continue };
        let cs_resolved = resolve(defs, cs);
        let is_map = cs_resolved
            .get("additionalProperties")
            .is_some_and(Value::is_object)
            && cs_resolved.get("properties").is_none();
        let is_list = cs_resolved.get("type").and_then(Value::as_str) == Some("array");
        let empty = match m.get(&k) {
            Some(Value::Object(o)) => o.is_empty() && is_map,
            Some(Value::Array(a)) => a.is_empty() && is_list,
            _ => false,
        };
        if empty && props.is_some() {
            m.remove(&k);
            continue;
        }
        if let Some(child) = m.get_mut(&k) {
            drop_empty(defs, cs, child);
        }
    }
}

/// Names of every definition reachable from `roots`.
fn closure(defs: &Map<String, Value>, roots: &[String]) -> BTreeSet<String> {
    fn walk(v: &Value, found: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                    if let Some(n) = r.strip_prefix(REF_PREFIX) {
                        found.push(n.to_string());
                    }
                }
                for c in m.values() {
                    walk(c, found);
                }
            }
            Value::Array(a) => a.iter().for_each(|c| walk(c, found)),
            _ => {}
        }
    }
    let mut seen = BTreeSet::new();
    let mut stack: Vec<String> = roots.to_vec();
    while let Some(n) = stack.pop() {
        if !seen.insert(n.clone()) {
            continue;
        }
        if let Some(d) = defs.get(&n) {
            let mut found = Vec::new();
            walk(d, &mut found);
            stack.extend(found.into_iter().filter(|f| !seen.contains(f)));
        }
    }
    seen
}

fn fnv64(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn param(name: &str, location: &str, desc: &str) -> Value {
    json!({"name": name, "in": location, "description": desc, "schema": {"type": "string"}, "required": location == "path"})
}

fn op(
    def: &ResourceDef,
    verb: &str,
    action: &str,
    schema_ref: Option<&str>,
    body: bool,
    params: Vec<Value>,
) -> Value {
    let mut o = json!({
        "description": format!("{verb} {}", def.kind),
        "operationId": format!("{verb}{}", def.kind),
        "tags": [def.group.clone()],
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk(def),
        "parameters": params,
        "responses": {"200": {"description": "OK"}, "401": {"description": "Unauthorized"}},
    });
    if let Some(r) = schema_ref {
        o["responses"]["200"]["content"] =
            json!({"application/json": {"schema": {"$ref": format!("{REF_PREFIX}{r}")}}});
        if body {
            o["requestBody"] = json!({"content": {"*/*": {"schema": {"$ref": format!("{REF_PREFIX}{r}")}}}, "required": true});
        }
    }
    o
}

impl Schemas {
    /// Generates the schemas of every built-in kind.
    pub fn build(registry: &Registry) -> Schemas {
        let mut generator = SchemaSettings::openapi3().into_generator();
        let builtins: Vec<Arc<ResourceDef>> = registry
            .all()
            .into_iter()
            .filter(|d| d.schema.is_some())
            .collect();
        for d in &builtins {
            if let Some(f) = d.schema {
                let _ = f(&mut generator);
            }
        }
        let mut defs = generator.take_definitions(true);
        for d in &builtins {
            if let Some(s) = defs.get_mut(&d.schema_name).and_then(Value::as_object_mut) {
                let list = s
                    .entry("x-kubernetes-group-version-kind")
                    .or_insert_with(|| json!([]));
                if let Some(a) = list.as_array_mut() {
                    if !a.contains(&gvk(d)) {
                        a.push(gvk(d));
                    }
                }
            }
        }
        Schemas {
            defs,
            docs: RwLock::new((u64::MAX, BTreeMap::new())),
        }
    }

    /// The schema a kind's objects follow: built-in definition or the CRD's structural schema.
    fn root(&self, def: &ResourceDef) -> Option<Value> {
        if let Some(crd) = &def.crd {
            let mut s = crd.schema.clone()?;
            // Custom resources always carry standard metadata.
            if let Some(props) = s.get_mut("properties").and_then(Value::as_object_mut) {
                props.insert(
                    "metadata".into(),
                    json!({"$ref": format!("{REF_PREFIX}io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")}),
                );
                props
                    .entry("apiVersion")
                    .or_insert(json!({"type": "string"}));
                props.entry("kind").or_insert(json!({"type": "string"}));
            }
            return Some(s);
        }
        self.defs.get(&def.schema_name).cloned()
    }

    /// Drops unknown fields from `obj`, returning their paths (`spec.foo`).
    pub fn prune_unknown(&self, def: &ResourceDef, obj: &mut Value) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(root) = self.root(def) {
            prune(&self.defs, &root, obj, "", &mut out);
        }
        out
    }

    /// Property names of a definition (following a single-element allOf).
    pub fn properties(&self, name: &str) -> Vec<String> {
        self.defs
            .get(name)
            .map(|d| resolve(&self.defs, d))
            .and_then(|d| d.get("properties"))
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Removes empty maps and lists (Go's omitempty).
    pub fn drop_empty(&self, def: &ResourceDef, obj: &mut Value) {
        if let Some(root) = self.root(def) {
            drop_empty(&self.defs, &root, obj);
        }
    }

    fn definitions_for(&self, defs_in_gv: &[Arc<ResourceDef>]) -> Map<String, Value> {
        let mut roots: Vec<String> = defs_in_gv
            .iter()
            .filter(|d| d.crd.is_none())
            .map(|d| d.schema_name.clone())
            .collect();
        roots.push("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta".into());
        roots.push("io.k8s.apimachinery.pkg.apis.meta.v1.Status".into());
        roots.push("io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions".into());
        let mut out = Map::new();
        for n in closure(&self.defs, &roots) {
            if let Some(d) = self.defs.get(&n) {
                out.insert(n, d.clone());
            }
        }
        for d in defs_in_gv.iter().filter(|d| d.crd.is_some()) {
            if let Some(mut s) = self.root(d) {
                s["x-kubernetes-group-version-kind"] = json!([gvk(d)]);
                out.insert(d.schema_name.clone(), s);
                for n in closure(
                    &self.defs,
                    &["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta".to_string()],
                ) {
                    if let Some(x) = self.defs.get(&n) {
                        out.insert(n, x.clone());
                    }
                }
            }
        }
        out
    }

    fn render_gv(&self, registry: &Registry, group: &str, version: &str) -> Bytes {
        let defs_in_gv = registry.in_group_version(group, version);
        let mut paths = Map::new();
        let gv_path = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let common = |d: &ResourceDef| {
            vec![
                param("pretty", "query", "If 'true', then the output is pretty printed."),
                param("dryRun", "query", "When present, indicates that modifications should not be persisted."),
                param("fieldManager", "query", "fieldManager is a name associated with the actor or entity that is making these changes."),
                param(
                    "fieldValidation",
                    "query",
                    "fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing unknown or duplicate fields. Valid values are: - Ignore - Warn - Strict",
                ),
                json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string"}, "description": format!("name of the {}", d.kind)}),
            ]
        };
        for d in &defs_in_gv {
            let base = if d.namespaced {
                format!("{gv_path}/namespaces/{{namespace}}/{}", d.plural)
            } else {
                format!("{gv_path}/{}", d.plural)
            };
            let mut item_params = common(d);
            if d.namespaced {
                item_params.push(json!({"name": "namespace", "in": "path", "required": true, "schema": {"type": "string"}}));
            }
            let r = d.schema_name.as_str();
            let mut item = Map::new();
            item.insert(
                "get".into(),
                op(d, "read", "get", Some(r), false, item_params.clone()),
            );
            item.insert(
                "put".into(),
                op(d, "replace", "put", Some(r), true, item_params.clone()),
            );
            item.insert(
                "patch".into(),
                op(d, "patch", "patch", Some(r), false, item_params.clone()),
            );
            item.insert(
                "delete".into(),
                op(d, "delete", "delete", None, false, item_params.clone()),
            );
            paths.insert(format!("{base}/{{name}}"), Value::Object(item));
            let mut coll = Map::new();
            let coll_params: Vec<Value> = item_params
                .iter()
                .filter(|p| p["name"] != "name")
                .cloned()
                .collect();
            coll.insert(
                "get".into(),
                op(d, "list", "list", None, false, coll_params.clone()),
            );
            coll.insert(
                "post".into(),
                op(d, "create", "post", Some(r), true, coll_params),
            );
            paths.insert(base.clone(), Value::Object(coll));
            for sub in ["status", "scale"] {
                if d.has_subresource(sub) {
                    let mut s = Map::new();
                    s.insert(
                        "get".into(),
                        op(
                            d,
                            &format!("read{sub}"),
                            "get",
                            Some(r),
                            false,
                            item_params.clone(),
                        ),
                    );
                    s.insert(
                        "put".into(),
                        op(
                            d,
                            &format!("replace{sub}"),
                            "put",
                            Some(r),
                            true,
                            item_params.clone(),
                        ),
                    );
                    s.insert(
                        "patch".into(),
                        op(
                            d,
                            &format!("patch{sub}"),
                            "patch",
                            Some(r),
                            false,
                            item_params.clone(),
                        ),
                    );
                    paths.insert(format!("{base}/{{name}}/{sub}"), Value::Object(s));
                }
            }
        }
        let doc = json!({
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": crate::api::KUBE_VERSION},
            "paths": paths,
            "components": {"schemas": self.definitions_for(&defs_in_gv)},
        });
        Bytes::from(serde_json::to_vec(&doc).expect("serializing JSON to memory cannot fail"))
    }

    fn refresh(&self, registry: &Registry) {
        let generation = registry.generation();
        if self.docs.read().0 == generation {
            return;
        }
        let mut docs = BTreeMap::new();
        for (g, versions) in registry.group_versions() {
            for v in versions {
                let key = if g.is_empty() {
                    format!("api/{v}")
                } else {
                    format!("apis/{g}/{v}")
                };
                let body = self.render_gv(registry, &g, &v);
                let hash = format!("{:016X}{:016X}", fnv64(&body), fnv64(key.as_bytes()));
                docs.insert(key, (hash, body));
            }
        }
        *self.docs.write() = (generation, docs);
    }

    /// The `/openapi/v3` discovery document.
    pub fn v3_root(&self, registry: &Registry) -> Value {
        self.refresh(registry);
        let docs = self.docs.read();
        let mut paths = Map::new();
        for (k, (hash, _)) in &docs.1 {
            paths.insert(
                k.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{k}?hash={hash}")}),
            );
        }
        json!({"paths": paths})
    }

    /// A group/version document and its hash.
    pub fn v3_doc(
        &self,
        registry: &Registry,
        group: &str,
        version: &str,
    ) -> Option<(String, Bytes)> {
        self.refresh(registry);
        let key = if group.is_empty() {
            format!("api/{version}")
        } else {
            format!("apis/{group}/{version}")
        };
        self.docs.read().1.get(&key).cloned()
    }

    /// A swagger 2.0 document with every definition (for old clients; kubectl uses v3).
    pub fn v2(&self) -> Value {
        let text = serde_json::to_string(&self.defs)
            .expect("JSON")
            .replace(REF_PREFIX, "#/definitions/");
        let defs: Value = serde_json::from_str(&text).expect("JSON");
        json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": crate::api::KUBE_VERSION}, "paths": {}, "definitions": defs})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_found_with_their_paths() {
        let registry = Registry::new();
        let s = Schemas::build(&registry);
        let def = registry.get("apps", "v1", "deployments").unwrap();
        let mut d = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "x", "labels": {"a": "b"}, "bogus": 1},
            "spec": {"replicas": 1, "foo": true, "template": {"spec": {"containers": [{"name": "c", "image": "i", "imagee": "typo"}]}},
                     "strategy": {"rollingUpdate": {"maxSurge": "25%"}}}
        });
        let unknown = s.prune_unknown(&def, &mut d);
        assert_eq!(
            unknown,
            vec![
                "metadata.bogus",
                "spec.foo",
                "spec.template.spec.containers[0].imagee"
            ]
        );
        assert!(d["spec"].get("foo").is_none());
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        // Maps keep arbitrary keys.
        let cm = registry.get("", "v1", "configmaps").unwrap();
        let mut c = json!({"data": {"any.key": "v"}, "metadata": {"annotations": {"x/y": "z"}}});
        assert!(s.prune_unknown(&cm, &mut c).is_empty());
    }

    #[test]
    fn v3_documents_let_kubectl_find_kinds_and_server_validation() {
        let registry = Registry::new();
        let s = Schemas::build(&registry);
        let root = s.v3_root(&registry);
        let url = root["paths"]["apis/apps/v1"]["serverRelativeURL"]
            .as_str()
            .unwrap();
        assert!(url.starts_with("/openapi/v3/apis/apps/v1?hash="));
        let (_, doc) = s.v3_doc(&registry, "apps", "v1").unwrap();
        let doc: Value = serde_json::from_slice(&doc).unwrap();
        let p = &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(p["x-kubernetes-group-version-kind"]["kind"], "Deployment");
        assert!(p["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "fieldValidation"));
        let schema = &doc["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(
            schema["x-kubernetes-group-version-kind"][0]["kind"],
            "Deployment"
        );
        assert!(doc["components"]["schemas"]
            .get("io.k8s.api.core.v1.PodSpec")
            .is_some());
    }
}
