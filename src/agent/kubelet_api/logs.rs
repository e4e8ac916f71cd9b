//! `containerLogs`: a container's log as upstream's kubelet serves it, read from the CRI-format
//! files the shim writes (`<RFC3339Nano> <stream> <P|F> <text>`, rotated as
//! `<attempt>.log.<timestamp>`).
//!
//! Which attempt is read follows upstream: the running or last terminated container, or with
//! `previous` the one before it (`lastState.terminated`), with upstream's messages when there
//! is none. Options: `follow` (until the container exits, the client goes away or the pod is
//! deleted; rotation is followed), `previous`, `sinceSeconds`/`sinceTime`, `timestamps`,
//! `tailLines` (read backwards from the end, so a tail of a large log costs only the tail) and
//! `limitBytes`. Lines split by the runtime (`P`) are joined back.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use k3rs_runtime::shim::{ContainerState, ShimClient};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use tokio::sync::mpsc;

use super::{channel_body, find_pod, has_container, query_pairs, status_resp};
use crate::agent::Agent;
use crate::httputil::Body;

/// How many bytes go to the client at once.
const CHUNK: usize = 64 << 10;
/// How often a follower looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(50);

/// The query of a `containerLogs` request (upstream's PodLogOptions).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    /// Only lines written at or after this instant.
    pub since: Option<jiff::Timestamp>,
    pub timestamps: bool,
    pub tail: Option<u64>,
    pub limit: Option<u64>,
}

impl LogOptions {
    /// Parses the query; a bad value gives upstream's field error.
    pub fn parse(query: &str, now: jiff::Timestamp) -> Result<LogOptions, String> {
        let mut o = LogOptions::default();
        let flag = |v: &str| v.is_empty() || v == "true" || v == "1";
        let mut since_seconds = None;
        let mut since_time = None;
        for (k, v) in query_pairs(query) {
            match k.as_str() {
                "follow" => o.follow = flag(&v),
                "previous" => o.previous = flag(&v),
                "timestamps" => o.timestamps = flag(&v),
                "sinceSeconds" => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| format!("sinceSeconds: Invalid value: {v:?}: not a number"))?;
                    if n < 1 {
                        return Err(format!(
                            "sinceSeconds: Invalid value: {n}: must be greater than 0"
                        ));
                    }
                    since_seconds = Some(n);
                }
                "sinceTime" => {
                    let t: jiff::Timestamp = v.parse().map_err(|_| {
                        format!("sinceTime: Invalid value: {v:?}: not an RFC 3339 time")
                    })?;
                    since_time = Some(t);
                }
                "tailLines" => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| format!("tailLines: Invalid value: {v:?}: not a number"))?;
                    if n < 0 {
                        return Err(format!(
                            "tailLines: Invalid value: {n}: must be greater than or equal to 0"
                        ));
                    }
                    o.tail = Some(n as u64);
                }
                "limitBytes" => {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| format!("limitBytes: Invalid value: {v:?}: not a number"))?;
                    if n < 1 {
                        return Err(format!(
                            "limitBytes: Invalid value: {n}: must be greater than 0"
                        ));
                    }
                    o.limit = Some(n as u64);
                }
                _ => {}
            }
        }
        if since_seconds.is_some() && since_time.is_some() {
            return Err("sinceTime: Forbidden: at most one of `sinceTime` or `sinceSeconds` may be specified".into());
        }
        o.since = since_time.or_else(|| {
            since_seconds.and_then(|s| now.checked_sub(jiff::SignedDuration::from_secs(s)).ok())
        });
        Ok(o)
    }
}

/// Which container's log to read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pick {
    /// The runtime's container with this id.
    Id(String),
    /// The newest attempt the runtime has (the status does not say yet).
    Latest,
}

fn status_of<'a>(pod: &'a Pod, container: &str) -> Option<&'a ContainerStatus> {
    let st = pod.status.as_ref()?;
    st.container_statuses
        .iter()
        .flatten()
        .chain(st.init_container_statuses.iter().flatten())
        .chain(st.ephemeral_container_statuses.iter().flatten())
        .find(|c| c.name == container)
}

