//! Probes: one attempt of an exec, httpGet, tcpSocket or grpc probe with upstream's messages,
//! and the threshold bookkeeping that turns attempts into a result.
//!
//! As upstream: httpGet succeeds on 200 ≤ code < 400, follows redirects to the same host (at
//! most 10; a redirect elsewhere ends the chain and counts as success), skips certificate
//! verification for HTTPS and reads at most 10 KiB of the body; grpc calls the standard
//! `grpc.health.v1.Health/Check` over HTTP/2 without TLS; exec succeeds on exit code 0.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use k8s_openapi::api::core::v1::{Container, HTTPHeader, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// What upstream's prober sends as its user agent (`kube-probe/<major>.<minor>`).
pub const USER_AGENT: &str = "kube-probe/1.33";
/// How much of a response body (or exec output) is read, as upstream.
const MAX_BODY: usize = 10 * 1024;
/// Redirects followed before giving up, as Go's default client.
const MAX_REDIRECTS: usize = 10;

/// The result of one probe attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    Success,
    /// Upstream's message (what the `Unhealthy` event shows after "… probe failed: ").
    Failure(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

/// Runs a command in the container: (exit code, combined output) or an error message.
pub type ExecFn = dyn Fn(Vec<String>, Duration) -> BoxFuture<'static, Result<(i32, Vec<u8>), String>>
    + Send
    + Sync;

/// The port a probe names: a number, or a named port of the container (or a number in a string).
fn port_of(p: &IntOrString, c: &Container) -> Result<u16, String> {
    let n = match p {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => match c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
        {
            Some(cp) => cp.container_port,
            None => name
                .parse::<i32>()
                .map_err(|_| format!("port {name} not found"))?,
        },
    };
    if (1..=65535).contains(&n) {
        Ok(n as u16)
    } else {
        Err(format!("invalid port number: {n}"))
    }
}

fn timeout_of(p: &Probe) -> Duration {
    Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64)
}

/// A duration as Go prints it (probe timeouts are whole seconds).
fn go_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// An OS error as Go prints it ("connection refused", "no route to host").
fn errno_text(e: &std::io::Error) -> String {
    let s = match e.raw_os_error() {
        Some(code) => {
            let full = std::io::Error::from_raw_os_error(code).to_string();
            full.split(" (os error").next().unwrap_or(&full).to_string()
        }
        None => e.to_string(),
    };
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => s,
    }
}

/// Connects like Go's `net.Dial("tcp", host:port)` and fails with its messages.
async fn dial(host: &str, port: u16) -> Result<TcpStream, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|_| format!("dial tcp: lookup {host}: no such host"))?
            .collect(),
    };
    let mut last = format!("dial tcp: lookup {host}: no such host");
    for a in addrs {
        match TcpStream::connect(a).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = format!("dial tcp {a}: connect: {}", errno_text(&e)),
        }
    }
    Err(last)
}

/// Accepts any server certificate (upstream probes set InsecureSkipVerify) but still checks
/// the handshake signatures.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    static CFG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    let cfg = CFG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth();
        Ok(Arc::new(cfg))
    });
    cfg.clone().map(tokio_rustls::TlsConnector::from)
}

/// An http(s) URL the prober requests.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Url {
    https: bool,
    host: String,
    port: u16,
    /// Path and query, starting with '/'.
    path: String,
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}://{}{}",
            if self.https { "https" } else { "http" },
            join_host_port(&self.host, self.port),
            self.path
        )
    }
}

impl Url {
    /// Where a `Location` header leads from this URL.
    fn follow(&self, location: &str) -> Option<Url> {
        let loc = location.trim();
        if let Some((scheme, rest)) = loc.split_once("://") {
            let https = match scheme.to_ascii_lowercase().as_str() {
                "http" => false,
                "https" => true,
                _ => return None,
            };
            return Self::with_authority(https, rest);
        }
        if let Some(rest) = loc.strip_prefix("//") {
            return Self::with_authority(self.https, rest);
        }
        let path = if loc.starts_with('/') {
            loc.to_string()
        } else {
            let base = self.path.split('?').next().unwrap_or("/");
            let dir = &base[..base.rfind('/').map(|i| i + 1).unwrap_or(1)];
            format!("{dir}{loc}")
        };
        Some(Url {
            path,
            ..self.clone()
        })
    }

