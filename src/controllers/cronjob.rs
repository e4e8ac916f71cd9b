//! The CronJob controller: creates a Job for each schedule time (in `timeZone`), honouring
//! `concurrencyPolicy` (Allow, Forbid, Replace), `startingDeadlineSeconds` and `suspend`;
//! tracks active jobs, `lastScheduleTime` and `lastSuccessfulTime`; and deletes finished jobs
//! beyond the successful/failed history limits.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde_json::{json, Value};

use crate::api::status::ApiResult;
use crate::controllers::client::{
    controller_of, is_terminating, key_of, name_of, namespace_of, owner_ref, split_key, uid_of,
    Client,
};
use crate::controllers::events::Recorder;
use crate::controllers::informer::Informer;
use crate::controllers::job;
use crate::controllers::queue::Queue;
use crate::controllers::{spawn_workers, Context};
use crate::cron;

const SCHEDULED_TIMESTAMP: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";
/// Missed start times beyond which the controller warns (as upstream).
const MISSED_CAP: usize = 100;

fn ts(v: &Value, ptr: &str) -> Option<Timestamp> {
    v.pointer(ptr)
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
}

fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn job_condition(job: &Value, ty: &str) -> Option<Timestamp> {
    job.pointer("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c["type"] == ty && c["status"] == "True")
        .and_then(|c| c["lastTransitionTime"].as_str())
        .and_then(|s| s.parse().ok())
}

/// The job's name for a schedule time: `<cronjob>-<minutes since the epoch>`, so that a
/// controller restart never starts the same run twice.
pub fn job_name(cronjob: &str, scheduled: Timestamp) -> String {
    format!("{cronjob}-{}", scheduled.as_second() / 60)
}

/// What to do now, decided from the cronjob, its jobs and the clock.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Nothing to start; look again after the delay (the next schedule time).
    Wait(Option<Duration>),
    /// Start a job for this schedule time (after deleting `replace`, for Replace).
    Start { scheduled: Timestamp, missed: usize },
    /// The latest schedule time is past `startingDeadlineSeconds`.
    Missed(Timestamp),
    /// Forbid and a job still runs.
    Forbidden(Timestamp),
}

pub fn decide(cj: &Value, active: usize, now: Timestamp, tz: &jiff::tz::TimeZone) -> Decision {
    let Ok(schedule) = cron::parse(cj["spec"]["schedule"].as_str().unwrap_or_default()) else {
        return Decision::Wait(None);
    };
    let until_next = |from: Timestamp| {
        schedule.next(from, tz).map(|n| {
            Duration::from_millis((n.as_millisecond() - now.as_millisecond()).max(0) as u64 + 100)
        })
    };
    if cj["spec"]["suspend"].as_bool() == Some(true) {
        return Decision::Wait(None);
    }
    let created = ts(cj, "/metadata/creationTimestamp").unwrap_or(now);
    let mut earliest = ts(cj, "/status/lastScheduleTime").unwrap_or(created);
    let deadline = cj["spec"]["startingDeadlineSeconds"].as_i64();
    if let Some(d) = deadline {
        let floor = Timestamp::from_second(now.as_second() - d).unwrap_or(earliest);
        earliest = earliest.max(floor);
    }
    let (latest, missed) = schedule.most_recent(earliest, now, tz, MISSED_CAP);
    let Some(scheduled) = latest else {
        return Decision::Wait(until_next(now));
    };
    if let Some(d) = deadline {
        if scheduled.as_second() + d < now.as_second() {
            return Decision::Missed(scheduled);
        }
    }
    if cj["spec"]["concurrencyPolicy"].as_str() == Some("Forbid") && active > 0 {
        return Decision::Forbidden(scheduled);
    }
    Decision::Start { scheduled, missed }
}

struct Controller {
    client: Client,
    cronjobs: Arc<Informer>,
    jobs: Arc<Informer>,
    recorder: Recorder,
}

