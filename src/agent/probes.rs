//! Probes: one attempt of an exec, httpGet, tcpSocket or grpc probe with upstream's messages,
//! and the threshold bookkeeping that turns attempts into a result.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub enum ProbeOutcome {
    Success,
    Failure(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

pub type ExecFn = dyn Fn(Vec<String>, Duration) -> BoxFuture<'static, Result<(i32, Vec<u8>), String>>
    + Send
    + Sync;

fn port_of(p: &IntOrString, c: &Container) -> Result<u16, String> {
    match p {
        IntOrString::Int(n) if (1..=65535).contains(n) => Ok(*n as u16),
        IntOrString::Int(n) => Err(format!("invalid port number: {n}")),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            c.ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .map(|cp| cp.container_port as u16)
                .ok_or_else(|| format!("couldn't find port: {name} in {}", c.name))
        }
    }
}

fn timeout_of(p: &Probe) -> Duration {
    Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64)
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
    let scheme = h
        .scheme
        .clone()
        .unwrap_or_else(|| "HTTP".into())
        .to_lowercase();
    let path = h.path.clone().unwrap_or_else(|| "/".into());
    let path = if path.starts_with('/') {
        path
    } else {
        format!("/{path}")
    };
    let url = format!("{scheme}://{host}:{port}{path}");
    let timeout = timeout_of(p);
    let fut = async {
        let addr: SocketAddr = format!("{host}:{port}")
            .parse()
            .map_err(|_| format!("Get {url:?}: bad address"))?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("Get {url:?}: dial tcp {addr}: connect: {}", refused(&e)))?;
        if scheme == "https" {
            return Err(format!("Get {url:?}: HTTPS probes are not supported yet"));
        }
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| format!("Get {url:?}: {e}"))?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method("GET")
            .uri(&path)
            .header("host", format!("{host}:{port}"))
            .header("user-agent", "kube-probe/1.33")
            .header("accept", "*/*");
        for hh in h.http_headers.iter().flatten() {
            req = req.header(hh.name.as_str(), hh.value.as_str());
        }
        let req = req
            .body(Full::new(bytes::Bytes::new()))
            .map_err(|e| format!("Get {url:?}: {e}"))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("Get {url:?}: {e}"))?;
        let code = resp.status().as_u16();
        // Read (at most 10 KiB of) the body so the connection closes cleanly.
        let mut body = resp.into_body();
        let mut n = 0;
        while let Some(Ok(f)) = body.frame().await {
            n += f.data_ref().map(|d| d.len()).unwrap_or(0);
            if n > 10 * 1024 {
                break;
            }
        }
        Ok(code)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(code)) if (200..400).contains(&code) => ProbeOutcome::Success,
        Ok(Ok(code)) => ProbeOutcome::Failure(format!("HTTP probe failed with statuscode: {code}")),
        Ok(Err(e)) => ProbeOutcome::Failure(e),
        Err(_) => ProbeOutcome::Failure(format!(
            "Get {url:?}: context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
        )),
    }
}

fn refused(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        _ => e.to_string(),
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
    let target = format!("{host}:{port}");
    match tokio::time::timeout(timeout_of(p), tokio::net::TcpStream::connect(&target)).await {
        Ok(Ok(_)) => ProbeOutcome::Success,
        Ok(Err(e)) => ProbeOutcome::Failure(format!("dial tcp {target}: connect: {}", refused(&e))),
        Err(_) => ProbeOutcome::Failure(format!("dial tcp {target}: i/o timeout")),
    }
}

/// grpc.health.v1.Health/Check over HTTP/2 (prior knowledge).
async fn grpc_probe(p: &Probe, ip: Option<IpAddr>) -> ProbeOutcome {
    let Some(g) = &p.grpc else {
        return ProbeOutcome::Failure("no grpc".into());
    };
    let host = ip
        .map(|i| i.to_string())
        .unwrap_or_else(|| "127.0.0.1".into());
    let target = format!("{host}:{}", g.port);
    let service = g.service.clone().unwrap_or_default();
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(&target).await.map_err(|e| {
            format!(
                "failed to connect service {target:?} within {}s: {}",
                timeout_of(p).as_secs(),
                refused(&e)
            )
        })?;
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        // HealthCheckRequest { string service = 1; }
        let mut msg = Vec::new();
        if !service.is_empty() {
            msg.push(0x0a);
            msg.push(service.len() as u8);
            msg.extend_from_slice(service.as_bytes());
        }
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        frame.extend_from_slice(&msg);
        let req = hyper::Request::builder()
            .method("POST")
            .uri(format!("http://{target}/grpc.health.v1.Health/Check"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(bytes::Bytes::from(frame)))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let trailers = body.trailers().cloned();
        let bytes = body.to_bytes();
        if let Some(t) = trailers {
            if let Some(s) = t.get("grpc-status").and_then(|v| v.to_str().ok()) {
                if s != "0" {
                    return Err(format!("rpc error: code = {s}"));
                }
            }
        }
        // HealthCheckResponse { ServingStatus status = 1; } after the 5-byte frame header.
        let status = if bytes.len() >= 7 && bytes[5] == 0x08 {
            bytes[6]
        } else {
            0
        };
        Ok(status)
    };
    match tokio::time::timeout(timeout_of(p), fut).await {
        Ok(Ok(1)) => ProbeOutcome::Success,
        Ok(Ok(s)) => ProbeOutcome::Failure(format!(
            "service unhealthy (responseCode: {})",
            match s {
                2 => "NOT_SERVING",
                3 => "SERVICE_UNKNOWN",
                _ => "UNKNOWN",
            }
        )),
        Ok(Err(e)) => ProbeOutcome::Failure(e),
        Err(_) => ProbeOutcome::Failure(format!(
            "timeout: health rpc did not complete within {}s",
            timeout_of(p).as_secs()
        )),
    }
}

