//! The Kubernetes API server: request pipeline (authenticate → authorize → decode → admission →
//! registry → storage) over the embedded store, discovery, OpenAPI, Table printing and watch.

// `ApiError` carries a whole upstream Status (reason, message, details, causes); it is returned
// on the error path of nearly every function here, where its size does not matter.
#![allow(clippy::result_large_err)]

pub mod admission;
pub mod apply;
pub mod cache;
pub mod crd;
pub mod defaults;
pub mod discovery;
pub mod eviction;
pub mod http;
pub mod managed;
pub mod metrics;
pub mod namespaces;
pub mod objects;
pub mod openapi;
pub mod patch;
pub mod pods;
pub mod protobuf;
pub mod proxy;
pub mod request;
pub mod resources;
pub mod selectors;
pub mod status;
pub mod table;
pub mod tokens;
pub mod validation;
pub mod watch;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use k3rs_storage::Store;
use serde_json::{json, Value};

use crate::api::objects::{DeleteOpts, ListOpts, Part, WriteOpts};
use crate::api::patch::PatchType;
use crate::api::request::{parse_path, Query, ResourcePath, Route};
use crate::api::resources::{Registry, ResourceDef};
use crate::api::status::{success_status, ApiError, ApiResult};
use crate::api::table::IncludeObject;

/// The Kubernetes version this server reports (kubectl 1.32–1.34 are within skew).
pub const KUBE_VERSION: &str = "v1.33.5";
pub const K3RS_VERSION: &str = env!("CARGO_PKG_VERSION");

pub use crate::httputil::Body;

/// An authenticated identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

/// Settings the API server needs from the server configuration.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// `host:port` clients are told to use (discovery's serverAddressByClientCIDRs).
    pub server_address: String,
    /// Events expire this long after they were last written.
    pub event_ttl: Duration,
    /// Pod network (a /24 per node is carved from it).
    pub cluster_cidr: crate::config::Cidr,
    /// ClusterIPs come from here; its first address is the `kubernetes` Service's.
    pub service_cidr: crate::config::Cidr,
    /// The cluster DNS Service's address (reserved for it).
    pub cluster_dns: std::net::IpAddr,
    pub cluster_domain: String,
    /// NodePorts, inclusive.
    pub service_node_port_range: (u16, u16),
    /// The advertised address of this API server (the `kubernetes` endpoints).
    pub advertise_address: std::net::IpAddr,
    pub https_port: u16,
    /// A node whose Lease is not renewed for this long is marked Unknown and tainted
    /// unreachable (`--node-monitor-grace-period`).
    pub node_monitor_grace_period: Duration,
}

/// Everything a request handler needs.
pub struct ApiState {
    pub store: Store,
    pub caches: cache::WatchCaches,
    pub registry: Registry,
    pub schemas: openapi::Schemas,
    pub config: ApiConfig,
    pub metrics: metrics::Metrics,
    pub ready: AtomicBool,
    /// The lease events are attached to, and when it was granted (reused for a minute, as
    /// upstream's lease manager does, so that events do not cost one lease each).
    event_lease: parking_lot::Mutex<Option<(i64, Instant)>>,
    namespace_tx: tokio::sync::mpsc::UnboundedSender<String>,
    /// Service account token issuer (set once at start, from the PKI).
    pub tokens: std::sync::OnceLock<tokens::Issuer>,
}

impl ApiState {
    pub fn new(
        store: Store,
        config: ApiConfig,
    ) -> (Arc<ApiState>, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let registry = Registry::new();
        let schemas = openapi::Schemas::build(&registry);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            Arc::new(ApiState {
                caches: cache::WatchCaches::new(store.clone()),
                store,
                registry,
                schemas,
                config,
                metrics: metrics::Metrics::default(),
                ready: AtomicBool::new(false),
                event_lease: parking_lot::Mutex::new(None),
                namespace_tx: tx,
                tokens: std::sync::OnceLock::new(),
            }),
            rx,
        )
    }

    /// The lease an event written now attaches to (its TTL is `event_ttl` plus the reuse
    /// window).
    pub async fn event_lease(&self) -> ApiResult<i64> {
        let ttl = self.config.event_ttl.as_secs().max(1);
        // An event written at any time inside the reuse window still lives `ttl`.
        let window = ttl.min(60);
        if let Some((id, at)) = *self.event_lease.lock() {
            if at.elapsed() < Duration::from_secs(window) {
                return Ok(id);
            }
        }
        let ttl = (ttl + window) as i64;
        let g = self.store.lease_grant(ttl).await?;
        *self.event_lease.lock() = Some((g.id, Instant::now()));
        Ok(g.id)
    }

    /// A namespace was marked for deletion: its contents are removed in the background.
    pub fn namespace_deleted(&self, name: &str) {
        let _ = self.namespace_tx.send(name.to_string());
    }
}

