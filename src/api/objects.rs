//! The registry logic of every resource: create, get, list, update, patch, delete and
//! deletecollection on the store, with upstream semantics (resourceVersion and conflicts,
//! generateName, uid, creationTimestamp, generation, finalizers and deletionTimestamp, status
//! subresources, dryRun, fieldValidation, defaulting and validation, namespace lifecycle).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use k3rs_storage::{
    Compare, DeleteRangeRequest, KeyRange, KeyValue, PutRequest, RangeRequest, TxnOp, TxnRequest,
};
use serde_json::{json, Map, Value};

use crate::api::request::{FieldValidation, Query};
use crate::api::resources::ResourceDef;
use crate::api::selectors::{supported_fields, FieldSelector, LabelSelector};
use crate::api::status::{ApiError, ApiResult, Cause};
use crate::api::{admission, defaults, validation, ApiState, User};

/// Largest accepted request body (upstream's limit is 3 MiB).
pub const MAX_BODY_BYTES: usize = 3 << 20;

pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

pub fn new_uid() -> String {
    let b: [u8; 16] = rand::random();
    let mut b = b;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Five characters from upstream's alphabet for generated names.
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random::<usize>() % ALPHABET.len()] as char)
        .collect()
}

/// Read an object from its stored bytes, stamping the resourceVersion and served version.
pub fn decode_stored(def: &ResourceDef, kv: &KeyValue) -> ApiResult<Value> {
    let mut v: Value = serde_json::from_slice(&kv.value).map_err(|e| {
        ApiError::internal(format!(
            "stored object {:?} is not JSON: {e}",
            String::from_utf8_lossy(&kv.key)
        ))
    })?;
    stamp(def, &mut v, kv.mod_revision);
    Ok(v)
}

pub fn stamp(def: &ResourceDef, v: &mut Value, rev: i64) {
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), json!(def.api_version()));
        m.insert("kind".into(), json!(def.kind));
        let md = m.entry("metadata").or_insert_with(|| json!({}));
        if let Some(md) = md.as_object_mut() {
            md.insert("resourceVersion".into(), json!(rev.to_string()));
        }
    }
}

/// A stored object as served at `rev`: the stored JSON with its resourceVersion spliced in when
/// it already names the served apiVersion (it leads, keys being sorted), else decoded and
/// stamped (a kind served in several versions that share storage).
pub fn served_bytes(def: &ResourceDef, stored: &[u8], rev: i64) -> Vec<u8> {
    let lead = format!("{{\"apiVersion\":\"{}\",", def.api_version());
    if stored.starts_with(lead.as_bytes()) {
        return crate::api::cache::splice_resource_version(stored, rev);
    }
    match serde_json::from_slice::<Value>(stored) {
        Ok(mut v) => {
            stamp(def, &mut v, rev);
            serde_json::to_vec(&v).expect("serializing JSON to memory cannot fail")
        }
        Err(_) => crate::api::cache::splice_resource_version(stored, rev),
    }
}

fn encode_for_store(v: &Value) -> Vec<u8> {
    let mut v = v.clone();
    if let Some(md) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        md.remove("resourceVersion");
        md.remove("selfLink");
    }
    serde_json::to_vec(&v).expect("serializing JSON to memory cannot fail")
}

fn meta_str<'a>(v: &'a Value, field: &str) -> &'a str {
    v.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn meta_mut(v: &mut Value) -> &mut Map<String, Value> {
    if !v.get("metadata").is_some_and(Value::is_object) {
        v.as_object_mut()
            .expect("objects are JSON objects")
            .insert("metadata".into(), json!({}));
    }
    v["metadata"]
        .as_object_mut()
        .expect("just made metadata an object")
}

pub fn parse_rv(s: &str) -> ApiResult<i64> {
    s.parse::<i64>()
        .ok()
        .filter(|r| *r >= 0)
        .ok_or_else(|| ApiError::bad_request(format!("invalid resource version: {s:?}")))
}

/// Checks `apiVersion`/`kind` of a request body against the endpoint (filling them in when
/// absent, as upstream's decoder does).
fn check_kind(def: &ResourceDef, obj: &mut Value) -> ApiResult<()> {
    let Some(m) = obj.as_object_mut() else {
        return Err(ApiError::bad_request(format!(
            "the body of the request must be a JSON object, got {}",
            json_kind(obj)
        )));
    };
    let want = def.api_version();
    match m.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            m.insert("apiVersion".into(), json!(want));
        }
        Some(v) if v == want => {}
        Some(v) => {
            // Custom resources may be written in any served version of the same group.
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({want})"
            )));
        }
    }
    match m.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            m.insert("kind".into(), json!(def.kind));
        }
        Some(k) if k == def.kind => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                def.kind
            )))
        }
    }
    if !m
        .get("metadata")
        .is_none_or(|md| md.is_object() || md.is_null())
    {
        return Err(ApiError::bad_request(
            "metadata must be an object".to_string(),
        ));
    }
    Ok(())
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// What the write pipeline needs to know about the request.
pub struct WriteOpts {
    pub dry_run: bool,
    pub field_validation: FieldValidation,
    pub field_manager: String,
    pub operation: &'static str,
}

impl WriteOpts {
    pub fn from_query(
        q: &Query,
        default_manager: &str,
        operation: &'static str,
    ) -> ApiResult<WriteOpts> {
        Ok(WriteOpts {
            dry_run: q.dry_run()?,
            field_validation: q.field_validation()?,
            field_manager: q.field_manager().unwrap_or(default_manager).to_string(),
            operation,
        })
    }
}

