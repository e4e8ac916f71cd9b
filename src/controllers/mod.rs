//! Control loops: the controller framework (in-process client, shared informers, work queues,
//! expectations, event recording, leader election) and the controllers built on it.

#![allow(clippy::result_large_err)]

pub mod client;
pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpoints;
pub mod events;
pub mod gc;
pub mod history;
pub mod informer;
pub mod job;
pub mod leader;
pub mod nodeipam;
pub mod nodelifecycle;
pub mod pods;
pub mod quantity;
pub mod queue;
pub mod quota;
pub mod replicaset;
pub mod scheduler;
pub mod serviceaccounts;
pub mod statefulset;
pub mod tainteviction;
pub mod volumes;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::api::status::ApiError;
use crate::api::ApiState;
use crate::controllers::client::Client;
use crate::controllers::informer::Informers;
use crate::controllers::queue::Queue;

/// What every control loop shares.
pub struct Context {
    pub st: Arc<ApiState>,
    pub informers: Arc<Informers>,
}

/// Runs `workers` tasks taking keys from `queue` and handing them to `sync`. A sync that fails
/// is retried with back-off; one that asks for it is re-run after the returned delay.
pub fn spawn_workers<F, Fut>(
    queue: Arc<Queue>,
    workers: usize,
    name: &'static str,
    sync: F,
) -> Vec<tokio::task::JoinHandle<()>>
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<Duration>, ApiError>> + Send + 'static,
{
    let sync = Arc::new(sync);
    (0..workers)
        .map(|_| {
            let queue = queue.clone();
            let sync = sync.clone();
            tokio::spawn(async move {
                loop {
                    let key = queue.get().await;
                    let span = tracing::debug_span!("reconcile", controller = name, key = %key);
                    let _g = span.enter();
                    drop(_g);
                    match sync(key.clone()).await {
                        Ok(None) => queue.forget(&key),
                        Ok(Some(after)) => {
                            queue.forget(&key);
                            queue.add_after(key.clone(), after);
                        }
                        Err(e) => {
                            if e.code == 409 {
                                // A concurrent write: retry soon, it is not a failure.
                                queue.add_after(key.clone(), Duration::from_millis(20));
                            } else {
                                tracing::debug!(controller = name, key = %key, error = %e, "reconcile failed");
                                queue.add_rate_limited(&key);
                            }
                        }
                    }
                    queue.done(&key);
                }
            })
        })
        .collect()
}

/// Creations and deletions a controller made and has not seen in its informers yet (client-go's
/// ControllerExpectations): until they are observed (or time out), the controller does not act
/// again on stale counts.
#[derive(Default)]
pub struct Expectations {
    inner: Mutex<HashMap<String, (i64, i64, Instant)>>,
}

const EXPECTATIONS_TIMEOUT: Duration = Duration::from_secs(300);

impl Expectations {
    pub fn expect(&self, key: &str, adds: i64, dels: i64) {
        self.inner
            .lock()
            .insert(key.to_string(), (adds, dels, Instant::now()));
    }
    pub fn observed_add(&self, key: &str) {
        if let Some(e) = self.inner.lock().get_mut(key) {
            e.0 -= 1;
        }
    }
    pub fn observed_delete(&self, key: &str) {
        if let Some(e) = self.inner.lock().get_mut(key) {
            e.1 -= 1;
        }
    }
    /// Lowers the expectations when a creation or deletion failed (it will not be observed).
    pub fn lower(&self, key: &str, adds: i64, dels: i64) {
        if let Some(e) = self.inner.lock().get_mut(key) {
            e.0 -= adds;
            e.1 -= dels;
        }
    }
    pub fn satisfied(&self, key: &str) -> bool {
        match self.inner.lock().get(key) {
            None => true,
            Some((a, d, at)) => (*a <= 0 && *d <= 0) || at.elapsed() > EXPECTATIONS_TIMEOUT,
        }
    }
    pub fn forget(&self, key: &str) {
        self.inner.lock().remove(key);
    }
}

/// The running control plane loops (see [`start`]).
pub struct Running {
    pub informers: Arc<Informers>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops the loops and releases the leases (so a restart leads at once).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        self.informers.shutdown();
    }
}

/// Starts every control loop, each component under its leader-election lease in `kube-system`
/// (`kube-controller-manager` for the controllers, `kube-scheduler` for the scheduler).
pub fn start(st: Arc<ApiState>) -> Running {
    let informers = Informers::new(st.clone());
    let ctx = Arc::new(Context {
        st: st.clone(),
        informers: informers.clone(),
    });
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let c = ctx.clone();
    let controllers = leader::run_elected(
        ctx.client("kube-controller-manager"),
        "kube-controller-manager",
        stop_rx.clone(),
        move || {
            let ctx = c.clone();
            let mut tasks = Vec::new();
            tasks.extend(replicaset::start(
                ctx.clone(),
                replicaset::Flavor::ReplicaSet,
            ));
            tasks.extend(replicaset::start(
                ctx.clone(),
                replicaset::Flavor::ReplicationController,
            ));
            tasks.extend(deployment::start(ctx.clone()));
            tasks.extend(gc::start(ctx.clone()));
            tasks.extend(job::start(ctx.clone()));
            tasks.extend(cronjob::start(ctx.clone()));
            tasks.extend(statefulset::start(ctx.clone()));
            tasks.extend(daemonset::start(ctx.clone()));
            tasks.extend(endpoints::start(ctx.clone()));
            tasks.extend(volumes::start(ctx.clone()));
            tasks.extend(serviceaccounts::start(ctx.clone()));
            tasks.extend(nodeipam::start(ctx.clone()));
            tasks.extend(nodelifecycle::start(ctx.clone()));
            tasks.extend(tainteviction::start(ctx.clone()));
            tasks.extend(quota::start(ctx.clone()));
            tasks.extend(disruption::start(ctx.clone()));
            tasks
        },
    );
    let c = ctx.clone();
    let scheduler = leader::run_elected(
        ctx.client("kube-scheduler"),
        "kube-scheduler",
        stop_rx,
        move || scheduler::start(c.clone()),
    );
    Running {
        informers,
        stop,
        tasks: vec![controllers, scheduler],
    }
}

impl Context {
    pub fn client(&self, manager: &str) -> Client {
        Client::new(self.st.clone(), manager)
    }
}
