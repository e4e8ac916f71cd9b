//! Leader election through a Lease in `kube-system` (`kube-controller-manager`,
//! `kube-scheduler`), as upstream's leaderelection package does: acquire when the lease is free,
//! expired, or held by an earlier incarnation of this node; renew every 2 s; give the loops up
//! when renewal fails for 10 s; release on shutdown so a restart takes over at once. A single
//! server is always the leader; with several servers only one runs each component.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::api::status::ApiResult;
use crate::controllers::client::Client;

const LEASE_DURATION: i64 = 15;
const RENEW_DEADLINE: Duration = Duration::from_secs(10);
const RETRY_PERIOD: Duration = Duration::from_secs(2);

fn micro_now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S.%6fZ")
        .to_string()
}

/// Whether a lease may be taken by `identity` now.
pub fn can_acquire(lease: &Value, identity: &str, now: jiff::Timestamp) -> bool {
    let spec = &lease["spec"];
    let holder = spec["holderIdentity"].as_str().unwrap_or_default();
    if holder.is_empty() || holder == identity {
        return true;
    }
    // An earlier incarnation of this node (one server process per node) holds it.
    let node = |id: &str| id.rsplit_once('_').map(|(n, _)| n.to_string());
    if node(holder).is_some() && node(holder) == node(identity) {
        return true;
    }
    let renewed = spec["renewTime"]
        .as_str()
        .and_then(|s| s.parse::<jiff::Timestamp>().ok());
    let duration = spec["leaseDurationSeconds"]
        .as_i64()
        .unwrap_or(LEASE_DURATION);
    match renewed {
        None => true,
        Some(r) => r.as_second() + duration < now.as_second(),
    }
}

pub struct Elector {
    client: Client,
    name: String,
    identity: String,
}

impl Elector {
    pub fn new(client: Client, name: &str) -> Elector {
        let identity = format!(
            "{}_{}",
            crate::config::hostname(),
            crate::api::objects::new_uid()
        );
        Elector {
            client,
            name: name.to_string(),
            identity,
        }
    }

    /// One attempt to acquire or renew; `true` while this process holds the lease.
    async fn try_acquire_or_renew(&self) -> ApiResult<bool> {
        let def = self.client.def("coordination.k8s.io", "v1", "leases");
        let now = micro_now();
        match self.client.get(&def, Some("kube-system"), &self.name).await {
            Err(e) if e.code == 404 => {
                let lease = json!({
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": "kube-system"},
                    "spec": {
                        "holderIdentity": self.identity,
                        "leaseDurationSeconds": LEASE_DURATION,
                        "acquireTime": now,
                        "renewTime": now,
                        "leaseTransitions": 0,
                    },
                });
                self.client.create(&def, Some("kube-system"), lease).await?;
                Ok(true)
            }
            Err(e) => Err(e),
            Ok(mut lease) => {
                if !can_acquire(&lease, &self.identity, jiff::Timestamp::now()) {
                    return Ok(false);
                }
                let spec = &mut lease["spec"];
                if spec["holderIdentity"] != self.identity.as_str() {
                    let transitions = spec["leaseTransitions"].as_i64().unwrap_or(0);
                    spec["holderIdentity"] = json!(self.identity);
                    spec["acquireTime"] = json!(now);
                    spec["leaseTransitions"] = json!(transitions + 1);
                    spec["leaseDurationSeconds"] = json!(LEASE_DURATION);
                }
                spec["renewTime"] = json!(now);
                self.client.update(&def, Some("kube-system"), lease).await?;
                Ok(true)
            }
        }
    }

    /// Waits until this process holds the lease (or `stop` is set: `false`).
    pub async fn acquire(&self, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                    return true;
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(lease = %self.name, error = %e, "acquiring lease"),
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY_PERIOD) => {}
                _ = stop.changed() => return false,
            }
            if *stop.borrow() {
                return false;
            }
        }
    }

    /// Renews until renewal has failed for the renew deadline (leadership lost).
    pub async fn hold(&self) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(RETRY_PERIOD).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::warn!(lease = %self.name, "lease taken by another holder");
                    return;
                }
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "renewing lease");
                    if last_ok.elapsed() > RENEW_DEADLINE {
                        return;
                    }
                }
            }
        }
    }

    /// Gives the lease up (on shutdown), so the next holder need not wait for it to expire.
    pub async fn release(&self) {
        let def = self.client.def("coordination.k8s.io", "v1", "leases");
        if let Ok(mut lease) = self.client.get(&def, Some("kube-system"), &self.name).await {
            if lease["spec"]["holderIdentity"] == self.identity.as_str() {
                lease["spec"]["holderIdentity"] = json!("");
                lease["spec"]["leaseDurationSeconds"] = json!(1);
                let _ = self.client.update(&def, Some("kube-system"), lease).await;
            }
        }
    }
}

/// Runs `start` while this process leads `lease`: the loops it returns are stopped when
/// leadership is lost (and started again when it is regained) or when `stop` is set.
pub fn run_elected<F>(
    client: Client,
    lease: &str,
    mut stop: watch::Receiver<bool>,
    start: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Vec<tokio::task::JoinHandle<()>> + Send + Sync + 'static,
{
    let elector = Arc::new(Elector::new(client, lease));
    tokio::spawn(async move {
        loop {
            if !elector.acquire(&mut stop).await {
                return;
            }
            let tasks = start();
            let stopped = tokio::select! {
                _ = elector.hold() => false,
                _ = stop.changed() => true,
            };
            for t in &tasks {
                t.abort();
            }
            for t in tasks {
                let _ = t.await;
            }
            if stopped {
                elector.release().await;
                return;
            }
            tracing::warn!(lease = %elector.name, "lost leadership: control loops stopped");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed: &str) -> Value {
        json!({"spec": {"holderIdentity": holder, "renewTime": renewed, "leaseDurationSeconds": 15}})
    }

    #[test]
    fn a_lease_is_taken_when_free_expired_or_ours() {
        let now: jiff::Timestamp = "2026-01-01T00:00:20Z".parse().unwrap();
        assert!(can_acquire(&lease("", "2026-01-01T00:00:19Z"), "a_1", now));
        assert!(can_acquire(
            &lease("a_1", "2026-01-01T00:00:19Z"),
            "a_1",
            now
        ));
        // An earlier incarnation of the same node.
        assert!(can_acquire(
            &lease("a_0", "2026-01-01T00:00:19Z"),
            "a_1",
            now
        ));
        // Another node, still fresh.
        assert!(!can_acquire(
            &lease("b_0", "2026-01-01T00:00:10Z"),
            "a_1",
            now
        ));
        // Another node, expired.
        assert!(can_acquire(
            &lease("b_0", "2026-01-01T00:00:04Z"),
            "a_1",
            now
        ));
    }
}
