//! Namespace deletion: once a namespace is Terminating, its contents are deleted (objects with
//! finalizers are marked and waited for); then the `kubernetes` finalizer is removed and the
//! namespace goes.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::api::objects::{self, DeleteOpts, ListOpts, Part, WriteOpts};
use crate::api::request::FieldValidation;
use crate::api::ApiState;

fn all_opts() -> ListOpts {
    ListOpts {
        labels: Default::default(),
        fields: Default::default(),
        limit: 0,
        continue_token: None,
        resource_version: None,
        rv_match: None,
    }
}

/// One pass over a terminating namespace; `true` when it is gone. Each pass records upstream's
/// deletion conditions on the namespace (what remains, which finalizers hold it).
async fn finalize(st: &ApiState, ns: &str) -> anyhow::Result<bool> {
    let mut remaining = 0;
    // Per resource (`pods.`, `widgets.example.com`): instances left; per finalizer: instances.
    let mut left: std::collections::BTreeMap<String, usize> = Default::default();
    let mut finalizers: std::collections::BTreeMap<String, usize> = Default::default();
    let mut failure: Option<String> = None;
    let mut seen = std::collections::BTreeSet::new();
    for def in st.registry.all() {
        if !def.namespaced || !seen.insert(def.key_prefix(Some(ns))) {
            continue;
        }
        let r = objects::list(st, &def, Some(ns), &all_opts())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        for o in r.items {
            let name = o
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let res = objects::delete(
                st,
                &def,
                Some(ns),
                &name,
                &DeleteOpts {
                    propagation: Some("Background".into()),
                    ..Default::default()
                },
            )
            .await;
            match res {
                Ok(obj) => {
                    if obj.pointer("/metadata/deletionTimestamp").is_some() {
                        remaining += 1;
                        *left
                            .entry(format!("{}.{}", def.plural, def.group))
                            .or_default() += 1;
                        for f in obj
                            .pointer("/metadata/finalizers")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                        {
                            *finalizers.entry(f.to_string()).or_default() += 1;
                        }
                    }
                }
                Err(e) if e.code == 404 => {}
                Err(e) => {
                    remaining += 1;
                    failure.get_or_insert(format!(
                        "Failed to delete all resource types, 1 remaining: {e}"
                    ));
                }
            }
        }
    }
    record_conditions(st, ns, &left, &finalizers, failure.as_deref()).await;
    if remaining > 0 {
        return Ok(false);
    }
    let def = st.registry.get("", "v1", "namespaces").expect("builtin");
    let opts = WriteOpts {
        dry_run: false,
        field_validation: FieldValidation::Ignore,
        field_manager: "k3rs-namespace-controller".into(),
        operation: "Update",
    };
    let res = objects::guaranteed_update(st, &def, None, ns, Part::Main, &opts, |cur| {
        let mut o = cur.clone();
        if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
            spec.insert("finalizers".into(), Value::Array(vec![]));
        }
        Ok(o)
    })
    .await;
    match res {
        Ok(_) => {}
        Err(e) if e.code == 404 => return Ok(true),
        Err(e) => return Err(anyhow::anyhow!("finalizing namespace {ns}: {e}")),
    }
    // With no finalizers left (spec and metadata), the namespace can go.
    let cur = match objects::get(st, &def, None, ns).await {
        Ok(c) => c,
        Err(e) if e.code == 404 => return Ok(true),
        Err(e) => return Err(anyhow::anyhow!("{e}")),
    };
    let meta_finalizers = cur
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    if meta_finalizers {
        return Ok(false);
    }
    let key = def.key(None, ns);
    st.store
        .delete_range(k3rs_storage::DeleteRangeRequest::new(
            k3rs_storage::KeyRange::key(key),
        ))
        .await?;
    Ok(true)
}

