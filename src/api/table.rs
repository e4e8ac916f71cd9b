//! Server-side printing: `meta.k8s.io/v1` Tables with upstream's columns for the built-in kinds
//! (including the `-o wide` ones, priority 1) and custom resources' additionalPrinterColumns.

use serde_json::{json, Value};

use crate::api::resources::ResourceDef;

/// Upstream's `duration.HumanDuration`.
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    let s = secs;
    if s < 60 * 2 {
        return format!("{s}s");
    }
    let m = s / 60;
    if m < 10 {
        let r = s % 60;
        return if r == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{r}s")
        };
    }
    if m < 60 * 3 {
        return format!("{m}m");
    }
    let h = m / 60;
    if h < 8 {
        let r = m % 60;
        return if r == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{r}m")
        };
    }
    if h < 48 {
        return format!("{h}h");
    }
    if h < 24 * 8 {
        let d = h / 24;
        let r = h % 24;
        return if r == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{r}h")
        };
    }
    if h < 24 * 365 * 2 {
        return format!("{}d", h / 24);
    }
    if h < 24 * 365 * 8 {
        let y = h / 24 / 365;
        let d = (h / 24) % 365;
        return if d == 0 {
            format!("{y}y")
        } else {
            format!("{y}y{d}d")
        };
    }
    format!("{}y", h / 24 / 365)
}

fn age_of(ts: Option<&str>) -> String {
    match ts.and_then(|t| t.parse::<jiff::Timestamp>().ok()) {
        Some(t) => human_duration(jiff::Timestamp::now().as_second() - t.as_second()),
        None => "<unknown>".into(),
    }
}

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

fn i(v: &Value, ptr: &str) -> i64 {
    v.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

fn none_if_empty(x: String) -> String {
    if x.is_empty() {
        "<none>".into()
    } else {
        x
    }
}

struct Col {
    name: &'static str,
    ty: &'static str,
    priority: i32,
    desc: &'static str,
}

const fn col(name: &'static str, ty: &'static str, priority: i32) -> Col {
    Col {
        name,
        ty,
        priority,
        desc: "",
    }
}

fn name_col() -> Col {
    Col {
        name: "Name",
        ty: "string",
        priority: 0,
        desc: "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
    }
}

fn containers_images(spec: &Value) -> (String, String) {
    let cs = spec
        .get("containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names: Vec<&str> = cs.iter().map(|c| s(c, "/name")).collect();
    let images: Vec<&str> = cs.iter().map(|c| s(c, "/image")).collect();
    (names.join(","), images.join(","))
}

fn selector_string(sel: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in m {
            parts.push(format!("{k}={}", v.as_str().unwrap_or_default()));
        }
    }
    if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
        for e in exprs {
            let vals: Vec<&str> = e["values"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let key = s(e, "/key");
            parts.push(match s(e, "/operator") {
                "In" => format!("{key} in ({})", vals.join(",")),
                "NotIn" => format!("{key} notin ({})", vals.join(",")),
                "Exists" => key.to_string(),
                "DoesNotExist" => format!("!{key}"),
                _ => String::new(),
            });
        }
    }
    none_if_empty(parts.join(","))
}

fn map_selector(m: &Value) -> String {
    none_if_empty(
        m.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
    )
}

fn pod_status(p: &Value) -> (String, String, String) {
    let cs = p
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let total = p
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let ready = cs
        .iter()
        .filter(|c| c["ready"].as_bool() == Some(true))
        .count();
    let restarts: i64 = cs
        .iter()
        .map(|c| c["restartCount"].as_i64().unwrap_or(0))
        .sum();
    let mut reason = p
        .pointer("/status/reason")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| s(p, "/status/phase").to_string());
    for c in &cs {
        if let Some(w) = c.pointer("/state/waiting/reason").and_then(Value::as_str) {
            reason = w.to_string();
        } else if let Some(t) = c
            .pointer("/state/terminated/reason")
            .and_then(Value::as_str)
        {
            reason = t.to_string();
        }
    }
    if p.pointer("/metadata/deletionTimestamp").is_some() {
        reason = "Terminating".into();
    }
    if reason.is_empty() {
        reason = "Pending".into();
    }
    (format!("{ready}/{total}"), reason, restarts.to_string())
}

fn service_ports(spec: &Value) -> String {
    let ports = spec
        .get("ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let p: Vec<String> = ports
        .iter()
        .map(|p| {
            let proto = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_i64() {
                Some(np) => format!("{}:{np}/{proto}", i(p, "/port")),
                None => format!("{}/{proto}", i(p, "/port")),
            }
        })
        .collect();
    none_if_empty(p.join(","))
}

fn node_status(n: &Value) -> String {
    let conds = n
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut st = match conds.iter().find(|c| c["type"] == "Ready") {
        Some(c) if c["status"] == "True" => "Ready".to_string(),
        Some(_) => "NotReady".to_string(),
        None => "Unknown".to_string(),
    };
    if n.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        st.push_str(",SchedulingDisabled");
    }
    st
}