impl Controller {
    async fn sync(&self, key: String) -> ApiResult<Option<Duration>> {
        let Some(cj) = self.cronjobs.get(&key) else {
            return Ok(None);
        };
        if is_terminating(&cj) {
            return Ok(None);
        }
        let ns = split_key(&key).0.unwrap_or_default().to_string();
        let job_def = self.jobs.def.clone();
        let uid = uid_of(&cj).to_string();
        let now = Timestamp::now();
        let jobs: Vec<Arc<Value>> = self
            .jobs
            .list_namespace(&ns)
            .into_iter()
            .filter(|j| controller_of(j).is_some_and(|c| c["uid"] == uid.as_str()))
            .collect();

        // Active jobs and the last success, from the jobs themselves.
        let mut last_success = ts(&cj, "/status/lastSuccessfulTime");
        let reported: Vec<Value> = cj
            .pointer("/status/active")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut active: Vec<Arc<Value>> = Vec::new();
        for j in &jobs {
            if job::finished(j) {
                let was_active = reported.iter().any(|r| r["uid"] == uid_of(j));
                if was_active {
                    let status = if job_condition(j, "Complete").is_some() {
                        "Complete"
                    } else {
                        "Failed"
                    };
                    self.recorder.event(
                        &cj,
                        "Normal",
                        "SawCompletedJob",
                        format!("Saw completed job: {}, status: {status}", name_of(j)),
                    );
                }
                if let Some(done) = job_condition(j, "Complete") {
                    let done = ts(j, "/status/completionTime").unwrap_or(done);
                    if last_success.is_none_or(|l| done > l) {
                        last_success = Some(done);
                    }
                }
            } else if !is_terminating(j) {
                active.push(j.clone());
            }
        }

        let tz = match cron::time_zone(cj["spec"]["timeZone"].as_str()) {
            Ok(tz) => tz,
            Err(e) => {
                self.recorder.event(
                    &cj,
                    "Warning",
                    "UnknownTimeZone",
                    format!("invalid timeZone: {e}"),
                );
                return Ok(None);
            }
        };
        let mut last_schedule = ts(&cj, "/status/lastScheduleTime");
        let requeue;
        match decide(&cj, active.len(), now, &tz) {
            Decision::Wait(after) => requeue = after,
            Decision::Missed(at) => {
                self.recorder.event(
                    &cj,
                    "Warning",
                    "MissSchedule",
                    format!("Missed scheduled time to start a job: {}", rfc3339(at)),
                );
                requeue = self.next_in(&cj, now, &tz);
            }
            Decision::Forbidden(_) => {
                self.recorder.event(
                    &cj,
                    "Normal",
                    "JobAlreadyActive",
                    "Not starting job because prior execution is running and concurrency policy is Forbid".into(),
                );
                requeue = self.next_in(&cj, now, &tz);
            }
            Decision::Start { scheduled, missed } => {
                if missed > MISSED_CAP {
                    self.recorder.event(&cj, "Warning", "TooManyMissedTimes", "too many missed start times. Set or decrease .spec.startingDeadlineSeconds or check clock skew".into());
                }
                let name = job_name(name_of(&cj), scheduled);
                let exists = jobs.iter().any(|j| name_of(j) == name);
                if !exists {
                    if cj["spec"]["concurrencyPolicy"].as_str() == Some("Replace") {
                        for j in &active {
                            if self
                                .client
                                .delete_uid(
                                    &job_def,
                                    Some(&ns),
                                    name_of(j),
                                    uid_of(j),
                                    Some("Background"),
                                )
                                .await
                                .is_ok()
                            {
                                self.recorder.event(
                                    &cj,
                                    "Normal",
                                    "SuccessfulDelete",
                                    format!("Deleted job {}", name_of(j)),
                                );
                            }
                        }
                        active.clear();
                    }
                    let zoned = scheduled.to_zoned(tz.clone());
                    let jt = &cj["spec"]["jobTemplate"];
                    let mut md = json!({
                        "name": name,
                        "namespace": ns,
                        "ownerReferences": [owner_ref(&cj, true)],
                        "annotations": {SCHEDULED_TIMESTAMP: zoned.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string()},
                    });
                    if let Some(l) = jt.pointer("/metadata/labels") {
                        md["labels"] = l.clone();
                    }
                    if let Some(a) = jt
                        .pointer("/metadata/annotations")
                        .and_then(Value::as_object)
                    {
                        for (k, v) in a {
                            md["annotations"][k] = v.clone();
                        }
                    }
                    let job = json!({
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "metadata": md,
                        "spec": jt.get("spec").cloned().unwrap_or(json!({})),
                    });
                    match self.client.create(&job_def, Some(&ns), job).await {
                        Ok(j) => {
                            self.recorder.event(
                                &cj,
                                "Normal",
                                "SuccessfulCreate",
                                format!("Created job {}", name_of(&j)),
                            );
                            active.push(Arc::new(j));
                        }
                        Err(e) if e.code == 409 => {}
                        Err(e) => {
                            self.recorder.event(
                                &cj,
                                "Warning",
                                "FailedCreate",
                                format!("Error creating job: {}", e.message),
                            );
                            return Err(e);
                        }
                    }
                }
                last_schedule = Some(last_schedule.map_or(scheduled, |l| l.max(scheduled)));
                requeue = self.next_in(&cj, now, &tz);
            }
        }

        // History limits.
        let limit = |field: &str, default: i64| {
            cj["spec"][field].as_i64().unwrap_or(default).max(0) as usize
        };
        for (cond, lim) in [
            ("Complete", limit("successfulJobsHistoryLimit", 3)),
            ("Failed", limit("failedJobsHistoryLimit", 1)),
        ] {
            let mut done: Vec<&Arc<Value>> = jobs
                .iter()
                .filter(|j| !is_terminating(j) && job_condition(j, cond).is_some())
                .collect();
            if done.len() > lim {
                done.sort_by_key(|j| {
                    ts(j, "/status/startTime").or_else(|| ts(j, "/metadata/creationTimestamp"))
                });
                for j in &done[..done.len() - lim] {
                    if self
                        .client
                        .delete_uid(
                            &job_def,
                            Some(&ns),
                            name_of(j),
                            uid_of(j),
                            Some("Background"),
                        )
                        .await
                        .is_ok()
                    {
                        self.recorder.event(
                            &cj,
                            "Normal",
                            "SuccessfulDelete",
                            format!("Deleted job {}", name_of(j)),
                        );
                    }
                }
            }
        }

        let refs: Vec<Value> = active
            .iter()
            .map(|j| {
                json!({
                    "kind": "Job",
                    "namespace": ns,
                    "name": name_of(j),
                    "uid": uid_of(j),
                    "apiVersion": "batch/v1",
                    "resourceVersion": j.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null),
                })
            })
            .collect();
        let mut status = json!({
            "active": if refs.is_empty() { Value::Null } else { Value::Array(refs) },
            "lastScheduleTime": last_schedule.map(rfc3339),
            "lastSuccessfulTime": last_success.map(rfc3339),
        });
        let current = cj.get("status").cloned().unwrap_or(json!({}));
        let same_active = {
            let names = |v: &Value| -> Vec<String> {
                v.as_array()
                    .map(|a| {
                        a.iter()
                            .map(|r| r["uid"].as_str().unwrap_or_default().to_string())
                            .collect()
                    })
                    .unwrap_or_default()
            };
            names(&status["active"]) == names(current.get("active").unwrap_or(&Value::Null))
        };
        if same_active {
            status.as_object_mut().expect("object").remove("active");
        }
        let differs = status
            .as_object()
            .expect("object")
            .iter()
            .any(|(k, v)| current.get(k).unwrap_or(&Value::Null) != v);
        if differs {
            self.client
                .merge_patch_status(
                    &self.cronjobs.def,
                    Some(&ns),
                    name_of(&cj),
                    &json!({"status": status}),
                )
                .await?;
        }
        Ok(requeue)
    }

    fn next_in(&self, cj: &Value, now: Timestamp, tz: &jiff::tz::TimeZone) -> Option<Duration> {
        let schedule = cron::parse(cj["spec"]["schedule"].as_str().unwrap_or_default()).ok()?;
        let next = schedule.next(now, tz)?;
        Some(Duration::from_millis(
            (next.as_millisecond() - now.as_millisecond()).max(0) as u64 + 100,
        ))
    }
}

