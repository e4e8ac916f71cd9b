//! Event recording as upstream's recorder does it: one core/v1 Event per (object, type,
//! reason, message), its count and lastTimestamp bumped when the same thing happens again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::api::objects::now_rfc3339;
use crate::controllers::client::{name_of, namespace_of, uid_of, Client};

/// Repeats within this window update the existing event.
const AGGREGATE_FOR: Duration = Duration::from_secs(600);
/// Events remembered for aggregation at most.
const MAX_RECENT: usize = 4096;

pub struct Recorder {
    client: Client,
    component: String,
    recent: Mutex<HashMap<String, (String, i64, Instant)>>,
}

impl Recorder {
    pub fn new(client: Client, component: &str) -> Recorder {
        Recorder {
            client,
            component: component.to_string(),
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Records an event about `obj` in the background.
    pub fn event(&self, obj: &Value, kind: &str, reason: &str, message: String) {
        let ns = match namespace_of(obj) {
            "" => "default".to_string(),
            n => n.to_string(),
        };
        let involved = json!({
            "kind": obj["kind"],
            "apiVersion": obj["apiVersion"],
            "name": name_of(obj),
            "namespace": namespace_of(obj),
            "uid": uid_of(obj),
            "resourceVersion": obj.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null),
        });
        let dedup = format!("{}|{kind}|{reason}|{message}", uid_of(obj));
        let now = now_rfc3339();
        let existing = {
            let mut recent = self.recent.lock();
            // Bounded like upstream's correlator cache: pruned when it grows, not per event.
            if recent.len() >= MAX_RECENT {
                recent.retain(|_, (_, _, at)| at.elapsed() < AGGREGATE_FOR);
                if recent.len() >= MAX_RECENT {
                    recent.clear();
                }
            }
            match recent.get_mut(&dedup) {
                Some((name, count, at)) if at.elapsed() < AGGREGATE_FOR => {
                    *count += 1;
                    *at = Instant::now();
                    Some((name.clone(), *count))
                }
                _ => None,
            }
        };
        let client = self.client.clone();
        let component = self.component.clone();
        let def = client.def("", "v1", "events");
        match existing {
            Some((name, count)) => {
                tokio::spawn(async move {
                    let p = json!({"count": count, "lastTimestamp": now});
                    if let Err(e) = client.merge_patch(&def, Some(&ns), &name, &p).await {
                        tracing::debug!(error = %e, "updating event");
                    }
                });
            }
            None => {
                let nanos = jiff::Timestamp::now().as_nanosecond() as u64;
                let name = format!("{}.{nanos:x}", name_of(obj));
                self.recent
                    .lock()
                    .insert(dedup, (name.clone(), 1, Instant::now()));
                let ev = json!({
                    "apiVersion": "v1", "kind": "Event",
                    "metadata": {"name": name, "namespace": ns},
                    "involvedObject": involved,
                    "reason": reason, "message": message, "type": kind,
                    "source": {"component": component},
                    "firstTimestamp": now, "lastTimestamp": now, "count": 1,
                    "reportingComponent": component, "reportingInstance": "",
                });
                tokio::spawn(async move {
                    if let Err(e) = client.create(&def, Some(&ns), ev).await {
                        tracing::debug!(error = %e, "recording event");
                    }
                });
            }
        }
    }
}
