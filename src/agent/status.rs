//! Pod status as upstream's kubelet reports it, computed from what the runtime says about each
//! container (pure: unit-tested without containers).

use k3rs_runtime::shim::{ContainerState, ContainerStatus};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

/// What the kubelet knows about one container of the pod.
#[derive(Debug, Clone, Default)]
pub struct ContainerView {
    pub name: String,
    pub image: String,
    pub image_id: String,
    /// The latest attempt, if any was created.
    pub current: Option<ContainerStatus>,
    /// The attempt before it (for lastState).
    pub previous: Option<ContainerStatus>,
    /// Why the container is not running (ContainerCreating, ErrImagePull, CrashLoopBackOff…).
    pub waiting: Option<(String, String)>,
    pub ready: bool,
    pub started: bool,
}

fn terminated(c: &ContainerStatus) -> Value {
    let mut t = json!({
        "exitCode": c.exit_code.unwrap_or(0),
        "reason": c.reason.clone().unwrap_or_else(|| if c.exit_code == Some(0) { "Completed".into() } else { "Error".into() }),
        "startedAt": c.started_at.clone().or_else(|| Some(c.created_at.clone())),
        "finishedAt": c.finished_at,
        "containerID": format!("k3rs://{}", c.id),
    });
    if let Some(m) = c.message.as_ref().filter(|m| !m.is_empty()) {
        t["message"] = json!(m);
    }
    if let Some(code) = c.exit_code {
        if code > 128 && code - 128 < 65 {
            t["signal"] = json!(code - 128);
        }
    }
    json!({ "terminated": t })
}

/// One entry of containerStatuses / initContainerStatuses.
pub fn container_status(v: &ContainerView) -> Value {
    let state = match (&v.waiting, &v.current) {
        (Some((reason, message)), _) => {
            let mut w = json!({"reason": reason});
            if !message.is_empty() {
                w["message"] = json!(message);
            }
            json!({ "waiting": w })
        }
        (None, Some(c)) => match c.state {
            ContainerState::Running => json!({"running": {"startedAt": c.started_at}}),
            ContainerState::Exited => terminated(c),
            ContainerState::Created => json!({"waiting": {"reason": "ContainerCreating"}}),
        },
        (None, None) => json!({"waiting": {"reason": "ContainerCreating"}}),
    };
    // When waiting to restart, lastState is the attempt that just ended.
    let last = if v.waiting.is_some() {
        v.current
            .as_ref()
            .filter(|c| c.state == ContainerState::Exited)
            .or(v.previous.as_ref())
    } else {
        v.previous.as_ref()
    };
    // As upstream: the attempt number of the latest container, also while it waits to restart.
    let restart_count = v.current.as_ref().map(|c| c.attempt).unwrap_or(0);
    let mut s = json!({
        "name": v.name,
        "state": state,
        "lastState": last.map(terminated).unwrap_or_else(|| json!({})),
        "ready": v.ready,
        "restartCount": restart_count,
        "image": v.image,
        "imageID": v.image_id,
        "started": v.started,
    });
    if let Some(c) = &v.current {
        s["containerID"] = json!(format!("k3rs://{}", c.id));
    }
    s
}

/// Inputs for the whole pod's status.
#[derive(Debug, Clone, Default)]
pub struct PodView {
    pub init: Vec<ContainerView>,
    pub containers: Vec<ContainerView>,
    /// Ephemeral (debug) containers: reported, never part of readiness or the phase.
    pub ephemeral: Vec<ContainerView>,
    pub sandbox_ready: bool,
    pub pod_ip: Option<String>,
    pub host_ip: String,
    pub start_time: String,
    pub qos_class: String,
    /// A terminal phase decided elsewhere (eviction, deadline), with reason and message.
    pub forced: Option<(String, String, String)>,
}

fn exited(c: &ContainerView) -> Option<i32> {
    c.current
        .as_ref()
        .filter(|s| s.state == ContainerState::Exited)
        .and_then(|s| s.exit_code)
}

fn running(c: &ContainerView) -> bool {
    c.current
        .as_ref()
        .is_some_and(|s| s.state == ContainerState::Running)
}