    fn with_authority(https: bool, rest: &str) -> Option<Url> {
        let (auth, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let default = if https { 443 } else { 80 };
        let (host, port) = if let Some(v6) = auth.strip_prefix('[') {
            let (h, after) = v6.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().ok()?,
                None => default,
            };
            (h.to_string(), port)
        } else {
            match auth.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().ok()?),
                None => (auth.to_string(), default),
            }
        };
        Some(Url {
            https,
            host,
            port,
            path,
        })
    }
}

/// The request headers as upstream builds them: the probe's own headers, then `User-Agent`
/// and `Accept: */*` unless the probe set them (an empty Accept removes it). Returns the Host
/// override (if the probe set one) and the other headers.
fn probe_headers(hs: &[HTTPHeader]) -> (Option<String>, Vec<(String, String)>) {
    let mut host = None;
    let mut out: Vec<(String, String)> = Vec::new();
    for h in hs {
        if h.name.eq_ignore_ascii_case("host") {
            host.get_or_insert_with(|| h.value.clone());
        } else {
            out.push((h.name.clone(), h.value.clone()));
        }
    }
    let has =
        |out: &[(String, String)], n: &str| out.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    if !has(&out, "user-agent") {
        out.push(("User-Agent".into(), USER_AGENT.into()));
    }
    if !has(&out, "accept") {
        out.push(("Accept".into(), "*/*".into()));
    } else {
        out.retain(|(k, v)| !(k.eq_ignore_ascii_case("accept") && v.is_empty()));
    }
    (host, out)
}

/// Sends one GET over an established connection; returns the status and any Location.
async fn send_http1<S>(
    io: S,
    url: &Url,
    host: &str,
    headers: &[(String, String)],
) -> Result<(u16, Option<String>), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method("GET")
        .uri(&url.path)
        .header("host", host)
        .header("connection", "close");
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let result = async {
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let code = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = resp.into_body();
        let mut n = 0;
        while n <= MAX_BODY {
            match body.frame().await {
                Some(Ok(f)) => n += f.data_ref().map(|d| d.len()).unwrap_or(0),
                _ => break,
            }
        }
        Ok((code, location))
    }
    .await;
    conn.abort();
    result
}

async fn http_once(
    url: &Url,
    host_override: Option<&str>,
    headers: &[(String, String)],
) -> Result<(u16, Option<String>), String> {
    let wrap = |e: String| format!("Get {:?}: {e}", url.to_string());
    let tcp = dial(&url.host, url.port).await.map_err(wrap)?;
    let host = host_override
        .map(str::to_string)
        .unwrap_or_else(|| join_host_port(&url.host, url.port));
    if url.https {
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| wrap(e.to_string()))?;
        let tls = tls_connector()
            .map_err(wrap)?
            .connect(name, tcp)
            .await
            .map_err(|e| wrap(e.to_string()))?;
        send_http1(tls, url, &host, headers).await.map_err(wrap)
    } else {
        send_http1(tcp, url, &host, headers).await.map_err(wrap)
    }
}

/// GETs `start`, following redirects to the same host name as Go's client with upstream's
/// redirect policy does. Returns the final status code.
async fn http_get(start: &Url, hs: &[HTTPHeader]) -> Result<u16, String> {
    let (host_override, headers) = probe_headers(hs);
    let mut cur = start.clone();
    let mut host = host_override;
    let mut hops = 0;
    loop {
        let (code, location) = http_once(&cur, host.as_deref(), &headers).await?;
        let Some(location) = location.filter(|_| matches!(code, 301 | 302 | 303 | 307 | 308))
        else {
            return Ok(code);
        };
        let Some(next) = cur.follow(&location) else {
            return Ok(code);
        };
        if next.host != start.host {
            // Upstream stops at a redirect to another host and judges that response.
            return Ok(code);
        }
        hops += 1;
        if hops >= MAX_REDIRECTS {
            return Err(format!(
                "Get {:?}: stopped after {MAX_REDIRECTS} redirects",
                next.to_string()
            ));
        }
        // A custom Host survives only relative redirects, as in Go.
        if location.contains("://") || location.starts_with("//") {
            host = None;
        }
        cur = next;
    }
}

