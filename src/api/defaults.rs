//! Defaulting of built-in kinds, as upstream's defaulters do (the fields `kubectl get -o yaml`
//! shows that the user did not write).

use serde_json::{json, Map, Value};

fn obj(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    v.as_object_mut().expect("just made an object")
}

fn set_default(m: &mut Map<String, Value>, k: &str, v: Value) {
    match m.get(k) {
        None | Some(Value::Null) => {
            m.insert(k.to_string(), v);
        }
        _ => {}
    }
}

fn image_pull_policy(image: &str) -> &'static str {
    // Digest references and explicit tags other than latest are pulled if missing.
    let name = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        return "IfNotPresent";
    }
    match name.rsplit_once(':') {
        Some((_, tag)) if tag != "latest" => "IfNotPresent",
        _ => "Always",
    }
}

fn default_container(c: &mut Value) {
    let m = obj(c);
    let image = m
        .get("image")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    set_default(m, "imagePullPolicy", json!(image_pull_policy(&image)));
    set_default(m, "terminationMessagePath", json!("/dev/termination-log"));
    set_default(m, "terminationMessagePolicy", json!("File"));
    set_default(m, "resources", json!({}));
    if let Some(ports) = m.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports {
            set_default(obj(p), "protocol", json!("TCP"));
        }
    }
    if let Some(env) = m.get_mut("env").and_then(Value::as_array_mut) {
        for e in env {
            if let Some(fr) = e.get_mut("valueFrom").and_then(|v| v.get_mut("fieldRef")) {
                set_default(obj(fr), "apiVersion", json!("v1"));
            }
        }
    }
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = m.get_mut(probe).filter(|p| p.is_object()) {
            let pm = obj(p);
            set_default(pm, "timeoutSeconds", json!(1));
            set_default(pm, "periodSeconds", json!(10));
            set_default(pm, "successThreshold", json!(1));
            set_default(pm, "failureThreshold", json!(3));
            if let Some(h) = pm.get_mut("httpGet").filter(|h| h.is_object()) {
                set_default(obj(h), "path", json!("/"));
                set_default(obj(h), "scheme", json!("HTTP"));
            }
        }
    }
}

pub fn default_pod_spec(spec: &mut Value) {
    let m = obj(spec);
    set_default(m, "restartPolicy", json!("Always"));
    set_default(m, "terminationGracePeriodSeconds", json!(30));
    set_default(m, "dnsPolicy", json!("ClusterFirst"));
    set_default(m, "securityContext", json!({}));
    set_default(m, "schedulerName", json!("default-scheduler"));
    if m.get("serviceAccountName").is_some() && m.get("serviceAccount").is_none() {
        let sa = m["serviceAccountName"].clone();
        m.insert("serviceAccount".into(), sa);
    }
    set_default(m, "enableServiceLinks", json!(true));
    if let Some(vols) = m.get_mut("volumes").and_then(Value::as_array_mut) {
        for v in vols {
            let vm = obj(v);
            for k in ["configMap", "secret", "projected", "downwardAPI"] {
                if let Some(src) = vm.get_mut(k).filter(|s| s.is_object()) {
                    set_default(obj(src), "defaultMode", json!(420));
                }
            }
            if let Some(src) = vm.get_mut("hostPath").filter(|s| s.is_object()) {
                set_default(obj(src), "type", json!(""));
            }
        }
    }
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        if let Some(cs) = m.get_mut(list).and_then(Value::as_array_mut) {
            for c in cs {
                default_container(c);
            }
        }
    }
}

fn default_template(tmpl: &mut Value) {
    let t = obj(tmpl);
    if let Some(spec) = t.get_mut("spec") {
        default_pod_spec(spec);
    }
    let md = t.entry("metadata").or_insert_with(|| json!({}));
    let _ = md;
}