/// The pod phase, as upstream's getPhase.
pub fn phase(restart_policy: &str, v: &PodView) -> &'static str {
    if let Some((p, _, _)) = &v.forced {
        return if p == "Failed" { "Failed" } else { "Succeeded" };
    }
    // Init containers not done → Pending (unless one failed for good).
    for c in &v.init {
        match exited(c) {
            Some(0) => continue,
            Some(_) if restart_policy == "Never" && c.waiting.is_none() => return "Failed",
            _ => return "Pending",
        }
    }
    let (mut run, mut waiting, mut stopped, mut succeeded, mut unknown) = (0, 0, 0, 0, 0);
    for c in &v.containers {
        if running(c) && c.waiting.is_none() {
            run += 1;
        } else if let Some(code) = exited(c).filter(|_| c.waiting.is_none()) {
            stopped += 1;
            if code == 0 {
                succeeded += 1;
            }
        } else if c.waiting.is_some() && c.current.is_some() {
            // Restarting after an exit: counts as running for the phase.
            run += 1;
        } else if c.current.is_none() || c.waiting.is_some() {
            waiting += 1;
        } else {
            unknown += 1;
        }
    }
    let n = v.containers.len();
    if waiting > 0 || unknown > 0 {
        return "Pending";
    }
    if run > 0 {
        return "Running";
    }
    if stopped == n && n > 0 {
        return match restart_policy {
            "Always" => "Running",
            "OnFailure" if succeeded == stopped => "Succeeded",
            "OnFailure" => "Running",
            _ if succeeded == stopped => "Succeeded",
            _ => "Failed",
        };
    }
    "Pending"
}

fn cond(kind: &str, ok: bool, reason: Option<&str>, message: Option<String>, old: &Pod) -> Value {
    let status = if ok { "True" } else { "False" };
    let prev = old
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == kind));
    let transition = match prev {
        Some(p) if p.status == status => p
            .last_transition_time
            .as_ref()
            .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_else(super::now_rfc3339),
        _ => super::now_rfc3339(),
    };
    let mut c = json!({
        "type": kind,
        "status": status,
        "lastProbeTime": null,
        "lastTransitionTime": transition,
    });
    if let Some(r) = reason {
        c["reason"] = json!(r);
    }
    if let Some(m) = message {
        c["message"] = json!(m);
    }
    c
}

