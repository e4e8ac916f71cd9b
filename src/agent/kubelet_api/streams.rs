//! exec, attach and port-forward over the two transports kubectl speaks: WebSocket
//! (`v5.channel.k8s.io` … `channel.k8s.io`; port-forward as `SPDY/3.1+portforward.k8s.io`, a
//! SPDY session inside binary messages) and plain SPDY/3.1 (`X-Stream-Protocol-Version`).
//!
//! Both transports are turned into the same [`Io`]: stdin and resize events from the client,
//! and numbered output channels (1 stdout, 2 stderr, 3 error) to it. The process side comes
//! from the pod's shim, which hands over the exec's pipes or terminal (or a container's stdin
//! and live output for attach), so bytes flow between the client and the process with no
//! other hop.

// Error answers are responses, built once and returned as they are.
#![allow(clippy::result_large_err)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use k3rs_runtime::shim::{AttachSession, ExecSession, FdIo, ShimClient};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::spdy;
use super::{find_pod, has_container, query_pairs, status_resp};

use crate::agent::Agent;
use crate::httputil::{full, Body};

/// Channel protocols for exec/attach over WebSocket, newest first.
const WS_CHANNEL: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// … and over SPDY (v5 exists only for WebSocket).
const SPDY_CHANNEL: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
const WS_PORTFORWARD: &[&str] = &["SPDY/3.1+portforward.k8s.io"];
const SPDY_PORTFORWARD: &[&str] = &["portforward.k8s.io"];

/// How long the client has to open all of its SPDY streams (upstream's).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Transport {
    WebSocket(String),
    Spdy(String),
}

impl Transport {
    fn protocol(&self) -> &str {
        match self {
            Transport::WebSocket(p) | Transport::Spdy(p) => p,
        }
    }

    /// v4 and later carry a Status on the error channel; older ones plain text.
    fn status_errors(&self) -> bool {
        matches!(self.protocol(), "v4.channel.k8s.io" | "v5.channel.k8s.io")
    }
}

fn header_values(req: &Request<Incoming>, name: &str) -> Vec<String> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Picks the transport and protocol (the client's first choice we speak) and builds the
/// 101 answer; an error answer when the request is not an upgrade we can take.
fn negotiate(
    req: &Request<Incoming>,
    ws: &[&str],
    spdy: &[&str],
) -> Result<(Transport, Response<Body>), Response<Body>> {
    let upgrade = header_values(req, "upgrade");
    let bad = |msg: String| Err(status_resp(StatusCode::BAD_REQUEST, "BadRequest", &msg));
    if upgrade.iter().any(|u| u.eq_ignore_ascii_case("websocket")) {
        let Some(key) = req.headers().get("sec-websocket-key") else {
            return bad("missing Sec-WebSocket-Key".into());
        };
        let offered = header_values(req, "sec-websocket-protocol");
        let Some(p) = offered.iter().find(|o| ws.contains(&o.as_str())) else {
            return bad(format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server supports {ws:?}"
            ));
        };
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
            .header("sec-websocket-protocol", p.as_str())
            .body(full(Bytes::new()))
            .expect("valid response");
        return Ok((Transport::WebSocket(p.clone()), resp));
    }
    if upgrade.iter().any(|u| u.eq_ignore_ascii_case("SPDY/3.1")) {
        let offered = header_values(req, "x-stream-protocol-version");
        let Some(p) = offered.iter().find(|o| spdy.contains(&o.as_str())) else {
            return Err(status_resp(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!(
                    "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts {spdy:?}"
                ),
            ));
        };
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "Upgrade")
            .header("upgrade", "SPDY/3.1")
            .header("x-stream-protocol-version", p.as_str())
            .body(full(Bytes::new()))
            .expect("valid response");
        return Ok((Transport::Spdy(p.clone()), resp));
    }
    bad("Upgrade request required".into())
}

/// What the client asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct StreamOpts {
    command: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

