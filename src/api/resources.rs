//! The registry of resource kinds the API server serves: group, version, kind, plural and
//! singular names, short names, categories, scope, subresources, and for built-in kinds the
//! k8s-openapi type used to check decoded objects and to describe their schema.
//! CustomResourceDefinitions add kinds at run time through the same registry.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiext;
use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope, Resource};
use parking_lot::RwLock;
use serde_json::Value;

/// Checks that a JSON object decodes as the built-in type; the error is serde's message.
pub type TypeCheck = fn(&Value) -> Result<(), String>;
/// Adds the kind's schema (and everything it references) to a generator.
pub type SchemaFn = fn(&mut schemars::SchemaGenerator) -> schemars::Schema;

/// One kind served at one group/version.
#[derive(Clone)]
pub struct ResourceDef {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub list_kind: String,
    pub plural: String,
    pub singular: String,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub namespaced: bool,
    /// Subresources served besides the main resource (`status`, `scale`, …).
    pub subresources: Vec<String>,
    /// Built-in kinds: the typed decode check and the schema.
    pub type_check: Option<TypeCheck>,
    pub schema: Option<SchemaFn>,
    /// OpenAPI definition name, e.g. `io.k8s.api.core.v1.Pod`.
    pub schema_name: String,
    /// Storage prefix shared by all versions of the kind (group/plural).
    pub storage_group: String,
    /// Served through a custom resource definition.
    pub crd: Option<Arc<CrdInfo>>,
}

/// What a custom resource kind needs beyond the common fields.
#[derive(Clone, Debug)]
pub struct CrdInfo {
    /// The structural schema of this version (openAPIV3Schema), if any.
    pub schema: Option<Value>,
    pub printer_columns: Vec<Value>,
    pub scale: Option<Value>,
}

impl std::fmt::Debug for ResourceDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} {}", self.group, self.version, self.plural)
    }
}

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `deployments.apps`: how upstream names the resource in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn has_subresource(&self, s: &str) -> bool {
        self.subresources.iter().any(|x| x == s)
    }

    /// Key prefix in the store for objects of this kind (all versions share it).
    pub fn key_prefix(&self, namespace: Option<&str>) -> String {
        let g = if self.storage_group.is_empty() {
            "core"
        } else {
            &self.storage_group
        };
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("/registry/{g}/{}/{ns}/", self.plural),
            _ => format!("/registry/{g}/{}/", self.plural),
        }
    }

    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.key_prefix(namespace))
    }

    /// Verbs of the main resource.
    pub fn verbs(&self) -> Vec<&'static str> {
        if self.kind == "Binding" {
            return vec!["create"];
        }
        vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }

    pub fn has_status(&self) -> bool {
        self.has_subresource("status")
    }
}

trait Scope {
    const NAMESPACED: bool;
}
impl Scope for NamespaceResourceScope {
    const NAMESPACED: bool = true;
}
impl Scope for ClusterResourceScope {
    const NAMESPACED: bool = false;
}

fn type_check<T: serde::de::DeserializeOwned>(v: &Value) -> Result<(), String> {
    T::deserialize(v).map(|_| ()).map_err(|e| e.to_string())
}

fn schema_of<T: schemars::JsonSchema>(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    g.subschema_for::<T>()
}

fn builtin<T>(short: &[&str], categories: &[&str], subresources: &[&str]) -> ResourceDef
where
    T: Resource + serde::de::DeserializeOwned + schemars::JsonSchema + 'static,
    T::Scope: Scope,
{
    ResourceDef {
        group: T::GROUP.to_string(),
        version: T::VERSION.to_string(),
        kind: T::KIND.to_string(),
        list_kind: format!("{}List", T::KIND),
        plural: T::URL_PATH_SEGMENT.to_string(),
        singular: T::KIND.to_lowercase(),
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: categories.iter().map(|s| s.to_string()).collect(),
        namespaced: <T::Scope as Scope>::NAMESPACED,
        subresources: subresources.iter().map(|s| s.to_string()).collect(),
        type_check: Some(type_check::<T>),
        schema: Some(schema_of::<T>),
        schema_name: T::schema_name().to_string(),
        storage_group: T::GROUP.to_string(),
        crd: None,
    }
}

