//! The Job controller: runs pods until `completions` succeed (NonIndexed or Indexed), at most
//! `parallelism` at once; retries failures with exponential back-off up to `backoffLimit`;
//! honours `activeDeadlineSeconds`, `podFailurePolicy` and `suspend`; reports conditions
//! Complete/Failed; and deletes finished jobs after `ttlSecondsAfterFinished`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::objects::now_rfc3339;
use crate::api::status::ApiResult;
use crate::controllers::client::{
    controller_of, is_terminating, key_of, name_of, namespace_of, split_key, uid_of, Client,
};
use crate::controllers::events::Recorder;
use crate::controllers::informer::{Change, Informer};
use crate::controllers::pods::{self, from_template, phase};
use crate::controllers::queue::Queue;
use crate::controllers::{spawn_workers, Context, Expectations};

const INDEX_ANNOTATION: &str = "batch.kubernetes.io/job-completion-index";
const BACKOFF_BASE: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(360);

fn i(v: &Value, ptr: &str) -> Option<i64> {
    v.pointer(ptr).and_then(Value::as_i64)
}

fn ts(v: &Value, ptr: &str) -> Option<jiff::Timestamp> {
    v.pointer(ptr)
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
}

fn has_condition(job: &Value, ty: &str) -> bool {
    job.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|c| c["type"] == ty && c["status"] == "True"))
}

pub fn finished(job: &Value) -> bool {
    has_condition(job, "Complete") || has_condition(job, "Failed")
}

fn index_of(p: &Value) -> Option<i64> {
    p.pointer("/metadata/annotations")
        .and_then(|a| a.get(INDEX_ANNOTATION))
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
}

/// `0-2,4,6-7`: upstream's compressed list of indexes.
pub fn format_indexes(idx: &BTreeSet<i64>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = idx.iter().peekable();
    while let Some(&start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&&(end + 1)) {
            end += 1;
            it.next();
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

/// What `podFailurePolicy` says about a failed pod.
#[derive(Debug, PartialEq, Eq)]
pub enum FailureAction {
    FailJob(String),
    Ignore,
    Count,
}

pub fn failure_action(job: &Value, pod: &Value) -> FailureAction {
    let Some(rules) = job
        .pointer("/spec/podFailurePolicy/rules")
        .and_then(Value::as_array)
    else {
        return FailureAction::Count;
    };
    let statuses: Vec<Value> = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for rule in rules {
        let matched = if let Some(oe) = rule.get("onExitCodes") {
            let values: Vec<i64> = oe["values"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_i64).collect())
                .unwrap_or_default();
            let container = oe["containerName"].as_str();
            statuses
                .iter()
                .filter(|s| container.is_none_or(|c| s["name"] == c))
                .any(|s| {
                    let code = s
                        .pointer("/state/terminated/exitCode")
                        .and_then(Value::as_i64)
                        .unwrap_or(0);
                    if code == 0 {
                        return false;
                    }
                    match oe["operator"].as_str() {
                        Some("In") => values.contains(&code),
                        Some("NotIn") => !values.contains(&code),
                        _ => false,
                    }
                })
        } else if let Some(conds) = rule.get("onPodConditions").and_then(Value::as_array) {
            conds.iter().any(|pc| {
                pod.pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|a| {
                        a.iter().any(|c| {
                            c["type"] == pc["type"]
                                && c["status"] == pc["status"].as_str().unwrap_or("True")
                        })
                    })
            })
        } else {
            false
        };
        if matched {
            return match rule["action"].as_str() {
                Some("FailJob") => FailureAction::FailJob(format!(
                    "Container {} for pod {}/{} failed with exit code matching FailJob rule",
                    statuses
                        .first()
                        .and_then(|s| s["name"].as_str())
                        .unwrap_or_default(),
                    namespace_of(pod),
                    name_of(pod)
                )),
                Some("Ignore") => FailureAction::Ignore,
                _ => FailureAction::Count,
            };
        }
    }
    FailureAction::Count
}

struct Controller {
    client: Client,
    jobs: Arc<Informer>,
    pods: Arc<Informer>,
    expectations: Expectations,
    recorder: Recorder,
}

fn condition(ty: &str, reason: &str, message: &str) -> Value {
    let now = now_rfc3339();
    json!({"type": ty, "status": "True", "reason": reason, "message": message, "lastProbeTime": now, "lastTransitionTime": now})
}

