//! Streaming through the API server to the kubelet with the real kubectl: exec (WebSocket and
//! the SPDY fallback, with and without a terminal), attach, port-forward, cp, logs and the
//! kubelet API's own access control.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::node::{Node, NODE_IP};

const T: Duration = Duration::from_secs(60);

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn sleeper(n: &Node, name: &str, extra: &str) {
    n.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "{extra}sleep 3600"]
"#
    ));
    n.wait_phase(name, "Running", T);
}

#[test]
fn exec_returns_output_stderr_and_exit_codes_over_websocket_and_spdy() {
    // Through the API server's HTTPS client to :10250, as for any other node (the other tests
    // take the in-memory path to the embedded kubelet).
    let n = Node::start_with(&["--kubelet-over-network"]);
    sleeper(&n, "ex", "");
    for websockets in ["true", "false"] {
        let out = n
            .kubectl_cmd(&[
                "exec",
                "ex",
                "--",
                "sh",
                "-c",
                "echo to-stdout; echo to-stderr >&2; exit 3",
            ])
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        assert_eq!(
            out.status.code(),
            Some(3),
            "websockets={websockets}: {stderr}"
        );
        assert_eq!(stdout, "to-stdout\n", "websockets={websockets}");
        assert!(stderr.contains("to-stderr"), "{stderr}");
        assert!(
            stderr.contains("command terminated with exit code 3"),
            "{stderr}"
        );
        // Success, and stdin reaching the process until its end (what kubectl cp relies on).
        let mut child = n
            .kubectl_cmd(&["exec", "-i", "ex", "--", "sh", "-c", "wc -c; echo done"])
            .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&vec![b'x'; 300_000])
            .unwrap();
        let out = wait_output(child, T);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "websockets={websockets}: {stderr}");
        assert_eq!(
            stdout.split_whitespace().collect::<Vec<_>>(),
            ["300000", "done"]
        );
    }
    // A command that does not exist: the runtime's error, as upstream prints it.
    let out = n.kubectl(&["exec", "ex", "--", "no-such-command"]);
    assert!(!out.status.success());
    assert!(
        text(&out)
            .1
            .contains("error executing command in container")
            && text(&out).1.contains("no-such-command"),
        "{}",
        text(&out).1
    );
    // Many sessions leave no descriptors behind in the server.
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", n.pid().unwrap()))
            .unwrap()
            .count()
    };
    let before = fds();
    for _ in 0..20 {
        let out = n.kubectl(&["exec", "ex", "--", "true"]);
        assert!(out.status.success(), "{}", text(&out).1);
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = fds();
    assert!(
        after <= before + 3,
        "descriptors: {before} before, {after} after"
    );
    // A container that does not exist: kubectl's own check, then the server's.
    let out = n.kubectl(&["exec", "ex", "-c", "nope", "--", "true"]);
    assert!(!out.status.success());
    assert!(
        text(&out).1.contains("container nope not found in pod ex")
            || text(&out).1.contains("not valid for pod ex"),
        "{}",
        text(&out).1
    );
    // Deleting the pod ends a running exec session.
    let child = n
        .kubectl_cmd(&["exec", "ex", "--", "sleep", "600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    n.ok(&["delete", "pod", "ex", "--wait=false"]);
    let out = wait_output(child, T);
    assert!(!out.status.success(), "{:?}", text(&out));
}

/// Waits for a child with a bound (killing it when it overstays).
pub(crate) fn wait_output(mut child: Child, within: Duration) -> Output {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the command did not finish within {within:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pseudo-terminal driving a command as a user at a terminal would.
struct Pty {
    master: std::fs::File,
    output: Arc<Mutex<Vec<u8>>>,
    child: Child,
}

impl Pty {
    fn spawn(mut cmd: std::process::Command) -> Pty {
        let (mut master, mut slave) = (0, 0);
        let ws = libc::winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty fills in two new descriptors.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &ws,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors are new and ours.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let io = |f: &OwnedFd| Stdio::from(f.try_clone().unwrap());
        cmd.stdin(io(&slave)).stdout(io(&slave)).stderr(io(&slave));
        // SAFETY: setsid and ioctl are async-signal-safe; the terminal becomes the child's.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(slave);
        let master = std::fs::File::from(master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let (mut r, out) = (master.try_clone().unwrap(), output.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            master,
            output,
            child,
        }
    }

    fn type_line(&mut self, s: &str) {
        self.master.write_all(format!("{s}\r").as_bytes()).unwrap();
    }

    fn seen(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).to_string()
    }

    fn wait_for(&self, what: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.seen().contains(what) {
            assert!(
                Instant::now() < deadline,
                "{what:?} never appeared on the terminal; it shows:\n{}",
                self.seen()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn resize(&self, rows: u16, cols: u16) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ on our master with a valid struct.
        unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    }

    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("kubectl did not exit; the terminal shows:\n{}", self.seen());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn exec_with_a_terminal_runs_an_interactive_shell_and_follows_resizes() {
    let n = Node::start();
    sleeper(&n, "tty", "");
    for websockets in ["true", "false"] {
        let mut cmd = n.kubectl_cmd(&["exec", "-it", "tty", "--", "sh"]);
        cmd.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", websockets)
            .env("TERM", "dumb");
        let mut pty = Pty::spawn(cmd);
        pty.type_line("echo hel''lo-$((40+2))");
        pty.wait_for("hello-42", T);
        // The terminal is a real one in the container, sized like ours.
        pty.type_line("[ -t 0 ] && stty size");
        pty.wait_for("24 80", T);
        // It is the container's own terminal (its devpts), and the shell's controlling one.
        pty.type_line("echo tty=$(tty)");
        pty.wait_for("tty=/dev/pts/", T);
        pty.type_line("echo ctty=$(readlink /proc/self/fd/0) $(ls /dev/pts | grep -c .)");
        pty.wait_for("ctty=/dev/pts/", T);
        pty.resize(33, 111);
        std::thread::sleep(Duration::from_millis(500));
        pty.type_line("stty size");
        pty.wait_for("33 111", T);
        pty.type_line("exit 7");
        assert_eq!(
            pty.wait_exit(T),
            Some(7),
            "websockets={websockets}: {}",
            pty.seen()
        );
    }
}

#[test]
fn run_it_attaches_to_a_container_with_a_terminal() {
    let n = Node::start();
    let mut cmd = n.kubectl_cmd(&[
        "run",
        "-it",
        "shell",
        "--image=busybox",
        "--image-pull-policy=IfNotPresent",
        "--restart=Never",
        "--",
        "sh",
    ]);
    cmd.env("TERM", "dumb");
    let mut pty = Pty::spawn(cmd);
    // kubectl attaches once the pod runs; typing reaches the container's terminal.
    let deadline = Instant::now() + T;
    while !pty.seen().contains("hi-2") {
        assert!(
            Instant::now() < deadline,
            "no answer; the terminal shows:\n{}",
            pty.seen()
        );
        pty.type_line("echo hi-$((1+1))");
        std::thread::sleep(Duration::from_millis(700));
    }
    pty.type_line("exit 0");
    assert_eq!(pty.wait_exit(T), Some(0), "{}", pty.seen());
    n.wait_phase("shell", "Succeeded", T);
    // What the terminal showed is the container's log too.
    assert!(n.ok(&["logs", "shell"]).contains("hi-2"));
}

#[test]
fn attach_relays_stdin_and_output_and_stdin_once_ends_the_container() {
    let n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: att}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: busybox
    imagePullPolicy: IfNotPresent
    stdin: true
    stdinOnce: true
    command: ["sh", "-c", "echo ready; while read l; do echo got:$l; done; echo bye"]
"#,
    );
    n.wait_phase("att", "Running", T);
    let mut child = n
        .kubectl_cmd(&["attach", "-i", "att"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello\nworld\n").unwrap();
    // Closing our input ends the attach's stdin; with stdinOnce the container's too.
    drop(stdin);
    let out = wait_output(child, T);
    let (stdout, stderr) = text(&out);
    assert!(
        stdout.contains("got:hello\ngot:world\n"),
        "{stdout}\n{stderr}"
    );
    n.wait_phase("att", "Succeeded", T);
    let logs = n.ok(&["logs", "att"]);
    assert_eq!(logs, "ready\ngot:hello\ngot:world\nbye\n");
}

fn start_port_forward(n: &Node, args: &[&str], websockets: &str) -> Child {
    let mut child = n
        .kubectl_cmd(args)
        .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", websockets)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for "Forwarding from …" lines.
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let ports = args.len() - 2;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut seen = String::new();
        while let Ok(k) = out.read(&mut buf) {
            if k == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..k]));
            if seen.matches("Forwarding from").count() >= ports {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(T).is_err() {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "kubectl port-forward did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child
}

fn curl(n: &Node, url: &str) -> Output {
    n.cmd("curl")
        .args(["-sS", "--max-time", "20", url])
        .output()
        .unwrap()
}

#[test]
fn port_forward_reaches_two_ports_and_many_connections_over_both_transports() {
    let n = Node::start();
    sleeper(
        &n,
        "web",
        "mkdir -p /w1 /w2; echo one > /w1/index.html; echo two > /w2/index.html; httpd -p 8080 -h /w1; httpd -p 8081 -h /w2; ",
    );
    for (websockets, base) in [("true", 18080), ("false", 19080)] {
        let (a, b) = (base.to_string(), (base + 1).to_string());
        let mut pf = start_port_forward(
            &n,
            &[
                "port-forward",
                "pod/web",
                &format!("{a}:8080"),
                &format!("{b}:8081"),
            ],
            websockets,
        );
        for _ in 0..20 {
            let o = curl(&n, &format!("http://127.0.0.1:{a}/"));
            assert_eq!(
                text(&o).0,
                "one\n",
                "websockets={websockets}: {}",
                text(&o).1
            );
        }
        let o = curl(&n, &format!("http://127.0.0.1:{b}/"));
        assert_eq!(text(&o).0, "two\n", "{}", text(&o).1);
        // A port nobody listens on: the error reaches kubectl, the forward keeps working.
        let _ = pf.kill();
        let _ = pf.wait();
        let mut bad = start_port_forward(
            &n,
            &["port-forward", "pod/web", &format!("{a}:9999")],
            websockets,
        );
        let o = curl(&n, &format!("http://127.0.0.1:{a}/"));
        assert!(!o.status.success(), "{:?}", text(&o));
        let _ = bad.kill();
        let out = bad.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("an error occurred forwarding") && stderr.contains("9999"),
            "{stderr}"
        );
    }
}

fn tree(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    fn walk(base: &std::path::Path, d: &std::path::Path, v: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            if p.is_dir() {
                v.push((format!("{rel}/"), Vec::new()));
                walk(base, &p, v);
            } else {
                v.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    walk(dir, dir, &mut v);
    v.sort();
    v
}

#[test]
fn cp_copies_a_directory_into_a_pod_and_back_unchanged() {
    let n = Node::start();
    sleeper(&n, "cp", "");
    let src = n.dir.path().join("src");
    std::fs::create_dir_all(src.join("nested/deeper")).unwrap();
    std::fs::write(src.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(src.join("nested/b.txt"), "beta\n").unwrap();
    let mut blob = vec![0u8; 1 << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut blob)
        .unwrap();
    std::fs::write(src.join("nested/deeper/blob.bin"), &blob).unwrap();
    n.ok(&["cp", src.to_str().unwrap(), "cp:/tmp/in"]);
    let listing = n.ok(&[
        "exec",
        "cp",
        "--",
        "sh",
        "-c",
        "cd /tmp/in && find . | sort",
    ]);
    assert!(listing.contains("./nested/deeper/blob.bin"), "{listing}");
    let back = n.dir.path().join("back");
    n.ok(&["cp", "cp:/tmp/in", back.to_str().unwrap()]);
    assert_eq!(tree(&src), tree(&back));
}

#[test]
fn logs_follow_tail_since_timestamps_previous_and_containers() {
    let n = Node::start();
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: lg}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: ticker
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo first; sleep 0.2; echo oops >&2; sleep 0.2; i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.3; done"]
  - name: flaky
    image: busybox
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo run-$(cat /proc/uptime | cut -d' ' -f1); sleep 1; exit 1"]
"#,
    );
    n.wait_for("the flaky container to restart", T, || {
        n.pod_field(
            "lg",
            "{.status.containerStatuses[?(@.name==\"flaky\")].restartCount}",
        )
        .parse::<u32>()
        .unwrap_or(0)
            >= 1
    });
    let all = n.ok(&["logs", "lg", "-c", "ticker"]);
    assert!(all.starts_with("first\noops\ntick-1\n"), "{all}");
    let tail = n.ok(&["logs", "lg", "-c", "ticker", "--tail=2"]);
    assert_eq!(tail.lines().count(), 2, "{tail}");
    assert!(tail.lines().all(|l| l.starts_with("tick-")), "{tail}");
    let ts = n.ok(&["logs", "lg", "-c", "ticker", "--timestamps", "--tail=1"]);
    let (stamp, line) = ts.trim_end().split_once(' ').unwrap();
    assert!(line.starts_with("tick-"), "{ts}");
    assert!(
        stamp.len() >= 20 && stamp.contains('T') && stamp.ends_with('Z'),
        "{ts}"
    );
    let none = n.ok(&[
        "logs",
        "lg",
        "-c",
        "ticker",
        "--since-time=2999-01-01T00:00:00Z",
    ]);
    assert_eq!(none, "");
    let recent = n.ok(&["logs", "lg", "-c", "ticker", "--since=1s"]);
    assert!(!recent.contains("first"), "{recent}");
    let limited = n.ok(&["logs", "lg", "-c", "ticker", "--limit-bytes=7"]);
    assert_eq!(limited, "first\no");
    // The previous attempt of the restarted container.
    let prev = n.ok(&["logs", "lg", "-c", "flaky", "--previous"]);
    assert!(prev.starts_with("run-"), "{prev}");
    let both = n.ok(&["logs", "lg", "--all-containers", "--tail=1"]);
    assert!(both.contains("tick-"), "{both}");
    // Follow sees lines written after it started.
    let mut f = n
        .kubectl_cmd(&["logs", "-f", "lg", "-c", "ticker", "--tail=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = f.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = String::new();
        let mut buf = [0u8; 1024];
        while let Ok(k) = out.read(&mut buf) {
            if k == 0 {
                break;
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..k]));
            if seen.lines().count() >= 4 {
                let _ = tx.send(seen.clone());
                break;
            }
        }
    });
    let seen = rx.recv_timeout(T);
    let _ = f.kill();
    let _ = f.wait();
    let seen = seen.expect("kubectl logs -f showed new lines");
    let nums: Vec<u32> = seen
        .lines()
        .filter_map(|l| l.strip_prefix("tick-")?.parse().ok())
        .collect();
    assert!(
        nums.len() >= 4 && nums.windows(2).all(|w| w[1] == w[0] + 1),
        "{seen}"
    );
    // Following a container that exits ends when it does.
    let f = n
        .kubectl_cmd(&["logs", "-f", "lg", "-c", "flaky"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(f, T);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("run-"),
        "{out:?}"
    );
    // Upstream's errors.
    n.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: nopull}
spec:
  containers:
  - name: c
    image: k3rs.invalid/none:1
    imagePullPolicy: Never
"#,
    );
    n.wait_for("the image error", T, || {
        n.pod_field(
            "nopull",
            "{.status.containerStatuses[0].state.waiting.reason}",
        ) == "ErrImageNeverPull"
    });
    let out = n.kubectl(&["logs", "nopull"]);
    assert!(
        text(&out)
            .1
            .contains("container \"c\" in pod \"nopull\" is waiting to start: ErrImageNeverPull"),
        "{}",
        text(&out).1
    );
    let out = n.kubectl(&["logs", "lg", "-c", "ticker", "--previous"]);
    assert!(
        text(&out)
            .1
            .contains("previous terminated container \"ticker\" in pod \"lg\" not found"),
        "{}",
        text(&out).1
    );
}

fn pem_from_kubeconfig(path: &std::path::Path, key: &str) -> Vec<u8> {
    use base64::Engine;
    let cfg = std::fs::read_to_string(path).unwrap();
    let line = cfg
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("{key} in {}", path.display()));
    let b64 = line.split_once(':').unwrap().1.trim();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

#[test]
fn the_kubelet_api_serves_only_the_api_server_and_admins() {
    let n = Node::start();
    sleeper(&n, "k", "");
    let certs = n.dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let agent = n.data_dir().join("agent");
    for (who, kubeconfig) in [
        ("admin", n.kubeconfig()),
        ("node", agent.join("kubelet.kubeconfig")),
    ] {
        std::fs::write(
            certs.join(format!("{who}.crt")),
            pem_from_kubeconfig(&kubeconfig, "client-certificate-data"),
        )
        .unwrap();
        std::fs::write(
            certs.join(format!("{who}.key")),
            pem_from_kubeconfig(&kubeconfig, "client-key-data"),
        )
        .unwrap();
    }
    let ca = agent.join("client-ca.crt");
    let get = |who: Option<&str>, path: &str| -> (String, String) {
        let mut c = n.cmd("curl");
        c.args([
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(&ca);
        if let Some(w) = who {
            c.arg("--cert")
                .arg(certs.join(format!("{w}.crt")))
                .arg("--key")
                .arg(certs.join(format!("{w}.key")));
        }
        let o = c
            .arg(format!("https://{NODE_IP}:10250{path}"))
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&o.stdout).to_string();
        let (body, code) = s.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_string(), body.to_string())
    };
    assert_eq!(get(None, "/pods").0, "401");
    let (code, body) = get(Some("node"), "/pods");
    assert_eq!(code, "403", "{body}");
    assert!(
        body.contains(
            "Forbidden (user=system:node:node1, verb=get, resource=nodes, subresource=proxy)"
        ),
        "{body}"
    );
    let (code, body) = get(Some("admin"), "/pods");
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("\"name\":\"k\""), "{body}");
    assert_eq!(get(Some("admin"), "/healthz"), ("200".into(), "ok".into()));
    // The same through the API server's nodes/proxy.
    assert_eq!(
        n.ok(&["get", "--raw", "/api/v1/nodes/node1/proxy/healthz"]),
        "ok"
    );
    let pods = n.ok(&["get", "--raw", "/api/v1/nodes/node1/proxy/pods"]);
    assert!(pods.contains("\"name\":\"k\""), "{pods}");
}
