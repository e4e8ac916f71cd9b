//! Unit tests of the probes: thresholds, and real http/https/tcp/grpc attempts against servers
//! on 127.0.0.1 written here.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use parking_lot::Mutex;
use serde_json::json;

use super::*;

fn probe(v: serde_json::Value) -> Probe {
    serde_json::from_value(v).unwrap()
}

fn container(ports: serde_json::Value) -> Container {
    serde_json::from_value(json!({"name": "c", "ports": ports})).unwrap()
}

const LOCAL: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

fn no_exec() -> Box<ExecFn> {
    Box::new(|_, _| Box::pin(async { Err("no exec".to_string()) }))
}

async fn run(p: &Probe, c: &Container) -> ProbeOutcome {
    // Generous outer bound: every probe here has its own 1–2 s timeout.
    tokio::time::timeout(
        Duration::from_secs(30),
        probe_once(p, c, LOCAL, &*no_exec()),
    )
    .await
    .expect("a probe attempt ends within its timeout")
}

fn failure(o: ProbeOutcome) -> String {
    match o {
        ProbeOutcome::Failure(m) => m,
        ProbeOutcome::Success => panic!("expected a failure"),
    }
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// (kind, successThreshold, failureThreshold, attempts, expected observe() answers, final result)
type Row = (
    ProbeKind,
    i32,
    i32,
    &'static str,
    &'static [Option<bool>],
    bool,
);

#[test]
fn trackers_flip_after_consecutive_results_as_upstream() {
    use ProbeKind::*;
    let rows: &[Row] = &[
        // Readiness starts failed; one success makes it ready.
        (Readiness, 1, 3, "s", &[Some(true)], true),
        // Two successes needed; a failure in between resets the run.
        (
            Readiness,
            2,
            3,
            "sfss",
            &[None, None, None, Some(true)],
            true,
        ),
        // Ready, then failureThreshold failures in a row make it unready.
        (
            Readiness,
            1,
            2,
            "sfsff",
            &[Some(true), None, None, None, Some(false)],
            false,
        ),
        // A never-ready readiness probe reports its failure once, at the threshold.
        (Readiness, 1, 2, "fff", &[None, Some(false), None], false),
        // Liveness starts alive and dies after 3 consecutive failures only.
        (
            Liveness,
            1,
            3,
            "ffsfff",
            &[None, None, None, None, None, Some(false)],
            false,
        ),
        // Liveness with failureThreshold 1 dies at once, and recovers on success.
        (Liveness, 1, 1, "fs", &[Some(false), Some(true)], true),
        // Startup: passes on the first success, failures before are reported at the threshold.
        (Startup, 1, 2, "ffs", &[None, Some(false), Some(true)], true),
    ];
    for (i, (kind, st, ft, attempts, want, end)) in rows.iter().enumerate() {
        let mut t = ProbeTracker::new(
            &probe(json!({"successThreshold": st, "failureThreshold": ft})),
            *kind,
        );
        assert_eq!(t.result(), *kind == Liveness, "row {i}: initial result");
        let got: Vec<Option<bool>> = attempts.chars().map(|c| t.observe(c == 's')).collect();
        assert_eq!(&got, want, "row {i}");
        assert_eq!(t.result(), *end, "row {i}: final result");
    }
}

#[test]
fn trackers_use_upstream_defaults_and_the_probe_timings() {
    let d = ProbeTracker::new(&probe(json!({})), ProbeKind::Liveness);
    assert_eq!(
        (d.period(), d.timeout(), d.initial_delay()),
        (
            Duration::from_secs(10),
            Duration::from_secs(1),
            Duration::ZERO
        )
    );
    let mut d = d;
    assert_eq!((d.observe(false), d.observe(false)), (None, None));
    assert_eq!(
        d.observe(false),
        Some(false),
        "failureThreshold defaults to 3"
    );
    let t = ProbeTracker::new(
        &probe(json!({"periodSeconds": 2, "timeoutSeconds": 5, "initialDelaySeconds": 7})),
        ProbeKind::Readiness,
    );
    assert_eq!(
        (t.period(), t.timeout(), t.initial_delay()),
        (
            Duration::from_secs(2),
            Duration::from_secs(5),
            Duration::from_secs(7)
        )
    );
}

/// What a test HTTP server saw: path and lower-cased headers of each request.
type Seen = Arc<Mutex<Vec<(String, HashMap<String, String>)>>>;

/// An HTTP/1 server on 127.0.0.1 answering `route(path) -> (status, location)`; with `tls`
/// it serves HTTPS with a self-signed certificate.
async fn http_server(route: fn(&str) -> (u16, Option<String>), tls: bool) -> (u16, Seen) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let acceptor = tls.then(|| {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    });
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let log = log.clone();
            let svc = service_fn(move |req: hyper::Request<Incoming>| {
                let headers = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect();
                let path = req.uri().to_string();
                log.lock().push((path.clone(), headers));
                let (code, location) = route(&path);
                let mut resp = hyper::Response::builder().status(code);
                if let Some(l) = location {
                    resp = resp.header("location", l);
                }
                async move {
                    Ok::<_, Infallible>(
                        resp.body(Full::new(Bytes::from("x".repeat(20_000))))
                            .unwrap(),
                    )
                }
            });
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let b = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    Some(a) => {
                        if let Ok(t) = a.accept(s).await {
                            let _ = b
                                .serve_connection(hyper_util::rt::TokioIo::new(t), svc)
                                .await;
                        }
                    }
                    None => {
                        let _ = b
                            .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                            .await;
                    }
                }
            });
        }
    });
    (port, seen)
}