/// Every built-in kind, in discovery order.
pub fn builtins() -> Vec<ResourceDef> {
    use api::apps::v1 as apps;
    use api::core::v1 as core;
    const ALL: &[&str] = &["all"];
    const NONE: &[&str] = &[];
    let mut v = vec![
        builtin::<core::Binding>(NONE, NONE, NONE),
        builtin::<core::ConfigMap>(&["cm"], NONE, NONE),
        builtin::<core::Endpoints>(&["ep"], NONE, NONE),
        builtin::<core::Event>(&["ev"], NONE, NONE),
        builtin::<core::LimitRange>(&["limits"], NONE, NONE),
        builtin::<core::Namespace>(&["ns"], NONE, &["finalize", "status"]),
        builtin::<core::Node>(&["no"], NONE, &["proxy", "status"]),
        builtin::<core::PersistentVolumeClaim>(&["pvc"], NONE, &["status"]),
        builtin::<core::PersistentVolume>(&["pv"], NONE, &["status"]),
        builtin::<core::Pod>(
            &["po"],
            ALL,
            &[
                "attach",
                "binding",
                "ephemeralcontainers",
                "eviction",
                "exec",
                "log",
                "portforward",
                "proxy",
                "status",
            ],
        ),
        builtin::<core::PodTemplate>(NONE, NONE, NONE),
        builtin::<core::ReplicationController>(&["rc"], ALL, &["scale", "status"]),
        builtin::<core::ResourceQuota>(&["quota"], NONE, &["status"]),
        builtin::<core::Secret>(NONE, NONE, NONE),
        builtin::<core::ServiceAccount>(&["sa"], NONE, &["token"]),
        builtin::<core::Service>(&["svc"], ALL, &["proxy", "status"]),
        builtin::<apps::ControllerRevision>(NONE, NONE, NONE),
        builtin::<apps::DaemonSet>(&["ds"], ALL, &["status"]),
        builtin::<apps::Deployment>(&["deploy"], ALL, &["scale", "status"]),
        builtin::<apps::ReplicaSet>(&["rs"], ALL, &["scale", "status"]),
        builtin::<apps::StatefulSet>(&["sts"], ALL, &["scale", "status"]),
        builtin::<api::autoscaling::v2::HorizontalPodAutoscaler>(&["hpa"], ALL, &["status"]),
        builtin::<api::autoscaling::v1::HorizontalPodAutoscaler>(&["hpa"], ALL, &["status"]),
        builtin::<api::batch::v1::CronJob>(&["cj"], ALL, &["status"]),
        builtin::<api::batch::v1::Job>(NONE, ALL, &["status"]),
        builtin::<api::certificates::v1::CertificateSigningRequest>(
            &["csr"],
            NONE,
            &["approval", "status"],
        ),
        builtin::<api::coordination::v1::Lease>(NONE, NONE, NONE),
        builtin::<api::discovery::v1::EndpointSlice>(NONE, NONE, NONE),
        builtin::<api::events::v1::Event>(&["ev"], NONE, NONE),
        builtin::<api::networking::v1::IngressClass>(NONE, NONE, NONE),
        builtin::<api::networking::v1::Ingress>(&["ing"], NONE, &["status"]),
        builtin::<api::networking::v1::NetworkPolicy>(&["netpol"], NONE, NONE),
        builtin::<api::policy::v1::PodDisruptionBudget>(&["pdb"], NONE, &["status"]),
        builtin::<api::rbac::v1::ClusterRoleBinding>(NONE, NONE, NONE),
        builtin::<api::rbac::v1::ClusterRole>(NONE, NONE, NONE),
        builtin::<api::rbac::v1::RoleBinding>(NONE, NONE, NONE),
        builtin::<api::rbac::v1::Role>(NONE, NONE, NONE),
        builtin::<api::scheduling::v1::PriorityClass>(&["pc"], NONE, NONE),
        builtin::<api::storage::v1::StorageClass>(&["sc"], NONE, NONE),
        builtin::<apiext::CustomResourceDefinition>(&["crd", "crds"], NONE, &["status"]),
    ];
    // Core events and events.k8s.io events are one resource upstream; here they share nothing
    // but the short name, which discovery gives to the core one only.
    for d in &mut v {
        if d.group == "events.k8s.io" {
            d.short_names.clear();
        }
    }
    v
}

/// Group/versions in the order discovery lists them (preferred version first per group).
pub fn group_order() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("", vec!["v1"]),
        ("apiregistration.k8s.io", vec![]),
        ("apps", vec!["v1"]),
        ("events.k8s.io", vec!["v1"]),
        ("authentication.k8s.io", vec![]),
        ("authorization.k8s.io", vec![]),
        ("autoscaling", vec!["v2", "v1"]),
        ("batch", vec!["v1"]),
        ("certificates.k8s.io", vec!["v1"]),
        ("networking.k8s.io", vec!["v1"]),
        ("policy", vec!["v1"]),
        ("rbac.authorization.k8s.io", vec!["v1"]),
        ("storage.k8s.io", vec!["v1"]),
        ("admissionregistration.k8s.io", vec![]),
        ("apiextensions.k8s.io", vec!["v1"]),
        ("scheduling.k8s.io", vec!["v1"]),
        ("coordination.k8s.io", vec!["v1"]),
        ("node.k8s.io", vec![]),
        ("discovery.k8s.io", vec!["v1"]),
    ]
}

