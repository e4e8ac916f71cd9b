//! The in-process client of the control loops: the same registry path as HTTP requests
//! (defaulting, validation, admission, optimistic concurrency), as an internal identity, without
//! TLS or JSON re-encoding.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::api::objects::{self, DeleteOpts, Part, WriteOpts};
use crate::api::request::FieldValidation;
use crate::api::resources::ResourceDef;
use crate::api::status::{ApiError, ApiResult};
use crate::api::{patch, ApiState, User};

#[derive(Clone)]
pub struct Client {
    pub st: Arc<ApiState>,
    manager: String,
    user: User,
}

impl Client {
    /// A client acting as `manager` (its field manager and event source).
    pub fn new(st: Arc<ApiState>, manager: &str) -> Client {
        Client {
            st,
            manager: manager.to_string(),
            user: User {
                name: format!("system:{manager}"),
                groups: vec!["system:masters".into()],
            },
        }
    }

    /// A built-in resource by group, version and plural.
    pub fn def(&self, group: &str, version: &str, plural: &str) -> Arc<ResourceDef> {
        self.st
            .registry
            .get(group, version, plural)
            .unwrap_or_else(|| panic!("built-in resource {group}/{version}/{plural} missing"))
    }

    fn opts(&self) -> WriteOpts {
        WriteOpts {
            dry_run: false,
            field_validation: FieldValidation::Ignore,
            field_manager: self.manager.clone(),
            operation: "Update",
        }
    }

    pub async fn get(
        &self,
        def: &Arc<ResourceDef>,
        ns: Option<&str>,
        name: &str,
    ) -> ApiResult<Value> {
        objects::get(&self.st, def, ns, name).await
    }

    pub async fn create(
        &self,
        def: &Arc<ResourceDef>,
        ns: Option<&str>,
        obj: Value,
    ) -> ApiResult<Value> {
        objects::create(&self.st, def, ns, obj, &self.opts(), &self.user)
            .await
            .map(|(o, _)| o)
    }

    /// Replaces an object (its `metadata.resourceVersion` is the precondition).
    pub async fn update(
        &self,
        def: &Arc<ResourceDef>,
        ns: Option<&str>,
        obj: Value,
    ) -> ApiResult<Value> {
        let name = name_of(&obj).to_string();
        objects::update(
            &self.st,
            def,
            ns,
            &name,
            obj,
            Part::Main,
            &self.opts(),
            None,
        )
        .await
        .map(|(o, _)| o)
    }

    /// Applies a JSON merge patch to the current object (retrying on conflicts).
    pub async fn merge_patch(
        &self,
        def: &Arc<ResourceDef>,
        ns: Option<&str>,
        name: &str,
        p: &Value,
    ) -> ApiResult<Value> {
        self.merge_patch_part(def, ns, name, Part::Main, p).await
    }

    /// Applies a JSON merge patch to the status of the current object.
    pub async fn merge_patch_status(
        &self,
        def: &Arc<ResourceDef>,
        ns: Option<&str>,
        name: &str,
        p: &Value,
    ) -> ApiResult<Value> {
        let part = if def.has_status() {
            Part::Status
        } else {
            Part::Main
        };
        self.merge_patch_part(def, ns, name, part, p).await
    }

    /// A JSON merge patch of one part of the current object, retried on conflicts.
    async fn merge_patch_part(
        &self,
        def: &Arc<ResourceDef>,
        ns: Option<&str>,
        name: &str,
        part: Part,
        p: &Value,
    ) -> ApiResult<Value> {
        objects::guaranteed_update(&self.st, def, ns, name, part, &self.opts(), |cur| {
            let mut out = patch::merge_patch(cur, p)?;
            if let Some(md) = out.get_mut("metadata").and_then(Value::as_object_mut) {
                md.remove("resourceVersion");
            }
            Ok(out)
        })
        .await
        .map(|(o, _)| o)
    }

    pub async fn delete(
        &self,
        def: &Arc<ResourceDef>,
        ns: Option<&str>,
        name: &str,
        opts: &DeleteOpts,
    ) -> ApiResult<Value> {
        objects::delete(&self.st, def, ns, name, opts).await
    }

    /// Deletes with preconditions on uid (the object the caller decided about).
    pub async fn delete_uid(
        &self,
        def: &Arc<ResourceDef>,
        ns: Option<&str>,
        name: &str,
        uid: &str,
        propagation: Option<&str>,
    ) -> ApiResult<Value> {
        let opts = DeleteOpts {
            precondition_uid: Some(uid.to_string()).filter(|u| !u.is_empty()),
            propagation: propagation.map(str::to_string),
            ..Default::default()
        };
        objects::delete(&self.st, def, ns, name, &opts).await
    }

    /// Binds a pod to a node (`pods/binding`): its node name and its PodScheduled condition in
    /// one write.
    pub async fn bind(&self, ns: &str, name: &str, node: &str) -> ApiResult<()> {
        let def = self.def("", "v1", "pods");
        let opts = self.opts();
        objects::guaranteed_update(&self.st, &def, Some(ns), name, Part::All, &opts, |cur| {
            if cur.pointer("/metadata/deletionTimestamp").is_some() {
                return Err(ApiError::conflict("", "pods", name, "pod is being deleted, cannot be assigned to a host"));
            }
            let current = cur.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or_default();
            if !current.is_empty() {
                return Err(ApiError::conflict("", "pods", name, &format!("pod {name} is already assigned to node \"{current}\"")));
            }
            let mut o = cur.clone();
            o["spec"]["nodeName"] = json!(node);
            let mut conds: Vec<Value> = o["status"]["conditions"].as_array().cloned().unwrap_or_default();
            conds.retain(|c| c["type"] != "PodScheduled");
            conds.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": objects::now_rfc3339()}));
            o["status"]["conditions"] = Value::Array(conds);
            if let Some(md) = o.get_mut("metadata").and_then(Value::as_object_mut) {
                md.remove("resourceVersion");
            }
            Ok(o)
        })
        .await
        .map(|_| ())
    }
}

pub fn name_of(v: &Value) -> &str {
    v.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub fn namespace_of(v: &Value) -> &str {
    v.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub fn uid_of(v: &Value) -> &str {
    v.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// `namespace/name` (or `name` for cluster-scoped objects): the queue key of an object.
pub fn key_of(v: &Value) -> String {
    let ns = namespace_of(v);
    if ns.is_empty() {
        name_of(v).to_string()
    } else {
        format!("{ns}/{}", name_of(v))
    }
}

pub fn split_key(key: &str) -> (Option<&str>, &str) {
    match key.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, key),
    }
}

/// The controlling owner reference, if any.
pub fn controller_of(v: &Value) -> Option<&Value> {
    v.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)?
        .iter()
        .find(|r| r["controller"].as_bool() == Some(true))
}

/// An owner reference naming `owner` as controller.
pub fn owner_ref(owner: &Value, block: bool) -> Value {
    json!({
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": name_of(owner),
        "uid": uid_of(owner),
        "controller": true,
        "blockOwnerDeletion": block,
    })
}

pub fn is_terminating(v: &Value) -> bool {
    v.pointer("/metadata/deletionTimestamp").is_some()
}