fn node_roles(n: &Value) -> String {
    let mut roles: Vec<String> = n
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.keys()
                .filter_map(|k| {
                    k.strip_prefix("node-role.kubernetes.io/")
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    roles.sort();
    none_if_empty(roles.join(","))
}

fn node_address(n: &Value, ty: &str) -> String {
    n.pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().find(|x| x["type"] == ty))
        .and_then(|x| x["address"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| "<none>".into())
}

fn job_status(j: &Value) -> String {
    let conds = j
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let has = |t: &str| {
        conds
            .iter()
            .any(|c| c["type"] == t && c["status"] == "True")
    };
    if has("Complete") {
        "Complete".into()
    } else if has("Failed") {
        "Failed".into()
    } else if has("FailureTarget") {
        "FailureTarget".into()
    } else if has("SuccessCriteriaMet") {
        "SuccessCriteriaMet".into()
    } else if j.pointer("/spec/suspend").and_then(Value::as_bool) == Some(true) {
        "Suspended".into()
    } else {
        "Running".into()
    }
}

fn duration_between(start: &str, end: Option<&str>) -> String {
    let Ok(s0) = start.parse::<jiff::Timestamp>() else {
        return String::new();
    };
    let e = end
        .and_then(|e| e.parse::<jiff::Timestamp>().ok())
        .unwrap_or_else(jiff::Timestamp::now);
    human_duration(e.as_second() - s0.as_second())
}

fn count_map(v: &Value, ptr: &str) -> i64 {
    v.pointer(ptr)
        .and_then(Value::as_object)
        .map_or(0, |m| m.len() as i64)
}

/// Columns and cells of a built-in kind; `None` for kinds without a printer.
fn builtin(group: &str, kind: &str, o: &Value) -> Option<(Vec<Col>, Vec<Value>)> {
    let name = json!(s(o, "/metadata/name"));
    let age = json!(age_of(
        o.pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str)
    ));
    Some(match (group, kind) {
        ("", "Pod") => {
            let (ready, status, restarts) = pod_status(o);
            (
                vec![
                    name_col(),
                    col("Ready", "string", 0),
                    col("Status", "string", 0),
                    col("Restarts", "string", 0),
                    col("Age", "string", 0),
                    col("IP", "string", 1),
                    col("Node", "string", 1),
                    col("Nominated Node", "string", 1),
                    col("Readiness Gates", "string", 1),
                ],
                vec![
                    name,
                    json!(ready),
                    json!(status),
                    json!(restarts),
                    age,
                    json!(none_if_empty(s(o, "/status/podIP").into())),
                    json!(none_if_empty(s(o, "/spec/nodeName").into())),
                    json!(none_if_empty(s(o, "/status/nominatedNodeName").into())),
                    json!("<none>"),
                ],
            )
        }
        ("apps", "Deployment") => {
            let (c, im) = containers_images(&o["spec"]["template"]["spec"]);
            (
                vec![
                    name_col(),
                    col("Ready", "string", 0),
                    col("Up-to-date", "string", 0),
                    col("Available", "string", 0),
                    col("Age", "string", 0),
                    col("Containers", "string", 1),
                    col("Images", "string", 1),
                    col("Selector", "string", 1),
                ],
                vec![
                    name,
                    json!(format!(
                        "{}/{}",
                        i(o, "/status/readyReplicas"),
                        i(o, "/spec/replicas")
                    )),
                    json!(i(o, "/status/updatedReplicas")),
                    json!(i(o, "/status/availableReplicas")),
                    age,
                    json!(c),
                    json!(im),
                    json!(selector_string(&o["spec"]["selector"])),
                ],
            )
        }
        ("apps", "ReplicaSet") | ("", "ReplicationController") => {
            let (c, im) = containers_images(&o["spec"]["template"]["spec"]);
            let sel = if kind == "ReplicaSet" {
                selector_string(&o["spec"]["selector"])
            } else {
                map_selector(&o["spec"]["selector"])
            };
            (
                vec![
                    name_col(),
                    col("Desired", "integer", 0),
                    col("Current", "integer", 0),
                    col("Ready", "integer", 0),
                    col("Age", "string", 0),
                    col("Containers", "string", 1),
                    col("Images", "string", 1),
                    col("Selector", "string", 1),
                ],
                vec![
                    name,
                    json!(i(o, "/spec/replicas")),
                    json!(i(o, "/status/replicas")),
                    json!(i(o, "/status/readyReplicas")),
                    age,
                    json!(c),
                    json!(im),
                    json!(sel),
                ],
            )
        }
        ("apps", "StatefulSet") => {
            let (c, im) = containers_images(&o["spec"]["template"]["spec"]);
            (
                vec![
                    name_col(),
                    col("Ready", "string", 0),
                    col("Age", "string", 0),
                    col("Containers", "string", 1),
                    col("Images", "string", 1),
                ],
                vec![
                    name,
                    json!(format!(
                        "{}/{}",
                        i(o, "/status/readyReplicas"),
                        i(o, "/spec/replicas")
                    )),
                    age,
                    json!(c),
                    json!(im),
                ],
            )
        }
        ("apps", "DaemonSet") => {
            let (c, im) = containers_images(&o["spec"]["template"]["spec"]);
            (
                vec![
                    name_col(),
                    col("Desired", "integer", 0),
                    col("Current", "integer", 0),
                    col("Ready", "integer", 0),
                    col("Up-to-date", "integer", 0),
                    col("Available", "integer", 0),
                    col("Node Selector", "string", 0),
                    col("Age", "string", 0),
                    col("Containers", "string", 1),
                    col("Images", "string", 1),
                    col("Selector", "string", 1),
                ],
                vec![
                    name,
                    json!(i(o, "/status/desiredNumberScheduled")),
                    json!(i(o, "/status/currentNumberScheduled")),
                    json!(i(o, "/status/numberReady")),
                    json!(i(o, "/status/updatedNumberScheduled")),
                    json!(i(o, "/status/numberAvailable")),
                    json!(map_selector(&o["spec"]["template"]["spec"]["nodeSelector"])),
                    age,
                    json!(c),
                    json!(im),
                    json!(selector_string(&o["spec"]["selector"])),
                ],
            )
        }
        ("batch", "Job") => {
            let (c, im) = containers_images(&o["spec"]["template"]["spec"]);
            let completions = match o.pointer("/spec/completions").and_then(Value::as_i64) {
                Some(n) => format!("{}/{n}", i(o, "/status/succeeded")),
                None => format!(
                    "{}/1 of {}",
                    i(o, "/status/succeeded"),
                    i(o, "/spec/parallelism").max(1)
                ),
            };
            let start = s(o, "/status/startTime");
            (
                vec![
                    name_col(),
                    col("Status", "string", 0),
                    col("Completions", "string", 0),
                    col("Duration", "string", 0),
                    col("Age", "string", 0),
                    col("Containers", "string", 1),
                    col("Images", "string", 1),
                    col("Selector", "string", 1),
                ],
                vec![
                    name,
                    json!(job_status(o)),
                    json!(completions),
                    json!(duration_between(
                        start,
                        o.pointer("/status/completionTime").and_then(Value::as_str)
                    )),
                    age,
                    json!(c),
                    json!(im),
                    json!(selector_string(&o["spec"]["selector"])),
                ],
            )
        }
        ("batch", "CronJob") => {
            let (c, im) = containers_images(&o["spec"]["jobTemplate"]["spec"]["template"]["spec"]);
            let last = o
                .pointer("/status/lastScheduleTime")
                .and_then(Value::as_str)
                .map_or("<none>".to_string(), |t| age_of(Some(t)));
            (
                vec![
                    name_col(),
                    col("Schedule", "string", 0),
                    col("Timezone", "string", 0),
                    col("Suspend", "boolean", 0),
                    col("Active", "integer", 0),
                    col("Last Schedule", "string", 0),
                    col("Age", "string", 0),
                    col("Containers", "string", 1),
                    col("Images", "string", 1),
                    col("Selector", "string", 1),
                ],
                vec![
                    name,
                    json!(s(o, "/spec/schedule")),
                    json!(none_if_empty(s(o, "/spec/timeZone").into())),
                    // Upstream prints the boolean as a string cell: "True"/"False".
                    json!(match o.pointer("/spec/suspend").and_then(Value::as_bool) {
                        Some(true) => "True",
                        Some(false) => "False",
                        None => "<unset>",
                    }),
                    json!(o
                        .pointer("/status/active")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len)),
                    json!(last),
                    age,
                    json!(c),
                    json!(im),
                    json!(selector_string(
                        &o["spec"]["jobTemplate"]["spec"]["selector"]
                    )),
                ],
            )
        }
        ("", "Service") => {
            let ty = s(o, "/spec/type");
            let ext: Vec<String> = o
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| {
                            x["ip"]
                                .as_str()
                                .or(x["hostname"].as_str())
                                .map(str::to_string)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut ext: Vec<String> = ext;
            if let Some(ips) = o.pointer("/spec/externalIPs").and_then(Value::as_array) {
                ext.extend(ips.iter().filter_map(|x| x.as_str().map(str::to_string)));
            }
            let external = if ty == "ExternalName" {
                s(o, "/spec/externalName").to_string()
            } else if ext.is_empty() {
                if ty == "LoadBalancer" {
                    "<pending>".into()
                } else {
                    "<none>".into()
                }
            } else {
                ext.join(",")
            };
            (
                vec![
                    name_col(),
                    col("Type", "string", 0),
                    col("Cluster-IP", "string", 0),
                    col("External-IP", "string", 0),
                    col("Port(s)", "string", 0),
                    col("Age", "string", 0),
                    col("Selector", "string", 1),
                ],
                vec![
                    name,
                    json!(ty),
                    json!(none_if_empty(s(o, "/spec/clusterIP").into())),
                    json!(external),
                    json!(service_ports(&o["spec"])),
                    age,
                    json!(map_selector(&o["spec"]["selector"])),
                ],
            )
        }
        ("", "Endpoints") => {
            let mut eps = Vec::new();
            for sub in o
                .get("subsets")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
            {
                let ports: Vec<i64> = sub["ports"]
                    .as_array()
                    .map(|a| a.iter().map(|p| p["port"].as_i64().unwrap_or(0)).collect())
                    .unwrap_or_default();
                for a in sub["addresses"].as_array().cloned().unwrap_or_default() {
                    let ip = s(&a, "/ip");
                    if ports.is_empty() {
                        eps.push(ip.to_string());
                    }
                    for p in &ports {
                        eps.push(format!("{ip}:{p}"));
                    }
                }
            }
            let shown = if eps.len() > 3 {
                format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
            } else {
                eps.join(",")
            };
            (
                vec![
                    name_col(),
                    col("Endpoints", "string", 0),
                    col("Age", "string", 0),
                ],
                vec![name, json!(none_if_empty(shown)), age],
            )
        }
        ("discovery.k8s.io", "EndpointSlice") => {
            let ports: Vec<String> = o
                .get("ports")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|p| {
                            p["port"]
                                .as_i64()
                                .map_or("<unset>".into(), |n| n.to_string())
                        })
                        .collect()
                })
                .unwrap_or_default();
            let addrs: Vec<String> = o
                .get("endpoints")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let shown = if addrs.len() > 3 {
                format!("{} + {} more...", addrs[..3].join(","), addrs.len() - 3)
            } else {
                addrs.join(",")
            };
            (
                vec![
                    name_col(),
                    col("AddressType", "string", 0),
                    col("Ports", "string", 0),
                    col("Endpoints", "string", 0),
                    col("Age", "string", 0),
                ],
                vec![
                    name,
                    json!(s(o, "/addressType")),
                    json!(none_if_empty(ports.join(","))),
                    json!(none_if_empty(shown)),
                    age,
                ],
            )
        }
        ("", "Node") => (
            vec![
                name_col(),
                col("Status", "string", 0),
                col("Roles", "string", 0),
                col("Age", "string", 0),
                col("Version", "string", 0),
                col("Internal-IP", "string", 1),
                col("External-IP", "string", 1),
                col("OS-Image", "string", 1),
                col("Kernel-Version", "string", 1),
                col("Container-Runtime", "string", 1),
            ],
            vec![
                name,
                json!(node_status(o)),
                json!(node_roles(o)),
                age,
                json!(s(o, "/status/nodeInfo/kubeletVersion")),
                json!(node_address(o, "InternalIP")),
                json!(node_address(o, "ExternalIP")),
                json!(s(o, "/status/nodeInfo/osImage")),
                json!(s(o, "/status/nodeInfo/kernelVersion")),
                json!(s(o, "/status/nodeInfo/containerRuntimeVersion")),
            ],
        ),
        ("", "Namespace") => (
            vec![
                name_col(),
                col("Status", "string", 0),
                col("Age", "string", 0),
            ],
            vec![name, json!(s(o, "/status/phase")), age],
        ),
        ("", "ConfigMap") => (
            vec![
                name_col(),
                col("Data", "string", 0),
                col("Age", "string", 0),
            ],
            vec![
                name,
                json!(count_map(o, "/data") + count_map(o, "/binaryData")),
                age,
            ],
        ),
        ("", "Secret") => (
            vec![
                name_col(),
                col("Type", "string", 0),
                col("Data", "string", 0),
                col("Age", "string", 0),
            ],
            vec![
                name,
                json!(s(o, "/type")),
                json!(count_map(o, "/data")),
                age,
            ],
        ),
        ("", "ServiceAccount") => (
            vec![
                name_col(),
                col("Secrets", "string", 0),
                col("Age", "string", 0),
            ],
            vec![
                name,
                json!(o
                    .get("secrets")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len)),
                age,
            ],
        ),
        ("", "Event") => {
            let last = o
                .pointer("/lastTimestamp")
                .and_then(Value::as_str)
                .or(o.pointer("/eventTime").and_then(Value::as_str))
                .or(o
                    .pointer("/metadata/creationTimestamp")
                    .and_then(Value::as_str));
            let object = format!(
                "{}/{}",
                s(o, "/involvedObject/kind").to_lowercase(),
                s(o, "/involvedObject/name")
            );
            let source = {
                let c = s(o, "/source/component");
                let h = s(o, "/source/host");
                if h.is_empty() {
                    c.to_string()
                } else {
                    format!("{c}, {h}")
                }
            };
            (
                vec![
                    col("Last Seen", "string", 0),
                    col("Type", "string", 0),
                    col("Reason", "string", 0),
                    col("Object", "string", 0),
                    col("Subobject", "string", 1),
                    col("Source", "string", 1),
                    col("Message", "string", 0),
                    col("First Seen", "string", 1),
                    col("Count", "string", 1),
                    name_col(),
                ],
                vec![
                    json!(age_of(last)),
                    json!(s(o, "/type")),
                    json!(s(o, "/reason")),
                    json!(object),
                    json!(s(o, "/involvedObject/fieldPath")),
                    json!(source),
                    json!(s(o, "/message").trim()),
                    json!(age_of(
                        o.pointer("/firstTimestamp")
                            .and_then(Value::as_str)
                            .or(last)
                    )),
                    json!(i(o, "/count").max(1)),
                    name,
                ],
            )
        }
        ("networking.k8s.io", "Ingress") => {
            let hosts: Vec<&str> = o
                .pointer("/spec/rules")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|r| r["host"].as_str()).collect())
                .unwrap_or_default();
            let addr: Vec<&str> = o
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x["ip"].as_str().or(x["hostname"].as_str()))
                        .collect()
                })
                .unwrap_or_default();
            let tls = o
                .pointer("/spec/tls")
                .and_then(Value::as_array)
                .is_some_and(|t| !t.is_empty());
            (
                vec![
                    name_col(),
                    col("Class", "string", 0),
                    col("Hosts", "string", 0),
                    col("Address", "string", 0),
                    col("Ports", "string", 0),
                    col("Age", "string", 0),
                ],
                vec![
                    name,
                    json!(none_if_empty(s(o, "/spec/ingressClassName").into())),
                    json!(if hosts.is_empty() {
                        "*".to_string()
                    } else {
                        hosts.join(",")
                    }),
                    json!(addr.join(",")),
                    json!(if tls { "80, 443" } else { "80" }),
                    age,
                ],
            )
        }
        ("", "PersistentVolume") => {
            let claim = if o.pointer("/spec/claimRef").is_some() {
                format!(
                    "{}/{}",
                    s(o, "/spec/claimRef/namespace"),
                    s(o, "/spec/claimRef/name")
                )
            } else {
                String::new()
            };
            (
                vec![
                    name_col(),
                    col("Capacity", "string", 0),
                    col("Access Modes", "string", 0),
                    col("Reclaim Policy", "string", 0),
                    col("Status", "string", 0),
                    col("Claim", "string", 0),
                    col("StorageClass", "string", 0),
                    col("VolumeAttributesClass", "string", 0),
                    col("Reason", "string", 0),
                    col("Age", "string", 0),
                    col("VolumeMode", "string", 1),
                ],
                vec![
                    name,
                    json!(s(o, "/spec/capacity/storage")),
                    json!(access_modes(o.pointer("/spec/accessModes"))),
                    json!(s(o, "/spec/persistentVolumeReclaimPolicy")),
                    json!(phase_or_terminating(o)),
                    json!(claim),
                    json!(s(o, "/spec/storageClassName")),
                    json!(unset_if_empty(s(o, "/spec/volumeAttributesClassName"))),
                    json!(s(o, "/status/reason")),
                    age,
                    json!(s(o, "/spec/volumeMode")),
                ],
            )
        }
        ("", "PersistentVolumeClaim") => (
            vec![
                name_col(),
                col("Status", "string", 0),
                col("Volume", "string", 0),
                col("Capacity", "string", 0),
                col("Access Modes", "string", 0),
                col("StorageClass", "string", 0),
                col("VolumeAttributesClass", "string", 0),
                col("Age", "string", 0),
                col("VolumeMode", "string", 1),
            ],
            vec![
                name,
                json!(phase_or_terminating(o)),
                json!(s(o, "/spec/volumeName")),
                json!(s(o, "/status/capacity/storage")),
                json!(access_modes(o.pointer("/status/accessModes"))),
                json!(s(o, "/spec/storageClassName")),
                json!(unset_if_empty(s(o, "/spec/volumeAttributesClassName"))),
                age,
                json!(s(o, "/spec/volumeMode")),
            ],
        ),
        ("coordination.k8s.io", "Lease") => (
            vec![
                name_col(),
                col("Holder", "string", 0),
                col("Age", "string", 0),
            ],
            vec![name, json!(s(o, "/spec/holderIdentity")), age],
        ),
        ("storage.k8s.io", "StorageClass") => {
            let def = o
                .pointer("/metadata/annotations/storageclass.kubernetes.io~1is-default-class")
                .and_then(Value::as_str)
                == Some("true");
            let n = if def {
                format!("{} (default)", s(o, "/metadata/name"))
            } else {
                s(o, "/metadata/name").to_string()
            };
            (
                vec![
                    name_col(),
                    col("Provisioner", "string", 0),
                    col("ReclaimPolicy", "string", 0),
                    col("VolumeBindingMode", "string", 0),
                    col("AllowVolumeExpansion", "string", 0),
                    col("Age", "string", 0),
                ],
                vec![
                    json!(n),
                    json!(s(o, "/provisioner")),
                    json!(s(o, "/reclaimPolicy")),
                    json!(s(o, "/volumeBindingMode")),
                    json!(o
                        .pointer("/allowVolumeExpansion")
                        .and_then(Value::as_bool)
                        .unwrap_or(false)),
                    age,
                ],
            )
        }
        ("scheduling.k8s.io", "PriorityClass") => (
            vec![
                name_col(),
                col("Value", "integer", 0),
                col("Global-Default", "boolean", 0),
                col("Age", "string", 0),
                col("PreemptionPolicy", "string", 0),
            ],
            vec![
                name,
                json!(i(o, "/value")),
                json!(o
                    .pointer("/globalDefault")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)),
                age,
                json!(s(o, "/preemptionPolicy")),
            ],
        ),
        ("rbac.authorization.k8s.io", "RoleBinding" | "ClusterRoleBinding") => {
            let subj = |k: &str| -> String {
                o.get("subjects")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter(|x| x["kind"] == k)
                            .map(|x| {
                                if k == "ServiceAccount" {
                                    format!("{}/{}", s(x, "/namespace"), s(x, "/name"))
                                } else {
                                    s(x, "/name").to_string()
                                }
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default()
            };
            (
                vec![
                    name_col(),
                    col("Role", "string", 0),
                    col("Age", "string", 0),
                    col("Users", "string", 1),
                    col("Groups", "string", 1),
                    col("ServiceAccounts", "string", 1),
                ],
                vec![
                    name,
                    json!(format!(
                        "{}/{}",
                        s(o, "/roleRef/kind"),
                        s(o, "/roleRef/name")
                    )),
                    age,
                    json!(subj("User")),
                    json!(subj("Group")),
                    json!(subj("ServiceAccount")),
                ],
            )
        }
        ("policy", "PodDisruptionBudget") => (
            vec![
                name_col(),
                col("Min Available", "string", 0),
                col("Max Unavailable", "string", 0),
                col("Allowed Disruptions", "integer", 0),
                col("Age", "string", 0),
            ],
            vec![
                name,
                json!(o
                    .pointer("/spec/minAvailable")
                    .map_or("N/A".into(), val_str)),
                json!(o
                    .pointer("/spec/maxUnavailable")
                    .map_or("N/A".into(), val_str)),
                json!(i(o, "/status/disruptionsAllowed")),
                age,
            ],
        ),
        ("autoscaling", "HorizontalPodAutoscaler") => (
            vec![
                name_col(),
                col("Reference", "string", 0),
                col("Targets", "string", 0),
                col("MinPods", "string", 0),
                col("MaxPods", "string", 0),
                col("Replicas", "string", 0),
                col("Age", "string", 0),
            ],
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    s(o, "/spec/scaleTargetRef/kind"),
                    s(o, "/spec/scaleTargetRef/name")
                )),
                json!("<unknown>"),
                json!(o
                    .pointer("/spec/minReplicas")
                    .and_then(Value::as_i64)
                    .unwrap_or(1)),
                json!(i(o, "/spec/maxReplicas")),
                json!(i(o, "/status/currentReplicas")),
                age,
            ],
        ),
        ("networking.k8s.io", "NetworkPolicy") => (
            vec![
                name_col(),
                col("Pod-Selector", "string", 0),
                col("Age", "string", 0),
            ],
            vec![name, json!(selector_string(&o["spec"]["podSelector"])), age],
        ),
        ("apps", "ControllerRevision") => (
            vec![
                name_col(),
                col("Controller", "string", 0),
                col("Revision", "integer", 0),
                col("Age", "string", 0),
            ],
            vec![
                name,
                json!(o
                    .pointer("/metadata/ownerReferences/0")
                    .map(|r| format!("{}/{}", s(r, "/kind").to_lowercase(), s(r, "/name")))
                    .unwrap_or_else(|| "<none>".into())),
                json!(i(o, "/revision")),
                age,
            ],
        ),
        ("", "ResourceQuota") => (
            vec![
                name_col(),
                col("Age", "string", 0),
                col("Request", "string", 0),
                col("Limit", "string", 0),
            ],
            {
                let (req, lim) = crate::api::admission::quota::table_columns(o);
                vec![name, age, json!(req), json!(lim)]
            },
        ),
        ("", "LimitRange") | ("", "PodTemplate") => (
            vec![name_col(), col("Created At", "date", 0)],
            vec![name, json!(s(o, "/metadata/creationTimestamp"))],
        ),
        ("certificates.k8s.io", "CertificateSigningRequest") => {
            let conds: Vec<&str> = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|c| c["type"].as_str()).collect())
                .unwrap_or_default();
            (
                vec![
                    name_col(),
                    col("Age", "string", 0),
                    col("SignerName", "string", 0),
                    col("Requestor", "string", 0),
                    col("RequestedDuration", "string", 0),
                    col("Condition", "string", 0),
                ],
                vec![
                    name,
                    age,
                    json!(s(o, "/spec/signerName")),
                    json!(s(o, "/spec/username")),
                    json!("<none>"),
                    json!(if conds.is_empty() {
                        "Pending".to_string()
                    } else {
                        conds.join(",")
                    }),
                ],
            )
        }
        ("networking.k8s.io", "IngressClass") => (
            vec![
                name_col(),
                col("Controller", "string", 0),
                col("Parameters", "string", 0),
                col("Age", "string", 0),
            ],
            vec![name, json!(s(o, "/spec/controller")), json!("<none>"), age],
        ),
        ("apiextensions.k8s.io", "CustomResourceDefinition") => (
            vec![name_col(), col("Created At", "date", 0)],
            vec![name, json!(s(o, "/metadata/creationTimestamp"))],
        ),
        _ => return None,
    })
}

