//! Validation of objects on create and update, with upstream's messages: object names,
//! labels and annotations, required and immutable fields of the common kinds.

use serde_json::{json, Value};

use crate::api::status::Cause;

pub const DNS1123_LABEL_ERR: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
pub const DNS1123_SUBDOMAIN_ERR: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const DNS1035_LABEL_ERR: &str = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')";
const QUALIFIED_NAME_ERR: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const LABEL_VALUE_ERR: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";

pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

pub fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// The name part of a qualified name (label keys, label values when non-empty).
pub fn is_qualified_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

fn qualified_name_causes(field: &str, key: &str, out: &mut Vec<Cause>) {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if !is_dns1123_subdomain(p) {
            out.push(Cause::invalid(
                field,
                &json!(key),
                &format!("prefix part {DNS1123_SUBDOMAIN_ERR}"),
            ));
        }
    }
    if name.is_empty() {
        out.push(Cause::invalid(
            field,
            &json!(key),
            "name part must be non-empty",
        ));
    } else if name.len() > 63 {
        out.push(Cause::invalid(
            field,
            &json!(key),
            "name part must be no more than 63 characters",
        ));
    } else if !is_qualified_name_part(name) {
        out.push(Cause::invalid(field, &json!(key), QUALIFIED_NAME_ERR));
    }
}

/// Which name rule a kind's objects follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    Subdomain,
    Label,
    Dns1035,
    /// Any non-empty name without '/' or '%' (paths), e.g. RBAC objects.
    Path,
}

pub fn name_rule(group: &str, kind: &str) -> NameRule {
    match (group, kind) {
        ("", "Namespace") | ("", "Service") => {
            if kind == "Service" {
                NameRule::Dns1035
            } else {
                NameRule::Label
            }
        }
        ("rbac.authorization.k8s.io", _) => NameRule::Path,
        ("apps", "Deployment") | ("apps", "StatefulSet") | ("batch", "CronJob") => {
            NameRule::Subdomain
        }
        _ => NameRule::Subdomain,
    }
}