impl Controller {
    async fn sync(&self, key: String) -> ApiResult<Option<Duration>> {
        let Some(job) = self.jobs.get(&key) else {
            self.expectations.forget(&key);
            return Ok(None);
        };
        if is_terminating(&job) {
            return Ok(None);
        }
        let ns = split_key(&key).0.unwrap_or_default().to_string();
        let job_def = self.jobs.def.clone();
        let pod_def = self.pods.def.clone();
        let uid = uid_of(&job).to_string();
        let pods: Vec<Arc<Value>> = self
            .pods
            .list_namespace(&ns)
            .into_iter()
            .filter(|p| controller_of(p).is_some_and(|c| c["uid"] == uid.as_str()))
            .collect();
        let now = jiff::Timestamp::now();

        // Finished: clean up what still runs, then wait for the TTL.
        if finished(&job) {
            for p in pods.iter().filter(|p| pods::is_active(p)) {
                let _ = self
                    .client
                    .delete_uid(&pod_def, Some(&ns), name_of(p), uid_of(p), None)
                    .await;
            }
            if let Some(ttl) = i(&job, "/spec/ttlSecondsAfterFinished") {
                let done = ts(&job, "/status/completionTime").or_else(|| {
                    job.pointer("/status/conditions")
                        .and_then(Value::as_array)
                        .and_then(|a| {
                            a.iter().find(|c| {
                                c["status"] == "True"
                                    && (c["type"] == "Complete" || c["type"] == "Failed")
                            })
                        })
                        .and_then(|c| c["lastTransitionTime"].as_str())
                        .and_then(|s| s.parse().ok())
                });
                if let Some(done) = done {
                    let left = done.as_second() + ttl - now.as_second();
                    if left <= 0 {
                        let _ = self
                            .client
                            .delete_uid(
                                &job_def,
                                Some(&ns),
                                name_of(&job),
                                &uid,
                                Some("Background"),
                            )
                            .await;
                        return Ok(None);
                    }
                    return Ok(Some(Duration::from_secs(left as u64)));
                }
            }
            return Ok(None);
        }

        let indexed =
            job.pointer("/spec/completionMode").and_then(Value::as_str) == Some("Indexed");
        let completions = i(&job, "/spec/completions");
        let parallelism = i(&job, "/spec/parallelism").unwrap_or(1).max(0);
        let backoff_limit = i(&job, "/spec/backoffLimit").unwrap_or(6);
        let suspended = job
            .pointer("/spec/suspend")
            .and_then(Value::as_bool)
            .unwrap_or(false);

        let active: Vec<&Arc<Value>> = pods.iter().filter(|p| pods::is_active(p)).collect();
        let succeeded_pods: Vec<&Arc<Value>> =
            pods.iter().filter(|p| phase(p) == "Succeeded").collect();
        let mut failed = 0i64;
        let mut fail_job: Option<String> = None;
        for p in pods.iter().filter(|p| phase(p) == "Failed") {
            match failure_action(&job, p) {
                FailureAction::Count => failed += 1,
                FailureAction::Ignore => {}
                FailureAction::FailJob(m) => {
                    failed += 1;
                    fail_job.get_or_insert(m);
                }
            }
        }
        let failed = failed.max(i(&job, "/status/failed").unwrap_or(0));
        let succeeded_indexes: BTreeSet<i64> =
            succeeded_pods.iter().filter_map(|p| index_of(p)).collect();
        let succeeded = if indexed {
            succeeded_indexes.len() as i64
        } else {
            (succeeded_pods.len() as i64).max(i(&job, "/status/succeeded").unwrap_or(0))
        };
        let ready = active.iter().filter(|p| pods::is_ready(p)).count();
        let start_time = job
            .pointer("/status/startTime")
            .cloned()
            .filter(|v| !v.is_null());

        let mut status = json!({
            "active": active.len(),
            "ready": ready,
            "succeeded": succeeded,
            "failed": failed,
            "terminating": pods.iter().filter(|p| is_terminating(p)).count(),
        });
        if indexed {
            status["completedIndexes"] = json!(format_indexes(&succeeded_indexes));
        }
        if start_time.is_none() && !suspended {
            status["startTime"] = json!(now_rfc3339());
        }
        let mut conditions: Vec<Value> = job
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut requeue = None;

        // Done?
        let complete = match completions {
            Some(c) => succeeded >= c,
            None => succeeded > 0 && active.is_empty(),
        };
        let deadline_passed = i(&job, "/spec/activeDeadlineSeconds")
            .zip(
                start_time
                    .as_ref()
                    .and_then(|v| v.as_str())
                    .and_then(|s| s.parse::<jiff::Timestamp>().ok()),
            )
            .map(|(d, st)| (now.as_second() - st.as_second(), d));
        let failure = if let Some(m) = fail_job {
            Some(("PodFailurePolicy", m))
        } else if failed > backoff_limit {
            Some((
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit".to_string(),
            ))
        } else if deadline_passed.is_some_and(|(ran, d)| ran >= d) {
            Some((
                "DeadlineExceeded",
                "Job was active longer than specified deadline".to_string(),
            ))
        } else {
            None
        };
        if let Some((reason, message)) = failure {
            conditions.retain(|c| c["type"] != "Failed" && c["type"] != "FailureTarget");
            conditions.push(condition("FailureTarget", reason, &message));
            conditions.push(condition("Failed", reason, &message));
            self.recorder.event(&job, "Warning", reason, message);
            for p in &active {
                let _ = self
                    .client
                    .delete_uid(&pod_def, Some(&ns), name_of(p), uid_of(p), None)
                    .await;
            }
            status["active"] = json!(0);
        } else if complete {
            conditions.retain(|c| c["type"] != "Complete" && c["type"] != "SuccessCriteriaMet");
            conditions.push(condition(
                "SuccessCriteriaMet",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            ));
            conditions.push(condition(
                "Complete",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            ));
            status["completionTime"] = json!(now_rfc3339());
            self.recorder
                .event(&job, "Normal", "Completed", "Job completed".into());
            for p in &active {
                let _ = self
                    .client
                    .delete_uid(&pod_def, Some(&ns), name_of(p), uid_of(p), None)
                    .await;
            }
            if let Some(ttl) = i(&job, "/spec/ttlSecondsAfterFinished") {
                requeue = Some(Duration::from_secs(ttl.max(0) as u64));
            }
        } else if suspended {
            for p in &active {
                let _ = self
                    .client
                    .delete_uid(&pod_def, Some(&ns), name_of(p), uid_of(p), None)
                    .await;
            }
            if !has_condition(&job, "Suspended") {
                conditions.retain(|c| c["type"] != "Suspended");
                conditions.push(condition("Suspended", "JobSuspended", "Job suspended"));
                self.recorder
                    .event(&job, "Normal", "Suspended", "Job suspended".into());
            }
            status["active"] = json!(0);
        } else if self.expectations.satisfied(&key) {
            if has_condition(&job, "Suspended") {
                conditions.retain(|c| c["type"] != "Suspended");
                self.recorder
                    .event(&job, "Normal", "Resumed", "Job resumed".into());
            }
            // How many more pods, and which indexes.
            let remaining = completions
                .map(|c| (c - succeeded).max(0))
                .unwrap_or(parallelism);
            let want_active = parallelism.min(if completions.is_some() {
                remaining
            } else {
                parallelism
            });
            let mut to_create: Vec<Option<i64>> = Vec::new();
            if indexed {
                let running: BTreeSet<i64> = active.iter().filter_map(|p| index_of(p)).collect();
                let total = completions.unwrap_or(1);
                for idx in 0..total {
                    if (active.len() + to_create.len()) as i64 >= want_active {
                        break;
                    }
                    if !succeeded_indexes.contains(&idx) && !running.contains(&idx) {
                        to_create.push(Some(idx));
                    }
                }
            } else {
                let n = (want_active - active.len() as i64).max(0);
                to_create.extend((0..n).map(|_| None));
            }
            // Back-off after failures: 10 s, 20 s, 40 s, … since the last failure.
            if !to_create.is_empty() && failed > 0 {
                let last_failure = pods
                    .iter()
                    .filter(|p| phase(p) == "Failed")
                    .filter_map(|p| {
                        p.pointer("/status/containerStatuses/0/state/terminated/finishedAt")
                            .and_then(Value::as_str)
                            .and_then(|s| s.parse::<jiff::Timestamp>().ok())
                    })
                    .max();
                let delay = (BACKOFF_BASE * 2u32.pow((failed as u32).saturating_sub(1).min(6)))
                    .min(BACKOFF_MAX);
                if let Some(lf) = last_failure {
                    let waited =
                        Duration::from_secs((now.as_second() - lf.as_second()).max(0) as u64);
                    if waited < delay {
                        to_create.clear();
                        requeue = Some(delay - waited);
                    }
                }
            }
            if !to_create.is_empty() {
                let created = to_create.len();
                self.expectations.expect(&key, created as i64, 0);
                for idx in to_create {
                    let mut template = job["spec"]["template"].clone();
                    let gen = match idx {
                        Some(ix) => {
                            template["metadata"]["annotations"][INDEX_ANNOTATION] =
                                json!(ix.to_string());
                            template["metadata"]["labels"][INDEX_ANNOTATION] =
                                json!(ix.to_string());
                            template["spec"]["hostname"] = json!(format!("{}-{ix}", name_of(&job)));
                            if let Some(cs) = template["spec"]["containers"].as_array_mut() {
                                for c in cs {
                                    let mut env = c["env"].as_array().cloned().unwrap_or_default();
                                    env.push(json!({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": format!("metadata.annotations['{INDEX_ANNOTATION}']")}}}));
                                    c["env"] = Value::Array(env);
                                }
                            }
                            format!("{}-{ix}-", name_of(&job))
                        }
                        None => format!("{}-", name_of(&job)),
                    };
                    let pod = from_template(&template, &job, &gen, &ns);
                    match self.client.create(&pod_def, Some(&ns), pod).await {
                        Ok(p) => self.recorder.event(
                            &job,
                            "Normal",
                            "SuccessfulCreate",
                            format!("Created pod: {}", name_of(&p)),
                        ),
                        Err(e) => {
                            self.expectations.lower(&key, 1, 0);
                            self.recorder.event(
                                &job,
                                "Warning",
                                "FailedCreate",
                                format!("Error creating: {}", e.message),
                            );
                            return Err(e);
                        }
                    }
                }
                status["active"] = json!(active.len() + created);
            }
            if let Some((ran, d)) = deadline_passed {
                let left = Duration::from_secs((d - ran).max(0) as u64 + 1);
                requeue = Some(requeue.map_or(left, |r| r.min(left)));
            }
        }
        status["conditions"] = if conditions.is_empty() {
            Value::Null
        } else {
            Value::Array(conditions)
        };
        let current = job.get("status").cloned().unwrap_or(json!({}));
        let differs = status.as_object().expect("object").iter().any(|(k, v)| {
            current.get(k).unwrap_or(&Value::Null) != v
                && !(v.is_null() && current.get(k).is_none())
        });
        if differs {
            self.client
                .merge_patch_status(
                    &self.jobs.def,
                    Some(&ns),
                    name_of(&job),
                    &json!({"status": status}),
                )
                .await?;
        }
        Ok(requeue)
    }
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client("job-controller");
    let c = Arc::new(Controller {
        jobs: ctx.informers.get(&client.def("batch", "v1", "jobs")),
        pods: ctx.informers.get(&client.def("", "v1", "pods")),
        expectations: Expectations::default(),
        recorder: Recorder::new(client.clone(), "job-controller"),
        client,
    });
    let queue = Queue::new();
    let mut tasks = Vec::new();
    {
        let c = c.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut jobs_rx = c.jobs.subscribe();
            let mut pods_rx = c.pods.subscribe();
            c.jobs.wait_synced().await;
            c.pods.wait_synced().await;
            for j in c.jobs.list() {
                queue.add(key_of(&j));
            }
            loop {
                tokio::select! {
                    Some(ch) = jobs_rx.recv() => queue.add(key_of(ch.object())),
                    Some(ch) = pods_rx.recv() => {
                        let p = ch.object();
                        if let Some(o) = controller_of(p).filter(|o| o["kind"] == "Job") {
                            let k = format!("{}/{}", namespace_of(p), o["name"].as_str().unwrap_or_default());
                            match &ch {
                                Change::Added(_) => c.expectations.observed_add(&k),
                                Change::Deleted(_) => c.expectations.observed_delete(&k),
                                Change::Updated { .. } => {}
                            }
                            queue.add(k);
                        }
                    }
                    else => return,
                }
            }
        }));
    }
    let c2 = c.clone();
    tasks.extend(spawn_workers(queue, 2, "job-controller", move |key| {
        let c = c2.clone();
        async move { c.sync(key).await }
    }));
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_compress_as_upstream() {
        let s: BTreeSet<i64> = [0, 1, 2, 4, 6, 7].into_iter().collect();
        assert_eq!(format_indexes(&s), "0-2,4,6-7");
        assert_eq!(format_indexes(&BTreeSet::new()), "");
    }

    #[test]
    fn pod_failure_policy_decides_per_exit_code() {
        let job = json!({"spec": {"podFailurePolicy": {"rules": [
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}},
            {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [3]}},
        ]}}});
        let pod = |code: i64| json!({"metadata": {"name": "p", "namespace": "d"}, "status": {"containerStatuses": [{"name": "c", "state": {"terminated": {"exitCode": code}}}]}});
        assert!(matches!(
            failure_action(&job, &pod(42)),
            FailureAction::FailJob(_)
        ));
        assert_eq!(failure_action(&job, &pod(3)), FailureAction::Ignore);
        assert_eq!(failure_action(&job, &pod(1)), FailureAction::Count);
        assert_eq!(failure_action(&json!({}), &pod(42)), FailureAction::Count);
    }
}