fn val_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn access_modes(v: Option<&Value>) -> String {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(|m| match m {
                    "ReadWriteOnce" => "RWO",
                    "ReadOnlyMany" => "ROX",
                    "ReadWriteMany" => "RWX",
                    "ReadWriteOncePod" => "RWOP",
                    o => o,
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// Evaluates the JSONPath subset CRDs use in additionalPrinterColumns.
pub fn jsonpath(o: &Value, path: &str) -> Option<Value> {
    let p = path.trim().trim_start_matches('{').trim_end_matches('}');
    let p = p.strip_prefix('.').unwrap_or(p);
    let mut cur = o.clone();
    let mut rest = p;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            let inner = &r[..end];
            rest = r[end + 1..].strip_prefix('.').unwrap_or(&r[end + 1..]);
            if let Some(f) = inner.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')')) {
                let (field, want) = f.split_once("==")?;
                let want = want.trim().trim_matches('"').trim_matches('\'');
                cur = cur
                    .as_array()?
                    .iter()
                    .find(|x| x.get(field.trim()).and_then(Value::as_str) == Some(want))?
                    .clone();
            } else if inner == "*" {
                continue;
            } else {
                let idx: usize = inner.parse().ok()?;
                cur = cur.as_array()?.get(idx)?.clone();
            }
            continue;
        }
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let key = &rest[..end];
        cur = cur.get(key)?.clone();
        rest = &rest[end..];
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
    Some(cur)
}