/// Checks unknown fields and types; returns warnings. Unknown fields are dropped (Warn,
/// Ignore) or refused (Strict).
fn check_fields(
    st: &ApiState,
    def: &ResourceDef,
    obj: &mut Value,
    fv: FieldValidation,
) -> ApiResult<Vec<String>> {
    let unknown = st.schemas.prune_unknown(def, obj);
    st.schemas.drop_empty(def, obj);
    let mut warnings = Vec::new();
    if !unknown.is_empty() {
        let msgs: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field \"{f}\""))
            .collect();
        match fv {
            FieldValidation::Strict => {
                return Err(ApiError::bad_request(format!(
                    "strict decoding error: {}",
                    msgs.join(", ")
                )))
            }
            FieldValidation::Warn => warnings.extend(msgs),
            FieldValidation::Ignore => {}
        }
    }
    if let Some(check) = def.type_check {
        if let Err(e) = check(obj) {
            return Err(ApiError::bad_request(format!(
                "{kind} in version \"{v}\" cannot be handled as a {kind}: {e}",
                kind = def.kind,
                v = def.version
            )));
        }
    }
    Ok(warnings)
}

fn kind_causes(def: &ResourceDef, obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    validation::validate_metadata(
        obj,
        validation::name_rule(&def.group, &def.kind),
        def.namespaced,
        &mut causes,
    );
    validation::validate_kind(&def.group, &def.kind, obj, &mut causes);
    if def.group == "apiextensions.k8s.io" && def.kind == "CustomResourceDefinition" {
        causes.extend(crate::api::crd::validate_crd(obj));
    }
    causes
}

/// Kinds whose status a create may not set (upstream's strategies reset it).
fn resets_status_on_create(def: &ResourceDef) -> bool {
    def.has_status()
        && !matches!(
            (def.group.as_str(), def.kind.as_str()),
            ("", "Node")
                | ("", "Namespace")
                | ("", "PersistentVolume")
                | ("", "PersistentVolumeClaim")
        )
}

/// Kinds that track `metadata.generation`.
/// Whether objects of a kind carry `metadata.generation` (the kinds whose upstream strategies
/// set it: workloads, policies, CRDs and custom resources; not Pods, Services, Nodes, claims…).
fn has_generation(def: &ResourceDef) -> bool {
    if def.crd.is_some() {
        return true;
    }
    match (def.group.as_str(), def.kind.as_str()) {
        ("apps", kind) => kind != "ControllerRevision",
        ("", "ReplicationController")
        | ("policy", "PodDisruptionBudget")
        | ("networking.k8s.io", "Ingress" | "NetworkPolicy")
        | ("autoscaling", "HorizontalPodAutoscaler")
        | ("apiextensions.k8s.io", "CustomResourceDefinition") => true,
        ("batch" | "flowcontrol.apiserver.k8s.io" | "admissionregistration.k8s.io", _) => true,
        _ => false,
    }
}

