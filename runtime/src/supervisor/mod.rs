//! The per-pod supervisor (`k3rs shim`): types, the protocol, and the async client the daemon
//! uses. The shim process itself is in `server.rs`; it is single-threaded because
//! libcontainer forks, and it outlives the daemon so that a restarted daemon adopts its pods.

mod logs;
mod server;
pub mod spec;
mod stream;

pub use logs::rotated_files;
pub use server::{bundle_dir, cgroup_v2};
pub use stream::{AttachSession, ExecSession, FdIo};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use server::shim_main;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("shim I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("shim protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Failed(String),
    #[error("the pod's shim did not come up: {0}")]
    Start(String),
}

/// The pod-level settings of a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SandboxConfig {
    pub pod_uid: String,
    pub hostname: String,
    pub host_network: bool,
    pub host_ipc: bool,
    pub host_pid: bool,
    pub share_pid: bool,
    /// The pod's cgroup, relative to the cgroup root (e.g. `/k3rs/kubepods/besteffort/pod<uid>`).
    pub cgroup_parent: String,
    /// Where containers' rootfs mounts and bundles live.
    pub state_dir: PathBuf,
    pub cpu_shares: Option<u64>,
    pub cpu_quota: Option<i64>,
    pub memory_limit: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mount {
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
}