use crate::httputil::full;

fn json_response(code: StatusCode, v: &Value, warnings: &[String]) -> Response<Body> {
    let body = serde_json::to_vec(v).expect("JSON");
    let mut r = Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .header("cache-control", "no-cache, private");
    for w in warnings {
        r = r.header("warning", format!("299 - \"{}\"", w.replace('"', "\\\"")));
    }
    r.body(full(body)).expect("valid response")
}

pub fn json_response_pub(code: StatusCode, v: &Value, warnings: &[String]) -> Response<Body> {
    json_response(code, v, warnings)
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.to_status(),
        &[],
    );
    if let Some(s) = e.retry_after {
        r.headers_mut()
            .insert("retry-after", s.to_string().parse().expect("digits"));
    }
    r
}

pub(crate) fn text_response(code: StatusCode, text: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "text/plain; charset=utf-8")
        .body(full(text.into()))
        .expect("valid response")
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> &'a str {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Which Table form (if any) the Accept header asks for.
fn wants_table(accept: &str, q: &Query) -> Option<IncludeObject> {
    if !accept.contains("as=Table") {
        return None;
    }
    Some(match q.get("includeObject") {
        Some("None") => IncludeObject::None,
        Some("Object") => IncludeObject::Object,
        _ => IncludeObject::Metadata,
    })
}

/// Reads a request body of at most 3 MiB. A larger one is read to its end (up to a bound) and
/// discarded before the 413 goes out, so that clients see the answer instead of a reset stream.
async fn read_body(mut body: Incoming) -> ApiResult<Bytes> {
    use hyper::body::Body as _;
    const DRAIN_LIMIT: usize = 64 << 20;
    let mut buf = bytes::BytesMut::new();
    let mut total = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let frame = match tokio::time::timeout_at(
            deadline,
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)),
        )
        .await
        {
            Err(_) => return Err(ApiError::timeout("timed out reading the request body")),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(format!(
                    "reading the request body: {e}"
                )))
            }
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            total += data.len();
            if total <= objects::MAX_BODY_BYTES {
                buf.extend_from_slice(&data);
            } else if total > DRAIN_LIMIT {
                break;
            }
        }
    }
    if total > objects::MAX_BODY_BYTES {
        return Err(ApiError::too_large(
            "Request entity too large: limit is 3145728",
        ));
    }
    Ok(buf.freeze())
}

/// Decodes a JSON, YAML or protobuf request body into an object.
fn decode_body(st: &ApiState, content_type: &str, body: &[u8]) -> ApiResult<Value> {
    if content_type.split(';').next().unwrap_or_default().trim() == protobuf::CONTENT_TYPE {
        return protobuf::decode(&st.schemas, body);
    }
    let ct = content_type.split(';').next().unwrap_or_default().trim();
    let v: Value = match ct {
        "" | "application/json" | "*/*" => serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("the body of the request was not valid JSON: {e}"))
        })?,
        "application/yaml"
        | "application/x-yaml"
        | "text/yaml"
        | "application/apply-patch+yaml" => {
            let y: serde_yaml::Value = serde_yaml::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!("error converting YAML to JSON: {e}"))
            })?;
            serde_json::to_value(y)
                .map_err(|e| ApiError::bad_request(format!("error converting YAML to JSON: {e}")))?
        }
        other => return Err(ApiError::unsupported_media_type(other)),
    };
    Ok(v)
}

