//! Deployments, Jobs and CronJobs on hollow nodes, driven through kubectl as a user would.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;

use crate::cluster::Cluster;
use crate::hollow::{jsonpath, wait_for, Hollow};

const LONG: Duration = Duration::from_secs(90);

fn ready_and_live(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Watches the pods matching `selector` and records the fewest that were ready (and not
/// terminating) at any point after the initial list, until `stop` is set.
fn watch_min_ready(
    c: &Cluster,
    selector: &str,
    stop: Arc<AtomicBool>,
) -> (std::thread::JoinHandle<()>, Arc<AtomicUsize>) {
    let kubeconfig = c.kubeconfig();
    let selector = selector.to_string();
    let min = Arc::new(AtomicUsize::new(usize::MAX));
    let min2 = min.clone();
    let (synced_tx, synced_rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap();
            let client = kube::Client::try_from(cfg).unwrap();
            let api: kube::Api<Pod> = kube::Api::namespaced(client, "default");
            let mut stream = watcher(api, watcher::Config::default().labels(&selector)).boxed();
            let mut pods: BTreeMap<String, bool> = BTreeMap::new();
            let mut init: BTreeMap<String, bool> = BTreeMap::new();
            let mut synced = false;
            while !stop.load(Ordering::SeqCst) {
                let ev = match tokio::time::timeout(Duration::from_millis(200), stream.next()).await
                {
                    Ok(Some(Ok(ev))) => ev,
                    Ok(Some(Err(e))) => panic!("watch failed: {e}"),
                    Ok(None) => break,
                    Err(_) => continue,
                };
                match ev {
                    watcher::Event::Init => init.clear(),
                    watcher::Event::InitApply(p) => {
                        init.insert(p.metadata.name.clone().unwrap(), ready_and_live(&p));
                    }
                    watcher::Event::InitDone => {
                        pods = std::mem::take(&mut init);
                        if !synced {
                            synced = true;
                            let _ = synced_tx.send(());
                        }
                    }
                    watcher::Event::Apply(p) => {
                        pods.insert(p.metadata.name.clone().unwrap(), ready_and_live(&p));
                    }
                    watcher::Event::Delete(p) => {
                        pods.remove(p.metadata.name.as_ref().unwrap());
                    }
                }
                if synced {
                    let ready = pods.values().filter(|r| **r).count();
                    min2.fetch_min(ready, Ordering::SeqCst);
                }
            }
        });
    });
    synced_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("pod watch synced");
    (h, min)
}

#[test]
fn deployment_scales_rolls_out_within_max_unavailable_and_rolls_back() {
    let c = Cluster::start();
    let _nodes = Hollow::start(&c, &["n1", "n2", "n3"], &["--startup-delay-ms", "200"]);
    c.ok(&[
        "create",
        "deployment",
        "web",
        "--image=nginx:1.27",
        "--replicas=3",
    ]);
    c.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    c.ok(&["scale", "deployment/web", "--replicas=6"]);
    let out = c.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
    assert_eq!(
        jsonpath(&c, &["deployment", "web"], "{.status.readyReplicas}"),
        "6"
    );

    // 6 replicas with the default 25 %: at most 1 unavailable, at most 2 surge.
    let stop = Arc::new(AtomicBool::new(false));
    let (watcher, min_ready) = watch_min_ready(&c, "app=web", stop.clone());
    c.ok(&["set", "image", "deployment/web", "nginx=nginx:1.28"]);
    let out = c.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let min = min_ready.load(Ordering::SeqCst);
    assert!(
        min >= 5,
        "a rollout of 6 replicas with maxUnavailable 1 went down to {min} ready pods"
    );
    let images = jsonpath(
        &c,
        &["pods", "-l", "app=web"],
        "{range .items[*]}{.spec.containers[0].image}{\"\\n\"}{end}",
    );
    assert_eq!(
        images.lines().filter(|l| *l == "nginx:1.28").count(),
        6,
        "{images}"
    );

    // Two ReplicaSets: the old one scaled to 0.
    let rs = jsonpath(
        &c,
        &["rs", "-l", "app=web"],
        "{range .items[*]}{.spec.template.spec.containers[0].image}={.spec.replicas}{\"\\n\"}{end}",
    );
    let mut rs: Vec<&str> = rs.lines().collect();
    rs.sort();
    assert_eq!(rs, vec!["nginx:1.27=0", "nginx:1.28=6"]);

    let history = c.ok(&["rollout", "history", "deployment/web"]);
    let revisions: Vec<&str> = history
        .lines()
        .skip_while(|l| !l.starts_with("REVISION"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(revisions, vec!["1", "2"], "{history}");

    let out = c.ok(&["rollout", "undo", "deployment/web"]);
    assert!(out.contains("rolled back"), "{out}");
    c.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    assert_eq!(
        jsonpath(
            &c,
            &["deployment", "web"],
            "{.spec.template.spec.containers[0].image}"
        ),
        "nginx:1.27"
    );
    let history = c.ok(&["rollout", "history", "deployment/web"]);
    assert!(
        history.contains("\n2 ") && history.contains("\n3 ") && !history.contains("\n1 "),
        "undo makes revision 1 the new revision 3:\n{history}"
    );
    let out = c.ok(&["rollout", "undo", "deployment/web", "--to-revision=2"]);
    assert!(out.contains("rolled back"), "{out}");
    c.ok(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    assert_eq!(
        jsonpath(
            &c,
            &["deployment", "web"],
            "{.spec.template.spec.containers[0].image}"
        ),
        "nginx:1.28"
    );
    let events = c.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.kind=Deployment",
    ]);
    assert!(events.contains("ScalingReplicaSet"), "{events}");
}

#[test]
fn job_with_failing_pods_backs_off_and_fails_at_backoff_limit() {
    let c = Cluster::start();
    let _nodes = Hollow::start(&c, &["n1"], &[]);
    c.ok_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: batch/v1
kind: Job
metadata: {name: flaky}
spec:
  backoffLimit: 1
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: busybox, command: [sh, -c, "exit 3"]}]
"#,
    );
    wait_for(&c, "job flaky Failed", LONG, || {
        jsonpath(
            &c,
            &["job", "flaky"],
            "{.status.conditions[?(@.type==\"Failed\")].reason}",
        ) == "BackoffLimitExceeded"
    });
    assert_eq!(jsonpath(&c, &["job", "flaky"], "{.status.failed}"), "2");
    // Two pods ran, the second one after a back-off of about 10 s.
    let starts = jsonpath(
        &c,
        &[
            "pods",
            "-l",
            "job-name=flaky",
            "--sort-by=.metadata.creationTimestamp",
        ],
        "{range .items[*]}{.metadata.creationTimestamp}{\"\\n\"}{end}",
    );
    let starts: Vec<jiff::Timestamp> = starts.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(starts.len(), 2, "{starts:?}");
    let gap = starts[1].as_second() - starts[0].as_second();
    assert!(
        gap >= 8,
        "the retry came {gap}s after the first pod, not after back-off"
    );
    let out = c.ok(&["get", "job", "flaky"]);
    assert!(out.contains("Failed") && out.contains("0/1"), "{out}");
    let events = c.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=flaky",
    ]);
    assert!(events.contains("BackoffLimitExceeded"), "{events}");
}