impl StreamOpts {
    fn parse(query: &str) -> StreamOpts {
        let mut o = StreamOpts::default();
        let flag = |v: &str| matches!(v, "1" | "true" | "True" | "TRUE");
        for (k, v) in query_pairs(query) {
            match k.as_str() {
                "command" => o.command.push(v),
                "input" | "stdin" => o.stdin = flag(&v),
                "output" | "stdout" => o.stdout = flag(&v),
                "error" | "stderr" => o.stderr = flag(&v),
                "tty" => o.tty = flag(&v),
                _ => {}
            }
        }
        // With a terminal, stderr is merged into stdout.
        if o.tty {
            o.stderr = false;
        }
        o
    }
}

/// The client side of a session, whatever the transport.
struct Io {
    /// stdin from the client; closes at the client's end of input.
    stdin: Option<mpsc::Receiver<Bytes>>,
    /// Terminal size changes (width, height).
    resize: mpsc::Receiver<(u16, u16)>,
    /// (channel, bytes) to the client: 1 stdout, 2 stderr, 3 error. Dropping every sender
    /// ends the session cleanly.
    out: mpsc::Sender<(u8, Bytes)>,
    /// Flips to true when the client has gone away.
    gone: watch::Receiver<bool>,
}

type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

/// Turns an upgraded connection into an [`Io`] for exec/attach.
async fn channels(up: Upgraded, transport: Transport, opts: &StreamOpts) -> Option<Io> {
    match transport {
        Transport::WebSocket(p) => Some(ws_channels(up, &p, opts).await),
        Transport::Spdy(_) => spdy_channels(up, opts).await,
    }
}

async fn ws_channels(up: Upgraded, protocol: &str, opts: &StreamOpts) -> Io {
    let ws = WebSocketStream::from_raw_socket(up, Role::Server, None).await;
    let (mut sink, mut source) = ws.split();
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let (resize_tx, resize_rx) = mpsc::channel(4);
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Bytes)>(16);
    let (gone_tx, gone_rx) = watch::channel(false);
    let v5 = protocol == "v5.channel.k8s.io";
    let gone_tx = Arc::new(gone_tx);
    let g = gone_tx.clone();
    tokio::spawn(async move {
        let mut stdin_tx = Some(stdin_tx);
        while let Some(msg) = source.next().await {
            let data = match msg {
                Ok(Message::Binary(d)) => d,
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            };
            let Some((&ch, rest)) = data.split_first() else {
                continue;
            };
            match ch {
                0 => {
                    if let Some(tx) = &stdin_tx {
                        if !rest.is_empty() && tx.send(Bytes::copy_from_slice(rest)).await.is_err()
                        {
                            stdin_tx = None;
                        }
                    }
                }
                4 => {
                    if let Some(sz) = parse_resize(rest) {
                        let _ = resize_tx.try_send(sz);
                    }
                }
                // v5: the client closed one of its channels (stdin: end of input).
                255 if v5 && rest.first() == Some(&0) => stdin_tx = None,
                _ => {}
            }
        }
        let _ = g.send(true);
    });
    tokio::spawn(async move {
        while let Some((ch, data)) = out_rx.recv().await {
            let mut m = Vec::with_capacity(data.len() + 1);
            m.push(ch);
            m.extend_from_slice(&data);
            if sink.send(Message::Binary(m.into())).await.is_err() {
                let _ = gone_tx.send(true);
                return;
            }
        }
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        let _ = sink.close().await;
    });
    Io {
        stdin: opts.stdin.then_some(stdin_rx),
        resize: resize_rx,
        out: out_tx,
        gone: gone_rx,
    }
}

/// `{"Width":80,"Height":24}`.
fn parse_resize(b: &[u8]) -> Option<(u16, u16)> {
    let v: Value = serde_json::from_slice(b).ok()?;
    Some((
        v["Width"].as_u64()?.min(u16::MAX as u64) as u16,
        v["Height"].as_u64()?.min(u16::MAX as u64) as u16,
    ))
}