fn custom_columns(def: &ResourceDef, o: &Value) -> (Vec<Col>, Vec<Value>, Vec<Value>) {
    let mut cols = vec![name_col()];
    let mut cells = vec![json!(s(o, "/metadata/name"))];
    let mut defs_json = Vec::new();
    let pcs = def
        .crd
        .as_ref()
        .map(|c| c.printer_columns.clone())
        .unwrap_or_default();
    if pcs.is_empty() {
        cols.push(col("Age", "date", 0));
        cells.push(json!(age_of(
            o.pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str)
        )));
    }
    for pc in &pcs {
        let ty = pc["type"].as_str().unwrap_or("string").to_string();
        let v = jsonpath(o, pc["jsonPath"].as_str().unwrap_or_default());
        let cell = match (ty.as_str(), v) {
            ("date", Some(Value::String(t))) => json!(age_of(Some(&t))),
            (_, Some(Value::String(x))) => json!(x),
            (_, Some(Value::Null)) | (_, None) => Value::Null,
            (_, Some(other)) => other,
        };
        cells.push(cell);
        defs_json.push(json!({
            "name": pc["name"].as_str().unwrap_or_default(),
            "type": if ty == "date" { "string".to_string() } else { ty },
            "format": pc["format"].as_str().unwrap_or_default(),
            "description": pc["description"].as_str().unwrap_or_default(),
            "priority": pc["priority"].as_i64().unwrap_or(0),
        }));
    }
    (cols, cells, defs_json)
}