fn routes(path: &str) -> (u16, Option<String>) {
    match path {
        "/ok" | "/ok?x=1" => (200, None),
        "/fail" => (500, None),
        "/teapot" => (418, None),
        "/moved" => (302, Some("/ok?x=1".into())),
        "/relative/a" => (301, Some("b".into())),
        "/relative/b" => (404, None),
        "/away" => (302, Some("http://elsewhere.invalid:1/".into())),
        "/loop" => (302, Some("/loop".into())),
        _ => (404, None),
    }
}

#[tokio::test]
async fn http_probes_judge_status_codes_and_send_upstream_headers() {
    let (port, seen) = http_server(routes, false).await;
    let c = container(json!([{"name": "web", "containerPort": port}]));
    // Named port, default headers.
    let p = probe(json!({"httpGet": {"port": "web", "path": "ok"}}));
    assert_eq!(run(&p, &c).await, ProbeOutcome::Success);
    {
        let s = seen.lock();
        let (path, h) = s.last().unwrap();
        assert_eq!(path, "/ok");
        assert_eq!(h["user-agent"], USER_AGENT);
        assert_eq!(h["accept"], "*/*");
        assert_eq!(h["host"], format!("127.0.0.1:{port}"));
        assert_eq!(h["connection"], "close");
    }
    // The probe's headers are sent and replace the defaults; Host sets the host header.
    let p = probe(
        json!({"httpGet": {"port": port, "path": "/ok", "httpHeaders": [
        {"name": "X-Custom", "value": "yes"}, {"name": "User-Agent", "value": "mine"},
        {"name": "Host", "value": "example.com"}, {"name": "Accept", "value": ""}]}}),
    );
    assert_eq!(run(&p, &c).await, ProbeOutcome::Success);
    {
        let s = seen.lock();
        let h = &s.last().unwrap().1;
        assert_eq!(h["x-custom"], "yes");
        assert_eq!(h["user-agent"], "mine");
        assert_eq!(h["host"], "example.com");
        assert!(
            !h.contains_key("accept"),
            "an empty Accept removes the header"
        );
    }
    let p = probe(json!({"httpGet": {"port": port, "path": "/fail"}}));
    assert_eq!(
        failure(run(&p, &c).await),
        "HTTP probe failed with statuscode: 500"
    );
    let p = probe(json!({"httpGet": {"port": port, "path": "/teapot"}}));
    assert_eq!(
        failure(run(&p, &c).await),
        "HTTP probe failed with statuscode: 418"
    );
    // A port number in a string is a number.
    let p = probe(json!({"httpGet": {"port": port.to_string(), "path": "/ok"}}));
    assert_eq!(run(&p, &c).await, ProbeOutcome::Success);
    let p = probe(json!({"httpGet": {"port": "nosuch"}}));
    assert_eq!(failure(run(&p, &c).await), "port nosuch not found");
    let p = probe(json!({"httpGet": {"port": 0}}));
    assert_eq!(failure(run(&p, &c).await), "invalid port number: 0");
}

#[tokio::test]
async fn http_probes_follow_redirects_to_the_same_host_only() {
    let (port, seen) = http_server(routes, false).await;
    let c = container(json!([]));
    let p = probe(json!({"httpGet": {"port": port, "path": "/moved"}}));
    assert_eq!(run(&p, &c).await, ProbeOutcome::Success);
    assert_eq!(
        seen.lock().last().unwrap().0,
        "/ok?x=1",
        "the redirect was followed"
    );
    // A relative Location resolves against the directory of the path.
    let p = probe(json!({"httpGet": {"port": port, "path": "/relative/a"}}));
    assert_eq!(
        failure(run(&p, &c).await),
        "HTTP probe failed with statuscode: 404"
    );
    assert_eq!(seen.lock().last().unwrap().0, "/relative/b");
    // Another host: not followed, the 302 itself counts as success.
    let before = seen.lock().len();
    let p = probe(json!({"httpGet": {"port": port, "path": "/away"}}));
    assert_eq!(run(&p, &c).await, ProbeOutcome::Success);
    assert_eq!(seen.lock().len(), before + 1);
    // A loop stops after 10 redirects with Go's message.
    let before = seen.lock().len();
    let p = probe(json!({"httpGet": {"port": port, "path": "/loop"}, "timeoutSeconds": 5}));
    assert_eq!(
        failure(run(&p, &c).await),
        format!("Get \"http://127.0.0.1:{port}/loop\": stopped after 10 redirects")
    );
    assert_eq!(seen.lock().len(), before + 10);
}