async fn spdy_channels(up: Upgraded, opts: &StreamOpts) -> Option<Io> {
    let (session, mut incoming) = spdy::serve(up);
    let mut want: Vec<&str> = vec!["error"];
    if opts.stdin {
        want.push("stdin");
    }
    if opts.stdout {
        want.push("stdout");
    }
    if opts.stderr {
        want.push("stderr");
    }
    if opts.tty {
        want.push("resize");
    }
    let mut got: Vec<(String, spdy::Stream)> = Vec::new();
    let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
    while !want.iter().all(|w| got.iter().any(|(t, _)| t == w)) {
        let s = match tokio::time::timeout_at(deadline, incoming.recv()).await {
            Ok(Some(s)) => s,
            _ => {
                tracing::debug!("SPDY exec/attach: the client did not open its streams");
                session.close().await;
                return None;
            }
        };
        let kind = s.header("streamtype").unwrap_or_default().to_string();
        if s.reply().await.is_err() {
            session.close().await;
            return None;
        }
        got.push((kind, s));
    }
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let (resize_tx, resize_rx) = mpsc::channel(4);
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Bytes)>(16);
    let (gone_tx, gone_rx) = watch::channel(false);
    let mut writers: Vec<(u8, spdy::StreamWriter)> = Vec::new();
    let mut stdin_tx = Some(stdin_tx);
    for (kind, s) in got {
        let (mut r, w) = s.split();
        match kind.as_str() {
            "error" => writers.push((3, w)),
            "stdout" => writers.push((1, w)),
            "stderr" => writers.push((2, w)),
            "stdin" => {
                let Some(tx) = stdin_tx.take() else { continue };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 || tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            break;
                        }
                    }
                });
            }
            "resize" => {
                let tx = resize_tx.clone();
                tokio::spawn(async move {
                    // A stream of JSON objects, one after another.
                    let mut pending = Vec::new();
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        pending.extend_from_slice(&buf[..n]);
                        let mut de =
                            serde_json::Deserializer::from_slice(&pending).into_iter::<Value>();
                        let mut used = 0;
                        while let Some(Ok(v)) = de.next() {
                            used = de.byte_offset();
                            if let (Some(w), Some(h)) = (v["Width"].as_u64(), v["Height"].as_u64())
                            {
                                let _ = tx.try_send((w as u16, h as u16));
                            }
                        }
                        pending.drain(..used);
                    }
                });
            }
            _ => {}
        }
    }
    drop(resize_tx);
    let s2 = session.clone();
    let gone_tx = Arc::new(gone_tx);
    let g = gone_tx.clone();
    tokio::spawn(async move {
        s2.closed().await;
        let _ = g.send(true);
    });
    tokio::spawn(async move {
        while let Some((ch, data)) = out_rx.recv().await {
            if let Some((_, w)) = writers.iter_mut().find(|(c, _)| *c == ch) {
                if w.write_all(&data).await.is_err() {
                    let _ = gone_tx.send(true);
                }
            }
        }
        for (_, w) in writers.iter_mut() {
            let _ = w.shutdown().await;
        }
        session.close().await;
    });
    Some(Io {
        stdin: if opts.stdin { Some(stdin_rx) } else { None },
        resize: resize_rx,
        out: out_tx,
        gone: gone_rx,
    })
}

/// The pod and its shim, or the error answer upstream's kubelet gives.
async fn pod_and_shim(
    agent: &Agent,
    ns: &str,
    name: &str,
) -> Result<(Arc<Pod>, ShimClient), Response<Body>> {
    let Some(pod) = find_pod(agent, ns, name) else {
        return Err(status_resp(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pod {ns}/{name} does not exist on this node"),
        ));
    };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    match ShimClient::connect(&agent.cfg.shims_dir().join(&uid)).await {
        Ok(s) => Ok((pod, s)),
        Err(_) => Err(status_resp(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pod {ns}/{name} has no running sandbox on this node"),
        )),
    }
}