/// One attempt of the probe.
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
            Ok((code, out)) => {
                let text = String::from_utf8_lossy(&out).trim().to_string();
                ProbeOutcome::Failure(if text.is_empty() {
                    format!("command exited with {code}")
                } else {
                    text
                })
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
    ProbeOutcome::Failure("probe has no handler".into())
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
            // Readiness and startup start as not passed; liveness as passing.
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
    #[cfg(test)]
    pub fn result(&self) -> bool {
        self.result
    }

    /// Feeds one attempt; returns the new result when it flips.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes += 1;
            if !self.result && self.successes >= self.success_threshold {
                self.result = true;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.result && self.failures >= self.failure_threshold {
                self.result = false;
                return Some(false);
            }
            // A readiness or startup probe that never passed reports its failure once.
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
mod tests {
    use super::*;
    use serde_json::json;

    fn probe(v: serde_json::Value) -> Probe {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn thresholds_flip_results_as_upstream() {
        let mut r = ProbeTracker::new(
            &probe(json!({"successThreshold": 2, "failureThreshold": 2})),
            ProbeKind::Readiness,
        );
        assert!(!r.result());
        assert_eq!(r.observe(true), None);
        assert_eq!(r.observe(true), Some(true));
        assert_eq!(r.observe(false), None);
        assert_eq!(r.observe(false), Some(false));
        assert_eq!(r.observe(false), None);
        let mut l = ProbeTracker::new(&probe(json!({"failureThreshold": 3})), ProbeKind::Liveness);
        assert!(l.result());
        assert_eq!(l.observe(false), None);
        assert_eq!(l.observe(true), None);
        assert_eq!(l.observe(false), None);
        assert_eq!(l.observe(false), None);
        assert_eq!(l.observe(false), Some(false));
        let d = ProbeTracker::new(&probe(json!({})), ProbeKind::Liveness);
        assert_eq!(
            (d.period(), d.timeout(), d.initial_delay()),
            (
                Duration::from_secs(10),
                Duration::from_secs(1),
                Duration::ZERO
            )
        );
    }

    fn no_exec() -> Box<ExecFn> {
        Box::new(|_, _| Box::pin(async { Err("no exec".to_string()) }))
    }

    async fn serve(code: u16) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let code = if req.contains("x-probe: yes") {
                    code
                } else {
                    418
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        port
    }

    #[tokio::test]
    async fn http_probes_send_headers_and_judge_status_codes() {
        let c: Container = serde_json::from_value(
            json!({"name": "c", "ports": [{"name": "web", "containerPort": 1}]}),
        )
        .unwrap();
        let ok = serve(200).await;
        let mut c2 = c.clone();
        c2.ports.as_mut().unwrap()[0].container_port = ok as i32;
        let p = probe(
            json!({"httpGet": {"port": "web", "path": "/h", "httpHeaders": [{"name": "X-Probe", "value": "yes"}]}}),
        );
        let ip = Some("127.0.0.1".parse().unwrap());
        assert!(matches!(
            probe_once(&p, &c2, ip, &*no_exec()).await,
            ProbeOutcome::Success
        ));
        let bad = serve(500).await;
        let p = probe(
            json!({"httpGet": {"port": bad, "httpHeaders": [{"name": "X-Probe", "value": "yes"}]}}),
        );
        match probe_once(&p, &c, ip, &*no_exec()).await {
            ProbeOutcome::Failure(m) => assert_eq!(m, "HTTP probe failed with statuscode: 500"),
            _ => panic!("500 must fail"),
        }
        // Nothing listens on a closed port.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = probe(json!({"tcpSocket": {"port": closed}}));
        match probe_once(&p, &c, ip, &*no_exec()).await {
            ProbeOutcome::Failure(m) => assert_eq!(
                m,
                format!("dial tcp 127.0.0.1:{closed}: connect: connection refused")
            ),
            _ => panic!("refused must fail"),
        }
        let p = probe(json!({"httpGet": {"port": "nosuch"}}));
        match probe_once(&p, &c, ip, &*no_exec()).await {
            ProbeOutcome::Failure(m) => assert_eq!(m, "couldn't find port: nosuch in c"),
            _ => panic!(),
        }
    }
}