/// Upstream's choice of container (kubelet's validateContainerLogStatus), with its messages.
fn pick(pod: &Pod, container: &str, previous: bool) -> Result<Pick, String> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    if !has_container(pod, container) {
        return Err(format!(
            "container {container:?} in pod {name:?} is not available"
        ));
    }
    let Some(cs) = status_of(pod, container) else {
        if previous {
            return Err(format!(
                "previous terminated container {container:?} in pod {name:?} not found"
            ));
        }
        return Ok(Pick::Latest);
    };
    let id = |s: &Option<String>| {
        s.as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| s.split_once("://").map(|(_, i)| i).unwrap_or(s).to_string())
    };
    let last = cs
        .last_state
        .as_ref()
        .and_then(|l| l.terminated.as_ref())
        .and_then(|t| id(&t.container_id));
    if previous {
        return last.map(Pick::Id).ok_or_else(|| {
            format!("previous terminated container {container:?} in pod {name:?} not found")
        });
    }
    let state = cs.state.as_ref();
    if state.is_some_and(|s| s.running.is_some()) {
        return Ok(id(&cs.container_id).map(Pick::Id).unwrap_or(Pick::Latest));
    }
    if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
        return id(&t.container_id)
            .or(last)
            .map(Pick::Id)
            .ok_or_else(|| format!("container {container:?} in pod {name:?} is terminated"));
    }
    if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
        if let Some(l) = last {
            return Ok(Pick::Id(l));
        }
        let reason = w.reason.as_deref().unwrap_or("ContainerCreating");
        let why = match reason {
            "ErrImagePull" | "ImagePullBackOff" => "image can't be pulled",
            r => r,
        };
        return Err(format!(
            "container {container:?} in pod {name:?} is waiting to start: {why}"
        ));
    }
    Ok(Pick::Latest)
}

fn bad(msg: &str) -> Response<Body> {
    status_resp(StatusCode::BAD_REQUEST, "BadRequest", msg)
}

/// Serves `GET /containerLogs/{ns}/{pod}/{container}`.
pub async fn serve(
    agent: Arc<Agent>,
    ns: &str,
    pod: &str,
    container: &str,
    query: &str,
) -> Response<Body> {
    let opts = match LogOptions::parse(query, jiff::Timestamp::now()) {
        Ok(o) => o,
        Err(e) => return bad(&e),
    };
    let Some(p) = find_pod(&agent, ns, pod) else {
        return status_resp(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pod {ns}/{pod} does not exist on this node"),
        );
    };
    let choice = match pick(&p, container, opts.previous) {
        Ok(c) => c,
        Err(e) => return bad(&e),
    };
    let uid = p.metadata.uid.clone().unwrap_or_default();
    let shim_dir = agent.cfg.shims_dir().join(&uid);
    let shim = ShimClient::connect(&shim_dir).await.ok();
    let listed = match &shim {
        Some(s) => s.list().await.unwrap_or_default(),
        None => Vec::new(),
    };
    let mut attempts: Vec<_> = listed.iter().filter(|c| c.name == container).collect();
    attempts.sort_by_key(|c| c.attempt);
    let found = match &choice {
        Pick::Id(id) => attempts
            .iter()
            .find(|c| &c.id == id)
            .or(attempts.last().filter(|_| !opts.previous)),
        Pick::Latest => attempts.last(),
    };
    let (path, id) = match found {
        Some(c) => (c.log_path.clone(), Some(c.id.clone())),
        None => {
            // The sandbox is gone (a finished pod): the files are still on disk.
            let dir = agent.cfg.pod_logs(ns, pod, &uid).join(container);
            match attempt_file(&dir, opts.previous) {
                Some(f) => (f, None),
                None if opts.previous => {
                    return bad(&format!(
                        "previous terminated container {container:?} in pod {pod:?} not found"
                    ))
                }
                None => {
                    return bad(&format!(
                    "container {container:?} in pod {pod:?} is waiting to start: ContainerCreating"
                ))
                }
            }
        }
    };
    // Followers stop when this container stops running or the pod goes away.
    let running = Arc::new(AtomicBool::new(
        found.is_some_and(|c| c.state != ContainerState::Exited),
    ));
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(8);
    if let (true, true, Some(shim)) = (opts.follow, running.load(Ordering::Relaxed), shim) {
        let running = running.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                // A shim that no longer answers is a pod that is gone.
                let alive = shim.list().await.ok().is_some_and(|l| {
                    l.iter()
                        .any(|c| Some(&c.id) == id.as_ref() && c.state != ContainerState::Exited)
                });
                if !alive {
                    running.store(false, Ordering::Relaxed);
                    return;
                }
            }
        });
    }
    tokio::task::spawn_blocking(move || {
        let mut out = Sink::new(tx, &opts);
        if let Err(e) = copy_log(&path, &opts, &running, &mut out) {
            tracing::debug!(path = %path.display(), error = %e, "reading a container log");
        }
        out.flush();
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain")
        .body(channel_body(rx))
        .expect("valid response")
}

/// The newest `<n>.log` (or the one before it for `previous`) in a container's log directory.
fn attempt_file(dir: &Path, previous: bool) -> Option<PathBuf> {
    let mut n: Vec<u32> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".log")?
                .parse::<u32>()
                .ok()
        })
        .collect();
    n.sort_unstable();
    let pick = if previous {
        n.len().checked_sub(2).map(|i| n[i])
    } else {
        n.last().copied()
    };
    pick.map(|a| dir.join(format!("{a}.log")))
}