/// A running container of the pod, else the answer kubectl shows after "unable to upgrade
/// connection:".
async fn running_container(
    shim: &ShimClient,
    pod: &Pod,
    container: &str,
) -> Result<(), Response<Body>> {
    let known = has_container(pod, container);
    let running = shim.list().await.ok().is_some_and(|l| {
        l.iter()
            .any(|c| c.name == container && c.state == k3rs_runtime::shim::ContainerState::Running)
    });
    if known && running {
        return Ok(());
    }
    Err(status_resp(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("container not found ({container:?})"),
    ))
}

pub async fn exec(
    agent: Arc<Agent>,
    ns: &str,
    pod: &str,
    container: &str,
    query: &str,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let opts = StreamOpts::parse(query);
    if opts.command.is_empty() {
        return status_resp(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "you must specify at least one command for the container",
        );
    }
    if !opts.stdin && !opts.stdout && !opts.stderr {
        return status_resp(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "you must specify at least 1 of stdin, stdout, stderr",
        );
    }
    let (p, shim) = match pod_and_shim(&agent, ns, pod).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(r) = running_container(&shim, &p, container).await {
        return r;
    }
    let (transport, resp) = match negotiate(&req, WS_CHANNEL, SPDY_CHANNEL) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let container = container.to_string();
    tokio::spawn(async move {
        let Ok(up) = on_upgrade.await else { return };
        let Some(io) = channels(TokioIo::new(up), transport.clone(), &opts).await else {
            return;
        };
        let Io {
            stdin,
            resize,
            out,
            gone,
        } = io;
        let status = match shim
            .exec_stream(&container, &opts.command, opts.tty, opts.stdin)
            .await
        {
            Ok(sess) => run_exec(sess, stdin, resize, out.clone(), gone)
                .await
                .map(|code| exit_status(code, &opts.command)),
            Err(e) => Some(internal_status(&format!(
                "error executing command in container: {e}"
            ))),
        };
        if let Some(st) = status {
            send_status(&out, &transport, st).await;
        }
        drop(out);
    });
    resp
}

fn exit_status(code: i32, command: &[String]) -> Value {
    if code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!(
            "command terminated with non-zero exit code: command '{}' exited with {code}",
            command.join(" ")
        ),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
}

fn internal_status(message: &str) -> Value {
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!("Internal error occurred: {message}"),
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    })
}

async fn send_status(out: &mpsc::Sender<(u8, Bytes)>, transport: &Transport, st: Value) {
    let payload = if transport.status_errors() {
        serde_json::to_vec(&st).unwrap_or_default()
    } else if st["status"] == "Success" {
        return;
    } else {
        st["message"]
            .as_str()
            .unwrap_or_default()
            .as_bytes()
            .to_vec()
    };
    let _ = out.send((3, Bytes::from(payload))).await;
}

/// Resolves when the client has gone away.
async fn client_gone(gone: &mut watch::Receiver<bool>) {
    let _ = gone.wait_for(|g| *g).await;
}

