//! StorageObjectInUseProtection, as upstream's admission plug-in: new PersistentVolumeClaims
//! get the `kubernetes.io/pvc-protection` finalizer and new PersistentVolumes the
//! `kubernetes.io/pv-protection` one, so that deleting a claim a pod uses, or a bound volume,
//! waits until the protection controllers (`controllers::volumes::protection`) see them
//! unused.

use serde_json::{json, Value};

use crate::api::resources::ResourceDef;

pub const PVC_PROTECTION: &str = "kubernetes.io/pvc-protection";
pub const PV_PROTECTION: &str = "kubernetes.io/pv-protection";

/// Adds the kind's protection finalizer to a new claim or volume (once).
pub fn protect(def: &ResourceDef, obj: &mut Value) {
    let finalizer = match (def.group.as_str(), def.kind.as_str()) {
        ("", "PersistentVolumeClaim") => PVC_PROTECTION,
        ("", "PersistentVolume") => PV_PROTECTION,
        _ => return,
    };
    let Some(md) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let list = md.entry("finalizers").or_insert_with(|| json!([]));
    if !list.is_array() {
        *list = json!([]);
    }
    let list = list.as_array_mut().expect("array");
    if !list.iter().any(|f| f == finalizer) {
        list.push(json!(finalizer));
    }
}
