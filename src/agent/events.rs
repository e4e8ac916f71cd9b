//! Kubelet events (`source.component: kubelet`), posted in the background; a repeat of the
//! same reason and message for the same object bumps the count of the existing event, as
//! upstream's recorder does.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::rest::RestClient;

/// The object an event is about.
#[derive(Debug, Clone)]
pub struct Involved {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub field_path: Option<String>,
}

#[derive(Clone)]
pub struct Recorder {
    client: Arc<RestClient>,
    host: String,
    seen: Arc<Mutex<HashMap<String, (String, u64)>>>,
}

impl Recorder {
    pub fn new(client: RestClient, host: &str) -> Recorder {
        Recorder {
            client: Arc::new(client),
            host: host.to_string(),
            seen: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Records an event (Normal or Warning) without waiting for the API server.
    pub fn record(&self, obj: &Involved, warning: bool, reason: &str, message: String) {
        let key = format!(
            "{}/{}/{warning}/{reason}/{message}",
            obj.uid,
            obj.field_path.as_deref().unwrap_or("")
        );
        let ns = if obj.namespace.is_empty() {
            "default".to_string()
        } else {
            obj.namespace.clone()
        };
        let now = super::now_rfc3339();
        let (name, count) = {
            let mut g = self.seen.lock();
            if g.len() > 4096 {
                g.clear();
            }
            let e = g.entry(key).or_insert_with(|| {
                (
                    format!(
                        "{}.{:016x}",
                        obj.name,
                        rand::random::<u64>() & 0x00ff_ffff_ffff_ffff
                    ),
                    0,
                )
            });
            e.1 += 1;
            (e.0.clone(), e.1)
        };
        let client = self.client.clone();
        if count > 1 {
            tokio::spawn(async move {
                let _ = client
                    .merge_patch(
                        &format!("/api/v1/namespaces/{ns}/events/{name}"),
                        &json!({"count": count, "lastTimestamp": now}),
                    )
                    .await;
            });
            return;
        }
        let mut involved = json!({
            "kind": obj.kind,
            "namespace": obj.namespace,
            "name": obj.name,
            "uid": obj.uid,
            "apiVersion": "v1",
        });
        if obj.namespace.is_empty() {
            involved.as_object_mut().map(|o| o.remove("namespace"));
        }
        if let Some(fp) = &obj.field_path {
            involved["fieldPath"] = json!(fp);
        }
        let ev: Value = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": ns},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "source": {"component": "kubelet", "host": self.host},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "type": if warning { "Warning" } else { "Normal" },
            "reportingComponent": "kubelet",
            "reportingInstance": self.host,
        });
        tokio::spawn(async move {
            if let Err(e) = client
                .post(&format!("/api/v1/namespaces/{ns}/events"), &ev)
                .await
            {
                tracing::debug!(error = %e, "posting an event");
            }
        });
    }
}