/// The part of an object that bumps `generation` when it changes.
fn generation_relevant(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

/// Records the writer in `metadata.managedFields` (Update operations; server-side apply sets
/// its own entries).
fn record_manager(obj: &mut Value, opts: &WriteOpts, api_version: &str, old: Option<&Value>) {
    if opts.operation == "Apply" {
        return;
    }
    let entries: Vec<Value> = old
        .and_then(|o| o.pointer("/metadata/managedFields"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // (managedFields themselves are never owned: the field walk skips them.)
    let entries = crate::api::managed::update_ownership(
        &entries,
        &opts.field_manager,
        api_version,
        old,
        obj,
        &now_rfc3339(),
    );
    meta_mut(obj).insert("managedFields".into(), Value::Array(entries));
}

/// Events live for `--event-ttl` after their last write: they are attached to a lease.
async fn lease_for(st: &ApiState, def: &ResourceDef) -> ApiResult<i64> {
    if def.kind == "Event" && (def.group.is_empty() || def.group == "events.k8s.io") {
        st.event_lease().await
    } else {
        Ok(0)
    }
}

/// Namespace lifecycle admission: the namespace must exist and not be terminating.
async fn check_namespace(st: &ApiState, def: &ResourceDef, ns: &str) -> ApiResult<()> {
    if !def.namespaced {
        return Ok(());
    }
    let key = format!("/registry/core/namespaces/{ns}");
    let kv = st.store.get(key).await?;
    match kv {
        None => Err(ApiError::not_found("", "namespaces", ns)),
        Some(kv) => {
            let v: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
            if v.pointer("/status/phase").and_then(Value::as_str) == Some("Terminating") {
                let mut e = ApiError::forbidden(format!(
                    "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    def.qualified(),
                    ""
                ));
                e.reason = "Forbidden".into();
                e.message = format!(
                    "unable to create new content in namespace {ns} because it is being terminated"
                );
                Err(e)
            } else {
                Ok(())
            }
        }
    }
}

/// Upstream's DefaultStorageClass admission (on create): a claim that names no class (no
/// `spec.storageClassName`, no beta class annotation; an explicit "" is a choice) gets the
/// default StorageClass, the one annotated `storageclass.kubernetes.io/is-default-class: "true"`
/// (the newest, then the first by name, if several).
pub(crate) async fn default_storage_class(st: &ApiState, obj: &mut Value) -> ApiResult<()> {
    let has_class = obj
        .pointer("/spec/storageClassName")
        .is_some_and(|v| !v.is_null())
        || obj
            .pointer("/metadata/annotations/volume.beta.kubernetes.io~1storage-class")
            .is_some();
    if has_class {
        return Ok(());
    }
    let Some(def) = st.registry.get("storage.k8s.io", "v1", "storageclasses") else {
        return Ok(());
    };
    let classes = list(
        st,
        &def,
        None,
        &ListOpts {
            labels: Default::default(),
            fields: Default::default(),
            limit: 0,
            continue_token: None,
            resource_version: None,
            rv_match: None,
        },
    )
    .await?
    .items;
    let is_default = |c: &Value| {
        [
            "storageclass.kubernetes.io/is-default-class",
            "storageclass.beta.kubernetes.io/is-default-class",
        ]
        .iter()
        .any(|a| c.pointer("/metadata/annotations").and_then(|m| m.get(*a)) == Some(&json!("true")))
    };
    let default = classes.iter().filter(|c| is_default(c)).min_by(|a, b| {
        let created = |c: &Value| meta_str(c, "creationTimestamp").to_string();
        created(b)
            .cmp(&created(a))
            .then_with(|| meta_str(a, "name").cmp(meta_str(b, "name")))
    });
    if let Some(class) = default {
        obj["spec"]["storageClassName"] = json!(meta_str(class, "name"));
    }
    Ok(())
}

/// POST: creates an object. Returns it with its resourceVersion, and warnings.
pub async fn create(
    st: &ApiState,
    def: &Arc<ResourceDef>,
    ns: Option<&str>,
    mut obj: Value,
    opts: &WriteOpts,
    user: &User,
) -> ApiResult<(Value, Vec<String>)> {
    check_kind(def, &mut obj)?;
    {
        let md = meta_mut(&mut obj);
        if def.namespaced {
            let url_ns = ns.unwrap_or_default();
            match md.get("namespace").and_then(Value::as_str) {
                Some(n) if !n.is_empty() && n != url_ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ))
                }
                _ => {
                    md.insert("namespace".into(), json!(url_ns));
                }
            }
        } else {
            md.remove("namespace");
        }
        // Fields only the server sets.
        for f in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            md.remove(f);
        }
    }
    let warnings = check_fields(st, def, &mut obj, opts.field_validation)?;
    defaults::apply(&def.group, &def.kind, &mut obj);
    if resets_status_on_create(def) {
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
        defaults_after_status_reset(def, &mut obj);
    }
    let generate = meta_str(&obj, "generateName").to_string();
    if meta_str(&obj, "name").is_empty() && !generate.is_empty() {
        meta_mut(&mut obj).insert(
            "name".into(),
            json!(format!("{generate}{}", random_suffix())),
        );
    }
    let mut causes = kind_causes(def, &obj);
    if def.group.is_empty()
        && def.kind == "Pod"
        && obj
            .pointer("/spec/ephemeralContainers")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    {
        causes.push(Cause::forbidden(
            "spec.ephemeralContainers",
            "cannot be set on create",
        ));
    }
    if !causes.is_empty() {
        let name = meta_str(&obj, "name").to_string();
        return Err(ApiError::invalid(&def.group, &def.kind, &name, causes));
    }
    if let Some(crd) = &def.crd {
        crate::api::crd::validate_custom(def, crd, &obj)?;
    }
    check_namespace(st, def, ns.unwrap_or_default()).await?;
    // A step that reserves something may have to run again from the object as it came.
    let before_admission = admission::reserves(st, def, ns).await.then(|| obj.clone());
    let mut extra = admission::create(st, def, ns, &mut obj, user, opts.dry_run).await?;
    finish_new(def, &mut obj, opts);
    let name = meta_str(&obj, "name").to_string();
    if opts.dry_run {
        let exists = st.store.get(def.key(ns, &name)).await?.is_some();
        if exists {
            return Err(ApiError::already_exists(&def.group, &def.plural, &name));
        }
        return Ok((obj, warnings));
    }
    let lease = lease_for(st, def).await?;
    // Generated names retry on collision, as upstream; so do admission reservations that
    // raced (their compares failed while the name was free).
    for attempt in 0..8 {
        let name = meta_str(&obj, "name").to_string();
        let key = def.key(ns, &name);
        let bytes = encode_for_store(&obj);
        let mut compares = vec![Compare::absent(key.clone())];
        compares.extend(extra.compares.iter().cloned());
        let mut ops = vec![TxnOp::Put(PutRequest::new(key.clone(), bytes).lease(lease))];
        ops.extend(extra.ops.iter().cloned());
        let resp = st
            .store
            .txn(TxnRequest::new().when(compares).and_then(ops))
            .await?;
        if resp.succeeded {
            stamp(def, &mut obj, resp.revision);
            return Ok((obj, warnings));
        }
        if let Some(base) = before_admission.as_ref() {
            if st.store.get(key.clone()).await?.is_none() {
                if attempt == 7 {
                    // What admission reserved (quota, allocations) kept changing under us.
                    return Err(ApiError::conflict(
                        &def.group,
                        &def.plural,
                        &name,
                        "the resources this object reserves were changed by concurrent writes; please try again",
                    ));
                }
                obj = base.clone();
                extra = admission::create(st, def, ns, &mut obj, user, false).await?;
                finish_new(def, &mut obj, opts);
                continue;
            }
        }
        if generate.is_empty() || attempt == 7 {
            return Err(ApiError::already_exists(&def.group, &def.plural, &name));
        }
        meta_mut(&mut obj).insert(
            "name".into(),
            json!(format!("{generate}{}", random_suffix())),
        );
    }
    unreachable_generate()
}

/// What the server sets on every new object once it is admitted.
fn finish_new(def: &ResourceDef, obj: &mut Value, opts: &WriteOpts) {
    {
        let md = meta_mut(obj);
        md.insert("uid".into(), json!(new_uid()));
        md.insert("creationTimestamp".into(), json!(now_rfc3339()));
    }
    if has_generation(def) {
        meta_mut(obj).insert("generation".into(), json!(1));
    }
    if def.group == "batch" && def.kind == "Job" {
        job_selector(obj);
    }
    record_manager(obj, opts, &def.api_version(), None);
}

fn unreachable_generate() -> ApiResult<(Value, Vec<String>)> {
    Err(ApiError::internal("could not generate a unique name"))
}

/// A Job's selector and pod labels from its uid, as upstream's job strategy generates them
/// (unless `manualSelector`).
fn job_selector(obj: &mut Value) {
    if obj.pointer("/spec/manualSelector").and_then(Value::as_bool) == Some(true) {
        return;
    }
    let uid = meta_str(obj, "uid").to_string();
    let name = meta_str(obj, "name").to_string();
    let labels = json!({
        "batch.kubernetes.io/controller-uid": uid,
        "batch.kubernetes.io/job-name": name,
        "controller-uid": uid,
        "job-name": name,
    });
    obj["spec"]["selector"] = json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
    if !obj["spec"]["template"]["metadata"].is_object() {
        obj["spec"]["template"]["metadata"] = json!({});
    }
    let tl = &mut obj["spec"]["template"]["metadata"]["labels"];
    if !tl.is_object() {
        *tl = json!({});
    }
    for (k, v) in labels.as_object().expect("object") {
        tl[k] = v.clone();
    }
}

