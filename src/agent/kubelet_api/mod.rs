//! The kubelet API (`:10250`, HTTPS): containerLogs, exec, attach, portForward, stats/summary,
//! metrics, healthz and pods, for the API server's proxy and for admins.
//!
//! Clients must present a certificate of the cluster CA: the API server's
//! `kube-apiserver-kubelet-client` or any `system:masters` member (an admin). Anything else
//! gets 401 (no certificate) or 403 (another identity), as upstream's webhook authorizer
//! would answer for users without `nodes/proxy`.

pub mod logs;
pub mod spdy;
pub mod stats;
mod streams;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};

use super::Agent;
pub(crate) use crate::httputil::query_pairs;
use crate::httputil::{full, Body};

/// A client's identity from its certificate.
#[derive(Debug, Clone)]
struct User {
    name: String,
    groups: Vec<String>,
}

/// The kubelet's port (upstream's).
pub const KUBELET_PORT: u16 = 10250;

/// Serves the kubelet API on `0.0.0.0:10250` for as long as the process lives.
pub async fn spawn(agent: Arc<Agent>) -> Result<()> {
    let tls = tls_config(&agent.cfg.agent_dir())?;
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", KUBELET_PORT))
        .await
        .with_context(|| format!("binding the kubelet API on port {KUBELET_PORT}"))?;
    tracing::info!(port = KUBELET_PORT, "kubelet API listening");
    // The API server of this process reaches this kubelet in memory.
    let local = agent.clone();
    if !agent.cfg.kubelet_over_network {
        crate::httputil::register_local_kubelet(
            &agent.cfg.node_name,
            Arc::new(move || {
                let (ours, theirs) = tokio::io::duplex(256 << 10);
                let user = User {
                    name: "kube-apiserver-kubelet-client".into(),
                    groups: vec!["system:masters".into()],
                };
                tokio::spawn(serve_conn(local.clone(), Some(user), ours, None));
                theirs
            }),
        );
    }
    tokio::spawn(serve(agent, listener, tls));
    Ok(())
}

/// Serves one connection (TLS from the network, or in memory from this process's API server).
async fn serve_conn<IO>(
    agent: Arc<Agent>,
    user: Option<User>,
    io: IO,
    peer: Option<std::net::SocketAddr>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let agent = agent.clone();
        let user = user.clone();
        async move { Ok::<_, Infallible>(handle(agent, user, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(?peer, error = %e, "kubelet API connection ended");
    }
}

fn tls_config(dir: &std::path::Path) -> Result<Arc<rustls::ServerConfig>> {
    let read = |f: &str| {
        std::fs::read(dir.join(f)).with_context(|| format!("reading {}", dir.join(f).display()))
    };
    let (ca, cert, key) = (
        read("client-ca.crt")?,
        read("serving-kubelet.crt")?,
        read("serving-kubelet.key")?,
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.context("parsing the client CA")?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .context("building the client certificate verifier")?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<_, _>>()
        .context("parsing the kubelet's serving certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&key).context("parsing the kubelet's serving key")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("configuring the kubelet's TLS")?;
    // HTTP/1.1 only: exec, attach and port-forward are connection upgrades.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "kubelet API: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let agent = agent.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "kubelet API: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let user = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| crate::httputil::cert_identity(c.as_ref()))
                .map(|(name, groups)| User { name, groups });
            serve_conn(agent, user, tls, Some(peer)).await;
        });
    }
}

fn text(code: StatusCode, s: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "text/plain; charset=utf-8")
        .body(full(s.into()))
        .expect("valid response")
}

fn json_resp(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(full(serde_json::to_vec(v).unwrap_or_default()))
        .expect("valid response")
}

/// An upstream-style Status body (what the API server relays to kubectl).
pub(crate) fn status_resp(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_resp(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
        }),
    )
}

/// The API server's kubelet client or an admin.
fn authorized(user: &User) -> bool {
    user.name == "kube-apiserver-kubelet-client"
        || user.groups.iter().any(|g| g == "system:masters")
}