/// Applies upstream's defaults for `group`/`kind` to `o` in place.
pub fn apply(group: &str, kind: &str, o: &mut Value) {
    match (group, kind) {
        ("", "Pod") => {
            let m = obj(o);
            let spec = m.entry("spec").or_insert_with(|| json!({}));
            default_pod_spec(spec);
        }
        ("", "PodTemplate") => {
            if let Some(t) = o.get_mut("template") {
                default_template(t);
            }
        }
        ("apps", "Deployment") => {
            let spec = obj(o).entry("spec").or_insert_with(|| json!({}));
            let s = obj(spec);
            set_default(s, "replicas", json!(1));
            set_default(s, "revisionHistoryLimit", json!(10));
            set_default(s, "progressDeadlineSeconds", json!(600));
            let strategy = s.entry("strategy").or_insert_with(|| json!({}));
            let st = obj(strategy);
            set_default(st, "type", json!("RollingUpdate"));
            if st.get("type").and_then(Value::as_str) == Some("RollingUpdate") {
                let ru = st.entry("rollingUpdate").or_insert_with(|| json!({}));
                set_default(obj(ru), "maxUnavailable", json!("25%"));
                set_default(obj(ru), "maxSurge", json!("25%"));
            }
            if let Some(t) = s.get_mut("template") {
                default_template(t);
            }
        }
        ("apps", "ReplicaSet") | ("", "ReplicationController") => {
            let spec = obj(o).entry("spec").or_insert_with(|| json!({}));
            let s = obj(spec);
            set_default(s, "replicas", json!(1));
            if kind == "ReplicationController" {
                // The selector defaults to the template's labels.
                let labels = s
                    .get("template")
                    .and_then(|t| t.pointer("/metadata/labels"))
                    .cloned();
                if let Some(l) = labels {
                    set_default(s, "selector", l);
                }
            }
            if let Some(t) = s.get_mut("template") {
                default_template(t);
            }
        }
        ("apps", "StatefulSet") => {
            let spec = obj(o).entry("spec").or_insert_with(|| json!({}));
            let s = obj(spec);
            set_default(s, "replicas", json!(1));
            set_default(s, "podManagementPolicy", json!("OrderedReady"));
            set_default(s, "revisionHistoryLimit", json!(10));
            set_default(
                s,
                "updateStrategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
            );
            set_default(
                s,
                "persistentVolumeClaimRetentionPolicy",
                json!({"whenDeleted": "Retain", "whenScaled": "Retain"}),
            );
            if let Some(t) = s.get_mut("template") {
                default_template(t);
            }
        }
        ("apps", "DaemonSet") => {
            let spec = obj(o).entry("spec").or_insert_with(|| json!({}));
            let s = obj(spec);
            set_default(s, "revisionHistoryLimit", json!(10));
            set_default(
                s,
                "updateStrategy",
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}),
            );
            if let Some(t) = s.get_mut("template") {
                default_template(t);
            }
        }
        ("batch", "Job") => {
            let spec = obj(o).entry("spec").or_insert_with(|| json!({}));
            let s = obj(spec);
            let completions_set = s.get("completions").is_some_and(|v| !v.is_null());
            set_default(s, "parallelism", json!(1));
            if !completions_set && s.get("parallelism").and_then(Value::as_i64) == Some(1) {
                s.insert("completions".into(), json!(1));
            }
            set_default(s, "backoffLimit", json!(6));
            set_default(s, "completionMode", json!("NonIndexed"));
            set_default(s, "suspend", json!(false));
            set_default(s, "manualSelector", json!(false));
            set_default(s, "podReplacementPolicy", json!("TerminatingOrFailed"));
            if let Some(t) = s.get_mut("template") {
                default_template(t);
            }
        }
        ("batch", "CronJob") => {
            let spec = obj(o).entry("spec").or_insert_with(|| json!({}));
            let s = obj(spec);
            set_default(s, "concurrencyPolicy", json!("Allow"));
            set_default(s, "suspend", json!(false));
            set_default(s, "successfulJobsHistoryLimit", json!(3));
            set_default(s, "failedJobsHistoryLimit", json!(1));
            if let Some(js) = s.get_mut("jobTemplate").and_then(|j| j.get_mut("spec")) {
                let mut job = json!({"spec": js.take()});
                apply("batch", "Job", &mut job);
                // The selector and manualSelector are set by the job controller, not here.
                if let Some(m) = job["spec"].as_object_mut() {
                    m.remove("manualSelector");
                }
                *js = job["spec"].take();
            }
        }
        ("", "Service") => {
            let spec = obj(o).entry("spec").or_insert_with(|| json!({}));
            let s = obj(spec);
            set_default(s, "type", json!("ClusterIP"));
            set_default(s, "sessionAffinity", json!("None"));
            let ty = s
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("ClusterIP")
                .to_string();
            if ty != "ExternalName" {
                set_default(s, "internalTrafficPolicy", json!("Cluster"));
            }
            if ty == "NodePort" || ty == "LoadBalancer" {
                set_default(s, "externalTrafficPolicy", json!("Cluster"));
            }
            if let Some(ports) = s.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports {
                    let pm = obj(p);
                    set_default(pm, "protocol", json!("TCP"));
                    if let Some(port) = pm.get("port").cloned() {
                        set_default(pm, "targetPort", port);
                    }
                }
            }
        }
        ("", "Secret") => {
            let m = obj(o);
            set_default(m, "type", json!("Opaque"));
            // stringData is write-only: it is merged into data, base64-encoded.
            if let Some(Value::Object(sd)) = m.remove("stringData") {
                use base64::Engine;
                let data = m.entry("data").or_insert_with(|| json!({}));
                for (k, v) in sd {
                    let raw = v.as_str().unwrap_or_default();
                    obj(data).insert(
                        k,
                        json!(base64::engine::general_purpose::STANDARD.encode(raw)),
                    );
                }
            }
        }
        ("", "Namespace") => {
            let name = o
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if !name.is_empty() {
                let md = obj(o).entry("metadata").or_insert_with(|| json!({}));
                let labels = obj(md).entry("labels").or_insert_with(|| json!({}));
                obj(labels).insert("kubernetes.io/metadata.name".into(), json!(name));
            }
            let m = obj(o);
            let spec = m.entry("spec").or_insert_with(|| json!({}));
            set_default(obj(spec), "finalizers", json!(["kubernetes"]));
            let status = m.entry("status").or_insert_with(|| json!({}));
            set_default(obj(status), "phase", json!("Active"));
        }
        ("", "PersistentVolumeClaim") => {
            let spec = obj(o).entry("spec").or_insert_with(|| json!({}));
            set_default(obj(spec), "volumeMode", json!("Filesystem"));
            let status = obj(o).entry("status").or_insert_with(|| json!({}));
            set_default(obj(status), "phase", json!("Pending"));
        }
        ("", "PersistentVolume") => {
            let spec = obj(o).entry("spec").or_insert_with(|| json!({}));
            set_default(obj(spec), "persistentVolumeReclaimPolicy", json!("Retain"));
            set_default(obj(spec), "volumeMode", json!("Filesystem"));
            let status = obj(o).entry("status").or_insert_with(|| json!({}));
            set_default(obj(status), "phase", json!("Pending"));
        }
        ("storage.k8s.io", "StorageClass") => {
            let m = obj(o);
            set_default(m, "reclaimPolicy", json!("Delete"));
            set_default(m, "volumeBindingMode", json!("Immediate"));
        }
        ("networking.k8s.io", "NetworkPolicy") => {
            let spec = obj(o).entry("spec").or_insert_with(|| json!({}));
            set_default(obj(spec), "policyTypes", json!(["Ingress"]));
        }
        ("policy", "PodDisruptionBudget") => {}
        ("scheduling.k8s.io", "PriorityClass") => {
            set_default(obj(o), "preemptionPolicy", json!("PreemptLowerPriority"))
        }
        ("rbac.authorization.k8s.io", _) => {}
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_get_upstream_defaults() {
        let mut p = json!({"spec": {"containers": [{"name": "c", "image": "nginx", "ports": [{"containerPort": 80}]}, {"name": "d", "image": "busybox:1.36"}]}});
        apply("", "Pod", &mut p);
        assert_eq!(p["spec"]["restartPolicy"], "Always");
        assert_eq!(p["spec"]["dnsPolicy"], "ClusterFirst");
        assert_eq!(p["spec"]["terminationGracePeriodSeconds"], 30);
        assert_eq!(p["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(
            p["spec"]["containers"][1]["imagePullPolicy"],
            "IfNotPresent"
        );
        assert_eq!(p["spec"]["containers"][0]["ports"][0]["protocol"], "TCP");
    }

    #[test]
    fn deployments_and_services_get_upstream_defaults() {
        let mut d = json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x:1"}]}}}});
        apply("apps", "Deployment", &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(
            d["spec"]["template"]["spec"]["schedulerName"],
            "default-scheduler"
        );
        let mut s = json!({"spec": {"ports": [{"port": 80}]}});
        apply("", "Service", &mut s);
        assert_eq!(s["spec"]["type"], "ClusterIP");
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 80);
    }
}