/// Status fields some kinds start with (after a create reset the rest).
fn defaults_after_status_reset(def: &ResourceDef, obj: &mut Value) {
    match (def.group.as_str(), def.kind.as_str()) {
        ("", "Pod") => {
            obj["status"] =
                json!({"phase": "Pending", "qosClass": crate::api::pods::qos_class(obj)});
        }
        ("", "Service") => obj["status"] = json!({"loadBalancer": {}}),
        _ => {}
    }
}

/// GET one object.
pub async fn get(
    st: &ApiState,
    def: &ResourceDef,
    ns: Option<&str>,
    name: &str,
) -> ApiResult<Value> {
    let kv = st
        .store
        .get(def.key(ns, name))
        .await?
        .ok_or_else(|| ApiError::not_found(&def.group, &def.plural, name))?;
    decode_stored(def, &kv)
}

async fn get_kv(
    st: &ApiState,
    def: &ResourceDef,
    ns: Option<&str>,
    name: &str,
) -> ApiResult<(Value, i64)> {
    let kv = st
        .store
        .get(def.key(ns, name))
        .await?
        .ok_or_else(|| ApiError::not_found(&def.group, &def.plural, name))?;
    let rev = kv.mod_revision;
    Ok((decode_stored(def, &kv)?, rev))
}

/// What an update may change: the whole object, only its status, or (scale) only replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
    /// Spec and status at once (internal writers such as the binding of a pod).
    All,
    /// Only a pod's `spec.ephemeralContainers` (the `ephemeralcontainers` subresource).
    EphemeralContainers,
}