/// The files of one attempt, oldest first: rotated ones, then the live one.
fn log_files(path: &Path) -> Vec<PathBuf> {
    let mut files = k3rs_runtime::shim::rotated_files(path);
    files.push(path.to_path_buf());
    files
}

/// Where the last `n` lines start: (index into `files`, byte offset), scanning backwards.
fn tail_start(files: &[PathBuf], n: u64) -> std::io::Result<(usize, u64)> {
    // The newline ending the last line counts as the first one seen.
    let mut seen = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for (i, f) in files.iter().enumerate().rev() {
        let Ok(mut file) = File::open(f) else {
            continue;
        };
        let mut pos = file.metadata()?.len();
        while pos > 0 {
            let k = (pos as usize).min(buf.len());
            pos -= k as u64;
            file.seek(SeekFrom::Start(pos))?;
            file.read_exact(&mut buf[..k])?;
            for j in (0..k).rev() {
                if buf[j] == b'\n' {
                    seen += 1;
                    if seen == n + 1 {
                        return Ok((i, pos + j as u64 + 1));
                    }
                }
            }
        }
    }
    Ok((0, 0))
}

/// One CRI log line: (timestamp, partial, text).
fn parse_line(line: &[u8]) -> Option<(&str, bool, &[u8])> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let sp = line.iter().position(|b| *b == b' ')?;
    let ts = std::str::from_utf8(&line[..sp]).ok()?;
    let rest = &line[sp + 1..];
    let sp2 = rest.iter().position(|b| *b == b' ')?;
    let rest = &rest[sp2 + 1..];
    let (tag, text) = match rest.iter().position(|b| *b == b' ') {
        Some(p) => (&rest[..p], &rest[p + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    Some((ts, tag == b"P", text))
}

/// Batches output for the client and enforces `limitBytes`; reports a gone client.
struct Sink {
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
    left: Option<u64>,
    gone: bool,
}

impl Sink {
    fn new(tx: mpsc::Sender<std::io::Result<Bytes>>, opts: &LogOptions) -> Sink {
        Sink {
            tx,
            buf: Vec::with_capacity(CHUNK),
            left: opts.limit,
            gone: false,
        }
    }

    /// False once nothing more is wanted (the limit is reached or the client left).
    fn write(&mut self, mut b: &[u8]) -> bool {
        if let Some(left) = self.left.as_mut() {
            if (b.len() as u64) > *left {
                b = &b[..*left as usize];
            }
            *left -= b.len() as u64;
        }
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CHUNK {
            self.flush();
        }
        !self.gone && self.left != Some(0)
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() && !self.gone {
            let b = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
            self.gone = self.tx.blocking_send(Ok(b)).is_err();
        }
    }

    fn done(&self) -> bool {
        self.gone || self.left == Some(0) || self.tx.is_closed()
    }
}

/// Formats CRI lines for the client.
struct Formatter<'a> {
    opts: &'a LogOptions,
    /// A split line is being continued.
    in_partial: bool,
}

impl Formatter<'_> {
    /// False once the sink wants no more.
    fn line(&mut self, raw: &[u8], out: &mut Sink) -> bool {
        let Some((ts, partial, text)) = parse_line(raw) else {
            return true;
        };
        if let Some(since) = self.opts.since {
            if !self.in_partial && ts.parse::<jiff::Timestamp>().is_ok_and(|t| t < since) {
                return true;
            }
        }
        let mut ok = true;
        if self.opts.timestamps && !self.in_partial {
            ok = out.write(ts.as_bytes()) && out.write(b" ");
        }
        ok = ok && out.write(text);
        if !partial {
            ok = ok && out.write(b"\n");
        }
        self.in_partial = partial;
        ok
    }
}