/// Copies output from `r` to the client's channel `ch` until end of file.
async fn pump_out(mut r: impl AsyncRead + Unpin, ch: u8, out: mpsc::Sender<(u8, Bytes)>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if out
                    .send((ch, Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Copies the client's stdin into `w` until the client ends its input; `w` is then closed.
async fn pump_in(mut rx: mpsc::Receiver<Bytes>, mut w: impl AsyncWrite + Unpin) {
    while let Some(b) = rx.recv().await {
        if w.write_all(&b).await.is_err() {
            return;
        }
    }
}

/// Runs an exec to its end; its exit code, or None when the client went away first.
async fn run_exec(
    mut sess: ExecSession,
    stdin: Option<mpsc::Receiver<Bytes>>,
    mut resize: mpsc::Receiver<(u16, u16)>,
    out: mpsc::Sender<(u8, Bytes)>,
    mut gone: watch::Receiver<bool>,
) -> Option<i32> {
    let mut outputs = tokio::task::JoinSet::new();
    let mut input = tokio::task::JoinSet::new();
    let mut tty: Option<FdIo> = None;
    if let Some(pty) = sess.pty.take() {
        if let (Some(rx), Ok(w)) = (stdin, pty.try_clone()) {
            input.spawn(pump_in(rx, w));
        }
        tty = pty.try_clone().ok();
        outputs.spawn(pump_out(pty, 1, out.clone()));
    } else {
        if let (Some(rx), Some(w)) = (stdin, sess.stdin.take()) {
            input.spawn(pump_in(rx, w));
        }
        // Nobody will write to it: the process sees end of input at once.
        drop(sess.stdin.take());
        if let Some(r) = sess.stdout.take() {
            outputs.spawn(pump_out(r, 1, out.clone()));
        }
        if let Some(r) = sess.stderr.take() {
            outputs.spawn(pump_out(r, 2, out.clone()));
        }
    }
    let mut resizing = true;
    let code = loop {
        tokio::select! {
            c = sess.wait() => break c.unwrap_or(255),
            r = resize.recv(), if resizing => match r {
                Some((w, h)) => {
                    if let Some(t) = &tty {
                        let _ = t.resize(w, h);
                    }
                }
                None => resizing = false,
            },
            _ = client_gone(&mut gone) => return None,
        }
    };
    drop(tty);
    input.abort_all();
    // Let the output drain; a background child may hold a pipe open, so bounded.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while outputs.join_next().await.is_some() {}
    })
    .await;
    outputs.abort_all();
    Some(code)
}

pub async fn attach(
    agent: Arc<Agent>,
    ns: &str,
    pod: &str,
    container: &str,
    query: &str,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let opts = StreamOpts::parse(query);
    let (p, shim) = match pod_and_shim(&agent, ns, pod).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(r) = running_container(&shim, &p, container).await {
        return r;
    }
    let stdin_once = p.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == container && c.stdin_once == Some(true))
            || s.ephemeral_containers
                .iter()
                .flatten()
                .any(|c| c.name == container && c.stdin_once == Some(true))
    });
    let sess = match shim.attach(container, opts.stdin).await {
        Ok(s) => s,
        Err(e) => {
            return status_resp(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("container not found ({container:?}): {e}"),
            )
        }
    };
    let (transport, resp) = match negotiate(&req, WS_CHANNEL, SPDY_CHANNEL) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let container = container.to_string();
    tokio::spawn(async move {
        let Ok(up) = on_upgrade.await else { return };
        let Some(io) = channels(TokioIo::new(up), transport.clone(), &opts).await else {
            return;
        };
        let close_after = stdin_once.then_some((shim, container));
        run_attach(sess, io, &opts, close_after).await;
    });
    resp
}