#[test]
fn indexed_job_completes_every_index_within_parallelism() {
    let c = Cluster::start();
    let _nodes = Hollow::start(&c, &["n1", "n2"], &[]);
    c.ok_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: batch/v1
kind: Job
metadata: {name: indexed}
spec:
  completions: 4
  parallelism: 2
  completionMode: Indexed
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: busybox, command: [sh, -c, "sleep 1"]}]
"#,
    );
    c.ok(&[
        "wait",
        "--for=condition=Complete",
        "job/indexed",
        "--timeout=90s",
    ]);
    assert_eq!(
        jsonpath(&c, &["job", "indexed"], "{.status.completedIndexes}"),
        "0-3"
    );
    let pods = jsonpath(
        &c,
        &["pods", "-l", "job-name=indexed"],
        "{range .items[*]}{.metadata.annotations.batch\\.kubernetes\\.io/job-completion-index} {.spec.hostname} {.spec.containers[0].env[0].name}{\"\\n\"}{end}",
    );
    let mut lines: Vec<&str> = pods.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            "0 indexed-0 JOB_COMPLETION_INDEX",
            "1 indexed-1 JOB_COMPLETION_INDEX",
            "2 indexed-2 JOB_COMPLETION_INDEX",
            "3 indexed-3 JOB_COMPLETION_INDEX"
        ]
    );
    let out = c.ok(&["get", "job", "indexed"]);
    assert!(out.contains("Complete") && out.contains("4/4"), "{out}");
}

/// Job names carry the schedule time in minutes (as upstream), so a CronJob runs at most once a
/// minute: this test takes two to three minutes of wall time.
#[test]
fn cronjob_fires_on_schedule_honours_forbid_and_keeps_history_limits() {
    let c = Cluster::start();
    let _nodes = Hollow::start(&c, &["n1"], &[]);
    c.ok_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: batch/v1
kind: CronJob
metadata: {name: tick}
spec:
  schedule: "* * * * *"
  concurrencyPolicy: Forbid
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: c, image: busybox, command: [sh, -c, "sleep 600"]}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: quick}
spec:
  schedule: "*/1 * * * *"
  successfulJobsHistoryLimit: 1
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: c, image: busybox, command: ["true"]}]
"#,
    );
    let minutes = Duration::from_secs(200);
    wait_for(&c, "the first scheduled run", minutes, || {
        jsonpath(&c, &["cronjob", "tick"], "{.status.active[0].kind}") == "Job"
    });
    assert!(!jsonpath(&c, &["cronjob", "tick"], "{.status.lastScheduleTime}").is_empty());
    wait_for(&c, "Forbid to skip the next run", minutes, || {
        c.ok(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=tick",
        ])
        .contains("JobAlreadyActive")
    });
    let jobs = jsonpath(
        &c,
        &["jobs"],
        "{range .items[*]}{.metadata.name}{\"\\n\"}{end}",
    );
    let ticks: Vec<&str> = jobs.lines().filter(|l| l.starts_with("tick-")).collect();
    assert_eq!(ticks.len(), 1, "Forbid ran two jobs at once: {jobs}");
    let out = c.ok(&["get", "cronjob", "tick"]);
    assert!(out.contains("* * * * *") && out.contains("False"), "{out}");

    // Allow with short jobs: each minute a run; only the newest success is kept.
    wait_for(
        &c,
        "the older successful run to be cleaned up",
        minutes,
        || {
            c.ok(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=quick",
            ])
            .contains("SuccessfulDelete")
        },
    );
    assert!(!jsonpath(&c, &["cronjob", "quick"], "{.status.lastSuccessfulTime}").is_empty());
    let events = c.ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=quick",
    ]);
    assert!(events.contains("SawCompletedJob"), "{events}");
    wait_for(&c, "one quick job to remain", LONG, || {
        jsonpath(
            &c,
            &["jobs"],
            "{range .items[*]}{.metadata.name}{\"\\n\"}{end}",
        )
        .lines()
        .filter(|l| l.starts_with("quick-"))
        .count()
            == 1
    });
}
