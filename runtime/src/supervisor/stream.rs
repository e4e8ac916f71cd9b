//! Streaming exec and attach between the daemon and a pod's shim.
//!
//! The shim hands the daemon the file descriptors themselves (SCM_RIGHTS on the request's unix
//! connection): the ends of an exec's stdin/stdout/stderr pipes or its pseudo-terminal master,
//! and for attach a duplicate of the container's stdin (pipe or pty master). The daemon then
//! copies bytes between those descriptors and the client's stream with no hop through the shim.
//! An attached client also gets the container's live output, which the shim forwards as
//! frames (`[stream: u8][len: u32 BE][bytes]`, stream 1 stdout, 2 stderr) on the same
//! connection until the container exits.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::ShimError;

/// The first message of a streaming answer; the descriptors named in `fds` ride along.
#[derive(Debug, Serialize, Deserialize, Default)]
pub(crate) struct StreamHeader {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub tty: bool,
    /// Names of the passed descriptors, in order: `stdin`, `stdout`, `stderr`, `pty`.
    #[serde(default)]
    pub fds: Vec<String>,
}

/// The last message of an exec: the process's exit code.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ExecExit {
    pub exit_code: i32,
}

/// Sends `line` (plus a newline) with `fds` attached.
pub(crate) fn send_with_fds(sock: RawFd, line: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut msg = line.to_vec();
    msg.push(b'\n');
    let iov = [IoSlice::new(&msg)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let mut sent = sendmsg::<()>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(std::io::Error::from)?;
    // The rest (rare: a full socket buffer) goes without descriptors.
    while sent < msg.len() {
        let iov = [IoSlice::new(&msg[sent..])];
        sent += sendmsg::<()>(sock, &iov, &[], MsgFlags::MSG_NOSIGNAL, None)
            .map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Reads one header line and the descriptors sent with it from a blocking socket; returns
/// the line and any bytes that followed it.
fn recv_header(sock: RawFd) -> std::io::Result<(Vec<u8>, Vec<u8>, Vec<OwnedFd>)> {
    let mut data = Vec::new();
    let mut fds = Vec::new();
    for _ in 0..1024 {
        let mut buf = [0u8; 4096];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let (n, got) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
                .map_err(std::io::Error::from)?;
            let mut got = Vec::new();
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(r) = c {
                    got.extend(r);
                }
            }
            (msg.bytes, got)
        };
        // SAFETY: SCM_RIGHTS hands us new descriptors that nothing else owns.
        fds.extend(got.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the shim closed the connection",
            ));
        }
        data.extend_from_slice(&buf[..n]);
        if let Some(p) = data.iter().position(|b| *b == b'\n') {
            let rest = data.split_off(p + 1);
            data.pop();
            return Ok((data, rest, fds));
        }
    }
    Err(std::io::Error::other("the shim's header is too long"))
}

fn take(fds: &mut Vec<(String, OwnedFd)>, name: &str) -> Option<OwnedFd> {
    let i = fds.iter().position(|(n, _)| n == name)?;
    Some(fds.remove(i).1)
}

/// Sends a request on a fresh connection and reads the streaming header with its descriptors.
pub(crate) async fn open(
    sock: &std::path::Path,
    req: Vec<u8>,
) -> Result<
    (
        StreamHeader,
        Vec<(String, OwnedFd)>,
        Vec<u8>,
        tokio::net::UnixStream,
    ),
    ShimError,
> {
    let sock = sock.to_path_buf();
    let (hdr, fds, rest, conn) = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&sock)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        let mut line = req;
        line.push(b'\n');
        s.write_all(&line)?;
        let (hdr, rest, fds) = recv_header(s.as_raw_fd())?;
        s.set_read_timeout(None)?;
        s.set_nonblocking(true)?;
        Ok::<_, std::io::Error>((hdr, fds, rest, s))
    })
    .await
    .map_err(|e| ShimError::Protocol(e.to_string()))??;
    let hdr: StreamHeader = match serde_json::from_slice(&hdr) {
        Ok(h) => h,
        Err(_) => {
            // An ordinary error answer (e.g. a bad request) instead of a stream header.
            let msg = match serde_json::from_slice::<super::Response>(&hdr) {
                Ok(super::Response::Err(e)) => e,
                _ => format!("unexpected answer {:?}", String::from_utf8_lossy(&hdr)),
            };
            return Err(ShimError::Failed(msg));
        }
    };
    if let Some(e) = hdr.error.clone() {
        return Err(ShimError::Failed(e));
    }
    if hdr.fds.len() != fds.len() {
        return Err(ShimError::Protocol(format!(
            "expected {} descriptors, got {}",
            hdr.fds.len(),
            fds.len()
        )));
    }
    let named = hdr.fds.iter().cloned().zip(fds).collect();
    let conn = tokio::net::UnixStream::from_std(conn)?;
    Ok((hdr, named, rest, conn))
}