/// Merges a requested new version with the current one according to the part written, and
/// copies the fields only the server sets.
fn merge_update(def: &ResourceDef, part: Part, old: &Value, new: &mut Value) {
    match part {
        Part::All => {}
        Part::EphemeralContainers => {
            let eph = new.pointer("/spec/ephemeralContainers").cloned();
            let mut merged = old.clone();
            if let Some(spec) = merged.get_mut("spec").and_then(Value::as_object_mut) {
                match eph {
                    Some(e) if !e.is_null() => {
                        spec.insert("ephemeralContainers".into(), e);
                    }
                    _ => {
                        spec.remove("ephemeralContainers");
                    }
                }
            }
            *new = merged;
        }
        Part::Main => {
            // Ephemeral containers change only through their subresource.
            if def.group.is_empty() && def.kind == "Pod" {
                let eph = old.pointer("/spec/ephemeralContainers").cloned();
                if let Some(spec) = new.get_mut("spec").and_then(Value::as_object_mut) {
                    match eph {
                        Some(e) => {
                            spec.insert("ephemeralContainers".into(), e);
                        }
                        None => {
                            spec.remove("ephemeralContainers");
                        }
                    }
                }
            }
            if def.has_status() {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(m) = new.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
        }
        Part::Status => {
            let status = new.get("status").cloned();
            let mut merged = old.clone();
            match status {
                Some(s) => merged["status"] = s,
                None => {
                    if let Some(m) = merged.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            // A status update may still change labels and annotations? Upstream keeps
            // metadata as it was, except for managedFields.
            *new = merged;
        }
    }
    let om = old.get("metadata").cloned().unwrap_or(json!({}));
    let md = meta_mut(new);
    for f in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "namespace",
        "generation",
    ] {
        match om.get(f) {
            Some(v) => {
                md.insert(f.into(), v.clone());
            }
            None => {
                md.remove(f);
            }
        }
    }
    if md.get("generateName").is_none() {
        if let Some(g) = om.get("generateName") {
            md.insert("generateName".into(), g.clone());
        }
    }
}

/// PUT (and the write half of PATCH): replaces an object, honouring an optional
/// resourceVersion precondition in the body and `expected_rev` (the revision a patch read).
#[allow(clippy::too_many_arguments)]
pub async fn update(
    st: &ApiState,
    def: &Arc<ResourceDef>,
    ns: Option<&str>,
    name: &str,
    mut obj: Value,
    part: Part,
    opts: &WriteOpts,
    base: Option<(Value, i64)>,
) -> ApiResult<(Value, Vec<String>)> {
    check_kind(def, &mut obj)?;
    let body_name = meta_str(&obj, "name").to_string();
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    if def.namespaced {
        let body_ns = meta_str(&obj, "namespace").to_string();
        if !body_ns.is_empty() && Some(body_ns.as_str()) != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
    }
    let precondition = match meta_str(&obj, "resourceVersion") {
        "" => None,
        rv => Some(parse_rv(rv)?),
    };
    let (old, old_rev) = match base {
        Some(b) => b,
        None => get_kv(st, def, ns, name).await?,
    };
    if let Some(p) = precondition {
        if p != old_rev {
            return Err(ApiError::stale(&def.group, &def.plural, name));
        }
    }
    // A uid in the new object is a precondition, as upstream (an update meant for an earlier
    // object of the same name must not land on its successor).
    let want_uid = meta_str(&obj, "uid");
    let have_uid = meta_str(&old, "uid");
    if !want_uid.is_empty() && want_uid != have_uid {
        return Err(ApiError::conflict(
            &def.group,
            &def.plural,
            name,
            &format!("Precondition failed: UID in precondition: {want_uid}, UID in object meta: {have_uid}"),
        ));
    }
    meta_mut(&mut obj).insert("name".into(), json!(name));
    let warnings = check_fields(st, def, &mut obj, opts.field_validation)?;
    merge_update(def, part, &old, &mut obj);
    defaults::apply(&def.group, &def.kind, &mut obj);
    if has_generation(def) && part != Part::Status {
        let g = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let bump = generation_relevant(&old) != generation_relevant(&obj);
        meta_mut(&mut obj).insert(
            "generation".into(),
            json!(if bump { g + 1 } else { g.max(1) }),
        );
    }
    let extra = admission::update(st, def, ns, &old, &mut obj, opts.dry_run).await?;
    let mut causes = kind_causes(def, &obj);
    if part != Part::All {
        // Internal writers (the binding of a pod) may change what users may not.
        validation::validate_update(&def.group, &def.kind, &old, &obj, &mut causes);
    }
    if old.pointer("/metadata/deletionTimestamp").is_some() {
        // Finalizers may only be removed from an object being deleted.
        let of: Vec<Value> = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let nf: Vec<Value> = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if nf.iter().any(|f| !of.contains(f)) {
            causes.push(Cause::forbidden(
                "metadata.finalizers",
                "no new finalizers can be added if the object is being deleted",
            ));
        }
    }
    if !causes.is_empty() {
        return Err(ApiError::invalid(&def.group, &def.kind, name, causes));
    }
    if let Some(crd) = &def.crd {
        crate::api::crd::validate_custom(def, crd, &obj)?;
    }
    // A write that changes nothing is not written (and keeps its resourceVersion).
    let mut cmp_old = old.clone();
    let mut cmp_new = obj.clone();
    for v in [&mut cmp_old, &mut cmp_new] {
        if let Some(md) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            md.remove("managedFields");
            md.remove("resourceVersion");
        }
    }
    if cmp_old == cmp_new {
        return Ok((old, warnings));
    }
    record_manager(&mut obj, opts, &def.api_version(), Some(&old));
    if opts.dry_run {
        stamp(def, &mut obj, old_rev);
        return Ok((obj, warnings));
    }
    let key = def.key(ns, name);
    let finalized = obj.pointer("/metadata/deletionTimestamp").is_some()
        && obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(|f| f.is_empty())
        // A namespace also waits for its spec finalizers (the namespace controller's).
        && obj
            .pointer("/spec/finalizers")
            .and_then(Value::as_array)
            .is_none_or(|f| f.is_empty());
    let mut ops = if finalized {
        let mut ops = vec![TxnOp::DeleteRange(DeleteRangeRequest::new(KeyRange::key(
            key.clone(),
        )))];
        ops.extend(admission::removed(st, def, &obj));
        ops
    } else {
        vec![TxnOp::Put(
            PutRequest::new(key.clone(), encode_for_store(&obj)).lease(lease_for(st, def).await?),
        )]
    };
    ops.extend(extra.ops);
    let mut compares = vec![Compare::mod_revision_is(key, old_rev)];
    compares.extend(extra.compares);
    let resp = st
        .store
        .txn(TxnRequest::new().when(compares).and_then(ops))
        .await?;
    if !resp.succeeded {
        return Err(ApiError::stale(&def.group, &def.plural, name));
    }
    stamp(def, &mut obj, resp.revision);
    Ok((obj, warnings))
}

/// Runs `f` on the current object and writes the result, retrying when a concurrent writer got
/// there first (upstream's GuaranteedUpdate). `f` may fail with an API error.
pub async fn guaranteed_update<F>(
    st: &ApiState,
    def: &Arc<ResourceDef>,
    ns: Option<&str>,
    name: &str,
    part: Part,
    opts: &WriteOpts,
    mut f: F,
) -> ApiResult<(Value, Vec<String>)>
where
    F: FnMut(&Value) -> ApiResult<Value>,
{
    let mut last = None;
    for _ in 0..8 {
        let (cur, rev) = get_kv(st, def, ns, name).await?;
        let new = f(&cur)?;
        // A resourceVersion the caller put into the patch is a precondition; the one we read
        // is not (it is compared through `base`).
        match update(st, def, ns, name, new, part, opts, Some((cur, rev))).await {
            Err(e) if e.code == 409 && e.reason == "Conflict" => {
                last = Some(e);
                continue;
            }
            other => return other,
        }
    }
    Err(last.unwrap_or_else(|| ApiError::internal("update retries exhausted")))
}

/// Options of a delete, from the query and an optional DeleteOptions body.
#[derive(Debug, Default, Clone)]
pub struct DeleteOpts {
    pub dry_run: bool,
    pub grace_period: Option<i64>,
    pub propagation: Option<String>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
}

impl DeleteOpts {
    pub fn parse(q: &Query, body: &[u8]) -> ApiResult<DeleteOpts> {
        let mut o = DeleteOpts {
            dry_run: q.dry_run()?,
            grace_period: q.int("gracePeriodSeconds")?,
            propagation: q.get("propagationPolicy").map(str::to_string),
            ..Default::default()
        };
        if !body.iter().all(u8::is_ascii_whitespace) {
            let b: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?;
            if let Some(g) = b["gracePeriodSeconds"].as_i64() {
                o.grace_period = Some(g);
            }
            if let Some(p) = b["propagationPolicy"].as_str() {
                o.propagation = Some(p.to_string());
            }
            if let Some(u) = b.pointer("/preconditions/uid").and_then(Value::as_str) {
                o.precondition_uid = Some(u.to_string());
            }
            if let Some(r) = b
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str)
            {
                o.precondition_rv = Some(r.to_string());
            }
            if b["dryRun"].as_array().is_some_and(|a| !a.is_empty()) {
                o.dry_run = true;
            }
        }
        if let Some(p) = &o.propagation {
            if !matches!(p.as_str(), "Orphan" | "Background" | "Foreground") {
                return Err(ApiError::invalid(
                    "",
                    "DeleteOptions",
                    "",
                    vec![Cause::not_supported(
                        "propagationPolicy",
                        &json!(p),
                        &["Foreground", "Background", "Orphan"],
                    )],
                ));
            }
        }
        Ok(o)
    }
}

