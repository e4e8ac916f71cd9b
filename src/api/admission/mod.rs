//! Admission: the steps between decoding/defaulting and the write, as kube-apiserver's
//! admission chain (mutating, then validating). Each plug-in is a module here, called by kind
//! from `create`, `update` and `removed`; a step may add compares and operations to the write's
//! own transaction (an allocation key that must be absent, a quota whose revision must hold),
//! so that what it reserves is written atomically with the object or not at all.
//!
//! Order on create: mutating steps (service account, default tolerations, limit ranges,
//! default storage class), then validating ones (quota), then allocation (service IPs/ports).

pub mod limitranger;
pub mod quota;
pub mod serviceaccount;
pub mod services;
pub mod storage;
pub mod tolerations;

use k3rs_storage::{Compare, TxnOp};
use serde_json::Value;

use crate::api::resources::ResourceDef;
use crate::api::status::ApiResult;
use crate::api::{ApiState, User};

/// What an admission step adds to the object's write transaction.
#[derive(Debug, Default)]
pub struct TxnExtra {
    pub compares: Vec<Compare>,
    pub ops: Vec<TxnOp>,
}

/// Whether admitting `def`'s objects may reserve something in the write's transaction (the
/// create then keeps a copy to admit again if the reservation raced).
pub async fn reserves(st: &ApiState, def: &ResourceDef, ns: Option<&str>) -> bool {
    if def.group.is_empty() && def.kind == "Service" {
        return true;
    }
    match ns {
        Some(ns) if !quota::ignored(def) => quota::namespace_has_quotas(st, ns).await,
        _ => false,
    }
}

/// Admission of a new object (after defaulting, before validation). `attempt` counts retries
/// after a transaction whose extra compares failed (an allocation raced): steps re-read state.
pub async fn create(
    st: &ApiState,
    def: &ResourceDef,
    ns: Option<&str>,
    obj: &mut Value,
    user: &User,
    dry_run: bool,
) -> ApiResult<TxnExtra> {
    let _ = (st, ns, user, dry_run);
    let mut extra = TxnExtra::default();
    if let ("", "Pod") = (def.group.as_str(), def.kind.as_str()) {
        serviceaccount::admit_pod(st, ns.unwrap_or_default(), obj).await?;
        tolerations::apply(obj);
    }
    limitranger::admit(st, def, ns, obj).await?;
    if let ("", "PersistentVolumeClaim") = (def.group.as_str(), def.kind.as_str()) {
        crate::api::objects::default_storage_class(st, obj).await?;
    }
    storage::protect(def, obj);
    let q = quota::admit(st, def, ns, obj, None, dry_run).await?;
    extra.compares.extend(q.compares);
    extra.ops.extend(q.ops);
    if let ("", "Service") = (def.group.as_str(), def.kind.as_str()) {
        let e = services::create(st, ns.unwrap_or_default(), obj).await?;
        extra.compares.extend(e.compares);
        extra.ops.extend(e.ops);
    }
    Ok(extra)
}

/// Admission of a change to an existing object (after merging and defaulting).
pub async fn update(
    st: &ApiState,
    def: &ResourceDef,
    ns: Option<&str>,
    old: &Value,
    obj: &mut Value,
    dry_run: bool,
) -> ApiResult<TxnExtra> {
    let mut extra = quota::admit(st, def, ns, obj, Some(old), dry_run).await?;
    if let ("", "Service") = (def.group.as_str(), def.kind.as_str()) {
        let e = services::update(st, ns.unwrap_or_default(), old, obj).await?;
        extra.compares.extend(e.compares);
        extra.ops.extend(e.ops);
    }
    Ok(extra)
}

/// Operations that go with removing `obj` from the store (releasing what it held).
pub fn removed(st: &ApiState, def: &ResourceDef, obj: &Value) -> Vec<TxnOp> {
    let _ = st;
    if let ("", "Service") = (def.group.as_str(), def.kind.as_str()) {
        return services::removed(obj);
    }
    Vec::new()
}