async fn http_probe(p: &Probe, c: &Container, ip: Option<IpAddr>) -> ProbeOutcome {
    let Some(h) = &p.http_get else {
        return ProbeOutcome::Failure("no httpGet".into());
    };
    let port = match port_of(&h.port, c) {
        Ok(p) => p,
        Err(e) => return ProbeOutcome::Failure(e),
    };
    let host = h
        .host
        .clone()
        .filter(|s| !s.is_empty())
        .or_else(|| ip.map(|i| i.to_string()))
        .unwrap_or_else(|| "127.0.0.1".into());
    let https = match h
        .scheme
        .as_deref()
        .unwrap_or("HTTP")
        .to_ascii_uppercase()
        .as_str()
    {
        "HTTP" | "" => false,
        "HTTPS" => true,
        other => return ProbeOutcome::Failure(format!("unsupported scheme {other:?}")),
    };
    let path = h.path.clone().unwrap_or_default();
    let url = Url {
        https,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
        path: if path.starts_with('/') {
            path
        } else {
            format!("/{path}")
        },
    };
    let headers = h.http_headers.clone().unwrap_or_default();
    match tokio::time::timeout(timeout_of(p), http_get(&url, &headers)).await {
        Ok(Ok(code)) if (200..400).contains(&code) => ProbeOutcome::Success,
        Ok(Ok(code)) => ProbeOutcome::Failure(format!("HTTP probe failed with statuscode: {code}")),
        Ok(Err(e)) => ProbeOutcome::Failure(e),
        Err(_) => ProbeOutcome::Failure(format!(
            "Get {:?}: context deadline exceeded (Client.Timeout exceeded while awaiting headers)",
            url.to_string()
        )),
    }
}

async fn tcp_probe(p: &Probe, c: &Container, ip: Option<IpAddr>) -> ProbeOutcome {
    let Some(t) = &p.tcp_socket else {
        return ProbeOutcome::Failure("no tcpSocket".into());
    };
    let port = match port_of(&t.port, c) {
        Ok(p) => p,
        Err(e) => return ProbeOutcome::Failure(e),
    };
    let host = t
        .host
        .clone()
        .filter(|s| !s.is_empty())
        .or_else(|| ip.map(|i| i.to_string()))
        .unwrap_or_else(|| "127.0.0.1".into());
    match tokio::time::timeout(timeout_of(p), dial(&host, port)).await {
        Ok(Ok(_)) => ProbeOutcome::Success,
        Ok(Err(e)) => ProbeOutcome::Failure(e),
        Err(_) => ProbeOutcome::Failure(format!(
            "dial tcp {}: i/o timeout",
            join_host_port(&host, port)
        )),
    }
}

/// gRPC status code names, as grpc-go prints them.
fn grpc_code_name(code: u32) -> String {
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    NAMES
        .get(code as usize)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("Code({code})"))
}