/// DELETE one object. Objects with finalizers (or a foreground/orphan propagation, recorded
/// as upstream does for the garbage collector) are only marked; the rest are removed.
pub async fn delete(
    st: &ApiState,
    def: &Arc<ResourceDef>,
    ns: Option<&str>,
    name: &str,
    opts: &DeleteOpts,
) -> ApiResult<Value> {
    for _ in 0..8 {
        let (mut obj, rev) = get_kv(st, def, ns, name).await?;
        if let Some(uid) = &opts.precondition_uid {
            if meta_str(&obj, "uid") != uid {
                return Err(ApiError::conflict(
                    &def.group,
                    &def.plural,
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta_str(&obj, "uid")
                    ),
                ));
            }
        }
        if let Some(prv) = &opts.precondition_rv {
            if *prv != rev.to_string() {
                return Err(ApiError::conflict(
                    &def.group,
                    &def.plural,
                    name,
                    &format!("Precondition failed: ResourceVersion in precondition: {prv}, ResourceVersion in object meta: {rev}"),
                ));
            }
        }
        let mut finalizers: Vec<Value> = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        match opts.propagation.as_deref() {
            Some("Foreground") if !finalizers.contains(&json!("foregroundDeletion")) => {
                finalizers.push(json!("foregroundDeletion"))
            }
            Some("Orphan") if !finalizers.contains(&json!("orphan")) => {
                finalizers.push(json!("orphan"))
            }
            _ => {}
        }
        let is_namespace = def.group.is_empty() && def.kind == "Namespace";
        let graceful_pod = def.group.is_empty()
            && def.kind == "Pod"
            && obj
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty())
            && opts.grace_period.unwrap_or_else(|| {
                obj.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
                    .unwrap_or(30)
            }) > 0;
        let key = def.key(ns, name);
        if finalizers.is_empty() && !is_namespace && !graceful_pod {
            if opts.dry_run {
                return Ok(obj);
            }
            let mut ops = vec![TxnOp::DeleteRange(DeleteRangeRequest::new(KeyRange::key(
                key.clone(),
            )))];
            ops.extend(admission::removed(st, def, &obj));
            let resp = st
                .store
                .txn(
                    TxnRequest::new()
                        .when([Compare::mod_revision_is(key, rev)])
                        .and_then(ops),
                )
                .await?;
            if !resp.succeeded {
                continue;
            }
            return Ok(obj);
        }
        // Mark for deletion.
        if obj.pointer("/metadata/deletionTimestamp").is_none() {
            let md = meta_mut(&mut obj);
            md.insert("deletionTimestamp".into(), json!(now_rfc3339()));
            let grace = if graceful_pod {
                opts.grace_period.unwrap_or_else(|| {
                    obj.pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                        .unwrap_or(30)
                })
            } else {
                0
            };
            meta_mut(&mut obj).insert("deletionGracePeriodSeconds".into(), json!(grace));
        }
        meta_mut(&mut obj).insert("finalizers".into(), Value::Array(finalizers.clone()));
        if finalizers.is_empty() {
            meta_mut(&mut obj).remove("finalizers");
        }
        if is_namespace {
            obj["status"]["phase"] = json!("Terminating");
        }
        if opts.dry_run {
            return Ok(obj);
        }
        let resp = st
            .store
            .txn(
                TxnRequest::new()
                    .when([Compare::mod_revision_is(key.clone(), rev)])
                    .and_then([TxnOp::Put(PutRequest::new(key, encode_for_store(&obj)))]),
            )
            .await?;
        if !resp.succeeded {
            continue;
        }
        stamp(def, &mut obj, resp.revision);
        if is_namespace {
            st.namespace_deleted(name);
        }
        return Ok(obj);
    }
    Err(ApiError::stale(&def.group, &def.plural, name))
}

/// Parsed list options.
pub struct ListOpts {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub limit: usize,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub rv_match: Option<String>,
}

impl ListOpts {
    pub fn parse(def: &ResourceDef, q: &Query) -> ApiResult<ListOpts> {
        let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or_default())?;
        let fields = FieldSelector::parse(
            q.get("fieldSelector").unwrap_or_default(),
            &if def.crd.is_some() {
                vec!["metadata.name", "metadata.namespace"]
            } else {
                supported_fields(&def.group, &def.kind)
            },
        )?;
        let limit = q.int("limit")?.unwrap_or(0).max(0) as usize;
        Ok(ListOpts {
            labels,
            fields,
            limit,
            continue_token: q
                .get("continue")
                .filter(|c| !c.is_empty())
                .map(str::to_string),
            resource_version: q.get("resourceVersion").map(str::to_string),
            rv_match: q.get("resourceVersionMatch").map(str::to_string),
        })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches_object(obj) && self.fields.matches(obj)
    }
}

const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

fn encode_continue(rv: i64, start: &str) -> String {
    let t = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t.to_string())
}

fn decode_continue(token: &str) -> ApiResult<(i64, String)> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v["rv"].as_i64().ok_or_else(bad)?;
    let start = v["start"].as_str().ok_or_else(bad)?.to_string();
    if start.contains("..") || start.starts_with('/') {
        return Err(bad());
    }
    Ok((rv, start))
}

/// The result of a list.
pub struct ListResult {
    pub items: Vec<Value>,
    pub revision: i64,
    pub continue_token: Option<String>,
    pub remaining: Option<i64>,
}