fn counts(m: &std::collections::BTreeMap<String, usize>, verb: &str) -> String {
    m.iter()
        .map(|(k, n)| format!("{k} {verb} {n} resource instances"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The conditions upstream's namespace controller reports while it deletes content.
pub fn deletion_conditions(
    left: &std::collections::BTreeMap<String, usize>,
    finalizers: &std::collections::BTreeMap<String, usize>,
    failure: Option<&str>,
) -> Vec<Value> {
    let c = |ty: &str, status: bool, reason: &str, message: String| serde_json::json!({"type": ty, "status": if status { "True" } else { "False" }, "reason": reason, "message": message});
    vec![
        c(
            "NamespaceDeletionDiscoveryFailure",
            false,
            "ResourcesDiscovered",
            "All resources successfully discovered".into(),
        ),
        c(
            "NamespaceDeletionGroupVersionParsingFailure",
            false,
            "ParsedGroupVersions",
            "All legacy kube types successfully parsed".into(),
        ),
        match failure {
            Some(m) => c(
                "NamespaceDeletionContentFailure",
                true,
                "ContentDeletionFailed",
                m.to_string(),
            ),
            None => c(
                "NamespaceDeletionContentFailure",
                false,
                "ContentDeleted",
                "All content successfully deleted, may be waiting on finalization".into(),
            ),
        },
        if left.is_empty() {
            c(
                "NamespaceContentRemaining",
                false,
                "ContentRemoved",
                "All content successfully removed".into(),
            )
        } else {
            c(
                "NamespaceContentRemaining",
                true,
                "SomeResourcesRemain",
                format!("Some resources are remaining: {}", counts(left, "has")),
            )
        },
        if finalizers.is_empty() {
            c(
                "NamespaceFinalizersRemaining",
                false,
                "ContentHasNoFinalizers",
                "All content-preserving finalizers finished".into(),
            )
        } else {
            c(
                "NamespaceFinalizersRemaining",
                true,
                "SomeFinalizersRemain",
                format!(
                    "Some content in the namespace has finalizers remaining: {}",
                    counts(finalizers, "in")
                ),
            )
        },
    ]
}

/// Writes the deletion conditions when they changed (keeping lastTransitionTime otherwise).
async fn record_conditions(
    st: &ApiState,
    ns: &str,
    left: &std::collections::BTreeMap<String, usize>,
    finalizers: &std::collections::BTreeMap<String, usize>,
    failure: Option<&str>,
) {
    let def = st.registry.get("", "v1", "namespaces").expect("builtin");
    let want = deletion_conditions(left, finalizers, failure);
    let opts = WriteOpts {
        dry_run: false,
        field_validation: FieldValidation::Ignore,
        field_manager: "k3rs-namespace-controller".into(),
        operation: "Update",
    };
    let _ = objects::guaranteed_update(st, &def, None, ns, Part::Status, &opts, |cur| {
        let have: Vec<Value> = cur
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let now = objects::now_rfc3339();
        let mut changed = false;
        let merged: Vec<Value> = want
            .iter()
            .map(|w| {
                let old = have.iter().find(|h| h["type"] == w["type"]);
                let mut c = w.clone();
                match old {
                    Some(o)
                        if o["status"] == w["status"]
                            && o["reason"] == w["reason"]
                            && o["message"] == w["message"] =>
                    {
                        c["lastTransitionTime"] = o["lastTransitionTime"].clone();
                    }
                    Some(o) if o["status"] == w["status"] => {
                        changed = true;
                        c["lastTransitionTime"] = o["lastTransitionTime"].clone();
                    }
                    _ => {
                        changed = true;
                        c["lastTransitionTime"] = serde_json::json!(now);
                    }
                }
                c
            })
            .collect();
        if !changed {
            return Err(crate::api::status::ApiError::conflict(
                "",
                "namespaces",
                ns,
                "unchanged",
            ));
        }
        let mut o = cur.clone();
        o["status"]["conditions"] = Value::Array(merged);
        if let Some(md) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            md.remove("resourceVersion");
        }
        Ok(o)
    })
    .await;
}

/// Runs until shutdown: finalizes namespaces marked for deletion (also those found at start).
pub async fn run(st: Arc<ApiState>, mut rx: tokio::sync::mpsc::UnboundedReceiver<String>) {
    let mut pending: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    if let Some(def) = st.registry.get("", "v1", "namespaces") {
        if let Ok(r) = objects::list(&st, &def, None, &all_opts()).await {
            for n in r.items {
                if n.pointer("/status/phase").and_then(Value::as_str) == Some("Terminating") {
                    pending.insert(
                        n.pointer("/metadata/name")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                    );
                }
            }
        }
    }
    loop {
        let timeout = if pending.is_empty() {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(500)
        };
        match tokio::time::timeout(timeout, rx.recv()).await {
            Ok(Some(ns)) => {
                pending.insert(ns);
            }
            Ok(None) => return,
            Err(_) => {}
        }
        while let Ok(ns) = rx.try_recv() {
            pending.insert(ns);
        }
        let current: Vec<String> = pending.iter().cloned().collect();
        for ns in current {
            match finalize(&st, &ns).await {
                Ok(true) => {
                    pending.remove(&ns);
                    tracing::info!(namespace = %ns, "namespace deleted");
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(namespace = %ns, error = %e, "namespace cleanup"),
            }
        }
    }
}