/// The gRPC code grpc-go derives from an HTTP status when the server sent no grpc-status.
fn grpc_code_of_http(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// Percent-decodes a `grpc-message`.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn get_varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// A length-prefixed gRPC message carrying `HealthCheckRequest { string service = 1; }`.
pub fn health_check_request(service: &str) -> Vec<u8> {
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        put_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    frame
}

/// `HealthCheckResponse.status` (field 1) from the first length-prefixed message; 0 (UNKNOWN)
/// when absent.
pub fn health_check_status(body: &[u8]) -> Result<u64, String> {
    if body.len() < 5 {
        return Err("response has no message".into());
    }
    if body[0] != 0 {
        return Err("compressed responses are not supported".into());
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let msg = body
        .get(5..5 + len)
        .ok_or_else(|| "truncated response message".to_string())?;
    let mut i = 0;
    let mut status = 0;
    let bad = || "malformed HealthCheckResponse".to_string();
    while i < msg.len() {
        let key = get_varint(msg, &mut i).ok_or_else(bad)?;
        match key & 7 {
            0 => {
                let v = get_varint(msg, &mut i).ok_or_else(bad)?;
                if key >> 3 == 1 {
                    status = v;
                }
            }
            1 => i += 8,
            2 => i += get_varint(msg, &mut i).ok_or_else(bad)? as usize,
            5 => i += 4,
            _ => return Err(bad()),
        }
    }
    Ok(status)
}

enum RpcError {
    Transport(String),
    Status(u32, String),
}

async fn health_check(tcp: TcpStream, addr: &str, service: &str) -> Result<u64, RpcError> {
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .map_err(|e| RpcError::Transport(e.to_string()))?;
    let conn = tokio::spawn(conn);
    let result = async {
        let req = hyper::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/grpc.health.v1.Health/Check"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("user-agent", USER_AGENT)
            .body(Full::new(Bytes::from(health_check_request(service))))
            .map_err(|e| RpcError::Transport(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| RpcError::Transport(e.to_string()))?;
        let http_status = resp.status().as_u16();
        let status_of = |h: &http::HeaderMap| {
            h.get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok())
                .map(|code| {
                    let msg = h
                        .get("grpc-message")
                        .and_then(|v| v.to_str().ok())
                        .map(percent_decode)
                        .unwrap_or_default();
                    (code, msg)
                })
        };
        // A trailers-only answer carries the status in its headers.
        if let Some((code, msg)) = status_of(resp.headers()) {
            if code != 0 {
                return Err(RpcError::Status(code, msg));
            }
        }
        if http_status != 200 {
            return Err(RpcError::Status(
                grpc_code_of_http(http_status),
                format!("unexpected HTTP status code received from server: {http_status}"),
            ));
        }
        let collected = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| RpcError::Transport(e.to_string()))?;
        if let Some((code, msg)) = collected.trailers().and_then(status_of) {
            if code != 0 {
                return Err(RpcError::Status(code, msg));
            }
        }
        health_check_status(&collected.to_bytes()).map_err(|e| RpcError::Status(13, e))
    }
    .await;
    conn.abort();
    result
}

/// grpc.health.v1.Health/Check over HTTP/2 (prior knowledge, no TLS), as upstream's prober.
async fn grpc_probe(p: &Probe, ip: Option<IpAddr>) -> ProbeOutcome {
    let Some(g) = &p.grpc else {
        return ProbeOutcome::Failure("no grpc".into());
    };
    let host = ip
        .map(|i| i.to_string())
        .unwrap_or_else(|| "127.0.0.1".into());
    let Ok(port) =
        u16::try_from(g.port)
            .map_err(|_| ())
            .and_then(|p| if p == 0 { Err(()) } else { Ok(p) })
    else {
        return ProbeOutcome::Failure(format!("invalid port number: {}", g.port));
    };
    let addr = join_host_port(&host, port);
    let timeout = timeout_of(p);
    let t = go_duration(timeout);
    let deadline = Instant::now() + timeout;
    let tcp = match tokio::time::timeout_at(deadline, dial(&host, port)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return ProbeOutcome::Failure(format!(
                "error: failed to connect service at {addr:?}: {e}"
            ))
        }
        Err(_) => {
            return ProbeOutcome::Failure(format!(
                "timeout: failed to connect service {addr:?} within {t}: context deadline exceeded"
            ))
        }
    };
    let service = g.service.clone().unwrap_or_default();
    match tokio::time::timeout_at(deadline, health_check(tcp, &addr, &service)).await {
        Ok(Ok(1)) => ProbeOutcome::Success,
        Ok(Ok(s)) => ProbeOutcome::Failure(format!(
            "service unhealthy (responded with {:?})",
            match s {
                0 => "UNKNOWN",
                2 => "NOT_SERVING",
                3 => "SERVICE_UNKNOWN",
                _ => "UNKNOWN",
            }
        )),
        Ok(Err(RpcError::Status(12, msg))) => ProbeOutcome::Failure(format!(
            "error: this server does not implement the grpc health protocol (grpc.health.v1.Health): {msg}"
        )),
        Ok(Err(RpcError::Status(4, _))) | Err(_) => ProbeOutcome::Failure(format!(
            "timeout: health rpc did not complete within {t}"
        )),
        Ok(Err(RpcError::Status(code, msg))) => ProbeOutcome::Failure(format!(
            "error: health rpc probe failed: rpc error: code = {} desc = {msg}",
            grpc_code_name(code)
        )),
        Ok(Err(RpcError::Transport(e))) => ProbeOutcome::Failure(format!(
            "error: health rpc probe failed: rpc error: code = Unavailable desc = connection error: {e}"
        )),
    }
}

