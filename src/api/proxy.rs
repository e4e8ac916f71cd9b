//! Proxying to kubelets: `pods/log`, `pods/exec`, `pods/attach`, `pods/portforward` and
//! `nodes/proxy`. The request is checked against the pod as upstream's registry does, then
//! sent over HTTPS to the pod's node (`status.addresses` InternalIP, `daemonEndpoints` port)
//! with the API server's kubelet client certificate. Upgrades (WebSocket or SPDY) are spliced
//! byte for byte once both sides have switched protocols; other answers stream through.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

use super::request::ResourcePath;
use super::status::ApiError;
use super::{ApiResult, ApiState, Body};
use crate::httputil::query_escape;

/// Where a kubelet listens when its node does not say.
const DEFAULT_KUBELET_PORT: u16 = 10250;

static KUBELET_TLS: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

/// Sets up the client side of the API server → kubelet connections.
pub fn init(pki: &crate::pki::Pki) -> anyhow::Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pki.ca.cert_pem.as_bytes()) {
        roots.add(c.context("parsing the CA certificate")?)?;
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(pki.kubelet_client.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .context("parsing the kubelet client certificate")?;
    let key = PrivateKeyDer::from_pem_slice(pki.kubelet_client.key_pem.as_bytes())
        .context("parsing the kubelet client key")?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("configuring the kubelet client")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let _ = KUBELET_TLS.set(Arc::new(cfg));
    Ok(())
}

/// Whether this request is one the proxy serves.
pub fn handles(rp: &ResourcePath) -> bool {
    matches!(
        (
            rp.group.as_str(),
            rp.plural.as_str(),
            rp.subresource.as_deref(),
        ),
        ("", "pods", Some("log" | "exec" | "attach" | "portforward"))
            | ("", "nodes", Some("proxy"))
    )
}

pub async fn handle(
    st: &Arc<ApiState>,
    rp: ResourcePath,
    req: Request<Incoming>,
) -> ApiResult<Response<Body>> {
    let name = rp.name.clone().unwrap_or_default();
    let query = req.uri().query().unwrap_or_default().to_string();
    if rp.plural == "nodes" {
        let node = get(st, "nodes", None, &name).await?;
        let addr = kubelet_addr(&node, &name)?;
        let full = req.uri().path().to_string();
        let marker = format!("/nodes/{name}/proxy");
        let rest = full
            .find(&marker)
            .map(|i| &full[i + marker.len()..])
            .unwrap_or_default();
        let rest = if rest.is_empty() { "/" } else { rest };
        let pq = if query.is_empty() {
            rest.to_string()
        } else {
            format!("{rest}?{query}")
        };
        return forward(&name, addr, pq, req).await;
    }
    let ns = rp.namespace.clone().unwrap_or_default();
    let pod = get(st, "pods", Some(&ns), &name).await?;
    let sub = rp.subresource.as_deref().unwrap_or_default();
    let pairs = crate::httputil::query_pairs(&query);
    let container_q = pairs
        .iter()
        .find(|(k, _)| k == "container")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let node_name = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let path = match sub {
        "portforward" => {
            if node_name.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "pod {name} does not have a host assigned"
                )));
            }
            format!("/portForward/{ns}/{name}")
        }
        _ => {
            let container = resolve_container(&pod, &name, &container_q)?;
            if sub != "log" {
                let phase = pod
                    .pointer("/status/phase")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if phase == "Succeeded" || phase == "Failed" {
                    let what = if sub == "exec" {
                        "exec into"
                    } else {
                        "attach to"
                    };
                    return Err(ApiError::bad_request(format!(
                        "cannot {what} a container in a completed pod; current phase is {phase}"
                    )));
                }
            }
            if node_name.is_empty() {
                if sub == "log" {
                    // Not scheduled yet: no logs (as upstream, an empty answer).
                    return Ok(Response::builder()
                        .status(StatusCode::OK)
                        .header("content-type", "text/plain")
                        .body(super::full(Bytes::new()))
                        .expect("valid response"));
                }
                return Err(ApiError::bad_request(format!(
                    "pod {name} does not have a host assigned"
                )));
            }
            let verb = match sub {
                "log" => "containerLogs",
                "exec" => "exec",
                _ => "attach",
            };
            format!("/{verb}/{ns}/{name}/{container}")
        }
    };
    let node = get(st, "nodes", None, &node_name).await?;
    let addr = kubelet_addr(&node, &node_name)?;
    let rest: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k != "container")
        .map(|(k, v)| format!("{}={}", query_escape(k), query_escape(v)))
        .collect();
    let pq = if rest.is_empty() {
        path
    } else {
        format!("{path}?{}", rest.join("&"))
    };
    forward(&node_name, addr, pq, req).await
}

async fn get(st: &Arc<ApiState>, plural: &str, ns: Option<&str>, name: &str) -> ApiResult<Value> {
    let def = st
        .registry
        .get("", "v1", plural)
        .ok_or_else(|| ApiError::internal(format!("no {plural} resource")))?;
    super::objects::get(st, &def, ns, name).await
}

