//! Request parsing: which endpoint a URL path names, and the query parameters of resource
//! requests (as upstream's RequestInfoFactory and meta/v1 options).

use std::collections::BTreeMap;

use crate::api::status::{ApiError, ApiResult};

/// What a path addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Health {
        check: String,
        verbose: bool,
    },
    Version,
    Metrics,
    /// `/api`
    CoreRoot,
    /// `/apis`
    GroupsRoot,
    /// `/apis/<group>`
    Group(String),
    /// `/api/v1` or `/apis/<group>/<version>`
    GroupVersion {
        group: String,
        version: String,
    },
    OpenApiV2,
    OpenApiV3Root,
    /// `/openapi/v3/api/v1` or `/openapi/v3/apis/<group>/<version>`
    OpenApiV3 {
        group: String,
        version: String,
    },
    Resource(ResourcePath),
    NotFound,
}

/// `/api/v1/namespaces/<ns>/<plural>/<name>/<subresource>` and the cluster-scoped forms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourcePath {
    pub group: String,
    pub version: String,
    pub namespace: Option<String>,
    pub plural: String,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

fn segments(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect()
}

pub fn parse_path(path: &str) -> Route {
    let segs = segments(path);
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    match s.as_slice() {
        [c @ ("healthz" | "livez" | "readyz"), rest @ ..] => Route::Health {
            check: if rest.is_empty() {
                c.to_string()
            } else {
                format!("{c}/{}", rest.join("/"))
            },
            verbose: false,
        },
        ["version"] => Route::Version,
        ["metrics"] => Route::Metrics,
        ["api"] => Route::CoreRoot,
        ["apis"] => Route::GroupsRoot,
        ["apis", g] => Route::Group(g.to_string()),
        ["api", v] => Route::GroupVersion {
            group: String::new(),
            version: v.to_string(),
        },
        ["apis", g, v] => Route::GroupVersion {
            group: g.to_string(),
            version: v.to_string(),
        },
        ["openapi", "v2"] | ["swagger.json"] => Route::OpenApiV2,
        ["openapi", "v3"] => Route::OpenApiV3Root,
        ["openapi", "v3", "api", v] => Route::OpenApiV3 {
            group: String::new(),
            version: v.to_string(),
        },
        ["openapi", "v3", "apis", g, v] => Route::OpenApiV3 {
            group: g.to_string(),
            version: v.to_string(),
        },
        ["api", v, rest @ ..] => resource(String::new(), v, rest),
        ["apis", g, v, rest @ ..] => resource(g.to_string(), v, rest),
        _ => Route::NotFound,
    }
}

fn resource(group: String, version: &str, rest: &[&str]) -> Route {
    let version = version.to_string();
    let r = |ns: Option<&str>, plural: &str, name: Option<&str>, sub: Option<&str>| {
        Route::Resource(ResourcePath {
            group: group.clone(),
            version: version.clone(),
            namespace: ns.map(str::to_string),
            plural: plural.to_string(),
            name: name.map(str::to_string),
            subresource: sub.map(str::to_string),
        })
    };
    match rest {
        // The namespace object itself and its subresources.
        ["namespaces", name] if group.is_empty() => r(None, "namespaces", Some(name), None),
        ["namespaces", name, sub @ ("status" | "finalize")] if group.is_empty() => {
            r(None, "namespaces", Some(name), Some(sub))
        }
        ["namespaces", ns, plural] => r(Some(ns), plural, None, None),
        ["namespaces", ns, plural, name] => r(Some(ns), plural, Some(name), None),
        ["namespaces", ns, plural, name, sub, ..] => r(Some(ns), plural, Some(name), Some(sub)),
        [plural] => r(None, plural, None, None),
        [plural, name] => r(None, plural, Some(name), None),
        [plural, name, sub, ..] => r(None, plural, Some(name), Some(sub)),
        _ => Route::NotFound,
    }
}

pub use crate::httputil::percent_decode;