/// Copies the log at `path` (with its rotated files) to `out`, following it while asked to
/// and the container runs.
fn copy_log(
    path: &Path,
    opts: &LogOptions,
    running: &AtomicBool,
    out: &mut Sink,
) -> std::io::Result<()> {
    let files = log_files(path);
    let (first, offset) = match opts.tail {
        Some(n) => tail_start(&files, n)?,
        None => (0, 0),
    };
    let mut fmt = Formatter {
        opts,
        in_partial: false,
    };
    let mut line = Vec::with_capacity(1024);
    let last = files.len() - 1;
    for (i, f) in files.iter().enumerate().skip(first) {
        let Ok(mut file) = File::open(f) else {
            continue;
        };
        if i == first {
            file.seek(SeekFrom::Start(offset))?;
        }
        let mut r = BufReader::with_capacity(CHUNK, file);
        loop {
            line.clear();
            if r.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if !line.ends_with(b"\n") && i == last && opts.follow {
                // Half a line: the rest is being written; the follower picks it up.
                r.seek_relative(-(line.len() as i64))?;
                break;
            }
            if !fmt.line(&line, out) {
                return Ok(());
            }
        }
        if i == last && opts.follow {
            return follow(path, r, &mut fmt, running, out);
        }
    }
    Ok(())
}