#[tokio::test]
async fn https_probes_skip_certificate_verification() {
    let (port, seen) = http_server(routes, true).await;
    let c = container(json!([]));
    let p = probe(json!({"httpGet": {"port": port, "path": "/ok", "scheme": "HTTPS"}}));
    assert_eq!(run(&p, &c).await, ProbeOutcome::Success);
    assert_eq!(seen.lock().len(), 1);
    let p = probe(json!({"httpGet": {"port": port, "path": "/fail", "scheme": "HTTPS"}}));
    assert_eq!(
        failure(run(&p, &c).await),
        "HTTP probe failed with statuscode: 500"
    );
}

#[tokio::test]
async fn refused_and_silent_servers_fail_with_go_messages() {
    let c = container(json!([]));
    let closed = closed_port();
    let p = probe(json!({"httpGet": {"port": closed, "path": "/healthz"}}));
    assert_eq!(
        failure(run(&p, &c).await),
        format!(
            "Get \"http://127.0.0.1:{closed}/healthz\": dial tcp 127.0.0.1:{closed}: connect: connection refused"
        )
    );
    let p = probe(json!({"tcpSocket": {"port": closed}}));
    assert_eq!(
        failure(run(&p, &c).await),
        format!("dial tcp 127.0.0.1:{closed}: connect: connection refused")
    );
    // A server that accepts but never answers: the 1 s timeout.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            conns.push(s);
        }
    });
    let p = probe(json!({"httpGet": {"port": port, "path": "/h"}, "timeoutSeconds": 1}));
    let started = std::time::Instant::now();
    assert_eq!(
        failure(run(&p, &c).await),
        format!(
            "Get \"http://127.0.0.1:{port}/h\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
        )
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    // TCP only needs the connection.
    let p = probe(json!({"tcpSocket": {"port": port}}));
    assert_eq!(run(&p, &c).await, ProbeOutcome::Success);
    let c = container(json!([{"name": "t", "containerPort": port}]));
    let p = probe(json!({"tcpSocket": {"port": "t"}}));
    assert_eq!(run(&p, &c).await, ProbeOutcome::Success);
    held.abort();
}

#[tokio::test]
async fn exec_probes_succeed_on_exit_zero_and_report_output() {
    let c = container(json!([]));
    let exec: Box<ExecFn> = Box::new(|argv, timeout| {
        Box::pin(async move {
            assert_eq!(timeout, Duration::from_secs(3));
            match argv[0].as_str() {
                "ok" => Ok((0, b"fine".to_vec())),
                "big" => Ok((1, vec![b'a'; 50_000])),
                "slow" => Err("command \"slow\" timed out".to_string()),
                _ => Ok((2, b"boom\n".to_vec())),
            }
        })
    });
    let (c, exec) = (&c, &exec);
    let run = move |cmd: &str| {
        let p = probe(json!({"exec": {"command": [cmd]}, "timeoutSeconds": 3}));
        async move { probe_once(&p, c, None, &**exec).await }
    };
    assert_eq!(run("ok").await, ProbeOutcome::Success);
    assert_eq!(failure(run("bad").await), "boom");
    assert_eq!(
        failure(run("big").await).len(),
        10 * 1024,
        "output capped at 10 KiB"
    );
    assert_eq!(failure(run("slow").await), "command \"slow\" timed out");
}

