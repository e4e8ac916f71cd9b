//! Discovery: `/api`, `/apis`, `/apis/<group>`, the per-group-version resource lists, and the
//! aggregated (apidiscovery.k8s.io/v2) documents kubectl 1.32 asks for first.

use serde_json::{json, Value};

use crate::api::resources::{Registry, ResourceDef};

pub const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Whether an Accept header asks for aggregated discovery (v2 or v2beta1).
pub fn wants_aggregated(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let p = part.replace(' ', "");
        p.contains("as=APIGroupDiscoveryList")
            && p.contains("g=apidiscovery.k8s.io")
            && p.contains("v=v2")
            && !p.contains("v=v2beta1")
    })
}

fn gv(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

/// (name, verbs, response kind group/version/kind) of each subresource.
fn subresource_info(d: &ResourceDef, sub: &str) -> (Vec<&'static str>, (String, String, String)) {
    let own = (d.group.clone(), d.version.clone(), d.kind.clone());
    match sub {
        "status" | "approval" | "ephemeralcontainers" => (vec!["get", "patch", "update"], own),
        "scale" => (
            vec!["get", "patch", "update"],
            ("autoscaling".into(), "v1".into(), "Scale".into()),
        ),
        "binding" => (vec!["create"], ("".into(), "v1".into(), "Binding".into())),
        "eviction" => (
            vec!["create"],
            ("policy".into(), "v1".into(), "Eviction".into()),
        ),
        "log" => (vec!["get"], ("".into(), "v1".into(), "Pod".into())),
        "exec" | "attach" => (
            vec!["create", "get"],
            (
                "".into(),
                "v1".into(),
                format!(
                    "Pod{}Options",
                    if sub == "exec" { "Exec" } else { "Attach" }
                ),
            ),
        ),
        "portforward" => (
            vec!["create", "get"],
            ("".into(), "v1".into(), "PodPortForwardOptions".into()),
        ),
        "proxy" => (
            vec!["create", "delete", "get", "patch", "update"],
            ("".into(), "v1".into(), format!("{}ProxyOptions", d.kind)),
        ),
        "token" => (
            vec!["create"],
            (
                "authentication.k8s.io".into(),
                "v1".into(),
                "TokenRequest".into(),
            ),
        ),
        "finalize" => (vec!["update"], own),
        _ => (vec!["get"], own),
    }
}

/// `/api/v1` or `/apis/<g>/<v>`: the legacy APIResourceList.
pub fn resource_list(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let defs = registry.in_group_version(group, version);
    if defs.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for d in &defs {
        let mut r = json!({
            "name": d.plural,
            "singularName": d.singular,
            "namespaced": d.namespaced,
            "kind": d.kind,
            "verbs": d.verbs(),
        });
        if !d.short_names.is_empty() {
            r["shortNames"] = json!(d.short_names);
        }
        if !d.categories.is_empty() {
            r["categories"] = json!(d.categories);
        }
        resources.push(r);
        for sub in &d.subresources {
            let (verbs, (g, v, k)) = subresource_info(d, sub);
            let mut s = json!({
                "name": format!("{}/{sub}", d.plural),
                "singularName": "",
                "namespaced": d.namespaced,
                "kind": k,
                "verbs": verbs,
            });
            if g != d.group || v != d.version {
                if !g.is_empty() {
                    s["group"] = json!(g);
                }
                s["version"] = json!(v);
            }
            resources.push(s);
        }
    }
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv(group, version),
        "resources": resources,
    }))
}

/// `/api`: the legacy APIVersions.
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_obj(name: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": gv(name, v), "version": v}))
        .collect();
    json!({
        "name": name,
        "versions": vs,
        "preferredVersion": {"groupVersion": gv(name, &versions[0]), "version": versions[0]},
    })
}

/// `/apis`: the legacy APIGroupList.
pub fn group_list(registry: &Registry) -> Value {
    let groups: Vec<Value> = registry
        .group_versions()
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, vs)| group_obj(&g, &vs))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`.
pub fn group(registry: &Registry, name: &str) -> Option<Value> {
    registry
        .group_versions()
        .into_iter()
        .find(|(g, _)| g == name && !g.is_empty())
        .map(|(g, vs)| {
            let mut o = group_obj(&g, &vs);
            o["kind"] = json!("APIGroup");
            o["apiVersion"] = json!("v1");
            o
        })
}

/// The aggregated discovery document: the core group for `/api`, the others for `/apis`.
pub fn aggregated(registry: &Registry, core: bool) -> Value {
    let mut items = Vec::new();
    for (g, versions) in registry.group_versions() {
        if g.is_empty() != core {
            continue;
        }
        let mut vs = Vec::new();
        for v in &versions {
            let mut resources = Vec::new();
            for d in registry.in_group_version(&g, v) {
                let subs: Vec<Value> = d
                    .subresources
                    .iter()
                    .map(|s| {
                        let (verbs, (rg, rv, rk)) = subresource_info(&d, s);
                        json!({"subresource": s, "responseKind": {"group": rg, "version": rv, "kind": rk}, "verbs": verbs})
                    })
                    .collect();
                let mut r = json!({
                    "resource": d.plural,
                    "responseKind": {"group": d.group, "version": d.version, "kind": d.kind},
                    "scope": if d.namespaced { "Namespaced" } else { "Cluster" },
                    "singularResource": d.singular,
                    "verbs": d.verbs(),
                });
                if !d.short_names.is_empty() {
                    r["shortNames"] = json!(d.short_names);
                }
                if !d.categories.is_empty() {
                    r["categories"] = json!(d.categories);
                }
                if !subs.is_empty() {
                    r["subresources"] = json!(subs);
                }
                resources.push(r);
            }
            vs.push(json!({"version": v, "resources": resources, "freshness": "Current"}));
        }
        items.push(json!({"metadata": {"name": g, "creationTimestamp": null}, "versions": vs}));
    }
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregated_discovery_lists_resources_with_short_names() {
        let r = Registry::new();
        let core = aggregated(&r, true);
        assert_eq!(core["items"].as_array().unwrap().len(), 1);
        let res = core["items"][0]["versions"][0]["resources"]
            .as_array()
            .unwrap();
        let pods = res.iter().find(|x| x["resource"] == "pods").unwrap();
        assert_eq!(pods["shortNames"], json!(["po"]));
        assert_eq!(pods["categories"], json!(["all"]));
        assert_eq!(pods["scope"], "Namespaced");
        let apis = aggregated(&r, false);
        let apps = apis["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["metadata"]["name"] == "apps")
            .unwrap();
        assert_eq!(apps["versions"][0]["version"], "v1");
        assert!(wants_aggregated(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
        ));
        assert!(!wants_aggregated("application/json"));
    }

    #[test]
    fn legacy_lists_include_subresources() {
        let r = Registry::new();
        let l = resource_list(&r, "apps", "v1").unwrap();
        let names: Vec<&str> = l["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"deployments/scale"));
        assert!(resource_list(&r, "apps", "v9").is_none());
    }
}