/// What a path asks of the kubelet, for the 403 message (as upstream's).
fn attributes(path: &str, method: &Method) -> (&'static str, &'static str) {
    let verb = match *method {
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "*",
    };
    let sub = match path.trim_start_matches('/').split('/').next().unwrap_or("") {
        "stats" => "stats",
        "metrics" => "metrics",
        "containerLogs" | "logs" => "log",
        _ => "proxy",
    };
    (verb, sub)
}

async fn handle(agent: Arc<Agent>, user: Option<User>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let Some(user) = user else {
        return text(StatusCode::UNAUTHORIZED, "Unauthorized");
    };
    if !authorized(&user) {
        let (verb, sub) = attributes(&path, req.method());
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "Forbidden (user={}, verb={verb}, resource=nodes, subresource={sub})",
                user.name
            ),
        );
    }
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(crate::httputil::percent_decode)
        .collect();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let query = req.uri().query().unwrap_or_default().to_string();
    match s.as_slice() {
        ["healthz", ..] => text(StatusCode::OK, "ok"),
        ["pods"] => {
            let items: Vec<Value> = local_pods(&agent)
                .iter()
                .filter_map(|p| serde_json::to_value(p.as_ref()).ok())
                .collect();
            json_resp(
                StatusCode::OK,
                &json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}),
            )
        }
        ["exec", ns, pod, container] | ["exec", ns, pod, _, container] => {
            streams::exec(agent.clone(), ns, pod, container, &query, req).await
        }
        ["attach", ns, pod, container] | ["attach", ns, pod, _, container] => {
            streams::attach(agent.clone(), ns, pod, container, &query, req).await
        }
        ["portForward", ns, pod] | ["portForward", ns, pod, _] => {
            streams::port_forward(agent.clone(), ns, pod, req).await
        }
        ["containerLogs", ns, pod, container] => {
            logs::serve(agent.clone(), ns, pod, container, &query).await
        }
        _ => match stats::route(&agent, &s).await {
            Some(r) => r,
            None => text(StatusCode::NOT_FOUND, "404 page not found\n"),
        },
    }
}

/// The pods this node runs (the latest object each pod worker has).
pub(crate) fn local_pods(agent: &Agent) -> Vec<Arc<Pod>> {
    agent
        .workers
        .lock()
        .values()
        .filter_map(|w| w.tx.borrow().clone())
        .collect()
}

pub(crate) fn find_pod(agent: &Agent, ns: &str, name: &str) -> Option<Arc<Pod>> {
    local_pods(agent).into_iter().find(|p| {
        p.metadata.namespace.as_deref() == Some(ns) && p.metadata.name.as_deref() == Some(name)
    })
}

/// Whether the pod's spec names this container (regular, init or ephemeral).
pub(crate) fn has_container(pod: &Pod, name: &str) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers.iter().any(|c| c.name == name)
            || s.init_containers.iter().flatten().any(|c| c.name == name)
            || s.ephemeral_containers
                .iter()
                .flatten()
                .any(|c| c.name == name)
    })
}

/// A streamed body from a channel of chunks (an error ends it).
pub(crate) fn channel_body(rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>) -> Body {
    use http_body_util::{BodyExt, StreamBody};
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Some(Ok(b)) => Some((Ok::<_, Infallible>(hyper::body::Frame::data(b)), rx)),
            _ => None,
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_api_server_and_admins_are_authorized() {
        let u = |n: &str, g: &[&str]| User {
            name: n.into(),
            groups: g.iter().map(|s| s.to_string()).collect(),
        };
        assert!(authorized(&u(
            "kube-apiserver-kubelet-client",
            &["system:masters"]
        )));
        assert!(authorized(&u("system:admin", &["system:masters"])));
        assert!(!authorized(&u("system:node:n1", &["system:nodes"])));
        assert!(!authorized(&u("alice", &[])));
        assert_eq!(
            attributes("/containerLogs/a/b/c", &Method::GET),
            ("get", "log")
        );
        assert_eq!(
            attributes("/exec/a/b/c", &Method::POST),
            ("create", "proxy")
        );
        assert_eq!(attributes("/stats/summary", &Method::GET), ("get", "stats"));
    }
}