/// Relays a container's output (and the client's input) until the container exits or the
/// client goes away. With `stdinOnce` (`close_after`), the container's stdin is closed when
/// the client ends its input.
async fn run_attach(
    mut sess: AttachSession,
    io: Io,
    opts: &StreamOpts,
    close_after: Option<(ShimClient, String)>,
) {
    let Io {
        stdin,
        mut resize,
        out,
        mut gone,
    } = io;
    let mut tasks = tokio::task::JoinSet::new();
    let tty = if sess.tty {
        sess.stdin.as_ref().and_then(|s| s.try_clone().ok())
    } else {
        None
    };
    if let (Some(rx), Some(w)) = (stdin, sess.stdin.take()) {
        tasks.spawn(async move {
            pump_in(rx, w).await;
            if let Some((shim, name)) = close_after {
                let _ = shim.close_stdin(&name).await;
            }
        });
    }
    loop {
        tokio::select! {
            o = sess.next() => match o {
                Some((s, data)) => {
                    let ch = if sess.tty || s == 1 { 1 } else { 2 };
                    let wanted = if ch == 1 { opts.stdout } else { opts.stderr };
                    if wanted && out.send((ch, Bytes::from(data))).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            Some((w, h)) = resize.recv() => {
                if let Some(t) = &tty {
                    let _ = t.resize(w, h);
                }
            }
            _ = client_gone(&mut gone) => break,
        }
    }
    tasks.abort_all();
}

pub async fn port_forward(
    agent: Arc<Agent>,
    ns: &str,
    pod: &str,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let (p, shim) = match pod_and_shim(&agent, ns, pod).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let netns = match shim.sandbox().await {
        Ok(s) => s.netns,
        Err(e) => {
            return status_resp(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                &format!("the pod's sandbox is not available: {e}"),
            )
        }
    };
    let (transport, resp) = match negotiate(&req, WS_PORTFORWARD, SPDY_PORTFORWARD) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let uid = p.metadata.uid.clone().unwrap_or_default();
    let pod_name = format!("{ns}/{pod}");
    tokio::spawn(async move {
        let Ok(up) = on_upgrade.await else { return };
        let up = TokioIo::new(up);
        let (session, incoming) = match transport {
            Transport::WebSocket(_) => {
                let ws = WebSocketStream::from_raw_socket(up, Role::Server, None).await;
                spdy::serve(ws_bytes(ws))
            }
            Transport::Spdy(_) => spdy::serve(up),
        };
        forward_streams(agent, uid, pod_name, netns, session, incoming).await;
    });
    resp
}

/// A WebSocket whose binary messages carry a byte stream, as a byte stream: each write is one
/// binary message, reads come from the messages in order; a close (or an error) is the end.
struct WsIo {
    ws: WebSocketStream<Upgraded>,
    pending: Bytes,
    ended: bool,
}

fn ws_bytes(ws: WebSocketStream<Upgraded>) -> WsIo {
    WsIo {
        ws,
        pending: Bytes::new(),
        ended: false,
    }
}

fn ws_error(e: tokio_tungstenite::tungstenite::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, e)
}

impl AsyncRead for WsIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            match futures::ready!(this.ws.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(d))) => this.pending = d,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => this.ended = true,
                Some(Ok(_)) => {}
            }
        }
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let ws = &mut self.ws;
        futures::ready!(ws.poll_ready_unpin(cx)).map_err(ws_error)?;
        ws.start_send_unpin(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(ws_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.ws.poll_flush_unpin(cx).map_err(ws_error)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // A normal close frame, then the connection ends.
        self.ws.poll_close_unpin(cx).map_err(ws_error)
    }
}

/// Serves the port-forward streams of one session: each `data` stream is connected to its
/// port inside the pod's network namespace; failures go to its `error` stream.
async fn forward_streams(
    agent: Arc<Agent>,
    uid: String,
    pod_name: String,
    netns: Option<PathBuf>,
    session: spdy::Session,
    mut incoming: mpsc::Receiver<spdy::Stream>,
) {
    let mut errors: std::collections::HashMap<String, spdy::StreamWriter> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        let s = tokio::select! {
            s = incoming.recv() => match s { Some(s) => s, None => break },
            _ = tick.tick() => {
                // The pod went away: end the session (kubectl reports the lost connection).
                if !agent.cfg.shims_dir().join(&uid).exists() {
                    break;
                }
                continue;
            }
        };
        if s.reply().await.is_err() {
            break;
        }
        let kind = s.header("streamtype").unwrap_or_default().to_string();
        let request_id = s.header("requestid").unwrap_or_default().to_string();
        let port = s.header("port").unwrap_or_default().to_string();
        match kind.as_str() {
            "error" => {
                let (_, w) = s.split();
                errors.insert(request_id, w);
            }
            "data" => {
                tracing::debug!(stream = s.id(), %port, %request_id, pod = %pod_name, "port-forward connection");
                let err_w = errors.remove(&request_id);
                let netns = netns.clone();
                let pod_name = pod_name.clone();
                tokio::spawn(async move {
                    forward_one(s, err_w, netns, &port, &pod_name).await;
                });
            }
            _ => {
                let (_, w) = s.split();
                w.reset();
            }
        }
    }
    session.close().await;
}