/// The whole status object to patch onto the pod.
pub fn pod_status(pod: &Pod, v: &PodView) -> Value {
    let spec = pod.spec.clone().unwrap_or_default();
    let policy = spec
        .restart_policy
        .clone()
        .unwrap_or_else(|| "Always".into());
    let phase = phase(&policy, v);
    let init_done = v
        .init
        .iter()
        .all(|c| exited(c) == Some(0) && c.waiting.is_none());
    let pending_init: Vec<String> = v
        .init
        .iter()
        .filter(|c| !(exited(c) == Some(0) && c.waiting.is_none()))
        .map(|c| c.name.clone())
        .collect();
    let unready: Vec<String> = v
        .containers
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.name.clone())
        .collect();
    let terminal = phase == "Succeeded" || phase == "Failed";
    let mut conditions = vec![];
    conditions.push(cond(
        "PodReadyToStartContainers",
        v.sandbox_ready,
        None,
        None,
        pod,
    ));
    conditions.push(if init_done {
        cond("Initialized", true, None, None, pod)
    } else {
        cond(
            "Initialized",
            false,
            Some("ContainersNotInitialized"),
            Some(format!(
                "containers with incomplete status: [{}]",
                pending_init.join(" ")
            )),
            pod,
        )
    });
    let (ready, reason, message) = if terminal && phase == "Succeeded" {
        (false, Some("PodCompleted"), None)
    } else if unready.is_empty() {
        (true, None, None)
    } else {
        (
            false,
            Some("ContainersNotReady"),
            Some(format!(
                "containers with unready status: [{}]",
                unready.join(" ")
            )),
        )
    };
    conditions.push(cond("ContainersReady", ready, reason, message.clone(), pod));
    conditions.push(cond("Ready", ready, reason, message, pod));
    // PodScheduled belongs to the scheduler: keep it as it is.
    if let Some(cs) = pod.status.as_ref().and_then(|s| s.conditions.as_ref()) {
        for c in cs {
            if c.type_ == "PodScheduled" || c.type_ == "DisruptionTarget" {
                conditions.push(serde_json::to_value(c).unwrap_or(Value::Null));
            }
        }
    }
    let mut s = json!({
        "phase": phase,
        "conditions": conditions,
        "hostIP": v.host_ip,
        "hostIPs": [{"ip": v.host_ip}],
        "startTime": v.start_time,
        "qosClass": v.qos_class,
        "containerStatuses": v.containers.iter().map(container_status).collect::<Vec<_>>(),
    });
    if !v.init.is_empty() {
        s["initContainerStatuses"] = json!(v.init.iter().map(container_status).collect::<Vec<_>>());
    }
    if !v.ephemeral.is_empty() {
        s["ephemeralContainerStatuses"] =
            json!(v.ephemeral.iter().map(container_status).collect::<Vec<_>>());
    }
    if let Some(ip) = &v.pod_ip {
        s["podIP"] = json!(ip);
        s["podIPs"] = json!([{"ip": ip}]);
    }
    if let Some((_, reason, message)) = &v.forced {
        s["reason"] = json!(reason);
        s["message"] = json!(message);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn st(attempt: u32, state: ContainerState, code: Option<i32>) -> ContainerStatus {
        ContainerStatus {
            name: "c".into(),
            attempt,
            id: format!("id{attempt}"),
            state,
            pid: None,
            created_at: "2026-01-01T00:00:00Z".into(),
            started_at: Some("2026-01-01T00:00:01Z".into()),
            finished_at: code.map(|_| "2026-01-01T00:00:02Z".into()),
            exit_code: code,
            reason: None,
            message: None,
            log_path: Default::default(),
            annotations: BTreeMap::new(),
        }
    }

    fn view(current: Option<ContainerStatus>, waiting: Option<(&str, &str)>) -> ContainerView {
        ContainerView {
            name: "c".into(),
            current,
            waiting: waiting.map(|(a, b)| (a.into(), b.into())),
            ..Default::default()
        }
    }

    fn pv(containers: Vec<ContainerView>) -> PodView {
        PodView {
            containers,
            ..Default::default()
        }
    }

    #[test]
    fn phases_follow_restart_policy() {
        let exited0 = view(Some(st(0, ContainerState::Exited, Some(0))), None);
        let exited3 = view(Some(st(0, ContainerState::Exited, Some(3))), None);
        let running = view(Some(st(0, ContainerState::Running, None)), None);
        let creating = view(None, Some(("ContainerCreating", "")));
        let backoff = view(
            Some(st(1, ContainerState::Exited, Some(1))),
            Some(("CrashLoopBackOff", "back-off")),
        );
        assert_eq!(phase("Always", &pv(vec![creating.clone()])), "Pending");
        assert_eq!(
            phase("Always", &pv(vec![running.clone(), creating])),
            "Pending"
        );
        assert_eq!(phase("Always", &pv(vec![running])), "Running");
        assert_eq!(phase("Never", &pv(vec![exited0.clone()])), "Succeeded");
        assert_eq!(phase("Never", &pv(vec![exited3.clone()])), "Failed");
        assert_eq!(phase("OnFailure", &pv(vec![exited0])), "Succeeded");
        assert_eq!(phase("Always", &pv(vec![backoff])), "Running");
        let mut init = pv(vec![view(None, Some(("PodInitializing", "")))]);
        init.init = vec![view(Some(st(0, ContainerState::Exited, Some(2))), None)];
        assert_eq!(phase("Never", &init), "Failed");
        assert_eq!(phase("Always", &init), "Pending");
    }

    #[test]
    fn crash_loop_status_shows_last_state_and_restart_count() {
        let v = view(
            Some(st(2, ContainerState::Exited, Some(1))),
            Some((
                "CrashLoopBackOff",
                "back-off 20s restarting failed container=c pod=p_ns(u)",
            )),
        );
        let s = container_status(&v);
        assert_eq!(s["restartCount"], 2);
        assert_eq!(s["state"]["waiting"]["reason"], "CrashLoopBackOff");
        assert_eq!(s["lastState"]["terminated"]["exitCode"], 1);
        assert_eq!(s["lastState"]["terminated"]["reason"], "Error");
        let done = container_status(&view(Some(st(0, ContainerState::Exited, Some(0))), None));
        assert_eq!(done["state"]["terminated"]["reason"], "Completed");
        assert_eq!(done["restartCount"], 0);
        assert_eq!(done["containerID"], "k3rs://id0");
    }

    #[test]
    fn readiness_conditions_name_unready_containers() {
        let pod: Pod = serde_json::from_value(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]},
            "status": {"conditions": [{"type": "PodScheduled", "status": "True"}]}}),
        )
        .unwrap();
        let mut v = pv(vec![view(Some(st(0, ContainerState::Running, None)), None)]);
        v.sandbox_ready = true;
        let s = pod_status(&pod, &v);
        let c = |k: &str| {
            s["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == k)
                .unwrap()
                .clone()
        };
        assert_eq!(c("Ready")["status"], "False");
        assert_eq!(c("Ready")["message"], "containers with unready status: [c]");
        assert_eq!(c("PodScheduled")["status"], "True");
        assert_eq!(c("PodReadyToStartContainers")["status"], "True");
        v.containers[0].ready = true;
        let s = pod_status(&pod, &v);
        let ready = s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap()
            .clone();
        assert_eq!(ready["status"], "True");
        assert_eq!(s["phase"], "Running");
    }
}