/// Handles one HTTP request of an authenticated (or anonymous) client.
pub async fn handle(
    st: Arc<ApiState>,
    user: Option<User>,
    req: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    let method = req.method().clone();
    let route = parse_path(req.uri().path());
    let resource_label = match &route {
        Route::Resource(r) => r.plural.clone(),
        _ => String::new(),
    };
    let resp = match dispatch(&st, user, route, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    st.metrics.observe(
        method.as_str(),
        &resource_label,
        resp.status().as_u16(),
        start.elapsed(),
    );
    resp
}

async fn dispatch(
    st: &Arc<ApiState>,
    user: Option<User>,
    route: Route,
    req: Request<Incoming>,
) -> ApiResult<Response<Body>> {
    let q = Query::parse(req.uri().query());
    // Public endpoints.
    match &route {
        Route::Health { check, .. } => {
            let ready = st.ready.load(Ordering::SeqCst);
            let verbose = q.get("verbose").is_some();
            let name = check.split('/').next().unwrap_or_default();
            let checks: Vec<(&str, bool)> = match name {
                "readyz" => vec![
                    ("ping", true),
                    ("log", true),
                    ("etcd", ready),
                    ("poststarthook/bootstrap-namespaces", ready),
                    ("shutdown", true),
                ],
                _ => vec![("ping", true), ("log", true), ("etcd", true)],
            };
            let ok = checks.iter().all(|(_, ok)| *ok);
            let code = if ok {
                StatusCode::OK
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            if verbose {
                let mut s = String::new();
                for (c, ok) in &checks {
                    s.push_str(&format!(
                        "[{}]{c} {}\n",
                        if *ok { "+" } else { "-" },
                        if *ok { "ok" } else { "failed: not ready" }
                    ));
                }
                s.push_str(&format!(
                    "{name} check {}\n",
                    if ok { "passed" } else { "failed" }
                ));
                return Ok(text_response(code, s));
            }
            return Ok(text_response(code, if ok { "ok" } else { "not ready" }));
        }
        Route::Version => {
            return Ok(json_response(
                StatusCode::OK,
                &json!({
                    "major": "1", "minor": "33",
                    "gitVersion": format!("{KUBE_VERSION}+k3rs{}", K3RS_VERSION),
                    "gitCommit": "", "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z",
                    "goVersion": "n/a (rust)", "compiler": "rustc", "platform": format!("linux/{}", crate::arch()),
                }),
                &[],
            ))
        }
        _ => {}
    }
    let Some(user) = user else {
        return Err(ApiError::unauthorized());
    };
    // Authorization: every authenticated user may do everything until RBAC lands.
    let accept = header(&req, "accept").to_string();
    let if_none_match = header(&req, "if-none-match").to_string();
    match route {
        Route::Health { .. } | Route::Version => unreachable_route(),
        Route::Metrics => Ok(text_response(StatusCode::OK, st.metrics.render(&st.store))),
        Route::CoreRoot => {
            if discovery::wants_aggregated(&accept) {
                Ok(aggregated_response(
                    &discovery::aggregated(&st.registry, true),
                    &if_none_match,
                ))
            } else {
                Ok(json_response(
                    StatusCode::OK,
                    &discovery::core_versions(&st.config.server_address),
                    &[],
                ))
            }
        }
        Route::GroupsRoot => {
            if discovery::wants_aggregated(&accept) {
                Ok(aggregated_response(
                    &discovery::aggregated(&st.registry, false),
                    &if_none_match,
                ))
            } else {
                Ok(json_response(
                    StatusCode::OK,
                    &discovery::group_list(&st.registry),
                    &[],
                ))
            }
        }
        Route::Group(g) => discovery::group(&st.registry, &g)
            .map(|v| json_response(StatusCode::OK, &v, &[]))
            .ok_or_else(not_found_page),
        Route::GroupVersion { group, version } => {
            discovery::resource_list(&st.registry, &group, &version)
                .map(|v| json_response(StatusCode::OK, &v, &[]))
                .ok_or_else(not_found_page)
        }
        Route::OpenApiV3Root => Ok(json_response(
            StatusCode::OK,
            &st.schemas.v3_root(&st.registry),
            &[],
        )),
        Route::OpenApiV3 { group, version } => {
            match st.schemas.v3_doc(&st.registry, &group, &version) {
                Some((hash, body)) => Ok(Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .header("etag", format!("\"{hash}\""))
                    .header(
                        "cache-control",
                        if q.get("hash").is_some() {
                            "public, immutable"
                        } else {
                            "no-cache, private"
                        },
                    )
                    .body(full(body))
                    .expect("valid response")),
                None => Err(not_found_page()),
            }
        }
        Route::OpenApiV2 => {
            if accept.contains("protobuf") && !accept.contains("application/json") {
                return Err(ApiError::not_acceptable(
                    "only application/json is served for /openapi/v2",
                ));
            }
            Ok(json_response(StatusCode::OK, &st.schemas.v2(), &[]))
        }
        Route::NotFound => tokens::discovery(st, req.uri().path())
            .map(|v| json_response(StatusCode::OK, &v, &[]))
            .ok_or_else(not_found_page),
        Route::Resource(rp)
            if (rp.group.as_str(), rp.version.as_str(), rp.plural.as_str())
                == ("authentication.k8s.io", "v1", "selfsubjectreviews")
                && req.method() == Method::POST =>
        {
            let review = tokens::self_subject_review(&user);
            Ok(json_response(StatusCode::CREATED, &review, &[]))
        }
        Route::Resource(rp) => resource(st, &user, rp, q, &accept, req).await,
    }
}

fn unreachable_route() -> ApiResult<Response<Body>> {
    Err(ApiError::internal(
        "public route reached the authenticated dispatcher",
    ))
}

/// Aggregated discovery with an ETag, answering 304 when the client's copy is current.
fn aggregated_response(v: &Value, if_none_match: &str) -> Response<Body> {
    let body = serde_json::to_vec(v).expect("JSON");
    let etag = format!("\"{:016X}\"", fnv(&body));
    if if_none_match.split(',').any(|t| t.trim() == etag) {
        return Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header("etag", etag)
            .body(full(Bytes::new()))
            .expect("valid response");
    }
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", discovery::AGGREGATED_CONTENT_TYPE)
        .header("etag", etag)
        .header("cache-control", "no-cache, private")
        .body(full(body))
        .expect("valid response")
}

fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn not_found_page() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

/// Upstream's message for a verb a resource does not support.
fn method_not_allowed(def: &ResourceDef, verb: &str) -> ApiError {
    ApiError::method_not_supported(&def.group, &def.plural, verb)
}

async fn resource(
    st: &Arc<ApiState>,
    user: &User,
    rp: ResourcePath,
    q: Query,
    accept: &str,
    req: Request<Incoming>,
) -> ApiResult<Response<Body>> {
    let def = st
        .registry
        .get(&rp.group, &rp.version, &rp.plural)
        .ok_or_else(not_found_page)?;
    if def.namespaced != rp.namespace.is_some() {
        // A namespaced kind without a namespace is only a cross-namespace list/watch.
        let listing = !def.namespaced || rp.name.is_some() || (req.method() != Method::GET);
        if !def.namespaced || listing {
            if def.namespaced && req.method() == Method::POST {
                return Err(ApiError::not_found(&def.group, &def.plural, ""));
            }
            if !def.namespaced {
                return Err(not_found_page());
            }
            if rp.name.is_some() {
                return Err(not_found_page());
            }
        }
    }
    if let Some(sub) = &rp.subresource {
        if !def.has_subresource(sub) {
            return Err(not_found_page());
        }
    }
    if proxy::handles(&rp) {
        return proxy::handle(st, rp, req).await;
    }
    let ns = rp.namespace.clone();
    let nsr = ns.as_deref();
    let table = wants_table(accept, &q);
    if accept.contains("application/vnd.kubernetes.protobuf")
        && !accept.contains("json")
        && !accept.contains("*/*")
    {
        return Err(ApiError::not_acceptable(
            "only the following media types are accepted: application/json, application/yaml",
        ));
    }
    let method = req.method().clone();
    let content_type = header(&req, "content-type").to_string();
    let default_manager = manager_from_user_agent(header(&req, "user-agent"));
    let body = read_body(req.into_body()).await?;
    let sub = rp.subresource.as_deref();
    match (method, rp.name.as_deref(), sub) {
        (Method::GET, None, None) => {
            let opts = ListOpts::parse(&def, &q)?;
            if q.flag("watch") && q.get("watch").is_some() {
                let timeout = q
                    .int("timeoutSeconds")?
                    .map(|s| Duration::from_secs(s.max(0) as u64));
                let rx = watch::start(
                    st.clone(),
                    def.clone(),
                    ns.clone(),
                    opts,
                    watch::WatchParams {
                        bookmarks: q.flag("allowWatchBookmarks")
                            && q.get("allowWatchBookmarks").is_some(),
                        timeout,
                        table,
                    },
                )
                .await?;
                let stream = futures::stream::unfold(rx, |mut rx| async move {
                    rx.recv()
                        .await
                        .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
                });
                return Ok(Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .header("transfer-encoding", "chunked")
                    .body(BodyExt::boxed(StreamBody::new(stream)))
                    .expect("valid response"));
            }
            let cached = objects::list_cached(st, &def, nsr, &opts).await?;
            let r = match (cached, table) {
                (Some(c), None) => {
                    return Ok(Response::builder()
                        .status(StatusCode::OK)
                        .header("content-type", "application/json")
                        .header("cache-control", "no-cache, private")
                        .body(full(c.to_json(&def)))
                        .expect("valid response"));
                }
                (Some(c), Some(_)) => c.into_values()?,
                (None, _) => objects::list(st, &def, nsr, &opts).await?,
            };
            let out = match table {
                Some(inc) => {
                    let rv = r.revision.to_string();
                    table::table(
                        &def,
                        &r.items,
                        &rv,
                        r.continue_token.as_deref(),
                        r.remaining,
                        inc,
                    )
                }
                None => objects::list_object(&def, r),
            };
            Ok(json_response(StatusCode::OK, &out, &[]))
        }
        (Method::GET, Some(name), None | Some("status") | Some("ephemeralcontainers")) => {
            let obj = objects::get(st, &def, nsr, name).await?;
            let out = match table {
                Some(inc) => {
                    let rv = obj
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    table::table(&def, &[obj], &rv, None, None, inc)
                }
                None => obj,
            };
            Ok(json_response(StatusCode::OK, &out, &[]))
        }
        (Method::GET, Some(name), Some("scale")) => {
            let obj = objects::get(st, &def, nsr, name).await?;
            Ok(json_response(StatusCode::OK, &scale_of(&def, &obj), &[]))
        }
        (Method::POST, None, None) => {
            let obj = decode_body(st, &content_type, &body)?;
            let opts = WriteOpts::from_query(&q, &default_manager, "Update")?;
            let (mut created, warnings) = objects::create(st, &def, nsr, obj, &opts, user).await?;
            if !opts.dry_run {
                created = after_write(st, &def, nsr, created).await?;
            }
            Ok(json_response(StatusCode::CREATED, &created, &warnings))
        }
        (Method::POST, Some(name), Some("binding")) => {
            let b = decode_body(st, &content_type, &body)?;
            bind_pod(st, &def, nsr, name, &b, &q).await?;
            Ok(json_response(
                StatusCode::CREATED,
                &success_status(None),
                &[],
            ))
        }
        (Method::POST, Some(name), Some("eviction")) => {
            let ev = if body.iter().all(u8::is_ascii_whitespace) {
                json!({})
            } else {
                decode_body(st, &content_type, &body)?
            };
            eviction::evict(st, &def, nsr, name, &ev, &q).await?;
            Ok(json_response(
                StatusCode::CREATED,
                &success_status(None),
                &[],
            ))
        }
        (Method::POST, Some(name), Some("token")) if def.kind == "ServiceAccount" => {
            let tr = decode_body(st, &content_type, &body)?;
            let out = tokens::token_request(st, nsr.unwrap_or_default(), name, tr).await?;
            Ok(json_response(StatusCode::CREATED, &out, &[]))
        }
        (
            Method::PUT,
            Some(name),
            None | Some("status") | Some("finalize") | Some("ephemeralcontainers"),
        ) => {
            let obj = decode_body(st, &content_type, &body)?;
            let opts = WriteOpts::from_query(&q, &default_manager, "Update")?;
            let part = match sub {
                Some("status") => Part::Status,
                Some("ephemeralcontainers") => Part::EphemeralContainers,
                _ => Part::Main,
            };
            let (mut out, warnings) =
                objects::update(st, &def, nsr, name, obj, part, &opts, None).await?;
            if !opts.dry_run {
                out = after_write(st, &def, nsr, out).await?;
            }
            Ok(json_response(StatusCode::OK, &out, &warnings))
        }
        (Method::PUT | Method::PATCH, Some(name), Some("scale")) => {
            let patch_type = PatchType::from_content_type(&content_type);
            let body_v = if patch_type.is_some() {
                serde_json::from_slice::<Value>(&body)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?
            } else {
                decode_body(st, &content_type, &body)?
            };
            let opts = WriteOpts::from_query(&q, &default_manager, "Update")?;
            let d2 = def.clone();
            let (out, _) =
                objects::guaranteed_update(st, &def, nsr, name, Part::Main, &opts, |cur| {
                    let scale = scale_of(&d2, cur);
                    let new_scale = match patch_type {
                        None => body_v.clone(),
                        Some(PatchType::Json) => patch::json_patch(&scale, &body_v)?,
                        Some(PatchType::Merge) | Some(PatchType::Apply) => {
                            patch::merge_patch(&scale, &body_v)?
                        }
                        Some(PatchType::Strategic) => patch::strategic_merge(&scale, &body_v)?,
                    };
                    let replicas = new_scale
                        .pointer("/spec/replicas")
                        .and_then(Value::as_i64)
                        .unwrap_or(0);
                    if replicas < 0 {
                        return Err(ApiError::invalid(
                            "autoscaling",
                            "Scale",
                            name,
                            vec![status::Cause::invalid(
                                "spec.replicas",
                                &json!(replicas),
                                "must be greater than or equal to 0",
                            )],
                        ));
                    }
                    let mut o = cur.clone();
                    set_replicas(&d2, &mut o, replicas);
                    Ok(o)
                })
                .await?;
            Ok(json_response(StatusCode::OK, &scale_of(&def, &out), &[]))
        }
        (Method::PATCH, Some(name), None | Some("status") | Some("ephemeralcontainers")) => {
            let pt = PatchType::from_content_type(&content_type)
                .ok_or_else(|| ApiError::unsupported_media_type(&content_type))?;
            let patch_body: Value = if pt == PatchType::Apply {
                decode_body(st, "application/yaml", &body)?
            } else {
                serde_json::from_slice(&body).map_err(|e| {
                    ApiError::bad_request(format!(
                        "the body of the request was not valid JSON: {e}"
                    ))
                })?
            };
            let part = match sub {
                Some("status") => Part::Status,
                Some("ephemeralcontainers") => Part::EphemeralContainers,
                _ => Part::Main,
            };
            let op = if pt == PatchType::Apply {
                "Apply"
            } else {
                "Update"
            };
            let mut opts = WriteOpts::from_query(&q, &default_manager, op)?;
            if pt == PatchType::Apply {
                if q.field_manager().is_none() {
                    return Err(ApiError::bad_request(
                        "PATCH, application/apply-patch+yaml requests must have a fieldManager",
                    ));
                }
                if opts.field_validation == request::FieldValidation::Warn
                    && q.get("fieldValidation").is_none()
                {
                    opts.field_validation = request::FieldValidation::Warn;
                }
                return crate::api::apply::server_side_apply(
                    st,
                    &def,
                    nsr,
                    name,
                    patch_body,
                    part,
                    &opts,
                    q.flag("force") && q.get("force").is_some(),
                    user,
                )
                .await;
            }
            let (mut out, warnings) = objects::guaranteed_update(st, &def, nsr, name, part, &opts, |cur| {
                let mut patched = match pt {
                    PatchType::Json => patch::json_patch(cur, &patch_body)?,
                    PatchType::Merge => patch::merge_patch(cur, &patch_body)?,
                    PatchType::Strategic => {
                        if def.crd.is_some() {
                            return Err(ApiError::new(415, "UnsupportedMediaType", "strategic merge patch is not supported for custom resources; use a merge patch (--type merge) instead"));
                        }
                        patch::strategic_merge(cur, &patch_body)?
                    }
                    PatchType::Apply => unreachable_apply(),
                };
                // Unless the patch itself carries one, the resourceVersion read is not a
                // precondition (the retry loop handles concurrent writers).
                let patch_rv = patch_body.pointer("/metadata/resourceVersion").and_then(Value::as_str);
                if patch_rv.is_none() || pt == PatchType::Json {
                    let keep = patched.pointer("/metadata/resourceVersion").and_then(Value::as_str).map(str::to_string);
                    if keep.as_deref() == cur.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
                        if let Some(md) = patched.get_mut("metadata").and_then(Value::as_object_mut) {
                            md.remove("resourceVersion");
                        }
                    }
                }
                Ok(patched)
            })
            .await?;
            if !opts.dry_run {
                out = after_write(st, &def, nsr, out).await?;
            }
            Ok(json_response(StatusCode::OK, &out, &warnings))
        }
        (Method::DELETE, Some(name), None) => {
            let body = delete_body(st, &content_type, body)?;
            let dopts = DeleteOpts::parse(&q, &body)?;
            let out = objects::delete(st, &def, nsr, name, &dopts).await?;
            if !dopts.dry_run {
                after_delete(st, &def, &out).await;
            }
            Ok(json_response(StatusCode::OK, &out, &[]))
        }
        (Method::DELETE, None, None) => {
            let lopts = ListOpts::parse(&def, &q)?;
            let body = delete_body(st, &content_type, body)?;
            let dopts = DeleteOpts::parse(&q, &body)?;
            let out = objects::delete_collection(st, &def, nsr, &lopts, &dopts).await?;
            if !dopts.dry_run {
                for o in out["items"].as_array().cloned().unwrap_or_default() {
                    after_delete(st, &def, &o).await;
                }
            }
            Ok(json_response(StatusCode::OK, &out, &[]))
        }
        (m, name, sub) => {
            let verb = match (m.as_str(), name, sub) {
                ("GET", _, Some(s))
                    if matches!(s, "log" | "exec" | "attach" | "portforward" | "proxy") =>
                {
                    return Err(ApiError::new(
                        503,
                        "ServiceUnavailable",
                        format!("{s} is not available: no node agent runs this pod yet"),
                    ))
                }
                ("POST", Some(_), None) => "create",
                ("PUT", None, _) => "update",
                ("PATCH", None, _) => "patch",
                ("POST", _, _) => "create",
                ("PUT", _, _) => "update",
                ("PATCH", _, _) => "patch",
                ("DELETE", _, _) => "delete",
                _ => "this method",
            };
            Err(method_not_allowed(&def, verb))
        }
    }
}

/// A DeleteOptions body as JSON bytes (typed clients send protobuf).
fn delete_body(st: &ApiState, content_type: &str, body: Bytes) -> ApiResult<Bytes> {
    if content_type.starts_with(protobuf::CONTENT_TYPE) && !body.is_empty() {
        let v = protobuf::decode(&st.schemas, &body)?;
        return Ok(Bytes::from(serde_json::to_vec(&v).expect("JSON")));
    }
    Ok(body)
}

fn unreachable_apply() -> Value {
    Value::Null
}

/// The field manager named after the client, as upstream derives it from the User-Agent.
fn manager_from_user_agent(ua: &str) -> String {
    let first = ua.split('/').next().unwrap_or_default().trim();
    if first.is_empty() {
        "unknown".into()
    } else {
        first.chars().take(128).collect()
    }
}

/// The autoscaling/v1 Scale of an object.
fn scale_of(def: &ResourceDef, obj: &Value) -> Value {
    let (spec_path, status_path, selector_path) =
        match def.crd.as_ref().and_then(|c| c.scale.clone()) {
            Some(s) => (
                json_ptr(s["specReplicasPath"].as_str().unwrap_or(".spec.replicas")),
                json_ptr(
                    s["statusReplicasPath"]
                        .as_str()
                        .unwrap_or(".status.replicas"),
                ),
                s["labelSelectorPath"].as_str().map(json_ptr),
            ),
            None => (
                "/spec/replicas".to_string(),
                "/status/replicas".to_string(),
                None,
            ),
        };
    let selector = match selector_path {
        Some(p) => obj
            .pointer(&p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        None => {
            let sel = &obj["spec"]["selector"];
            if def.kind == "ReplicationController" {
                sel.as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default()
            } else {
                sel.get("matchLabels")
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default()
            }
        }
    };
    let md = &obj["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": md["name"], "namespace": md["namespace"], "uid": md["uid"],
            "resourceVersion": md["resourceVersion"], "creationTimestamp": md["creationTimestamp"],
        },
        "spec": {"replicas": obj.pointer(&spec_path).and_then(Value::as_i64).unwrap_or(0)},
        "status": {"replicas": obj.pointer(&status_path).and_then(Value::as_i64).unwrap_or(0), "selector": selector},
    })
}