/// The live registry: built-in kinds plus those added by CRDs.
pub struct Registry {
    inner: RwLock<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    defs: Vec<Arc<ResourceDef>>,
    /// (group, version, plural) → def.
    by_path: BTreeMap<(String, String, String), Arc<ResourceDef>>,
    /// Bumped on every change (discovery ETags, OpenAPI hashes).
    generation: u64,
}

impl Registry {
    pub fn new() -> Registry {
        let r = Registry {
            inner: RwLock::new(RegistryInner::default()),
        };
        for d in builtins() {
            r.add(d);
        }
        r
    }

    pub fn add(&self, def: ResourceDef) {
        let mut g = self.inner.write();
        let def = Arc::new(def);
        let key = (def.group.clone(), def.version.clone(), def.plural.clone());
        g.defs
            .retain(|d| (d.group.clone(), d.version.clone(), d.plural.clone()) != key);
        g.defs.push(def.clone());
        g.by_path.insert(key, def);
        g.generation += 1;
    }

    /// Removes every version of a custom resource's group/plural.
    pub fn remove_crd(&self, group: &str, plural: &str) {
        let mut g = self.inner.write();
        g.defs
            .retain(|d| !(d.crd.is_some() && d.group == group && d.plural == plural));
        g.by_path
            .retain(|(gr, _, p), d| !(d.crd.is_some() && gr == group && p == plural));
        g.generation += 1;
    }

    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.inner
            .read()
            .by_path
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<ResourceDef>> {
        self.inner.read().defs.clone()
    }

    pub fn generation(&self) -> u64 {
        self.inner.read().generation
    }

    /// Every group/version served, preferred version of each group first.
    pub fn group_versions(&self) -> Vec<(String, Vec<String>)> {
        let defs = self.all();
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for (g, versions) in group_order() {
            let served: Vec<String> = versions
                .iter()
                .filter(|v| defs.iter().any(|d| d.group == g && d.version == **v))
                .map(|v| v.to_string())
                .collect();
            if !served.is_empty() {
                out.push((g.to_string(), served));
            }
        }
        // Custom resource groups, in name order; versions as their CRDs list them.
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for d in defs.iter().filter(|d| d.crd.is_some()) {
            if out.iter().any(|(g, _)| g == &d.group) {
                continue;
            }
            let vs = extra.entry(d.group.clone()).or_default();
            if !vs.contains(&d.version) {
                vs.push(d.version.clone());
            }
        }
        for (g, mut vs) in extra {
            vs.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
            out.push((g, vs));
        }
        out
    }

    pub fn in_group_version(&self, group: &str, version: &str) -> Vec<Arc<ResourceDef>> {
        let mut v: Vec<_> = self
            .all()
            .into_iter()
            .filter(|d| d.group == group && d.version == version)
            .collect();
        v.sort_by(|a, b| a.plural.cmp(&b.plural));
        v
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

/// Kubernetes version priority: GA > beta > alpha, higher numbers first (v2 > v1 > v1beta2).
pub fn version_priority(v: &str) -> (u8, u32, u32) {
    let Some(rest) = v.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let major: u32 = digits.parse().unwrap_or(0);
    let tail = &rest[digits.len()..];
    if tail.is_empty() {
        return (3, major, 0);
    }
    let (stage, n) = if let Some(n) = tail.strip_prefix("beta") {
        (2, n)
    } else if let Some(n) = tail.strip_prefix("alpha") {
        (1, n)
    } else {
        return (0, 0, 0);
    };
    (stage, major, n.parse().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_have_upstream_names_and_scopes() {
        let r = Registry::new();
        let pods = r.get("", "v1", "pods").unwrap();
        assert_eq!((pods.kind.as_str(), pods.namespaced), ("Pod", true));
        assert_eq!(pods.short_names, vec!["po"]);
        assert_eq!(
            pods.key(Some("default"), "x").as_str(),
            "/registry/core/pods/default/x"
        );
        let ns = r.get("", "v1", "namespaces").unwrap();
        assert!(!ns.namespaced);
        let d = r.get("apps", "v1", "deployments").unwrap();
        assert_eq!(d.qualified(), "deployments.apps");
        assert_eq!(d.schema_name, "io.k8s.api.apps.v1.Deployment");
        assert!(r.get("", "v1", "nopes").is_none());
        let gv = r.group_versions();
        assert_eq!(gv[0], ("".to_string(), vec!["v1".to_string()]));
        assert!(gv.contains(&("autoscaling".into(), vec!["v2".into(), "v1".into()])));
    }

    #[test]
    fn versions_sort_as_kubernetes_does() {
        let mut v = vec!["v1beta1", "v2", "v1alpha1", "v1", "v10", "v2beta2", "foo"];
        v.sort_by_key(|x| std::cmp::Reverse(version_priority(x)));
        assert_eq!(
            v,
            vec!["v10", "v2", "v1", "v2beta2", "v1beta1", "v1alpha1", "foo"]
        );
    }
}