/// The container a request is for: the named one (which must exist), or the only one.
fn resolve_container(pod: &Value, pod_name: &str, wanted: &str) -> ApiResult<String> {
    let names = |key: &str| -> Vec<String> {
        pod.pointer(&format!("/spec/{key}"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (main, init, eph) = (
        names("containers"),
        names("initContainers"),
        names("ephemeralContainers"),
    );
    if wanted.is_empty() {
        if main.len() == 1 {
            return Ok(main[0].clone());
        }
        let mut msg = format!(
            "a container name must be specified for pod {pod_name}, choose one of: [{}]",
            main.join(" ")
        );
        if !init.is_empty() {
            msg.push_str(&format!(
                " or one of the init containers: [{}]",
                init.join(" ")
            ));
        }
        if !eph.is_empty() {
            msg.push_str(&format!(
                " or one of the ephemeral containers: [{}]",
                eph.join(" ")
            ));
        }
        return Err(ApiError::bad_request(msg));
    }
    if main.iter().chain(&init).chain(&eph).any(|n| n == wanted) {
        return Ok(wanted.to_string());
    }
    Err(ApiError::bad_request(format!(
        "container {wanted} is not valid for pod {pod_name}"
    )))
}

/// The kubelet endpoint of a node.
fn kubelet_addr(node: &Value, name: &str) -> ApiResult<SocketAddr> {
    let addrs = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let pick = |t: &str| {
        addrs
            .iter()
            .filter(|a| a["type"] == t)
            .filter_map(|a| a["address"].as_str()?.parse::<IpAddr>().ok())
            .next()
    };
    let ip = pick("InternalIP")
        .or_else(|| pick("ExternalIP"))
        .ok_or_else(|| {
            ApiError::new(
                503,
                "ServiceUnavailable",
                format!("no preferred addresses found; known addresses: [] (node {name})"),
            )
        })?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .filter(|p| *p > 0 && *p < 65536)
        .unwrap_or(DEFAULT_KUBELET_PORT as u64) as u16;
    Ok(SocketAddr::new(ip, port))
}

fn dial_error(addr: SocketAddr, e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("error dialing backend: dial tcp {addr}: {e}"))
}

/// Sends the request to the kubelet and relays its answer (or splices an upgrade).
async fn forward(
    node: &str,
    addr: SocketAddr,
    path_and_query: String,
    req: Request<Incoming>,
) -> ApiResult<Response<Body>> {
    // The kubelet of this very process: in memory, no TLS.
    if let Some(dial) = crate::httputil::local_kubelet(node) {
        return forward_over(dial(), addr, path_and_query, req).await;
    }
    let tls = KUBELET_TLS
        .get()
        .cloned()
        .ok_or_else(|| ApiError::internal("the kubelet client is not configured"))?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| dial_error(addr, "i/o timeout"))?
    .map_err(|e| dial_error(addr, e))?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| dial_error(addr, e))?;
    forward_over(stream, addr, path_and_query, req).await
}

/// The request and its answer over a connection to the kubelet.
async fn forward_over<IO>(
    stream: IO,
    addr: SocketAddr,
    path_and_query: String,
    mut req: Request<Incoming>,
) -> ApiResult<Response<Body>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| dial_error(addr, e))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let upgrading = req.headers().contains_key(http::header::UPGRADE);
    let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let mut out = Request::builder()
        .method(parts.method.clone())
        .uri(path_and_query);
    for (k, v) in parts.headers.iter() {
        let skip = matches!(
            k.as_str(),
            "host" | "authorization" | "content-length" | "transfer-encoding" | "keep-alive"
        ) || (!upgrading && matches!(k.as_str(), "connection" | "upgrade"));
        if !skip {
            out = out.header(k, v);
        }
    }
    out = out.header("host", addr.to_string());
    let out = out
        .body(body)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut resp = sender
        .send_request(out)
        .await
        .map_err(|e| ApiError::internal(format!("error talking to the kubelet at {addr}: {e}")))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(ApiError::internal("the kubelet switched protocols unasked"));
        };
        let kubelet_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(c), Ok(k)) = (client_upgrade.await, kubelet_upgrade.await) else {
                return;
            };
            let (mut c, mut k) = (TokioIo::new(c), TokioIo::new(k));
            let _ = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut k, 256 << 10, 256 << 10)
                .await;
        });
        let mut r = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
        for (k, v) in resp.headers() {
            r = r.header(k, v);
        }
        return r
            .body(super::full(Bytes::new()))
            .map_err(|e| ApiError::internal(e.to_string()));
    }
    let (parts, body) = resp.into_parts();
    let stream = futures::stream::unfold(body, |mut b| async move {
        match b.frame().await {
            Some(Ok(f)) => Some((Ok::<_, Infallible>(f), b)),
            _ => None,
        }
    });
    let mut r = Response::builder().status(parts.status);
    for (k, v) in parts.headers.iter() {
        if !matches!(
            k.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            r = r.header(k, v);
        }
    }
    r.body(BodyExt::boxed(StreamBody::new(stream)))
        .map_err(|e| ApiError::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_container_is_named_or_the_only_one() {
        let one = json!({"spec": {"containers": [{"name": "app"}]}});
        assert_eq!(resolve_container(&one, "p", "").unwrap(), "app");
        let two = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}],
            "initContainers": [{"name": "i"}]}});
        let e = resolve_container(&two, "p", "").unwrap_err();
        assert_eq!(
            e.message,
            "a container name must be specified for pod p, choose one of: [a b] or one of the init containers: [i]"
        );
        assert_eq!(resolve_container(&two, "p", "i").unwrap(), "i");
        let e = resolve_container(&two, "p", "zz").unwrap_err();
        assert_eq!(e.message, "container zz is not valid for pod p");
        assert_eq!(e.code, 400);
    }

    #[test]
    fn the_kubelet_is_reached_on_the_internal_ip_and_its_port() {
        let node = json!({"status": {
            "addresses": [{"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "10.0.0.5"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}}}});
        assert_eq!(
            kubelet_addr(&node, "n1").unwrap(),
            "10.0.0.5:10250".parse().unwrap()
        );
        assert_eq!(kubelet_addr(&json!({}), "n1").unwrap_err().code, 503);
    }
}