/// Runs one attempt of the probe (not its thresholds). `exec` runs a command in the container.
pub async fn probe_once(
    probe: &Probe,
    container: &Container,
    pod_ip: Option<IpAddr>,
    exec: &ExecFn,
) -> ProbeOutcome {
    if let Some(e) = &probe.exec {
        let cmd = e.command.clone().unwrap_or_default();
        return match exec(cmd, timeout_of(probe)).await {
            Ok((0, _)) => ProbeOutcome::Success,
            Ok((_, mut out)) => {
                // Upstream's message is the command's (capped) output.
                out.truncate(MAX_BODY);
                ProbeOutcome::Failure(String::from_utf8_lossy(&out).trim_end().to_string())
            }
            Err(e) => ProbeOutcome::Failure(e),
        };
    }
    if probe.http_get.is_some() {
        return http_probe(probe, container, pod_ip).await;
    }
    if probe.tcp_socket.is_some() {
        return tcp_probe(probe, container, pod_ip).await;
    }
    if probe.grpc.is_some() {
        return grpc_probe(probe, pod_ip).await;
    }
    ProbeOutcome::Failure("missing probe handler".into())
}

/// Thresholds and periods of one probe of one container.
#[derive(Debug, Clone)]
pub struct ProbeTracker {
    kind: ProbeKind,
    initial_delay: Duration,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
    successes: u32,
    failures: u32,
    result: bool,
}

impl ProbeTracker {
    /// Defaults as upstream: period 10 s, timeout 1 s, successThreshold 1, failureThreshold 3.
    pub fn new(probe: &Probe, kind: ProbeKind) -> ProbeTracker {
        ProbeTracker {
            kind,
            initial_delay: Duration::from_secs(
                probe.initial_delay_seconds.unwrap_or(0).max(0) as u64
            ),
            period: Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64),
            timeout: timeout_of(probe),
            success_threshold: probe.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
            successes: 0,
            failures: 0,
            // Readiness starts failed and startup not passed (upstream's Unknown); liveness
            // starts passing.
            result: kind == ProbeKind::Liveness,
        }
    }
    pub fn initial_delay(&self) -> Duration {
        self.initial_delay
    }
    pub fn period(&self) -> Duration {
        self.period
    }
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// The current result (ready / alive / started).
    #[allow(dead_code)] // the kubelet acts on observe()'s answers; kept for the contract
    pub fn result(&self) -> bool {
        self.result
    }

    /// Feeds one attempt; returns the new result when it flips after successThreshold /
    /// failureThreshold consecutive attempts. A readiness or startup probe that never passed
    /// also reports its (unchanged) failure once, when failureThreshold is first reached, as
    /// upstream sets its result then.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.result && self.successes >= self.success_threshold {
                self.result = true;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.result && self.failures >= self.failure_threshold {
                self.result = false;
                return Some(false);
            }
            if !self.result
                && self.kind != ProbeKind::Liveness
                && self.failures == self.failure_threshold
            {
                return Some(false);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests;