/// A running exec: its stdio (pipes, or one pty master with `tty`) and its exit code.
#[derive(Debug)]
pub struct ExecSession {
    pub stdin: Option<FdIo>,
    pub stdout: Option<FdIo>,
    pub stderr: Option<FdIo>,
    /// The terminal's master side (stdin and output both) when the exec has a TTY.
    pub pty: Option<FdIo>,
    conn: tokio::net::UnixStream,
    rest: Vec<u8>,
}

impl ExecSession {
    pub(crate) fn new(
        mut fds: Vec<(String, OwnedFd)>,
        rest: Vec<u8>,
        conn: tokio::net::UnixStream,
    ) -> Result<ExecSession, ShimError> {
        let mut io = |n: &str| take(&mut fds, n).map(FdIo::new).transpose();
        Ok(ExecSession {
            stdin: io("stdin")?,
            stdout: io("stdout")?,
            stderr: io("stderr")?,
            pty: io("pty")?,
            conn,
            rest,
        })
    }

    /// Waits for the process to end; its exit code (128+signal when killed).
    pub async fn wait(&mut self) -> Result<i32, ShimError> {
        let mut buf = std::mem::take(&mut self.rest);
        loop {
            if let Some(p) = buf.iter().position(|b| *b == b'\n') {
                let exit: ExecExit = serde_json::from_slice(&buf[..p])
                    .map_err(|e| ShimError::Protocol(e.to_string()))?;
                return Ok(exit.exit_code);
            }
            let mut chunk = [0u8; 256];
            let n = self.conn.read(&mut chunk).await?;
            if n == 0 {
                return Err(ShimError::Protocol(
                    "the shim went away before the exec ended".into(),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// An attachment to a running container: a duplicate of its stdin (when it has one and it
/// was asked for) and its live output.
#[derive(Debug)]
pub struct AttachSession {
    pub tty: bool,
    pub stdin: Option<FdIo>,
    conn: tokio::net::UnixStream,
    buf: Vec<u8>,
}

impl AttachSession {
    pub(crate) fn new(
        tty: bool,
        mut fds: Vec<(String, OwnedFd)>,
        rest: Vec<u8>,
        conn: tokio::net::UnixStream,
    ) -> Result<AttachSession, ShimError> {
        Ok(AttachSession {
            tty,
            stdin: take(&mut fds, "stdin").map(FdIo::new).transpose()?,
            conn,
            buf: rest,
        })
    }

    /// The next piece of output: (1 stdout | 2 stderr, bytes); None when the container has
    /// exited (or the shim went away).
    pub async fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() >= 5 + len {
                    let stream = self.buf[0];
                    let data = self.buf[5..5 + len].to_vec();
                    self.buf.drain(..5 + len);
                    return Some((stream, data));
                }
            }
            let mut chunk = vec![0u8; 65536];
            match self.conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Non-blocking async I/O on a pipe end or a pty master. A pty master's EIO (the terminal's
/// last user is gone) reads as end of file.
#[derive(Debug)]
pub struct FdIo(AsyncFd<OwnedFd>);

impl FdIo {
    pub fn new(fd: OwnedFd) -> std::io::Result<FdIo> {
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        // SAFETY: the OwnedFd stays open, unchanged, inside the AsyncFd for its lifetime.
        let afd = unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)?;
        Ok(FdIo(afd))
    }

    pub fn raw(&self) -> RawFd {
        self.0.get_ref().as_raw_fd()
    }

    /// Sets a terminal's window size (on a pty master).
    pub fn resize(&self, width: u16, height: u16) -> std::io::Result<()> {
        let ws = libc::winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads the struct we pass.
        if unsafe { libc::ioctl(self.raw(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Another handle on the same open file (e.g. a pty master's reading and writing sides).
    pub fn try_clone(&self) -> std::io::Result<FdIo> {
        FdIo::new(self.0.get_ref().try_clone()?)
    }
}

impl AsyncRead for FdIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let r = guard.try_io(|fd| {
                // SAFETY: reading into the caller's initialized buffer.
                let n = unsafe {
                    libc::read(
                        fd.get_ref().as_raw_fd(),
                        unfilled.as_mut_ptr().cast(),
                        unfilled.len(),
                    )
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EIO) {
                        return Ok(0);
                    }
                    return Err(e);
                }
                Ok(n as usize)
            });
            match r {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            let r = guard.try_io(|fd| {
                // SAFETY: writing the caller's bytes to a descriptor we own.
                let n = unsafe {
                    libc::write(fd.get_ref().as_raw_fd(), data.as_ptr().cast(), data.len())
                };
                if n < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(n as usize)
            });
            match r {
                Ok(res) => return Poll::Ready(res),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Receives one descriptor (a terminal's master from a container's process).
pub(crate) fn recv_fd(sock: RawFd) -> std::io::Result<OwnedFd> {
    let mut buf = [0u8; 256];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(std::io::Error::from)?;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(r) = c {
            if let Some(f) = r.first() {
                // SAFETY: SCM_RIGHTS hands us a new descriptor that nothing else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(*f) });
            }
        }
    }
    Err(std::io::Error::other("no terminal was passed"))
}