/// One container to run: everything already resolved by the caller.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ContainerConfig {
    pub name: String,
    pub attempt: u32,
    /// Unpacked image layers, bottom-most first.
    pub layers: Vec<PathBuf>,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub image_user: String,
    pub supplemental_gids: Vec<u32>,
    pub mounts: Vec<Mount>,
    pub privileged: bool,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub no_new_privs: bool,
    pub read_only_rootfs: bool,
    pub seccomp_default: bool,
    pub cpu_shares: u64,
    pub cpu_quota: Option<i64>,
    pub cpu_period: u64,
    pub memory_limit: Option<i64>,
    pub stdin: bool,
    pub tty: bool,
    pub log_path: PathBuf,
    pub annotations: BTreeMap<String, String>,
    /// Join the PID namespace of this other container of the pod (an ephemeral container's
    /// `targetContainerName`) instead of the pod's.
    #[serde(default)]
    pub pid_ns_of: Option<String>,
    /// Log rotation: size of a file and files kept (`container-log-max-size`/`-files`;
    /// 0 = 10 MiB and 5).
    #[serde(default)]
    pub log_max_size: u64,
    #[serde(default)]
    pub log_max_files: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ContainerState {
    Created,
    Running,
    Exited,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerStatus {
    pub name: String,
    pub attempt: u32,
    pub id: String,
    pub state: ContainerState,
    pub pid: Option<i32>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub log_path: PathBuf,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxStatus {
    pub pod_uid: String,
    pub netns: Option<PathBuf>,
    pub shim_pid: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Sandbox,
    Run {
        config: Box<ContainerConfig>,
    },
    Kill {
        name: String,
        signal: i32,
    },
    Remove {
        name: String,
        attempt: u32,
    },
    List,
    Exec {
        name: String,
        argv: Vec<String>,
        timeout_ms: u64,
    },
    /// An interactive exec: the answer is a `StreamHeader` carrying the stdio descriptors,
    /// then, when the process ends, an `ExecExit` line.
    ExecStream {
        name: String,
        argv: Vec<String>,
        tty: bool,
        stdin: bool,
    },
    /// Attach to a running container: a `StreamHeader` (with a duplicate of its stdin if
    /// asked and it has one), then its output as frames until it exits.
    Attach {
        name: String,
        stdin: bool,
    },
    /// Close the container's stdin (`stdinOnce` after the first attach ends).
    CloseStdin {
        name: String,
    },
    Shutdown,
}

#[derive(Debug, Serialize, Deserialize)]
enum Response {
    Ok(serde_json::Value),
    Err(String),
}

/// Talks to one pod's shim over its unix socket (one request per connection).
#[derive(Debug, Clone)]
pub struct ShimClient {
    sock: PathBuf,
}

const SOCK: &str = "shim.sock";

impl ShimClient {
    /// Starts `<exe> shim --dir <dir>` detached (own session; it survives the daemon) and waits
    /// until it answers.
    pub async fn start(
        exe: &Path,
        dir: &Path,
        sandbox: &SandboxConfig,
    ) -> Result<ShimClient, ShimError> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("sandbox.json"),
            serde_json::to_vec(sandbox).map_err(|e| ShimError::Protocol(e.to_string()))?,
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("shim.log"))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("shim")
            .arg("--dir")
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe; it only detaches the child from our session.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let c = ShimClient {
            sock: dir.join(SOCK),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if c.sock.exists() && c.sandbox().await.is_ok() {
                // The shim forked itself into the background; reap the launcher.
                let _ = child.wait();
                return Ok(c);
            }
            if let Ok(Some(st)) = child.try_wait() {
                if !st.success() {
                    let log = std::fs::read_to_string(dir.join("shim.log")).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    return Err(ShimError::Start(format!(
                        "exited with {st}: {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    )));
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ShimError::Start("no answer within 20 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Connects to a running shim (adoption after a daemon restart).
    pub async fn connect(dir: &Path) -> Result<ShimClient, ShimError> {
        let c = ShimClient {
            sock: dir.join(SOCK),
        };
        c.sandbox().await?;
        Ok(c)
    }

    async fn call(&self, req: &Request, timeout: Duration) -> Result<serde_json::Value, ShimError> {
        let fut = async {
            let mut s = tokio::net::UnixStream::connect(&self.sock).await?;
            let mut line =
                serde_json::to_vec(req).map_err(|e| ShimError::Protocol(e.to_string()))?;
            line.push(b'\n');
            s.write_all(&line).await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            let resp: Response = serde_json::from_slice(&buf).map_err(|e| {
                ShimError::Protocol(format!("{e} in {:?}", String::from_utf8_lossy(&buf)))
            })?;
            match resp {
                Response::Ok(v) => Ok(v),
                Response::Err(e) => Err(ShimError::Failed(e)),
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ShimError::Protocol("the shim did not answer in time".into()))?
    }

    fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ShimError> {
        serde_json::from_value(v).map_err(|e| ShimError::Protocol(e.to_string()))
    }

    pub async fn sandbox(&self) -> Result<SandboxStatus, ShimError> {
        Self::parse(
            self.call(&Request::Sandbox, Duration::from_secs(10))
                .await?,
        )
    }

    /// Mounts the rootfs, writes the bundle, creates and starts the container.
    pub async fn run_container(&self, cfg: &ContainerConfig) -> Result<ContainerStatus, ShimError> {
        Self::parse(
            self.call(
                &Request::Run {
                    config: Box::new(cfg.clone()),
                },
                Duration::from_secs(60),
            )
            .await?,
        )
    }

    pub async fn kill(&self, name: &str, signal: i32) -> Result<(), ShimError> {
        self.call(
            &Request::Kill {
                name: name.into(),
                signal,
            },
            Duration::from_secs(10),
        )
        .await
        .map(drop)
    }

    /// Removes an exited container attempt (rootfs, cgroup and state; its log stays).
    pub async fn remove_container(&self, name: &str, attempt: u32) -> Result<(), ShimError> {
        self.call(
            &Request::Remove {
                name: name.into(),
                attempt,
            },
            Duration::from_secs(30),
        )
        .await
        .map(drop)
    }

    pub async fn list(&self) -> Result<Vec<ContainerStatus>, ShimError> {
        Self::parse(self.call(&Request::List, Duration::from_secs(10)).await?)
    }

    pub async fn exec(
        &self,
        name: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecResult, ShimError> {
        Self::parse(
            self.call(
                &Request::Exec {
                    name: name.into(),
                    argv: argv.to_vec(),
                    timeout_ms: timeout.as_millis() as u64,
                },
                timeout + Duration::from_secs(10),
            )
            .await?,
        )
    }

    /// Starts a command in a running container with its stdio handed to us (a TTY when
    /// `tty`: then `pty` is the terminal and there is no separate stderr).
    pub async fn exec_stream(
        &self,
        name: &str,
        argv: &[String],
        tty: bool,
        stdin: bool,
    ) -> Result<ExecSession, ShimError> {
        let req = serde_json::to_vec(&Request::ExecStream {
            name: name.into(),
            argv: argv.to_vec(),
            tty,
            stdin,
        })
        .map_err(|e| ShimError::Protocol(e.to_string()))?;
        let (_, fds, rest, conn) = stream::open(&self.sock, req).await?;
        ExecSession::new(fds, rest, conn)
    }

    /// Attaches to a running container's output (and its stdin when `stdin` and the
    /// container was created with one).
    pub async fn attach(&self, name: &str, stdin: bool) -> Result<AttachSession, ShimError> {
        let req = serde_json::to_vec(&Request::Attach {
            name: name.into(),
            stdin,
        })
        .map_err(|e| ShimError::Protocol(e.to_string()))?;
        let (hdr, fds, rest, conn) = stream::open(&self.sock, req).await?;
        AttachSession::new(hdr.tty, fds, rest, conn)
    }

    pub async fn close_stdin(&self, name: &str) -> Result<(), ShimError> {
        self.call(
            &Request::CloseStdin { name: name.into() },
            Duration::from_secs(10),
        )
        .await
        .map(drop)
    }

    /// Kills and removes every container, frees the sandbox and exits.
    pub async fn shutdown(&self) -> Result<(), ShimError> {
        self.call(&Request::Shutdown, Duration::from_secs(60))
            .await
            .map(drop)
    }
}

/// Pod directories under `<run>/pods` that have a shim socket: (pod uid, dir).
pub fn list_shims(run_pods_dir: &Path) -> Vec<(String, PathBuf)> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(run_pods_dir) {
        for e in rd.flatten() {
            if e.path().join(SOCK).exists() {
                v.push((e.file_name().to_string_lossy().to_string(), e.path()));
            }
        }
    }
    v
}

/// RFC 3339 with nanoseconds, UTC, from the system clock.
pub fn now_rfc3339_nanos() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_nanos())
}

/// Civil date from days since the epoch (Howard Hinnant's algorithm).
pub fn rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_nanos() {
        assert_eq!(rfc3339(0, 5), "1970-01-01T00:00:00.000000005Z");
        assert_eq!(
            rfc3339(1_700_000_000, 123_456_789),
            "2023-11-14T22:13:20.123456789Z"
        );
        assert_eq!(rfc3339(951_782_400, 0), "2000-02-29T00:00:00.000000000Z");
    }
}