fn col_json(c: &Col) -> Value {
    json!({
        "name": c.name,
        "type": c.ty,
        "format": if c.name == "Name" { "name" } else { "" },
        "description": c.desc,
        "priority": c.priority,
    })
}

/// How much of each object a Table row carries (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

fn row_object(o: &Value, include: IncludeObject) -> Option<Value> {
    match include {
        IncludeObject::None => None,
        IncludeObject::Object => Some(o.clone()),
        IncludeObject::Metadata => {
            let mut md = o.get("metadata").cloned().unwrap_or(json!({}));
            if let Some(m) = md.as_object_mut() {
                m.remove("managedFields");
            }
            Some(
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": md}),
            )
        }
    }
}

/// Column definitions and one row per object.
pub fn columns_and_rows(
    def: &ResourceDef,
    items: &[Value],
    include: IncludeObject,
) -> (Vec<Value>, Vec<Value>) {
    let mut col_defs: Option<Vec<Value>> = None;
    let mut rows = Vec::new();
    for o in items {
        let (cols, cells) = if def.crd.is_some() {
            let (cols, cells, extra) = custom_columns(def, o);
            if col_defs.is_none() {
                let mut v: Vec<Value> = cols.iter().map(col_json).collect();
                v.extend(extra);
                col_defs = Some(v);
            }
            (None, cells)
        } else {
            match builtin(&def.group, &def.kind, o) {
                Some((cols, cells)) => (Some(cols), cells),
                None => (
                    Some(vec![name_col(), col("Created At", "date", 0)]),
                    vec![
                        json!(s(o, "/metadata/name")),
                        json!(s(o, "/metadata/creationTimestamp")),
                    ],
                ),
            }
        };
        if col_defs.is_none() {
            col_defs = cols.map(|c| c.iter().map(col_json).collect());
        }
        let mut row = json!({"cells": cells});
        if let Some(obj) = row_object(o, include) {
            row["object"] = obj;
        }
        rows.push(row);
    }
    let col_defs = col_defs.unwrap_or_else(|| {
        // No objects: the columns still come from the kind's printer.
        let probe = json!({"metadata": {"name": ""}});
        if def.crd.is_some() {
            let (cols, _, extra) = custom_columns(def, &probe);
            let mut v: Vec<Value> = cols.iter().map(col_json).collect();
            v.extend(extra);
            v
        } else {
            builtin(&def.group, &def.kind, &probe)
                .map(|(c, _)| c)
                .unwrap_or_else(|| vec![name_col(), col("Created At", "date", 0)])
                .iter()
                .map(col_json)
                .collect()
        }
    });
    (col_defs, rows)
}