pub fn start(ctx: Arc<Context>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = ctx.client("cronjob-controller");
    let c = Arc::new(Controller {
        cronjobs: ctx.informers.get(&client.def("batch", "v1", "cronjobs")),
        jobs: ctx.informers.get(&client.def("batch", "v1", "jobs")),
        recorder: Recorder::new(client.clone(), "cronjob-controller"),
        client,
    });
    let queue = Queue::new();
    let mut tasks = Vec::new();
    {
        let c = c.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut cj_rx = c.cronjobs.subscribe();
            let mut jobs_rx = c.jobs.subscribe();
            c.cronjobs.wait_synced().await;
            c.jobs.wait_synced().await;
            for cj in c.cronjobs.list() {
                queue.add(key_of(&cj));
            }
            loop {
                tokio::select! {
                    Some(ch) = cj_rx.recv() => queue.add(key_of(ch.object())),
                    Some(ch) = jobs_rx.recv() => {
                        let j = ch.object();
                        if let Some(o) = controller_of(j).filter(|o| o["kind"] == "CronJob") {
                            queue.add(format!("{}/{}", namespace_of(j), o["name"].as_str().unwrap_or_default()));
                        }
                    }
                    else => return,
                }
            }
        }));
    }
    let c2 = c.clone();
    tasks.extend(spawn_workers(queue, 1, "cronjob-controller", move |key| {
        let c = c2.clone();
        async move { c.sync(key).await }
    }));
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::tz::TimeZone;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn cj(spec: Value, status: Value) -> Value {
        json!({"metadata": {"name": "c", "creationTimestamp": "2026-01-01T00:00:00Z"}, "spec": spec, "status": status})
    }

    #[test]
    fn starts_the_latest_missed_run_once() {
        let c = cj(json!({"schedule": "*/5 * * * *"}), json!({}));
        assert_eq!(
            decide(&c, 0, at("2026-01-01T00:12:00Z"), &TimeZone::UTC),
            Decision::Start {
                scheduled: at("2026-01-01T00:10:00Z"),
                missed: 2
            }
        );
        let done = cj(
            json!({"schedule": "*/5 * * * *"}),
            json!({"lastScheduleTime": "2026-01-01T00:10:00Z"}),
        );
        assert_eq!(
            decide(&done, 0, at("2026-01-01T00:12:00Z"), &TimeZone::UTC),
            Decision::Wait(Some(Duration::from_millis(180_100)))
        );
    }

    #[test]
    fn forbid_skips_while_a_job_runs_and_allow_does_not() {
        let forbid = cj(
            json!({"schedule": "* * * * *", "concurrencyPolicy": "Forbid"}),
            json!({}),
        );
        let now = at("2026-01-01T00:03:10Z");
        assert_eq!(
            decide(&forbid, 1, now, &TimeZone::UTC),
            Decision::Forbidden(at("2026-01-01T00:03:00Z"))
        );
        assert!(matches!(
            decide(&forbid, 0, now, &TimeZone::UTC),
            Decision::Start { .. }
        ));
        let allow = cj(json!({"schedule": "* * * * *"}), json!({}));
        assert!(matches!(
            decide(&allow, 3, now, &TimeZone::UTC),
            Decision::Start { .. }
        ));
    }

    #[test]
    fn starting_deadline_and_suspend() {
        let c = cj(
            json!({"schedule": "0 * * * *", "startingDeadlineSeconds": 60}),
            json!({}),
        );
        assert_eq!(
            decide(&c, 0, at("2026-01-01T05:00:30Z"), &TimeZone::UTC),
            Decision::Start {
                scheduled: at("2026-01-01T05:00:00Z"),
                missed: 1
            }
        );
        // 05:00 is more than 60 s ago and nothing later is due: wait for 06:00.
        assert!(matches!(
            decide(&c, 0, at("2026-01-01T05:30:00Z"), &TimeZone::UTC),
            Decision::Wait(Some(_))
        ));
        let s = cj(json!({"schedule": "* * * * *", "suspend": true}), json!({}));
        assert_eq!(
            decide(&s, 0, at("2026-01-01T05:30:00Z"), &TimeZone::UTC),
            Decision::Wait(None)
        );
    }

    #[test]
    fn job_names_are_minutes_since_the_epoch() {
        assert_eq!(
            job_name("backup", at("2026-01-01T00:10:00Z")),
            "backup-29453770"
        );
    }
}