fn json_ptr(path: &str) -> String {
    format!("/{}", path.trim_start_matches('.').replace('.', "/"))
}

fn set_replicas(def: &ResourceDef, obj: &mut Value, n: i64) {
    let path = def
        .crd
        .as_ref()
        .and_then(|c| c.scale.as_ref())
        .and_then(|s| s["specReplicasPath"].as_str())
        .map(json_ptr)
        .unwrap_or_else(|| "/spec/replicas".into());
    let mut cur = obj;
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    for (i, p) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            cur[*p] = json!(n);
        } else {
            if !cur.get(*p).is_some_and(Value::is_object) {
                cur[*p] = json!({});
            }
            cur = &mut cur[*p];
        }
    }
}

/// POST pods/<name>/binding: assigns the pod to a node.
async fn bind_pod(
    st: &Arc<ApiState>,
    _def: &Arc<ResourceDef>,
    ns: Option<&str>,
    name: &str,
    binding: &Value,
    _q: &Query,
) -> ApiResult<()> {
    let node = binding
        .pointer("/target/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if node.is_empty() {
        return Err(ApiError::invalid(
            "",
            "Binding",
            name,
            vec![status::Cause::required("target.name", "")],
        ));
    }
    crate::controllers::client::Client::new(st.clone(), "kube-scheduler")
        .bind(ns.unwrap_or_default(), name, &node)
        .await
}

