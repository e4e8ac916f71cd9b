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

/// One pass over a terminating namespace; `true` when it is gone.
async fn finalize(st: &ApiState, ns: &str) -> anyhow::Result<bool> {
    let mut remaining = 0;
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
            match objects::delete(
                st,
                &def,
                Some(ns),
                &name,
                &DeleteOpts {
                    grace_period: Some(0),
                    ..Default::default()
                },
            )
            .await
            {
                Ok(left) => {
                    if left.pointer("/metadata/deletionTimestamp").is_some() {
                        remaining += 1;
                    }
                }
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(anyhow::anyhow!("deleting {}/{name}: {e}", def.plural)),
            }
        }
    }
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