/// Parses an `application/x-www-form-urlencoded` query string; repeated keys keep every value.
pub fn parse_query(q: &str) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(&k.replace('+', " "));
        let v = percent_decode(&v.replace('+', " "));
        m.entry(k).or_default().push(v);
    }
    m
}

/// Query parameters of resource requests.
#[derive(Clone, Debug, Default)]
pub struct Query {
    raw: BTreeMap<String, Vec<String>>,
}

impl Query {
    pub fn parse(q: Option<&str>) -> Query {
        Query {
            raw: q.map(parse_query).unwrap_or_default(),
        }
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.raw.get(k).and_then(|v| v.last()).map(String::as_str)
    }

    pub fn all(&self, k: &str) -> Vec<String> {
        self.raw.get(k).cloned().unwrap_or_default()
    }

    pub fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true") | Some("1") | Some(""))
    }

    pub fn int(&self, k: &str) -> ApiResult<Option<i64>> {
        match self.get(k) {
            None | Some("") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                ApiError::bad_request(format!("invalid value for {k}: {v:?} is not an integer"))
            }),
        }
    }

    /// `dryRun=All` (the only value upstream accepts).
    pub fn dry_run(&self) -> ApiResult<bool> {
        let v = self.all("dryRun");
        for d in &v {
            if d != "All" {
                return Err(ApiError::bad_request(format!(
                    "Invalid dryRun: {d:?}: supported values: \"All\""
                )));
            }
        }
        Ok(!v.is_empty())
    }

    /// `fieldValidation`: Strict (kubectl's default), Warn, Ignore; upstream's default is Warn.
    pub fn field_validation(&self) -> ApiResult<FieldValidation> {
        match self.get("fieldValidation") {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation must be one of \"Ignore\", \"Warn\", or \"Strict\", got {other:?}"
            ))),
        }
    }

    pub fn field_manager(&self) -> Option<&str> {
        self.get("fieldManager").filter(|s| !s.is_empty())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    Strict,
    Warn,
    Ignore,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(path: &str) -> ResourcePath {
        match parse_path(path) {
            Route::Resource(r) => r,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn paths_parse_as_upstream_request_info() {
        let r = res("/api/v1/namespaces/default/pods/web-1/log");
        assert_eq!(
            (
                r.namespace.as_deref(),
                r.plural.as_str(),
                r.name.as_deref(),
                r.subresource.as_deref()
            ),
            (Some("default"), "pods", Some("web-1"), Some("log"))
        );
        let r = res("/api/v1/namespaces/kube-system");
        assert_eq!(
            (r.namespace, r.plural.as_str(), r.name.as_deref()),
            (None, "namespaces", Some("kube-system"))
        );
        let r = res("/api/v1/namespaces/x/status");
        assert_eq!(
            (r.plural.as_str(), r.subresource.as_deref()),
            ("namespaces", Some("status"))
        );
        let r = res("/apis/apps/v1/deployments");
        assert_eq!(
            (r.group.as_str(), r.namespace, r.name),
            ("apps", None, None)
        );
        let r = res("/api/v1/namespaces/default/configmaps");
        assert_eq!(
            (r.namespace.as_deref(), r.plural.as_str()),
            (Some("default"), "configmaps")
        );
        assert_eq!(
            parse_path("/apis/apps/v1"),
            Route::GroupVersion {
                group: "apps".into(),
                version: "v1".into()
            }
        );
        assert_eq!(
            parse_path("/openapi/v3/apis/apps/v1"),
            Route::OpenApiV3 {
                group: "apps".into(),
                version: "v1".into()
            }
        );
        assert_eq!(parse_path("/nope"), Route::NotFound);
    }

    #[test]
    fn queries_decode_percent_escapes() {
        let q = Query::parse(Some(
            "labelSelector=app%3Dweb%2Ctier+in+%28a%2Cb%29&limit=500&dryRun=All",
        ));
        assert_eq!(q.get("labelSelector"), Some("app=web,tier in (a,b)"));
        assert_eq!(q.int("limit").unwrap(), Some(500));
        assert!(q.dry_run().unwrap());
        assert!(Query::parse(Some("limit=x")).int("limit").is_err());
    }
}