/// Side effects of writes to kinds the server itself acts on (CRDs).
async fn after_write(
    st: &Arc<ApiState>,
    def: &ResourceDef,
    _ns: Option<&str>,
    obj: Value,
) -> ApiResult<Value> {
    if def.group == "apiextensions.k8s.io" && def.kind == "CustomResourceDefinition" {
        let causes = crd::validate_crd(&obj);
        if !causes.is_empty() {
            // Already stored: report but keep serving nothing for it.
            tracing::warn!(crd = ?obj.pointer("/metadata/name"), "invalid CRD stored");
            return Ok(obj);
        }
        crd::register(&st.registry, &obj);
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let opts = WriteOpts {
            dry_run: false,
            field_validation: request::FieldValidation::Ignore,
            field_manager: "k3rs-apiextensions".into(),
            operation: "Update",
        };
        let status = crd::established_status(&obj);
        if obj.get("status").map(|s| s.get("conditions")) != Some(status.get("conditions"))
            || obj.pointer("/status/acceptedNames") != status.get("acceptedNames")
        {
            let d = st
                .registry
                .get("apiextensions.k8s.io", "v1", "customresourcedefinitions")
                .expect("builtin");
            let mut with_status = obj.clone();
            with_status["status"] = status;
            if let Some(md) = with_status
                .get_mut("metadata")
                .and_then(Value::as_object_mut)
            {
                md.remove("resourceVersion");
            }
            match objects::update(st, &d, None, &name, with_status, Part::Status, &opts, None).await
            {
                Ok((o, _)) => return Ok(o),
                Err(e) => tracing::warn!(error = %e, "updating CRD status"),
            }
        }
    }
    Ok(obj)
}