/// LIST: one page over one consistent snapshot, filtered by selectors.
pub async fn list(
    st: &ApiState,
    def: &ResourceDef,
    ns: Option<&str>,
    opts: &ListOpts,
) -> ApiResult<ListResult> {
    let prefix = def.key_prefix(ns);
    let (mut revision, mut start) = match &opts.continue_token {
        Some(t) => {
            let (rv, start) = decode_continue(t)?;
            (rv, format!("{prefix}{start}"))
        }
        None => (0, prefix.clone()),
    };
    let mut serializable = false;
    if opts.continue_token.is_none() {
        match opts.resource_version.as_deref() {
            None | Some("") => {}
            Some("0") => serializable = true,
            Some(rv) => {
                let rv = parse_rv(rv)?;
                if opts.rv_match.as_deref() == Some("Exact") {
                    revision = rv;
                } else {
                    // NotOlderThan: the current state is never older.
                    serializable = true;
                    if st.store.current_revision() < rv {
                        return Err(ApiError::timeout(format!(
                            "Too large resource version: {rv}, current: {}",
                            st.store.current_revision()
                        )));
                    }
                }
            }
        }
    }
    let end = k3rs_storage::prefix_end(prefix.as_bytes());
    let mut items = Vec::new();
    let chunk = if opts.limit == 0 {
        0
    } else {
        opts.limit.max(64)
    };
    let filtering = !opts.labels.is_empty() || !opts.fields.is_empty();
    let mut next_start: Option<String> = None;
    let mut remaining = None;
    // Single-object fast path (kubectl get -w with a name uses a field selector).
    if let (Some(name), None) = (opts.fields.single_name(), &opts.continue_token) {
        let key = def.key(ns, name);
        let mut req = RangeRequest::new(KeyRange::key(key)).revision(revision);
        req.serializable = serializable;
        let resp = st
            .store
            .range(req)
            .await
            .map_err(|e| continue_err(e, &opts.continue_token))?;
        for kv in &resp.kvs {
            let obj = decode_stored(def, kv)?;
            if opts.matches(&obj) {
                items.push(obj);
            }
        }
        return Ok(ListResult {
            items,
            revision: resp.revision,
            continue_token: None,
            remaining: None,
        });
    }
    loop {
        let mut req = RangeRequest::new(KeyRange::interval(start.clone(), end.clone()))
            .revision(revision)
            .limit(chunk);
        req.serializable = serializable;
        let resp = st
            .store
            .range(req)
            .await
            .map_err(|e| continue_err(e, &opts.continue_token))?;
        revision = resp.revision;
        let mut last_key = None;
        for kv in &resp.kvs {
            last_key = Some(kv.key.clone());
            let obj = decode_stored(def, kv)?;
            if opts.matches(&obj) {
                items.push(obj);
                if opts.limit != 0 && items.len() >= opts.limit {
                    break;
                }
            }
        }
        let full = opts.limit != 0 && items.len() >= opts.limit;
        if full {
            let lk = last_key.clone().expect("a full page read at least one key");
            let scanned_all = resp.kvs.last().map(|k| &k.key) == Some(&lk);
            let more_in_store = resp.more || !scanned_all;
            if more_in_store {
                let rel = String::from_utf8_lossy(&lk[prefix.len()..]).into_owned();
                next_start = Some(format!("{rel}\u{0}"));
                if !filtering {
                    let counted = resp.count as i64;
                    let returned_here = resp
                        .kvs
                        .iter()
                        .position(|k| k.key == lk)
                        .map_or(0, |p| p as i64 + 1);
                    remaining = Some(counted - returned_here);
                }
            }
            break;
        }
        if !resp.more {
            break;
        }
        let lk = resp.kvs.last().expect("more implies keys").key.clone();
        let mut next = lk.to_vec();
        next.push(0);
        start = String::from_utf8_lossy(&next).into_owned();
    }
    Ok(ListResult {
        items,
        revision,
        continue_token: next_start.map(|s| encode_continue(revision, &s)),
        remaining,
    })
}

fn continue_err(e: k3rs_storage::Error, token: &Option<String>) -> ApiError {
    match (&e, token) {
        (k3rs_storage::Error::Compacted { .. }, Some(_)) => ApiError::gone(CONTINUE_EXPIRED),
        _ => e.into(),
    }
}

/// The `<Kind>List` object for a list result.
pub fn list_object(def: &ResourceDef, r: ListResult) -> Value {
    let mut md = json!({"resourceVersion": r.revision.to_string()});
    if let Some(c) = &r.continue_token {
        md["continue"] = json!(c);
    }
    if let Some(n) = r.remaining.filter(|n| *n > 0) {
        md["remainingItemCount"] = json!(n);
    }
    json!({
        "kind": def.list_kind,
        "apiVersion": def.api_version(),
        "metadata": md,
        "items": r.items,
    })
}