/// Validates `metadata` of a new or updated object.
pub fn validate_metadata(obj: &Value, rule: NameRule, namespaced: bool, out: &mut Vec<Cause>) {
    let meta = &obj["metadata"];
    let name = meta["name"].as_str().unwrap_or_default();
    let generate = meta["generateName"].as_str().unwrap_or_default();
    if name.is_empty() {
        if generate.is_empty() {
            out.push(Cause::required(
                "metadata.name",
                "name or generateName is required",
            ));
        }
    } else {
        let (ok, msg) = match rule {
            NameRule::Subdomain => (is_dns1123_subdomain(name), DNS1123_SUBDOMAIN_ERR),
            NameRule::Label => (is_dns1123_label(name), DNS1123_LABEL_ERR),
            NameRule::Dns1035 => (is_dns1035_label(name), DNS1035_LABEL_ERR),
            NameRule::Path => (
                !name.contains('/') && !name.contains('%') && name != "." && name != "..",
                "may not contain '/' or '%', or be '.' or '..'",
            ),
        };
        if !ok {
            let msg = if name.len() > 253 && rule == NameRule::Subdomain {
                "must be no more than 253 characters".to_string()
            } else if name.len() > 63 && matches!(rule, NameRule::Label | NameRule::Dns1035) {
                "must be no more than 63 characters".to_string()
            } else {
                msg.to_string()
            };
            out.push(Cause::invalid("metadata.name", &json!(name), &msg));
        }
    }
    if namespaced {
        let ns = meta["namespace"].as_str().unwrap_or_default();
        if ns.is_empty() {
            out.push(Cause::required("metadata.namespace", ""));
        }
    }
    if let Some(labels) = meta.get("labels") {
        match labels.as_object() {
            Some(m) => {
                for (k, v) in m {
                    qualified_name_causes("metadata.labels", k, out);
                    match v.as_str() {
                        Some(s) if s.is_empty() || (s.len() <= 63 && is_qualified_name_part(s)) => {
                        }
                        Some(s) if s.len() > 63 => out.push(Cause::invalid(
                            "metadata.labels",
                            v,
                            "must be no more than 63 characters",
                        )),
                        _ => out.push(Cause::invalid("metadata.labels", v, LABEL_VALUE_ERR)),
                    }
                }
            }
            None if labels.is_null() => {}
            None => out.push(Cause::invalid("metadata.labels", labels, "must be a map")),
        }
    }
    if let Some(ann) = meta.get("annotations").and_then(Value::as_object) {
        let mut total = 0;
        for (k, v) in ann {
            qualified_name_causes("metadata.annotations", &k.to_lowercase(), out);
            total += k.len() + v.as_str().map_or(0, str::len);
        }
        if total > 256 * 1024 {
            out.push(Cause::new(
                "FieldValueTooLong",
                "metadata.annotations",
                "Too long: may not be more than 262144 bytes".to_string(),
            ));
        }
    }
    if let Some(f) = meta.get("finalizers").and_then(Value::as_array) {
        for (i, v) in f.iter().enumerate() {
            let s = v.as_str().unwrap_or_default();
            let field = format!("metadata.finalizers[{i}]");
            if !s.contains('/') && !["kubernetes", "orphan", "foregroundDeletion"].contains(&s) {
                out.push(Cause::invalid(
                    field,
                    v,
                    "name is neither a standard finalizer name nor is it fully qualified",
                ));
            } else {
                let mut inner = Vec::new();
                qualified_name_causes(&field, s, &mut inner);
                out.extend(inner);
            }
        }
    }
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

/// A container's name at field `f`: present, a DNS label, not already in `names` (added).
fn container_name(
    c: &Value,
    f: &str,
    names: &mut std::collections::BTreeSet<String>,
    out: &mut Vec<Cause>,
) {
    let name = str_at(c, "/name");
    if name.is_empty() {
        out.push(Cause::required(format!("{f}.name"), ""));
    } else if !is_dns1123_label(name) {
        out.push(Cause::invalid(
            format!("{f}.name"),
            &json!(name),
            DNS1123_LABEL_ERR,
        ));
    } else if !names.insert(name.to_string()) {
        out.push(Cause::duplicate(format!("{f}.name"), &json!(name)));
    }
}

/// Validates a container list (`spec.containers`, `spec.initContainers`).
fn validate_containers(list: &Value, field: &str, required: bool, out: &mut Vec<Cause>) {
    let Some(arr) = list.as_array() else {
        if required {
            out.push(Cause::required(field, ""));
        }
        return;
    };
    if arr.is_empty() && required {
        out.push(Cause::required(field, ""));
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, c) in arr.iter().enumerate() {
        let f = format!("{field}[{i}]");
        container_name(c, &f, &mut names, out);
        if str_at(c, "/image").is_empty() {
            out.push(Cause::required(format!("{f}.image"), ""));
        }
        if let Some(ports) = c.get("ports").and_then(Value::as_array) {
            for (j, p) in ports.iter().enumerate() {
                let port = p["containerPort"].as_i64().unwrap_or(0);
                if !(1..=65535).contains(&port) {
                    out.push(Cause::invalid(
                        format!("{f}.ports[{j}].containerPort"),
                        &p["containerPort"],
                        "must be between 1 and 65535, inclusive",
                    ));
                }
            }
        }
        if let Some(p) = c.get("imagePullPolicy").filter(|v| !v.is_null()) {
            if !matches!(p.as_str(), Some("Always" | "IfNotPresent" | "Never")) {
                out.push(Cause::not_supported(
                    format!("{f}.imagePullPolicy"),
                    p,
                    &["Always", "IfNotPresent", "Never"],
                ));
            }
        }
    }
}

fn validate_pod_spec(spec: &Value, field: &str, out: &mut Vec<Cause>) {
    validate_containers(
        &spec["containers"],
        &format!("{field}.containers"),
        true,
        out,
    );
    if spec.get("initContainers").is_some() {
        validate_containers(
            &spec["initContainers"],
            &format!("{field}.initContainers"),
            false,
            out,
        );
    }
    if let Some(p) = spec.get("restartPolicy").filter(|v| !v.is_null()) {
        if !matches!(p.as_str(), Some("Always" | "OnFailure" | "Never")) {
            out.push(Cause::not_supported(
                format!("{field}.restartPolicy"),
                p,
                &["Always", "OnFailure", "Never"],
            ));
        }
    }
}

fn validate_selector_matches_template(obj: &Value, out: &mut Vec<Cause>) {
    let sel = &obj["spec"]["selector"];
    if sel.is_null() || sel.as_object().is_some_and(|m| m.is_empty()) {
        out.push(Cause::required("spec.selector", ""));
        return;
    }
    let labels = &obj["spec"]["template"]["metadata"]["labels"];
    let template = json!({"metadata": {"labels": labels}});
    match crate::api::selectors::from_label_selector_object(sel) {
        Ok(s) if s.is_empty() => out.push(Cause::invalid(
            "spec.selector",
            sel,
            "empty selector is invalid for deployment",
        )),
        Ok(s) if !s.matches_object(&template) => out.push(Cause::invalid(
            "spec.template.metadata.labels",
            labels,
            "`selector` does not match template `labels`",
        )),
        Ok(_) => {}
        Err(e) => out.push(Cause::invalid("spec.selector", sel, &e.message)),
    }
}

/// Kind-specific validation of a new object.
pub fn validate_kind(group: &str, kind: &str, obj: &Value, out: &mut Vec<Cause>) {
    match (group, kind) {
        ("", "Pod") => validate_pod_spec(&obj["spec"], "spec", out),
        ("", "PodTemplate") => validate_pod_spec(&obj["template"]["spec"], "template.spec", out),
        ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet") => {
            validate_selector_matches_template(obj, out);
            validate_pod_spec(&obj["spec"]["template"]["spec"], "spec.template.spec", out);
            if let Some(r) = obj["spec"]["replicas"].as_i64() {
                if r < 0 {
                    out.push(Cause::invalid(
                        "spec.replicas",
                        &obj["spec"]["replicas"],
                        "must be greater than or equal to 0",
                    ));
                }
            }
        }
        ("", "ReplicationController") => {
            validate_pod_spec(&obj["spec"]["template"]["spec"], "spec.template.spec", out)
        }
        ("batch", "Job") => {
            validate_pod_spec(&obj["spec"]["template"]["spec"], "spec.template.spec", out);
            let rp = &obj["spec"]["template"]["spec"]["restartPolicy"];
            if !matches!(rp.as_str(), Some("OnFailure" | "Never")) {
                out.push(Cause::not_supported(
                    "spec.template.spec.restartPolicy",
                    rp,
                    &["OnFailure", "Never"],
                ));
            }
        }
        ("batch", "CronJob") => {
            let schedule = str_at(obj, "/spec/schedule");
            if schedule.is_empty() {
                out.push(Cause::required("spec.schedule", ""));
            } else if let Err(e) = crate::cron::parse(schedule) {
                out.push(Cause::invalid(
                    "spec.schedule",
                    &obj["spec"]["schedule"],
                    &e,
                ));
            }
            if let Some(tz) = obj.pointer("/spec/timeZone").and_then(Value::as_str) {
                if let Err(e) = crate::cron::time_zone(Some(tz)) {
                    out.push(Cause::invalid(
                        "spec.timeZone",
                        &obj["spec"]["timeZone"],
                        &e,
                    ));
                }
            }
            validate_pod_spec(
                &obj["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                "spec.jobTemplate.spec.template.spec",
                out,
            );
        }
        ("", "Service") => validate_service(obj, out),
        ("", "ConfigMap") | ("", "Secret") => {
            for field in ["data", "binaryData", "stringData"] {
                if let Some(m) = obj.get(field).and_then(Value::as_object) {
                    for k in m.keys() {
                        let ok = !k.is_empty()
                            && k.len() <= 253
                            && k.bytes().all(|c| {
                                c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')
                            });
                        if !ok {
                            out.push(Cause::invalid(
                                format!("{field}[{k}]"),
                                &json!(k),
                                "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')",
                            ));
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

fn validate_service(obj: &Value, out: &mut Vec<Cause>) {
    let spec = &obj["spec"];
    let ty = spec["type"].as_str().unwrap_or("ClusterIP");
    if !matches!(
        ty,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        out.push(Cause::not_supported(
            "spec.type",
            &spec["type"],
            &["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"],
        ));
    }
    let ports = spec["ports"].as_array().cloned().unwrap_or_default();
    let headless = spec["clusterIP"].as_str() == Some("None");
    if ports.is_empty() && ty != "ExternalName" && !headless {
        out.push(Cause::required("spec.ports", ""));
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let port = p["port"].as_i64().unwrap_or(0);
        if !(1..=65535).contains(&port) {
            out.push(Cause::invalid(
                format!("spec.ports[{i}].port"),
                &p["port"],
                "must be between 1 and 65535, inclusive",
            ));
        }
        let name = p["name"].as_str().unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            out.push(Cause::required(format!("spec.ports[{i}].name"), ""));
        }
        if !name.is_empty() && !names.insert(name.to_string()) {
            out.push(Cause::duplicate(
                format!("spec.ports[{i}].name"),
                &p["name"],
            ));
        }
    }
    if ty == "ExternalName" && str_at(obj, "/spec/externalName").is_empty() {
        out.push(Cause::required("spec.externalName", ""));
    }
}

/// Fields an ephemeral container may not have (upstream's validateEphemeralContainers).
const EPHEMERAL_FORBIDDEN: &[&str] = &[
    "ports",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "lifecycle",
    "resources",
    "resizePolicy",
    "restartPolicy",
];

/// A change of `spec.ephemeralContainers`: containers may only be added, each valid, with a
/// name unique in the pod and a target that names one of its containers.
fn validate_ephemeral_update(old: &Value, new: &Value, out: &mut Vec<Cause>) {
    let list = |s: &Value, k: &str| -> Vec<Value> {
        s.get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let (before, after) = (
        list(old, "ephemeralContainers"),
        list(new, "ephemeralContainers"),
    );
    let field = "spec.ephemeralContainers";
    for o in &before {
        let name = str_at(o, "/name");
        match after.iter().position(|n| str_at(n, "/name") == name) {
            None => out.push(Cause::forbidden(
                field,
                &format!("existing ephemeral containers {name:?} may not be removed"),
            )),
            Some(i) if &after[i] != o => out.push(Cause::forbidden(
                format!("{field}[{i}]"),
                &format!("existing ephemeral containers {name:?} may not be changed"),
            )),
            Some(_) => {}
        }
    }
    let regular: Vec<String> = list(new, "containers")
        .iter()
        .chain(list(new, "initContainers").iter())
        .map(|c| str_at(c, "/name").to_string())
        .collect();
    let mut names: std::collections::BTreeSet<String> = regular.iter().cloned().collect();
    for (i, c) in after.iter().enumerate() {
        let f = format!("{field}[{i}]");
        container_name(c, &f, &mut names, out);
        if before.iter().any(|b| b == c) {
            continue;
        }
        if str_at(c, "/image").is_empty() {
            out.push(Cause::required(format!("{f}.image"), ""));
        }
        for k in EPHEMERAL_FORBIDDEN {
            let set = c.get(*k).is_some_and(|v| {
                !v.is_null()
                    && v.as_object().is_none_or(|m| !m.is_empty())
                    && v.as_array().is_none_or(|a| !a.is_empty())
            });
            if set {
                out.push(Cause::forbidden(
                    format!("{f}.{k}"),
                    "cannot be set for an Ephemeral Container",
                ));
            }
        }
        let target = str_at(c, "/targetContainerName");
        if !target.is_empty() && !regular.iter().any(|r| r == target) {
            out.push(Cause::new(
                "FieldValueNotFound",
                format!("{f}.targetContainerName"),
                format!("Not found: {target:?}"),
            ));
        }
    }
}

/// Fields that may not change on update, per kind.
pub fn validate_update(group: &str, kind: &str, old: &Value, new: &Value, out: &mut Vec<Cause>) {
    let immutable = |ptr: &str, field: &str, msg: &str, out: &mut Vec<Cause>| {
        if old.pointer(ptr) != new.pointer(ptr) {
            out.push(Cause::invalid(
                field,
                new.pointer(ptr).unwrap_or(&Value::Null),
                msg,
            ));
        }
    };
    match (group, kind) {
        ("", "Pod") => {
            // Only images (and a few scheduling fields) may change in a pod's spec.
            let strip = |spec: &Value| {
                let mut s = spec.clone();
                for list in ["containers", "initContainers"] {
                    if let Some(arr) = s.get_mut(list).and_then(Value::as_array_mut) {
                        for c in arr {
                            if let Some(m) = c.as_object_mut() {
                                m.remove("image");
                            }
                        }
                    }
                }
                if let Some(m) = s.as_object_mut() {
                    m.remove("ephemeralContainers");
                    m.remove("activeDeadlineSeconds");
                    m.remove("tolerations");
                    m.remove("terminationGracePeriodSeconds");
                }
                s
            };
            if strip(&old["spec"]) != strip(&new["spec"]) {
                out.push(Cause::forbidden(
                    "spec",
                    "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
                ));
            }
            if old.pointer("/spec/ephemeralContainers") != new.pointer("/spec/ephemeralContainers")
            {
                validate_ephemeral_update(&old["spec"], &new["spec"], out);
            }
        }
        ("", "Service") => {
            let old_ip = old.pointer("/spec/clusterIP");
            let new_ip = new.pointer("/spec/clusterIP");
            if old_ip.is_some() && new_ip.is_some() && old_ip != new_ip {
                out.push(Cause::invalid(
                    "spec.clusterIPs[0]",
                    new_ip.unwrap_or(&Value::Null),
                    "may not change once set",
                ));
            }
        }
        ("batch", "Job") => immutable("/spec/template", "spec.template", "field is immutable", out),
        ("apps", "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet") => {
            immutable("/spec/selector", "spec.selector", "field is immutable", out)
        }
        ("", "ConfigMap" | "Secret") if old["immutable"].as_bool() == Some(true) => {
            for f in ["data", "binaryData"] {
                if old.get(f) != new.get(f) {
                    out.push(Cause::forbidden(
                        f,
                        "field is immutable when `immutable` is set",
                    ));
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_rfc1123() {
        assert!(is_dns1123_subdomain("a.b-c.d"));
        assert!(!is_dns1123_subdomain("Bad_Name"));
        assert!(!is_dns1123_label("a.b"));
        assert!(is_dns1035_label("web"));
        assert!(!is_dns1035_label("1web"));
        let mut out = Vec::new();
        validate_metadata(
            &json!({"metadata": {"name": "Bad_Name", "namespace": "d", "labels": {"ok": "v", "bad key": "x"}}}),
            NameRule::Subdomain,
            true,
            &mut out,
        );
        assert_eq!(out[0].field, "metadata.name");
        assert!(out[0]
            .message
            .starts_with("Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain"));
        assert_eq!(out[1].field, "metadata.labels");
    }

    #[test]
    fn deployments_need_a_selector_matching_the_template() {
        let mut out = Vec::new();
        let d = json!({"spec": {"selector": {"matchLabels": {"app": "a"}}, "template": {"metadata": {"labels": {"app": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        validate_kind("apps", "Deployment", &d, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].message,
            "Invalid value: {\"app\":\"b\"}: `selector` does not match template `labels`"
        );
    }
}

#[cfg(test)]
mod ephemeral_tests {
    use super::*;

    fn pod(eph: Value) -> Value {
        json!({"spec": {"containers": [{"name": "app", "image": "busybox"}], "ephemeralContainers": eph}})
    }

    fn causes(old: &Value, new: &Value) -> Vec<String> {
        let mut out = Vec::new();
        validate_update("", "Pod", old, new, &mut out);
        out.into_iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect()
    }

    #[test]
    fn ephemeral_containers_may_only_be_added_and_valid() {
        let one = pod(json!([{"name": "dbg", "image": "busybox", "targetContainerName": "app"}]));
        assert!(causes(&pod(json!([])), &one).is_empty());
        assert_eq!(
            causes(&one, &pod(json!([]))),
            vec!["spec.ephemeralContainers: Forbidden: existing ephemeral containers \"dbg\" may not be removed"]
        );
        let changed =
            pod(json!([{"name": "dbg", "image": "alpine", "targetContainerName": "app"}]));
        assert_eq!(
            causes(&one, &changed),
            vec!["spec.ephemeralContainers[0]: Forbidden: existing ephemeral containers \"dbg\" may not be changed"]
        );
        let bad = pod(json!([
            {"name": "app", "image": "busybox"},
            {"name": "x", "targetContainerName": "nope", "ports": [{"containerPort": 80}]},
        ]));
        assert_eq!(
            causes(&pod(json!([])), &bad),
            vec![
                "spec.ephemeralContainers[0].name: Duplicate value: \"app\"",
                "spec.ephemeralContainers[1].image: Required value",
                "spec.ephemeralContainers[1].ports: Forbidden: cannot be set for an Ephemeral Container",
                "spec.ephemeralContainers[1].targetContainerName: Not found: \"nope\"",
            ]
        );
    }
}