async fn after_delete(st: &Arc<ApiState>, def: &ResourceDef, obj: &Value) {
    if def.group == "apiextensions.k8s.io"
        && def.kind == "CustomResourceDefinition"
        && obj.pointer("/metadata/deletionTimestamp").is_none()
    {
        let group = obj
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let plural = obj
            .pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        st.registry.remove_crd(&group, &plural);
        let prefix = format!("/registry/{group}/{plural}/");
        if let Err(e) = objects::delete_prefix(st, &prefix).await {
            tracing::warn!(error = %e, "deleting custom resources of a removed CRD");
        }
    }
}

/// Registers the kinds of every stored CRD (at start).
pub async fn load_crds(st: &ApiState) -> anyhow::Result<()> {
    let d = st
        .registry
        .get("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        .expect("builtin");
    let r = objects::list(
        st,
        &d,
        None,
        &ListOpts {
            labels: Default::default(),
            fields: Default::default(),
            limit: 0,
            continue_token: None,
            resource_version: None,
            rv_match: None,
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("listing CRDs: {e}"))?;
    for c in r.items {
        if crd::validate_crd(&c).is_empty() {
            crd::register(&st.registry, &c);
        }
    }
    Ok(())
}

/// Creates the namespaces every cluster has, and the default StorageClass.
pub async fn bootstrap(st: &Arc<ApiState>) -> anyhow::Result<()> {
    let def = st.registry.get("", "v1", "namespaces").expect("builtin");
    let user = User {
        name: "system:k3rs".into(),
        groups: vec!["system:masters".into()],
    };
    let opts = WriteOpts {
        dry_run: false,
        field_validation: request::FieldValidation::Strict,
        field_manager: "k3rs".into(),
        operation: "Update",
    };
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}});
        match objects::create(st, &def, None, obj, &opts, &user).await {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => anyhow::bail!("creating namespace {ns}: {e}"),
        }
    }
    // Their `default` ServiceAccounts before the first pod (the controller keeps them).
    let sa_def = st
        .registry
        .get("", "v1", "serviceaccounts")
        .expect("builtin");
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj =
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}});
        match objects::create(st, &sa_def, Some(ns), obj, &opts, &user).await {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => anyhow::bail!("creating service account {ns}/default: {e}"),
        }
    }
    // The default StorageClass, as k3s ships one: claims that name no class get it, and their
    // volumes are provisioned on the node of their first pod.
    let sc = st
        .registry
        .get("storage.k8s.io", "v1", "storageclasses")
        .expect("builtin");
    let obj = json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": "local-path", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": "k3rs.io/local-path",
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
    });
    match objects::create(st, &sc, None, obj, &opts, &user).await {
        Ok(_) => {}
        Err(e) if e.code == 409 => {}
        Err(e) => anyhow::bail!("creating storage class local-path: {e}"),
    }
    // The `kubernetes` Service (first address of the service CIDR) and its endpoints.
    admission::services::ensure_kubernetes(st)
        .await
        .map_err(|e| anyhow::anyhow!("creating the kubernetes Service: {e}"))?;
    Ok(())
}