/// Waits for new lines at the end of the live file, across rotations, until the container
/// stops (and what it wrote is out), the client leaves or the limit is reached.
fn follow(
    path: &Path,
    mut r: BufReader<File>,
    fmt: &mut Formatter<'_>,
    running: &AtomicBool,
    out: &mut Sink,
) -> std::io::Result<()> {
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let mut progressed = false;
        loop {
            let n = r.read_until(b'\n', &mut pending)?;
            if n == 0 {
                break;
            }
            progressed = true;
            if pending.ends_with(b"\n") {
                if !fmt.line(&pending, out) {
                    return Ok(());
                }
                pending.clear();
            }
        }
        if progressed {
            out.flush();
        }
        // Rotated: what is open was renamed away; read it out, then switch to the new file.
        let ino = r.get_ref().metadata()?.ino();
        if let Ok(m) = std::fs::metadata(path) {
            if m.ino() != ino {
                if let Ok(f) = File::open(path) {
                    // The old file's last bytes, then the new file from its start.
                    let mut rest = Vec::new();
                    r.read_to_end(&mut rest)?;
                    pending.extend_from_slice(&rest);
                    for l in pending.split_inclusive(|b| *b == b'\n') {
                        if !fmt.line(l, out) {
                            return Ok(());
                        }
                    }
                    pending.clear();
                    r = BufReader::with_capacity(CHUNK, f);
                    continue;
                }
            }
        }
        if out.done() {
            return Ok(());
        }
        if !running.load(Ordering::Relaxed) {
            // One last look: the shim flushes the final lines as the container exits.
            let mut rest = Vec::new();
            r.read_to_end(&mut rest)?;
            pending.extend_from_slice(&rest);
            for l in pending.split_inclusive(|b| *b == b'\n') {
                if !fmt.line(l, out) {
                    break;
                }
            }
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> jiff::Timestamp {
        "2026-01-01T00:00:10Z".parse().unwrap()
    }

    #[test]
    fn options_follow_upstream_pod_log_options() {
        let o = LogOptions::parse(
            "follow=true&previous=true&timestamps=true&tailLines=5&limitBytes=7&sinceSeconds=4",
            now(),
        )
        .unwrap();
        assert!(o.follow && o.previous && o.timestamps);
        assert_eq!(o.tail, Some(5));
        assert_eq!(o.limit, Some(7));
        assert_eq!(o.since, Some("2026-01-01T00:00:06Z".parse().unwrap()));
        let t = LogOptions::parse("sinceTime=2026-01-01T00:00:01Z", now()).unwrap();
        assert_eq!(t.since, Some("2026-01-01T00:00:01Z".parse().unwrap()));
        assert!(LogOptions::parse("tailLines=-1", now())
            .unwrap_err()
            .contains("tailLines"));
        assert!(LogOptions::parse("limitBytes=0", now())
            .unwrap_err()
            .contains("limitBytes"));
        assert!(
            LogOptions::parse("sinceSeconds=1&sinceTime=2026-01-01T00:00:01Z", now())
                .unwrap_err()
                .contains("at most one")
        );
        assert_eq!(LogOptions::parse("", now()).unwrap(), LogOptions::default());
    }

    fn pod(statuses: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"containerStatuses": statuses},
        }))
        .unwrap()
    }

    #[test]
    fn the_container_read_is_upstreams_choice() {
        let running = pod(
            json!([{"name": "c", "image": "i", "imageID": "", "ready": true,
            "restartCount": 1, "containerID": "k3rs://b",
            "state": {"running": {}},
            "lastState": {"terminated": {"exitCode": 1, "containerID": "k3rs://a"}}}]),
        );
        assert_eq!(pick(&running, "c", false), Ok(Pick::Id("b".into())));
        assert_eq!(pick(&running, "c", true), Ok(Pick::Id("a".into())));
        let fresh = pod(
            json!([{"name": "c", "image": "i", "imageID": "", "ready": true,
            "restartCount": 0, "containerID": "k3rs://a", "state": {"running": {}}}]),
        );
        assert_eq!(
            pick(&fresh, "c", true),
            Err("previous terminated container \"c\" in pod \"p\" not found".into())
        );
        let pulling = pod(
            json!([{"name": "c", "image": "i", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff"}}}]),
        );
        assert_eq!(
            pick(&pulling, "c", false),
            Err("container \"c\" in pod \"p\" is waiting to start: image can't be pulled".into())
        );
        let creating = pod(
            json!([{"name": "c", "image": "i", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]),
        );
        assert_eq!(
            pick(&creating, "c", false),
            Err("container \"c\" in pod \"p\" is waiting to start: ContainerCreating".into())
        );
        // Waiting to restart: the attempt that just ended.
        let backoff = pod(
            json!([{"name": "c", "image": "i", "imageID": "", "ready": false,
            "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "containerID": "k3rs://a"}}}]),
        );
        assert_eq!(pick(&backoff, "c", false), Ok(Pick::Id("a".into())));
        assert_eq!(
            pick(&pod(json!([])), "c", false),
            Ok(Pick::Latest),
            "no status yet: the newest attempt"
        );
        assert_eq!(
            pick(&running, "x", false),
            Err("container \"x\" in pod \"p\" is not available".into())
        );
    }

    fn read(path: &Path, opts: &LogOptions) -> String {
        let (tx, mut rx) = mpsc::channel(1024);
        let mut sink = Sink::new(tx, opts);
        copy_log(path, opts, &AtomicBool::new(false), &mut sink).unwrap();
        sink.flush();
        drop(sink);
        let mut s = Vec::new();
        while let Ok(Ok(b)) = rx.try_recv() {
            s.extend_from_slice(&b);
        }
        String::from_utf8(s).unwrap()
    }

    #[test]
    fn lines_are_formatted_tailed_limited_and_joined_across_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("0.log");
        std::fs::write(
            dir.path().join("0.log.20260101T000001"),
            "2026-01-01T00:00:01.000000001Z stdout F one\n\
             2026-01-01T00:00:02Z stderr P tw\n",
        )
        .unwrap();
        std::fs::write(
            &live,
            "2026-01-01T00:00:02Z stderr F o\n\
             2026-01-01T00:00:03Z stdout F three\n\
             2026-01-01T00:00:04Z stdout F \n",
        )
        .unwrap();
        let o = LogOptions::default();
        assert_eq!(read(&live, &o), "one\ntwo\nthree\n\n");
        let tail = |n| LogOptions {
            tail: Some(n),
            ..Default::default()
        };
        assert_eq!(read(&live, &tail(2)), "three\n\n");
        assert_eq!(read(&live, &tail(0)), "");
        assert_eq!(read(&live, &tail(100)), "one\ntwo\nthree\n\n");
        let ts = LogOptions {
            timestamps: true,
            tail: Some(4),
            ..Default::default()
        };
        assert_eq!(
            read(&live, &ts),
            "2026-01-01T00:00:02Z two\n2026-01-01T00:00:03Z three\n2026-01-01T00:00:04Z \n"
        );
        let since = LogOptions {
            since: Some("2026-01-01T00:00:03Z".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(read(&live, &since), "three\n\n");
        let limit = LogOptions {
            limit: Some(6),
            ..Default::default()
        };
        assert_eq!(read(&live, &limit), "one\ntw");
    }

    #[test]
    fn the_newest_attempt_file_is_found_without_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(attempt_file(dir.path(), false), None);
        for n in [0, 1, 10] {
            std::fs::write(dir.path().join(format!("{n}.log")), "").unwrap();
        }
        std::fs::write(dir.path().join("10.log.20260101"), "").unwrap();
        assert_eq!(
            attempt_file(dir.path(), false),
            Some(dir.path().join("10.log"))
        );
        assert_eq!(
            attempt_file(dir.path(), true),
            Some(dir.path().join("1.log"))
        );
    }
}
