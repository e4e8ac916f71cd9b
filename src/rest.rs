//! A small HTTPS client for the Kubernetes API, for the processes that talk to a server from
//! outside (node agents, hollow nodes): kubeconfig credentials, one multiplexed HTTP/2
//! connection (re-established on failure), JSON requests and line-delimited watch streams.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tokio::sync::Mutex;

/// Credentials and address of a server, as a kubeconfig gives them.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub tls: Arc<rustls::ClientConfig>,
}

fn b64(v: &serde_yaml::Value, key: &str) -> Result<Vec<u8>> {
    let s = v
        .get(key)
        .and_then(|x| x.as_str())
        .with_context(|| format!("kubeconfig lacks {key}"))?;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .with_context(|| format!("kubeconfig {key} is not base64"))
}

impl Target {
    /// Reads the current context of a kubeconfig (certificate data embedded, as k3rs writes it).
    pub fn from_kubeconfig(path: &std::path::Path) -> Result<Target> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let kc: serde_yaml::Value =
            serde_yaml::from_str(&text).with_context(|| format!("{}: not YAML", path.display()))?;
        let current = kc
            .get("current-context")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let find = |list: &str, name: &str| -> Option<serde_yaml::Value> {
            kc.get(list)?
                .as_sequence()?
                .iter()
                .find(|e| e.get("name").and_then(|n| n.as_str()) == Some(name))
                .cloned()
        };
        let ctx = find("contexts", current)
            .or_else(|| kc.get("contexts")?.as_sequence()?.first().cloned())
            .context("kubeconfig has no context")?;
        let ctx = ctx.get("context").cloned().unwrap_or_default();
        let cluster_name = ctx
            .get("cluster")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let user_name = ctx.get("user").and_then(|v| v.as_str()).unwrap_or_default();
        let cluster = find("clusters", cluster_name)
            .and_then(|c| c.get("cluster").cloned())
            .context("kubeconfig: cluster not found")?;
        let user = find("users", user_name)
            .and_then(|u| u.get("user").cloned())
            .context("kubeconfig: user not found")?;
        let server = cluster
            .get("server")
            .and_then(|v| v.as_str())
            .context("kubeconfig: no server")?;
        let uri: hyper::Uri = server
            .parse()
            .with_context(|| format!("bad server URL {server:?}"))?;
        if uri.scheme_str() != Some("https") {
            bail!("server {server:?} is not an https URL");
        }
        let host = uri
            .host()
            .context("server URL has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let ca = b64(&cluster, "certificate-authority-data")?;
        let cert = b64(&user, "client-certificate-data")?;
        let key = b64(&user, "client-key-data")?;
        Ok(Target {
            host,
            port,
            tls: client_tls(&ca, &cert, &key)?,
        })
    }
}

pub fn client_tls(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.context("parsing the CA certificate")?)?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .context("parsing the client certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).context("parsing the client key")?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// An API error answer.
#[derive(Debug)]
pub struct Status {
    pub code: u16,
    pub body: Value,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}",
            self.code,
            self.body["message"].as_str().unwrap_or("(no message)")
        )
    }
}

impl std::error::Error for Status {}

pub struct RestClient {
    target: Target,
    conn: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl RestClient {
    pub fn new(target: Target) -> RestClient {
        RestClient {
            target,
            conn: Mutex::new(None),
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>> {
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect((self.target.host.as_str(), self.target.port)),
        )
        .await
        .map_err(|_| {
            anyhow!(
                "connecting to {}:{} timed out",
                self.target.host,
                self.target.port
            )
        })??;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(self.target.host.clone())
            .map_err(|e| anyhow!("bad server name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(self.target.tls.clone())
            .connect(name, tcp)
            .await?;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>> {
        let mut g = self.conn.lock().await;
        if let Some(s) = g.as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let s = self.connect().await?;
        *g = Some(s.clone());
        Ok(s)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let uri = format!("https://{}:{}{path}", self.target.host, self.target.port);
        for attempt in 0..3 {
            let mut b = Request::builder()
                .method(method.clone())
                .uri(&uri)
                .header("accept", "application/json")
                .header("user-agent", "k3rs");
            let payload = match &body {
                Some((ct, data)) => {
                    b = b.header("content-type", *ct);
                    Bytes::from(data.clone())
                }
                None => Bytes::new(),
            };
            let req = b.body(Full::new(payload))?;
            let mut sender = self.sender().await?;
            match sender.send_request(req).await {
                Ok(r) => return Ok(r),
                Err(e) if attempt < 2 => {
                    tracing::debug!(error = %e, "request failed; reconnecting");
                    *self.conn.lock().await = None;
                }
                Err(e) => return Err(e.into()),
            }
        }
        bail!("unreachable")
    }

    async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<Value> {
        let resp = self.send(method, path, body).await?;
        let code = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if code.is_success() {
            Ok(v)
        } else {
            Err(Status {
                code: code.as_u16(),
                body: v,
            }
            .into())
        }
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.json(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.json(
            Method::POST,
            path,
            Some(("application/json", serde_json::to_vec(body)?)),
        )
        .await
    }

    pub async fn merge_patch(&self, path: &str, body: &Value) -> Result<Value> {
        self.json(
            Method::PATCH,
            path,
            Some(("application/merge-patch+json", serde_json::to_vec(body)?)),
        )
        .await
    }

    pub async fn delete(&self, path: &str, body: &Value) -> Result<Value> {
        self.json(
            Method::DELETE,
            path,
            Some(("application/json", serde_json::to_vec(body)?)),
        )
        .await
    }

    /// Streams the events of a watch (`?watch=true` is added) until the server ends it.
    pub async fn watch(&self, path_and_query: &str) -> Result<tokio::sync::mpsc::Receiver<Value>> {
        let sep = if path_and_query.contains('?') {
            '&'
        } else {
            '?'
        };
        let resp = self
            .send(
                Method::GET,
                &format!("{path_and_query}{sep}watch=true"),
                None,
            )
            .await?;
        if resp.status() != StatusCode::OK {
            let code = resp.status().as_u16();
            let bytes = resp.into_body().collect().await?.to_bytes();
            return Err(Status {
                code,
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            }
            .into());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let mut body = resp.into_body();
        tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::new();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { return };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                        if tx.send(v).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// The HTTP status of an error from this client, if it was an API answer.
pub fn status_code(e: &anyhow::Error) -> Option<u16> {
    e.downcast_ref::<Status>().map(|s| s.code)
}