/// A tiny gRPC health server over h2c: service "" and "up" are SERVING, "down" NOT_SERVING,
/// anything else answers NOT_FOUND in a trailers-only response; `unimplemented` answers
/// UNIMPLEMENTED to everything.
async fn grpc_server(unimplemented: bool) -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let services: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = services.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let log = log.clone();
            let svc = service_fn(move |req: hyper::Request<Incoming>| {
                let log = log.clone();
                async move {
                    assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
                    assert_eq!(req.headers()["content-type"], "application/grpc");
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    // Decode HealthCheckRequest.service.
                    let mut i = 5;
                    let mut service = String::new();
                    if body.len() > 5 && body[5] == 0x0a {
                        i += 1;
                        let n = get_varint(&body, &mut i).unwrap() as usize;
                        service = String::from_utf8(body[i..i + n].to_vec()).unwrap();
                    }
                    log.lock().push(service.clone());
                    let status = match service.as_str() {
                        _ if unimplemented => None,
                        "" | "up" => Some(1u8),
                        "down" => Some(2),
                        _ => None,
                    };
                    let resp = hyper::Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc");
                    let frames: Vec<Result<Frame<Bytes>, Infallible>> = match status {
                        Some(st) => {
                            let mut t = http::HeaderMap::new();
                            t.insert("grpc-status", "0".parse().unwrap());
                            vec![
                                Ok(Frame::data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, st]))),
                                Ok(Frame::trailers(t)),
                            ]
                        }
                        None => Vec::new(),
                    };
                    let resp = match status {
                        Some(_) => resp,
                        None if unimplemented => resp
                            .header("grpc-status", "12")
                            .header("grpc-message", "unknown service grpc.health.v1.Health"),
                        None => resp
                            .header("grpc-status", "5")
                            .header("grpc-message", "unknown%20service"),
                    };
                    Ok::<_, Infallible>(
                        resp.body(StreamBody::new(futures::stream::iter(frames)))
                            .unwrap(),
                    )
                }
            });
            tokio::spawn(async move {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
            });
        }
    });
    (port, services)
}

#[tokio::test]
async fn grpc_probes_call_the_standard_health_service() {
    let c = container(json!([]));
    let (port, services) = grpc_server(false).await;
    let p = probe(json!({"grpc": {"port": port}}));
    assert_eq!(run(&p, &c).await, ProbeOutcome::Success);
    let p = probe(json!({"grpc": {"port": port, "service": "up"}}));
    assert_eq!(run(&p, &c).await, ProbeOutcome::Success);
    let p = probe(json!({"grpc": {"port": port, "service": "down"}}));
    assert_eq!(
        failure(run(&p, &c).await),
        "service unhealthy (responded with \"NOT_SERVING\")"
    );
    let long = "s".repeat(300);
    let p = probe(json!({"grpc": {"port": port, "service": long}}));
    assert_eq!(
        failure(run(&p, &c).await),
        "error: health rpc probe failed: rpc error: code = NotFound desc = unknown service"
    );
    assert_eq!(
        *services.lock(),
        vec!["".to_string(), "up".into(), "down".into(), long],
        "service names (a long one with a multi-byte length) reach the server"
    );
    let (port, _) = grpc_server(true).await;
    let p = probe(json!({"grpc": {"port": port}}));
    assert_eq!(
        failure(run(&p, &c).await),
        "error: this server does not implement the grpc health protocol (grpc.health.v1.Health): unknown service grpc.health.v1.Health"
    );
    let closed = closed_port();
    let p = probe(json!({"grpc": {"port": closed}}));
    assert_eq!(
        failure(run(&p, &c).await),
        format!(
            "error: failed to connect service at \"127.0.0.1:{closed}\": dial tcp 127.0.0.1:{closed}: connect: connection refused"
        )
    );
}

#[test]
fn health_messages_encode_and_decode_protobuf() {
    assert_eq!(health_check_request(""), vec![0, 0, 0, 0, 0]);
    let r = health_check_request("ab");
    assert_eq!(r, vec![0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b']);
    let r = health_check_request(&"x".repeat(200));
    assert_eq!(&r[5..8], &[0x0a, 0xc8, 0x01], "varint length");
    // An unknown field before the status is skipped.
    assert_eq!(
        health_check_status(&[0, 0, 0, 0, 6, 0x12, 2, b'h', b'i', 0x08, 2]),
        Ok(2)
    );
    assert_eq!(health_check_status(&[0, 0, 0, 0, 0]), Ok(0));
    assert!(health_check_status(&[0, 0, 0, 0, 9, 0x08]).is_err());
    assert_eq!(percent_decode("a%20b%zz%4"), "a b%zz%4");
}

#[test]
fn redirect_locations_resolve_like_urls() {
    let u = Url {
        https: false,
        host: "10.0.0.1".into(),
        port: 8080,
        path: "/a/b?q".into(),
    };
    assert_eq!(u.to_string(), "http://10.0.0.1:8080/a/b?q");
    assert_eq!(u.follow("c").unwrap().path, "/a/c");
    assert_eq!(u.follow("/z").unwrap().path, "/z");
    let abs = u.follow("https://[::1]/x").unwrap();
    assert_eq!(
        (abs.https, abs.host.as_str(), abs.port, abs.path.as_str()),
        (true, "::1", 443, "/x")
    );
    assert_eq!(abs.to_string(), "https://[::1]:443/x");
    let rel = u.follow("//other:9/").unwrap();
    assert_eq!((rel.host.as_str(), rel.port), ("other", 9));
    assert!(u.follow("ftp://x/").is_none());
}