async fn forward_one(
    s: spdy::Stream,
    err_w: Option<spdy::StreamWriter>,
    netns: Option<PathBuf>,
    port: &str,
    pod_name: &str,
) {
    let (mut r, mut w) = s.split();
    let report = |msg: String| async move {
        if let Some(mut e) = err_w {
            let _ = e.write_all(msg.as_bytes()).await;
            let _ = e.shutdown().await;
        }
    };
    let Ok(port) = port.parse::<u16>() else {
        report(format!("invalid port {port:?}")).await;
        let _ = w.shutdown().await;
        return;
    };
    let tcp = match connect_in_netns(netns.clone(), port).await {
        Ok(t) => t,
        Err(e) => {
            report(format!(
                "failed to connect to localhost:{port} inside the network namespace of pod {pod_name}: {e}"
            ))
            .await;
            let _ = w.shutdown().await;
            return;
        }
    };
    let (tr, mut tw) = tcp.into_split();
    // Large reads: fewer, fuller SPDY frames (tokio::io::copy reads 8 KiB at a time).
    let mut tr = tokio::io::BufReader::with_capacity(128 << 10, tr);
    let mut r = tokio::io::BufReader::with_capacity(128 << 10, &mut r);
    let up = async {
        let _ = tokio::io::copy_buf(&mut r, &mut tw).await;
        let _ = tw.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy_buf(&mut tr, &mut w).await;
        let _ = w.shutdown().await;
    };
    tokio::join!(up, down);
    report(String::new()).await;
}

/// Connects to `127.0.0.1:port` (then `[::1]:port`) inside a network namespace, from a
/// short-lived thread of its own (a thread's namespace cannot be given back safely).
async fn connect_in_netns(
    netns: Option<PathBuf>,
    port: u16,
) -> std::io::Result<tokio::net::TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("portforward-connect".into())
        .spawn(move || {
            let r = (|| -> std::io::Result<std::net::TcpStream> {
                if let Some(ns) = &netns {
                    let f = std::fs::File::open(ns)?;
                    // SAFETY: setns on this thread only, with a namespace file we opened.
                    if unsafe {
                        libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET)
                    } != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                let t = Duration::from_secs(5);
                let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                match std::net::TcpStream::connect_timeout(&v4, t) {
                    Ok(s) => Ok(s),
                    Err(e4) => {
                        let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
                        std::net::TcpStream::connect_timeout(&v6, t).map_err(|_| e4)
                    }
                }
            })();
            let _ = tx.send(r);
        })?;
    let s = rx
        .await
        .map_err(|_| std::io::Error::other("the connecting thread died"))??;
    s.set_nonblocking(true)?;
    let _ = s.set_nodelay(true);
    tokio::net::TcpStream::from_std(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_options_follow_kubectl_queries() {
        let o = StreamOpts::parse(
            "command=sh&command=-c&command=exit+3&stdin=true&stdout=true&stderr=true",
        );
        assert_eq!(o.command, vec!["sh", "-c", "exit 3"]);
        assert!(o.stdin && o.stdout && o.stderr && !o.tty);
        let t = StreamOpts::parse("command=sh&stdin=true&stdout=true&tty=true&stderr=true");
        assert!(t.tty && !t.stderr, "a terminal merges stderr");
        assert_eq!(StreamOpts::parse("").command, Vec::<String>::new());
    }

    #[test]
    fn exit_codes_become_upstream_statuses() {
        let ok = exit_status(0, &["true".into()]);
        assert_eq!(ok["status"], "Success");
        let st = exit_status(3, &["sh".into(), "-c".into(), "exit 3".into()]);
        assert_eq!(st["reason"], "NonZeroExitCode");
        assert_eq!(st["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(st["details"]["causes"][0]["message"], "3");
    }

    #[test]
    fn resize_messages_parse() {
        assert_eq!(
            parse_resize(br#"{"Width":120,"Height":40}"#),
            Some((120, 40))
        );
        assert_eq!(parse_resize(b"nonsense"), None);
    }
}