/// DELETE on a collection: deletes every matching object (each as a single delete would).
pub async fn delete_collection(
    st: &ApiState,
    def: &Arc<ResourceDef>,
    ns: Option<&str>,
    lopts: &ListOpts,
    dopts: &DeleteOpts,
) -> ApiResult<Value> {
    let r = list(
        st,
        def,
        ns,
        &ListOpts {
            limit: 0,
            continue_token: None,
            labels: lopts.labels.clone(),
            fields: lopts.fields.clone(),
            resource_version: None,
            rv_match: None,
        },
    )
    .await?;
    let mut deleted = Vec::new();
    for obj in r.items {
        let name = meta_str(&obj, "name").to_string();
        let ons = meta_str(&obj, "namespace").to_string();
        let ons = if def.namespaced {
            Some(ons.as_str())
        } else {
            None
        };
        match delete(st, def, ons, &name, dopts).await {
            Ok(o) => deleted.push(o),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(list_object(
        def,
        ListResult {
            items: deleted,
            revision: st.store.current_revision(),
            continue_token: None,
            remaining: None,
        },
    ))
}

/// Raw store access for subsystems (namespace cleanup): delete every key under a prefix.
pub async fn delete_prefix(st: &ApiState, prefix: &str) -> ApiResult<i64> {
    let r = st
        .store
        .delete_range(DeleteRangeRequest::new(KeyRange::prefix(Bytes::from(
            prefix.to_string(),
        ))))
        .await?;
    Ok(r.deleted)
}

/// A list served from the watch cache: items as JSON bytes (with resourceVersion spliced in).
pub struct CachedList {
    pub items: Vec<Vec<u8>>,
    pub revision: i64,
    pub continue_token: Option<String>,
    pub remaining: Option<i64>,
}

impl CachedList {
    pub fn into_values(self) -> ApiResult<ListResult> {
        let mut items = Vec::with_capacity(self.items.len());
        for raw in &self.items {
            items.push(
                serde_json::from_slice(raw)
                    .map_err(|e| ApiError::internal(format!("cached object is not JSON: {e}")))?,
            );
        }
        Ok(ListResult {
            items,
            revision: self.revision,
            continue_token: self.continue_token,
            remaining: self.remaining,
        })
    }

    /// The `<Kind>List` JSON, assembled from the items' bytes.
    pub fn to_json(&self, def: &ResourceDef) -> Vec<u8> {
        let mut md = json!({"resourceVersion": self.revision.to_string()});
        if let Some(c) = &self.continue_token {
            md["continue"] = json!(c);
        }
        if let Some(n) = self.remaining.filter(|n| *n > 0) {
            md["remainingItemCount"] = json!(n);
        }
        let head = format!(
            "{{\"kind\":{},\"apiVersion\":{},\"metadata\":{},\"items\":[",
            Value::String(def.list_kind.clone()),
            Value::String(def.api_version()),
            md
        );
        let len: usize = self.items.iter().map(|i| i.len() + 1).sum::<usize>() + head.len() + 2;
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(head.as_bytes());
        for (i, it) in self.items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(it);
        }
        out.extend_from_slice(b"]}");
        out
    }
}

/// LIST from the watch cache when it can answer with upstream's consistency (a consistent read
/// waits until the cache has caught up with the store's current revision). `None` when the store
/// must answer (exact revisions, continuations of older snapshots, a cache that lags).
pub async fn list_cached(
    st: &ApiState,
    def: &ResourceDef,
    ns: Option<&str>,
    opts: &ListOpts,
) -> ApiResult<Option<CachedList>> {
    // Custom resources may be served in a version other than the stored one: decode path.
    if def.crd.is_some() || def.schema.is_none() {
        return Ok(None);
    }
    let cache = st.caches.get(&def.key_prefix(None));
    let (start, token_rev) = match &opts.continue_token {
        Some(t) => {
            let (rv, start) = decode_continue(t)?;
            (Some(format!("{}{start}", def.key_prefix(ns))), Some(rv))
        }
        None => (None, None),
    };
    let target = match (
        token_rev,
        opts.resource_version.as_deref(),
        opts.rv_match.as_deref(),
    ) {
        (Some(rv), _, _) => rv,
        (None, _, Some("Exact")) => return Ok(None),
        (None, None | Some(""), _) => st.store.read_revision().await?,
        (None, Some("0"), _) => 0,
        (None, Some(rv), _) => {
            let rv = parse_rv(rv)?;
            if st.store.current_revision() < rv {
                return Err(ApiError::timeout(format!(
                    "Too large resource version: {rv}, current: {}",
                    st.store.current_revision()
                )));
            }
            rv
        }
    };
    if !cache.wait_for(target, Duration::from_secs(3)).await {
        return Ok(None);
    }
    let snap = cache.snapshot(&def.key_prefix(ns), start.as_deref());
    // A continuation must read the same snapshot it started on.
    if let Some(rv) = token_rev {
        if snap.revision != rv {
            return Ok(None);
        }
    }
    let filtering = !opts.labels.is_empty() || !opts.fields.is_empty();
    let mut items = Vec::new();
    let mut last_key = None;
    for o in &snap.objects {
        if opts.limit != 0 && items.len() >= opts.limit {
            break;
        }
        let raw = served_bytes(def, &o.value, o.mod_revision);
        if filtering {
            let v: Value =
                serde_json::from_slice(&raw).map_err(|e| ApiError::internal(e.to_string()))?;
            if !opts.matches(&v) {
                continue;
            }
        }
        items.push(raw);
        last_key = Some(o.key.clone());
    }
    let more = opts.limit != 0
        && items.len() >= opts.limit
        && last_key
            .as_ref()
            .is_some_and(|lk| snap.objects.last().is_some_and(|o| o.key > *lk));
    let (continue_token, remaining) = if more {
        let lk = last_key.expect("more implies a last key");
        let rel = String::from_utf8_lossy(&lk[def.key_prefix(ns).len()..]).into_owned();
        let rest = snap.objects.iter().filter(|o| o.key > lk).count() as i64;
        (
            Some(encode_continue(snap.revision, &format!("{rel}\u{0}"))),
            if filtering { None } else { Some(rest) },
        )
    } else {
        (None, None)
    };
    Ok(Some(CachedList {
        items,
        revision: snap.revision,
        continue_token,
        remaining,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_refuse_garbage() {
        let t = encode_continue(42, "web-7\u{0}");
        assert_eq!(decode_continue(&t).unwrap(), (42, "web-7\u{0}".to_string()));
        assert!(decode_continue("not-base64!").is_err());
        let evil = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(json!({"rv": 1, "start": "../secrets/x"}).to_string());
        assert!(decode_continue(&evil).is_err());
    }

    #[test]
    fn stored_objects_are_served_with_their_revision_and_the_served_version() {
        let r = crate::api::resources::Registry::new();
        let v2 = r
            .get("autoscaling", "v2", "horizontalpodautoscalers")
            .unwrap();
        let v1 = r
            .get("autoscaling", "v1", "horizontalpodautoscalers")
            .unwrap();
        let stored = encode_for_store(&json!({"apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler", "metadata": {"name": "h"}, "spec": {}}));
        let same: Value = serde_json::from_slice(&served_bytes(&v2, &stored, 7)).unwrap();
        assert_eq!(same["metadata"]["resourceVersion"], "7");
        assert_eq!(same["apiVersion"], "autoscaling/v2");
        let other: Value = serde_json::from_slice(&served_bytes(&v1, &stored, 8)).unwrap();
        assert_eq!(other["metadata"]["resourceVersion"], "8");
        assert_eq!(other["apiVersion"], "autoscaling/v1");
    }

    #[test]
    fn only_workload_and_policy_kinds_carry_a_generation() {
        let r = crate::api::resources::Registry::new();
        let kind = |g: &str, v: &str, p: &str| r.get(g, v, p).unwrap();
        assert!(has_generation(&kind("apps", "v1", "deployments")));
        assert!(has_generation(&kind("batch", "v1", "jobs")));
        assert!(has_generation(&kind(
            "policy",
            "v1",
            "poddisruptionbudgets"
        )));
        assert!(!has_generation(&kind("apps", "v1", "controllerrevisions")));
        assert!(!has_generation(&kind("", "v1", "pods")));
        assert!(!has_generation(&kind("", "v1", "services")));
        assert!(!has_generation(&kind("", "v1", "persistentvolumeclaims")));
    }

    #[test]
    fn uids_are_version_4() {
        let u = new_uid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_eq!(random_suffix().len(), 5);
    }
}