/// A Table for a list (or a single object).
pub fn table(
    def: &ResourceDef,
    items: &[Value],
    resource_version: &str,
    cont: Option<&str>,
    remaining: Option<i64>,
    include: IncludeObject,
) -> Value {
    let (cols, rows) = columns_and_rows(def, items, include);
    let mut md = json!({"resourceVersion": resource_version});
    if let Some(c) = cont {
        md["continue"] = json!(c);
    }
    if let Some(r) = remaining.filter(|r| *r > 0) {
        md["remainingItemCount"] = json!(r);
    }
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": md, "columnDefinitions": cols, "rows": rows})
}

/// Volumes and claims print `<unset>` without a VolumeAttributesClass, as upstream.
fn unset_if_empty(v: &str) -> String {
    if v.is_empty() {
        "<unset>".into()
    } else {
        v.to_string()
    }
}

/// Volumes and claims being deleted print `Terminating` instead of their phase.
fn phase_or_terminating(o: &Value) -> String {
    if o.pointer("/metadata/deletionTimestamp").is_some() {
        "Terminating".into()
    } else {
        s(o, "/status/phase").to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_print_like_kubectl() {
        for (s, want) in [
            (5, "5s"),
            (119, "119s"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600 + 5, "3h"),
            (7 * 3600 + 60 * 5, "7h5m"),
            (30 * 3600, "30h"),
            (50 * 3600, "2d2h"),
            (10 * 86400, "10d"),
            (3 * 365 * 86400, "3y"),
        ] {
            assert_eq!(human_duration(s), want, "{s}");
        }
    }

    #[test]
    fn jsonpath_subset_reads_printer_columns() {
        let o = json!({"spec": {"size": 3}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        assert_eq!(jsonpath(&o, ".spec.size"), Some(json!(3)));
        assert_eq!(
            jsonpath(&o, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(json!("True"))
        );
        assert_eq!(
            jsonpath(&o, ".status.conditions[0].type"),
            Some(json!("Ready"))
        );
        assert_eq!(jsonpath(&o, ".spec.missing"), None);
    }
}
