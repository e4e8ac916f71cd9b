//! A server-side SPDY/3.1 session, as kubectl's streaming client (Go's `moby/spdystream` with
//! its SPDY/3 framer) expects it: exec/attach/cp fall back to it when the WebSocket upgrade is
//! refused, and port-forward speaks it either plainly or tunneled inside WebSocket binary
//! messages (`SPDY/3.1+portforward.k8s.io`).
//!
//! The HTTP upgrade (101) is done elsewhere; [`serve`] takes the upgraded byte stream:
//!
//! ```ignore
//! let (session, mut incoming) = spdy::serve(upgraded);
//! while let Some(stream) = incoming.recv().await {
//!     let kind = stream.header("streamtype");   // case-insensitive
//!     stream.reply().await?;                    // SYN_REPLY, before any data
//!     let (mut r, mut w) = stream.split();      // AsyncRead / AsyncWrite halves
//!     // tokio::io::copy(&mut r, ..), w.write_all(..), w.shutdown() (FIN), w.reset() (RST)
//! }
//! session.close().await;                        // flush, GOAWAY, close
//! ```
//!
//! Protocol notes (SPDY/3, as spdystream speaks it):
//! - Frames: control frames `1|version(15)=3|type(16)|flags(8)|length(24)|payload`, data frames
//!   `0|stream-id(31)|flags(8)|length(24)|payload`. FIN (0x01) half-closes a stream.
//! - Name/value header blocks (`u32` count, then `u32`-length-prefixed names and values, several
//!   values joined by NUL) are zlib-compressed with the SPDY/3 dictionary, one zlib stream per
//!   direction for the whole session, each block ending with a sync flush.
//! - Clients open odd stream ids, increasing; the server answers each with SYN_REPLY (kubectl
//!   waits up to 30 s for it, and spdystream drops data that arrives before it).
//! - spdystream does no flow control: it never sends WINDOW_UPDATE and ignores ours, so writes
//!   are not held back by windows; SETTINGS and WINDOW_UPDATE from the client are accepted and
//!   ignored. Client PINGs (odd ids) are echoed. A client GOAWAY refuses later streams; the
//!   session runs until the connection ends.
//!
//! Buffering and backpressure (what was chosen):
//! - Writes of all streams go through one bounded queue ([`WRITE_QUEUE`] frames of at most
//!   [`MAX_DATA`] bytes) to a writer task, so a stream writer waits while the connection is
//!   busy; control frames (SYN_REPLY, RST_STREAM, PING echoes) take a separate queue that the
//!   writer serves first, so a SYN_REPLY always precedes the data written after `reply()`.
//! - Each stream has a bounded receive queue ([`READ_QUEUE`] chunks of at most 64 KiB). A stream
//!   whose reader is slow blocks the session's reader (as in spdystream); a dropped reader
//!   discards its data instead, so an unread stream never stalls the others.
//! - New streams are queued for the application ([`ACCEPT_QUEUE`]); when that queue is full or
//!   closed, further streams are refused with RST_STREAM REFUSED_STREAM rather than blocking.
//! - Bad input (bad frame, bad zlib data, an unknown version) ends the session with a tracing
//!   warning (after a GOAWAY PROTOCOL_ERROR), never a panic.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, watch};

/// Largest data frame this side sends (the brief's, and kubectl's own io.Copy buffer).
pub const MAX_DATA: usize = 128 * 1024;
/// Data frames queued for the connection, all streams together.
pub const WRITE_QUEUE: usize = 64;
/// Chunks (of at most [`READ_CHUNK`] bytes) queued for one stream's reader.
pub const READ_QUEUE: usize = 16;
/// New streams waiting for the application.
pub const ACCEPT_QUEUE: usize = 64;
/// Received data is handed to stream readers in slices of at most this many bytes.
const READ_CHUNK: usize = 64 * 1024;
/// Control frames waiting for the writer.
const CONTROL_QUEUE: usize = 256;
/// A decompressed header block larger than this ends the session (a zlib bomb).
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// How many bytes the writer gathers before writing them out.
const WRITE_BATCH: usize = 256 * 1024;
/// How long a session that met bad input waits for its GOAWAY to be written.
const GOAWAY_GRACE: Duration = Duration::from_secs(5);

const VERSION: u16 = 3;
const FLAG_FIN: u8 = 0x01;
const FLAG_UNIDIRECTIONAL: u8 = 0x02;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

const RST_PROTOCOL_ERROR: u32 = 1;
const RST_REFUSED_STREAM: u32 = 3;
const RST_CANCEL: u32 = 5;

const GOAWAY_OK: u32 = 0;
const GOAWAY_PROTOCOL_ERROR: u32 = 1;

/// The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00, 2.6.10.1): these
/// words, each preceded by its length as a 4-byte big-endian integer, then [`DICT_TAIL`].
const DICT_WORDS: [&str; 65] = [
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

/// The dictionary's unprefixed end.
const DICT_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,",
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

/// The SPDY/3 zlib dictionary (1423 bytes).
fn dictionary() -> &'static [u8] {
    static DICT: OnceLock<Vec<u8>> = OnceLock::new();
    DICT.get_or_init(|| {
        let mut d = Vec::with_capacity(1423);
        for w in DICT_WORDS {
            d.extend_from_slice(&(w.len() as u32).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(DICT_TAIL.as_bytes());
        d
    })
}

fn bad_data(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn broken_pipe() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the SPDY stream is closed")
}

/// One direction's header compressor: one zlib stream with the SPDY dictionary.
struct HeaderDeflater(Compress);

impl HeaderDeflater {
    fn new() -> io::Result<Self> {
        let mut c = Compress::new(Compression::default(), true);
        c.set_dictionary(dictionary()).map_err(io::Error::other)?;
        Ok(Self(c))
    }

    /// Appends the compressed `block`, sync-flushed, to `out`.
    fn compress(&mut self, block: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let mut used = 0usize;
        for _ in 0..10_000 {
            out.reserve(block.len() - used + 64);
            let before = self.0.total_in();
            self.0
                .compress_vec(&block[used..], out, FlushCompress::Sync)
                .map_err(io::Error::other)?;
            used += (self.0.total_in() - before) as usize;
            // Done when all input is in and the flush left room in the output.
            if used == block.len() && out.len() < out.capacity() {
                return Ok(());
            }
        }
        Err(io::Error::other("header compression did not finish"))
    }
}

/// One direction's header decompressor.
struct HeaderInflater(Decompress);

impl HeaderInflater {
    fn new() -> Self {
        Self(Decompress::new(true))
    }

    /// Decompresses one frame's header block (the continuation of the session's zlib stream).
    fn decompress(&mut self, input: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(input.len() * 4 + 64);
        let mut used = 0usize;
        for _ in 0..10_000 {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(bad_data("header block too large"));
                }
                out.reserve(out.len().max(256));
            }
            let (before_in, before_out) = (self.0.total_in(), out.len());
            let r = self
                .0
                .decompress_vec(&input[used..], &mut out, FlushDecompress::Sync);
            used += (self.0.total_in() - before_in) as usize;
            match r {
                Ok(Status::StreamEnd) => return Ok(out),
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.0
                        .set_dictionary(dictionary())
                        .map_err(|e| bad_data(format!("header dictionary: {e}")))?;
                    continue;
                }
                Err(e) => return Err(bad_data(format!("header block: {e}"))),
            }
            if used == input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if used < input.len() && out.len() == before_out && self.0.total_in() == before_in {
                return Err(bad_data("header block: no progress"));
            }
        }
        Err(bad_data("header block: no progress"))
    }
}

/// A name/value header block, uncompressed.
fn encode_header_block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    for (n, v) in headers {
        let n = n.to_ascii_lowercase();
        b.extend_from_slice(&(n.len() as u32).to_be_bytes());
        b.extend_from_slice(n.as_bytes());
        b.extend_from_slice(&(v.len() as u32).to_be_bytes());
        b.extend_from_slice(v.as_bytes());
    }
    b
}

/// Parses an uncompressed name/value block; several values of one name stay NUL-joined.
fn parse_header_block(mut b: &[u8]) -> io::Result<Vec<(String, String)>> {
    fn take<'a>(b: &mut &'a [u8]) -> io::Result<&'a [u8]> {
        if b.len() < 4 {
            return Err(bad_data("truncated header block"));
        }
        let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if b.len() - 4 < n {
            return Err(bad_data("truncated header block"));
        }
        let (s, rest) = b[4..].split_at(n);
        *b = rest;
        Ok(s)
    }
    if b.len() < 4 {
        return Err(bad_data("truncated header block"));
    }
    let count = b.get_u32() as usize;
    if count > b.len() / 8 {
        return Err(bad_data("header block count exceeds its size"));
    }
    let mut h = Vec::with_capacity(count);
    for _ in 0..count {
        let name = String::from_utf8_lossy(take(&mut b)?).into_owned();
        let value = String::from_utf8_lossy(take(&mut b)?).into_owned();
        h.push((name, value));
    }
    Ok(h)
}

/// What the writer task sends.
enum Out {
    Reply(u32),
    Data { id: u32, data: Bytes, fin: bool },
    Rst { id: u32, status: u32 },
    Ping(u32),
    GoAway(u32),
}

fn put_control(out: &mut BytesMut, ty: u16, flags: u8, payload_len: usize) {
    out.put_u16(0x8000 | VERSION);
    out.put_u16(ty);
    out.put_u32(((flags as u32) << 24) | (payload_len as u32 & 0x00ff_ffff));
}

/// State shared by a session's tasks and handles.
struct Shared {
    ctrl_tx: mpsc::Sender<Out>,
    data_tx: mpsc::Sender<Out>,
    done_tx: watch::Sender<bool>,
    /// The last client stream id accepted (for GOAWAY).
    last_good: AtomicU32,
}

impl Shared {
    fn finish(&self) {
        self.done_tx.send_replace(true);
    }
}

/// A running SPDY session (cheap to clone).
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

impl Session {
    /// Flushes what was queued, sends GOAWAY and closes the connection.
    pub async fn close(&self) {
        if !*self.shared.done_tx.borrow() {
            let _ = self.shared.data_tx.send(Out::GoAway(GOAWAY_OK)).await;
        }
        self.closed().await;
    }

    /// Resolves when the connection has ended (either side).
    pub async fn closed(&self) {
        let mut rx = self.shared.done_tx.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }
}

/// Per-stream state shared by the session reader and the stream's halves.
struct StreamState {
    /// Reset by either side: reads end, writes fail.
    reset: AtomicBool,
    /// This side may write no more (FIN sent, or the client opened it unidirectional).
    local_closed: AtomicBool,
}

/// A stream opened by the client.
pub struct Stream {
    id: u32,
    headers: Vec<(String, String)>,
    state: Arc<StreamState>,
    rx: mpsc::Receiver<Bytes>,
    session: Arc<Shared>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.id)
            .field("headers", &self.headers)
            .finish()
    }
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// A header of the SYN_STREAM (names compare case-insensitively; the first of several
    /// values).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split('\0').next().unwrap_or_default())
    }

    /// Sends SYN_REPLY (empty headers) — must be called before data is written.
    pub async fn reply(&self) -> io::Result<()> {
        self.session
            .ctrl_tx
            .send(Out::Reply(self.id))
            .await
            .map_err(|_| broken_pipe())
    }

    /// The read half (EOF at FIN or RST) and the write half (shutdown = FIN).
    pub fn split(self) -> (StreamReader, StreamWriter) {
        (
            StreamReader {
                rx: self.rx,
                cur: Bytes::new(),
                state: self.state.clone(),
            },
            StreamWriter {
                id: self.id,
                state: self.state,
                session: self.session,
                pending: Mutex::new(None),
            },
        )
    }
}

/// The receiving half of a stream.
pub struct StreamReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
    state: Arc<StreamState>,
}

impl AsyncRead for StreamReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.cur.is_empty() {
                let n = this.cur.len().min(buf.remaining());
                buf.put_slice(&this.cur.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.state.reset.load(Ordering::Acquire) {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.rx.poll_recv(cx)) {
                Some(b) => this.cur = b,
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

type Reserve = Pin<
    Box<dyn Future<Output = Result<mpsc::OwnedPermit<Out>, mpsc::error::SendError<()>>> + Send>,
>;

/// The sending half of a stream.
pub struct StreamWriter {
    id: u32,
    state: Arc<StreamState>,
    session: Arc<Shared>,
    /// A place in the session's write queue being waited for (a Mutex only to be Sync; it is
    /// reached through `&mut self`).
    pending: Mutex<Option<Reserve>>,
}

impl StreamWriter {
    /// Resets the stream (RST_STREAM CANCEL): later writes fail, reads end.
    pub fn reset(&self) {
        if self.state.reset.swap(true, Ordering::AcqRel) {
            return;
        }
        let out = Out::Rst {
            id: self.id,
            status: RST_CANCEL,
        };
        if let Err(mpsc::error::TrySendError::Full(out)) = self.session.ctrl_tx.try_send(out) {
            // A full control queue: send it from a task rather than lose it.
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                let tx = self.session.ctrl_tx.clone();
                h.spawn(async move {
                    let _ = tx.send(out).await;
                });
            }
        }
    }

    fn poll_permit(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<mpsc::OwnedPermit<Out>>> {
        let pending = self
            .pending
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| Box::pin(self.session.data_tx.clone().reserve_owned()));
        let r = ready!(pending.as_mut().poll(cx));
        *self.pending.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        Poll::Ready(r.map_err(|_| broken_pipe()))
    }
}

impl AsyncWrite for StreamWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.state.reset.load(Ordering::Acquire)
            || this.state.local_closed.load(Ordering::Acquire)
        {
            return Poll::Ready(Err(broken_pipe()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let permit = ready!(this.poll_permit(cx))?;
        if this.state.reset.load(Ordering::Acquire) {
            return Poll::Ready(Err(broken_pipe()));
        }
        let n = buf.len().min(MAX_DATA);
        permit.send(Out::Data {
            id: this.id,
            data: Bytes::copy_from_slice(&buf[..n]),
            fin: false,
        });
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.state.local_closed.load(Ordering::Acquire)
            || this.state.reset.load(Ordering::Acquire)
        {
            return Poll::Ready(Ok(()));
        }
        let permit = ready!(this.poll_permit(cx))?;
        if !this.state.local_closed.swap(true, Ordering::AcqRel) {
            permit.send(Out::Data {
                id: this.id,
                data: Bytes::new(),
                fin: true,
            });
        }
        Poll::Ready(Ok(()))
    }
}

/// Runs a server-side session over `io` (spawns its reader/writer tasks). New client streams
/// arrive on the receiver; it closes when the connection ends.
pub fn serve<IO>(io: IO) -> (Session, mpsc::Receiver<Stream>)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (ctrl_tx, ctrl_rx) = mpsc::channel(CONTROL_QUEUE);
    let (data_tx, data_rx) = mpsc::channel(WRITE_QUEUE);
    let (done_tx, _) = watch::channel(false);
    let (accept_tx, accept_rx) = mpsc::channel(ACCEPT_QUEUE);
    let shared = Arc::new(Shared {
        ctrl_tx,
        data_tx,
        done_tx,
        last_good: AtomicU32::new(0),
    });
    let (r, w) = tokio::io::split(io);
    tokio::spawn(write_loop(w, ctrl_rx, data_rx, shared.clone()));
    tokio::spawn(read_task(r, accept_tx, shared.clone()));
    (Session { shared }, accept_rx)
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut ctrl_rx: mpsc::Receiver<Out>,
    mut data_rx: mpsc::Receiver<Out>,
    shared: Arc<Shared>,
) {
    let mut done = shared.done_tx.subscribe();
    let r = async {
        let mut deflater = HeaderDeflater::new()?;
        let mut out = BytesMut::with_capacity(WRITE_BATCH + MAX_DATA + 64);
        let mut scratch = Vec::new();
        loop {
            let first = tokio::select! {
                biased;
                m = ctrl_rx.recv() => m,
                m = data_rx.recv() => m,
            };
            let Some(mut m) = first else {
                return Ok::<(), io::Error>(());
            };
            let mut goaway = false;
            loop {
                match m {
                    Out::Reply(id) => {
                        scratch.clear();
                        deflater.compress(&encode_header_block(&[]), &mut scratch)?;
                        put_control(&mut out, TYPE_SYN_REPLY, 0, 4 + scratch.len());
                        out.put_u32(id & 0x7fff_ffff);
                        out.put_slice(&scratch);
                    }
                    Out::Data { id, data, fin } => {
                        out.put_u32(id & 0x7fff_ffff);
                        let flags = if fin { FLAG_FIN } else { 0 };
                        out.put_u32(((flags as u32) << 24) | data.len() as u32);
                        out.put_slice(&data);
                    }
                    Out::Rst { id, status } => {
                        put_control(&mut out, TYPE_RST_STREAM, 0, 8);
                        out.put_u32(id & 0x7fff_ffff);
                        out.put_u32(status);
                    }
                    Out::Ping(id) => {
                        put_control(&mut out, TYPE_PING, 0, 4);
                        out.put_u32(id);
                    }
                    Out::GoAway(status) => {
                        put_control(&mut out, TYPE_GOAWAY, 0, 8);
                        out.put_u32(shared.last_good.load(Ordering::Acquire) & 0x7fff_ffff);
                        out.put_u32(status);
                        goaway = true;
                        break;
                    }
                }
                if out.len() >= WRITE_BATCH {
                    break;
                }
                m = match ctrl_rx.try_recv() {
                    Ok(m) => m,
                    Err(_) => match data_rx.try_recv() {
                        Ok(m) => m,
                        Err(_) => break,
                    },
                };
            }
            // Flushed per batch: TLS and upgraded HTTP streams may buffer.
            w.write_all(&out).await?;
            w.flush().await?;
            out.clear();
            if goaway {
                let _ = w.shutdown().await;
                return Ok(());
            }
        }
    };
    tokio::select! {
        r = r => {
            if let Err(e) = r {
                tracing::debug!("SPDY session: writing failed: {e}");
            }
        }
        _ = done.wait_for(|d| *d) => {}
    }
    shared.finish();
}

/// A client stream the reader knows.
struct Entry {
    /// Its reader's queue; None once the client half-closed or reset it (or nobody reads).
    tx: Option<mpsc::Sender<Bytes>>,
    state: Arc<StreamState>,
}

struct Reader<R> {
    r: R,
    buf: BytesMut,
    inflater: HeaderInflater,
    streams: HashMap<u32, Entry>,
    last_id: u32,
    goaway_received: bool,
    accept_tx: mpsc::Sender<Stream>,
    shared: Arc<Shared>,
}

async fn read_task<R: AsyncRead + Unpin>(
    r: R,
    accept_tx: mpsc::Sender<Stream>,
    shared: Arc<Shared>,
) {
    let mut done = shared.done_tx.subscribe();
    let mut reader = Reader {
        r,
        buf: BytesMut::with_capacity(READ_CHUNK * 4),
        inflater: HeaderInflater::new(),
        streams: HashMap::new(),
        last_id: 0,
        goaway_received: false,
        accept_tx,
        shared: shared.clone(),
    };
    let res = tokio::select! {
        r = reader.run() => r,
        _ = done.wait_for(|d| *d) => Ok(()),
    };
    // Streams end (readers see EOF) and the accept queue closes once this returns.
    drop(reader);
    match res {
        Ok(()) => shared.finish(),
        Err(e) => {
            tracing::warn!("SPDY session ended on bad input: {e}");
            if shared
                .ctrl_tx
                .try_send(Out::GoAway(GOAWAY_PROTOCOL_ERROR))
                .is_ok()
            {
                let _ = tokio::time::timeout(GOAWAY_GRACE, done.wait_for(|d| *d)).await;
            }
            shared.finish();
        }
    }
}

/// Queues a control frame from the reader (it waits while the writer is behind).
async fn send_ctrl(shared: &Shared, out: Out) -> Result<(), ReadEnd> {
    shared.ctrl_tx.send(out).await.map_err(|_| ReadEnd::Eof)
}

/// A reader error: the connection ended (not worth a warning) or the input was bad.
enum ReadEnd {
    Eof,
    Bad(io::Error),
}

impl From<io::Error> for ReadEnd {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::InvalidData {
            ReadEnd::Bad(e)
        } else {
            ReadEnd::Eof
        }
    }
}

impl<R: AsyncRead + Unpin> Reader<R> {
    async fn run(&mut self) -> io::Result<()> {
        loop {
            match self.frame().await {
                Ok(()) => {}
                Err(ReadEnd::Eof) => return Ok(()),
                Err(ReadEnd::Bad(e)) => return Err(e),
            }
        }
    }

    /// Reads until `n` bytes are buffered.
    async fn fill(&mut self, n: usize) -> Result<(), ReadEnd> {
        while self.buf.len() < n {
            if self.buf.capacity() - self.buf.len() < READ_CHUNK {
                self.buf.reserve((n - self.buf.len()).max(4 * READ_CHUNK));
            }
            if self.r.read_buf(&mut self.buf).await? == 0 {
                return Err(ReadEnd::Eof);
            }
        }
        Ok(())
    }

    async fn frame(&mut self) -> Result<(), ReadEnd> {
        self.fill(8).await?;
        let w0 = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        let w1 = u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]);
        let flags = (w1 >> 24) as u8;
        let len = (w1 & 0x00ff_ffff) as usize;
        if w0 & 0x8000_0000 != 0 {
            let version = ((w0 >> 16) & 0x7fff) as u16;
            if version != VERSION {
                return Err(ReadEnd::Bad(bad_data(format!(
                    "unsupported SPDY version {version}"
                ))));
            }
            self.fill(8 + len).await?;
            self.buf.advance(8);
            let payload = self.buf.split_to(len).freeze();
            self.control((w0 & 0xffff) as u16, flags, payload).await
        } else {
            let id = w0 & 0x7fff_ffff;
            if id == 0 {
                return Err(ReadEnd::Bad(bad_data("data frame for stream 0")));
            }
            self.fill(8 + len).await?;
            self.buf.advance(8);
            let payload = self.buf.split_to(len).freeze();
            self.data(id, flags, payload).await;
            Ok(())
        }
    }

    async fn data(&mut self, id: u32, flags: u8, mut payload: Bytes) {
        let Some(e) = self.streams.get_mut(&id) else {
            // Already reset or finished: data in flight is dropped, as spdystream does.
            return;
        };
        if e.state.reset.load(Ordering::Acquire) {
            e.tx = None;
        }
        if let Some(tx) = &e.tx {
            while !payload.is_empty() {
                let chunk = payload.split_to(payload.len().min(READ_CHUNK));
                if tx.send(chunk).await.is_err() {
                    // Nobody reads this stream any more: drop its data.
                    e.tx = None;
                    break;
                }
            }
        }
        if flags & FLAG_FIN != 0 {
            e.tx = None;
        }
        self.forget_if_done(id);
    }

    /// Drops a stream the client finished with and the application let go of.
    fn forget_if_done(&mut self, id: u32) {
        if let Some(e) = self.streams.get(&id) {
            if e.tx.is_none() && Arc::strong_count(&e.state) == 1 {
                self.streams.remove(&id);
            }
        }
    }

    async fn control(&mut self, ty: u16, flags: u8, mut p: Bytes) -> Result<(), ReadEnd> {
        let short = |what: &str| ReadEnd::Bad(bad_data(format!("{what} frame too short")));
        match ty {
            TYPE_SYN_STREAM => {
                if p.len() < 10 {
                    return Err(short("SYN_STREAM"));
                }
                let id = p.get_u32() & 0x7fff_ffff;
                let _associated = p.get_u32();
                let _priority_slot = p.get_u16();
                // Decoded whatever happens next: the zlib stream must stay in step.
                let block = self.inflater.decompress(&p)?;
                let headers = parse_header_block(&block)?;
                if id == 0 {
                    return Err(ReadEnd::Bad(bad_data("SYN_STREAM for stream 0")));
                }
                if id % 2 == 0 || id <= self.last_id {
                    tracing::debug!("SPDY: refusing stream {id}: not a new client stream id");
                    return send_ctrl(
                        &self.shared,
                        Out::Rst {
                            id,
                            status: RST_PROTOCOL_ERROR,
                        },
                    )
                    .await;
                }
                self.last_id = id;
                if self.goaway_received {
                    return send_ctrl(
                        &self.shared,
                        Out::Rst {
                            id,
                            status: RST_REFUSED_STREAM,
                        },
                    )
                    .await;
                }
                self.accept(id, flags, headers).await
            }
            TYPE_SYN_REPLY | TYPE_HEADERS => {
                if p.len() < 4 {
                    return Err(short("SYN_REPLY/HEADERS"));
                }
                let id = p.get_u32() & 0x7fff_ffff;
                let block = self.inflater.decompress(&p)?;
                parse_header_block(&block)?;
                if ty == TYPE_HEADERS && flags & FLAG_FIN != 0 {
                    if let Some(e) = self.streams.get_mut(&id) {
                        e.tx = None;
                    }
                    self.forget_if_done(id);
                }
                Ok(())
            }
            TYPE_RST_STREAM => {
                if p.len() != 8 {
                    return Err(ReadEnd::Bad(bad_data("RST_STREAM frame of a wrong size")));
                }
                let id = p.get_u32() & 0x7fff_ffff;
                let status = p.get_u32();
                tracing::debug!("SPDY: client reset stream {id} (status {status})");
                if let Some(e) = self.streams.get_mut(&id) {
                    e.state.reset.store(true, Ordering::Release);
                    e.tx = None;
                }
                self.forget_if_done(id);
                Ok(())
            }
            TYPE_SETTINGS => {
                if p.len() < 4 {
                    return Err(short("SETTINGS"));
                }
                let n = p.get_u32() as usize;
                if p.len() != n.saturating_mul(8) {
                    return Err(ReadEnd::Bad(bad_data("SETTINGS frame of a wrong size")));
                }
                Ok(())
            }
            TYPE_PING => {
                if p.len() != 4 {
                    return Err(ReadEnd::Bad(bad_data("PING frame of a wrong size")));
                }
                let id = p.get_u32();
                // Client pings are odd; an even one would answer ours (we send none).
                if id % 2 == 1 {
                    send_ctrl(&self.shared, Out::Ping(id)).await?;
                }
                Ok(())
            }
            TYPE_GOAWAY => {
                if p.len() < 4 {
                    return Err(short("GOAWAY"));
                }
                tracing::debug!("SPDY: client sent GOAWAY");
                self.goaway_received = true;
                Ok(())
            }
            TYPE_WINDOW_UPDATE => {
                if p.len() != 8 {
                    return Err(ReadEnd::Bad(bad_data(
                        "WINDOW_UPDATE frame of a wrong size",
                    )));
                }
                Ok(())
            }
            // Unknown control frames are ignored (SPDY/3, 2.2.1).
            _ => Ok(()),
        }
    }

    async fn accept(
        &mut self,
        id: u32,
        flags: u8,
        headers: Vec<(String, String)>,
    ) -> Result<(), ReadEnd> {
        // Forget streams finished on both sides before adding one.
        if self.streams.len() >= 64 {
            self.streams
                .retain(|_, e| e.tx.is_some() || Arc::strong_count(&e.state) > 1);
        }
        let (tx, rx) = mpsc::channel(READ_QUEUE);
        let state = Arc::new(StreamState {
            reset: AtomicBool::new(false),
            local_closed: AtomicBool::new(flags & FLAG_UNIDIRECTIONAL != 0),
        });
        let stream = Stream {
            id,
            headers,
            state: state.clone(),
            rx,
            session: self.shared.clone(),
        };
        match self.accept_tx.try_send(stream) {
            Ok(()) => {
                self.shared.last_good.store(id, Ordering::Release);
                let tx = if flags & FLAG_FIN != 0 {
                    None
                } else {
                    Some(tx)
                };
                self.streams.insert(id, Entry { tx, state });
                Ok(())
            }
            Err(_) => {
                tracing::debug!("SPDY: refusing stream {id}: nobody accepts streams");
                send_ctrl(
                    &self.shared,
                    Out::Rst {
                        id,
                        status: RST_REFUSED_STREAM,
                    },
                )
                .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
    use tokio::time::timeout;

    const T: Duration = Duration::from_secs(10);

    /// Two SYN_STREAM frames as Go's SPDY framer (moby/spdystream, the one kubectl uses)
    /// encodes kubectl port-forward's error and data streams for port 8080 (captured from
    /// that framer for this test; the second block continues the first one's zlib stream).
    const GO_SYN_STREAMS: [&[u8]; 2] = [
        &[
            0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x3e, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2, 0x02, 0x25, 0x3a, 0x06,
            0x06, 0x06, 0xce, 0x22, 0x48, 0xfc, 0x64, 0x82, 0xd2, 0x2d, 0xa3, 0x01, 0x38, 0xe5,
            0x95, 0x14, 0xa5, 0x26, 0xe6, 0x42, 0x0b, 0x17, 0xd6, 0x54, 0x50, 0xd0, 0x43, 0x0a,
            0xea, 0x22, 0x70, 0x9e, 0xb0, 0x30, 0xb0, 0x30, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff,
        ],
        &[
            0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x1a, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x82, 0x6a, 0x46, 0x17, 0x23, 0x64, 0x18, 0xa8, 0xa4, 0x4a,
            0x04, 0x00, 0x00, 0x00, 0xff, 0xff,
        ],
    ];

    /// A frame as the test client sees it.
    #[derive(Debug)]
    enum Frame {
        Control { ty: u16, flags: u8, payload: Bytes },
        Data { id: u32, flags: u8, data: Bytes },
    }

    /// The client's sending side (a minimal spdystream stand-in).
    struct ClientW {
        w: WriteHalf<DuplexStream>,
        deflater: HeaderDeflater,
    }

    impl ClientW {
        async fn raw(&mut self, b: &[u8]) {
            self.w.write_all(b).await.unwrap();
        }

        async fn control(&mut self, ty: u16, flags: u8, payload: &[u8]) {
            let mut b = BytesMut::new();
            put_control(&mut b, ty, flags, payload.len());
            b.put_slice(payload);
            self.raw(&b).await;
        }

        async fn syn_stream(&mut self, id: u32, flags: u8, headers: &[(&str, &str)]) {
            let mut p = Vec::new();
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(&0u32.to_be_bytes());
            p.extend_from_slice(&[0, 0]);
            self.deflater
                .compress(&encode_header_block(headers), &mut p)
                .unwrap();
            self.control(TYPE_SYN_STREAM, flags, &p).await;
        }

        async fn data(&mut self, id: u32, data: &[u8], fin: bool) {
            let mut b = BytesMut::new();
            b.put_u32(id);
            b.put_u32(((if fin { FLAG_FIN } else { 0 } as u32) << 24) | data.len() as u32);
            b.put_slice(data);
            self.raw(&b).await;
        }

        async fn rst(&mut self, id: u32, status: u32) {
            let mut p = id.to_be_bytes().to_vec();
            p.extend_from_slice(&status.to_be_bytes());
            self.control(TYPE_RST_STREAM, 0, &p).await;
        }
    }

    /// The client's receiving side.
    struct ClientR {
        r: ReadHalf<DuplexStream>,
        buf: BytesMut,
        inflater: HeaderInflater,
    }

    impl ClientR {
        /// The next frame, or None at EOF.
        async fn next(&mut self) -> Option<Frame> {
            timeout(T, async {
                loop {
                    if self.buf.len() >= 8 {
                        let w0 = u32::from_be_bytes(self.buf[0..4].try_into().unwrap());
                        let w1 = u32::from_be_bytes(self.buf[4..8].try_into().unwrap());
                        let len = (w1 & 0xff_ffff) as usize;
                        if self.buf.len() >= 8 + len {
                            self.buf.advance(8);
                            let payload = self.buf.split_to(len).freeze();
                            let flags = (w1 >> 24) as u8;
                            return Some(if w0 & 0x8000_0000 != 0 {
                                assert_eq!((w0 >> 16) & 0x7fff, 3, "SPDY version 3");
                                Frame::Control {
                                    ty: (w0 & 0xffff) as u16,
                                    flags,
                                    payload,
                                }
                            } else {
                                Frame::Data {
                                    id: w0,
                                    flags,
                                    data: payload,
                                }
                            });
                        }
                    }
                    if self.r.read_buf(&mut self.buf).await.unwrap_or(0) == 0 {
                        return None;
                    }
                }
            })
            .await
            .expect("a frame in time")
        }

        /// Expects a RST_STREAM and returns its stream id and status code.
        async fn rst_stream(&mut self) -> (u32, u32) {
            match self.next().await {
                Some(Frame::Control {
                    ty: TYPE_RST_STREAM,
                    mut payload,
                    ..
                }) => (payload.get_u32(), payload.get_u32()),
                other => panic!("expected RST_STREAM, got {other:?}"),
            }
        }

        /// Expects a SYN_REPLY and returns its stream id and headers.
        async fn syn_reply(&mut self) -> (u32, Vec<(String, String)>) {
            match self.next().await {
                Some(Frame::Control {
                    ty: TYPE_SYN_REPLY,
                    mut payload,
                    ..
                }) => {
                    let id = payload.get_u32();
                    let block = self.inflater.decompress(&payload).unwrap();
                    (id, parse_header_block(&block).unwrap())
                }
                other => panic!("expected SYN_REPLY, got {other:?}"),
            }
        }

        /// Data of stream `id` until its FIN.
        async fn data_until_fin(&mut self, id: u32) -> Vec<u8> {
            let mut got = Vec::new();
            loop {
                match self.next().await {
                    Some(Frame::Data { id: i, flags, data }) if i == id => {
                        assert!(
                            data.len() <= MAX_DATA,
                            "data frames of at most MAX_DATA bytes"
                        );
                        got.extend_from_slice(&data);
                        if flags & FLAG_FIN != 0 {
                            return got;
                        }
                    }
                    other => panic!("expected data of stream {id}, got {other:?}"),
                }
            }
        }
    }

    fn setup() -> (Session, mpsc::Receiver<Stream>, ClientW, ClientR) {
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        let (session, incoming) = serve(ours);
        let (r, w) = tokio::io::split(theirs);
        (
            session,
            incoming,
            ClientW {
                w,
                deflater: HeaderDeflater::new().unwrap(),
            },
            ClientR {
                r,
                buf: BytesMut::new(),
                inflater: HeaderInflater::new(),
            },
        )
    }

    async fn accept(incoming: &mut mpsc::Receiver<Stream>) -> Stream {
        timeout(T, incoming.recv())
            .await
            .expect("a stream in time")
            .expect("a stream")
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
            .collect()
    }

    #[test]
    fn handles_can_move_between_tasks() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<Session>();
        send_sync::<Stream>();
        send_sync::<StreamReader>();
        send_sync::<StreamWriter>();
    }

    #[test]
    fn dictionary_is_spdy3s() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        // zlib's DICTID of the SPDY/3 dictionary, as every SPDY/3 peer sends it.
        let mut c = Compress::new(Compression::default(), true);
        assert_eq!(c.set_dictionary(d).unwrap(), 0xe3c6_a7c2);
        let mut out = Vec::new();
        let mut def = HeaderDeflater::new().unwrap();
        def.compress(&encode_header_block(&[]), &mut out).unwrap();
        assert_eq!(out[0] & 0x0f, 8, "deflate");
        assert_ne!(out[1] & 0x20, 0, "FDICT is set");
        assert_eq!(&out[2..6], &[0xe3, 0xc6, 0xa7, 0xc2]);
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]), "sync-flushed");
    }

    #[test]
    fn header_blocks_round_trip_through_one_zlib_stream_per_direction() {
        let mut def = HeaderDeflater::new().unwrap();
        let mut inf = HeaderInflater::new();
        let blocks: [&[(&str, &str)]; 3] = [
            &[
                ("streamType", "error"),
                ("port", "8080"),
                ("requestID", "0"),
            ],
            &[],
            &[("streamtype", "data"), ("x-multi", "a\0b")],
        ];
        for h in blocks {
            let mut z = Vec::new();
            def.compress(&encode_header_block(h), &mut z).unwrap();
            let parsed = parse_header_block(&inf.decompress(&z).unwrap()).unwrap();
            let want: Vec<(String, String)> = h
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.to_string()))
                .collect();
            assert_eq!(parsed, want);
        }
    }

    #[test]
    fn truncated_or_oversized_header_blocks_are_errors() {
        assert!(parse_header_block(&[0, 0]).is_err());
        assert!(parse_header_block(&[0, 0, 0, 1, 0, 0, 0, 9, b'a']).is_err());
        assert!(parse_header_block(&[0xff, 0xff, 0xff, 0xff]).is_err());
        // A zlib bomb: 1 MiB of zeros compresses to a few KiB.
        let mut def = HeaderDeflater::new().unwrap();
        let mut z = Vec::new();
        def.compress(&vec![0u8; 1 << 20], &mut z).unwrap();
        assert!(HeaderInflater::new().decompress(&z).is_err());
        assert!(HeaderInflater::new()
            .decompress(b"not zlib at all")
            .is_err());
    }

    #[tokio::test]
    async fn go_framer_syn_streams_decode_to_kubectl_portforward_headers() {
        let (_session, mut incoming, mut cw, _cr) = setup();
        for f in GO_SYN_STREAMS {
            cw.raw(f).await;
        }
        let err = accept(&mut incoming).await;
        assert_eq!(err.id(), 1);
        assert_eq!(err.header("streamType"), Some("error"));
        assert_eq!(err.header("port"), Some("8080"));
        assert_eq!(err.header("requestID"), Some("0"));
        let data = accept(&mut incoming).await;
        assert_eq!(data.id(), 3);
        assert_eq!(data.header("STREAMTYPE"), Some("data"));
        assert_eq!(data.header("requestid"), Some("0"));
        assert_eq!(data.header("missing"), None);
    }

    #[tokio::test]
    async fn opened_stream_gets_a_syn_reply_with_its_id() {
        let (_session, mut incoming, mut cw, mut cr) = setup();
        cw.syn_stream(5, 0, &[("streamtype", "stdout")]).await;
        let s = accept(&mut incoming).await;
        assert_eq!(s.id(), 5);
        assert_eq!(s.header("streamtype"), Some("stdout"));
        s.reply().await.unwrap();
        let (id, headers) = cr.syn_reply().await;
        assert_eq!(id, 5);
        assert!(headers.is_empty());
    }

    #[tokio::test]
    async fn data_flows_both_ways_and_fin_ends_each_direction() {
        let (_session, mut incoming, mut cw, mut cr) = setup();
        cw.syn_stream(1, 0, &[("streamtype", "data")]).await;
        let s = accept(&mut incoming).await;
        s.reply().await.unwrap();
        let (mut r, mut w) = s.split();
        cw.data(1, b"hello ", false).await;
        cw.data(1, b"server", true).await;
        let mut got = Vec::new();
        timeout(T, r.read_to_end(&mut got)).await.unwrap().unwrap();
        assert_eq!(got, b"hello server");
        // Writing still works after the client's FIN (a half-close).
        w.write_all(b"hello client").await.unwrap();
        w.shutdown().await.unwrap();
        assert_eq!(cr.syn_reply().await.0, 1, "the reply precedes the data");
        assert_eq!(cr.data_until_fin(1).await, b"hello client");
        assert_eq!(
            w.write_all(b"more").await.unwrap_err().kind(),
            io::ErrorKind::BrokenPipe,
            "no writes after FIN"
        );
    }

    #[tokio::test]
    async fn stream_opened_with_fin_reads_eof_at_once() {
        let (_session, mut incoming, mut cw, _cr) = setup();
        cw.syn_stream(1, FLAG_FIN, &[("streamtype", "error")]).await;
        let (mut r, _w) = accept(&mut incoming).await.split();
        let mut got = Vec::new();
        timeout(T, r.read_to_end(&mut got)).await.unwrap().unwrap();
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn concurrent_streams_keep_their_data_apart() {
        let (_session, mut incoming, mut cw, mut cr) = setup();
        for id in [1, 3, 5] {
            cw.syn_stream(id, 0, &[("requestid", &id.to_string())])
                .await;
        }
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        for want in [1, 3, 5] {
            let s = accept(&mut incoming).await;
            assert_eq!(s.id(), want);
            assert_eq!(s.header("requestid"), Some(want.to_string().as_str()));
            s.reply().await.unwrap();
            let (r, w) = s.split();
            readers.push(r);
            writers.push(w);
        }
        for round in 0..3u8 {
            for id in [5, 1, 3] {
                cw.data(id, &[id as u8, round], round == 2).await;
            }
        }
        for (r, id) in readers.iter_mut().zip([1u8, 3, 5]) {
            let mut got = Vec::new();
            timeout(T, r.read_to_end(&mut got)).await.unwrap().unwrap();
            assert_eq!(got, [id, 0, id, 1, id, 2]);
        }
        // Each writer's data arrives tagged with its own stream id.
        for (w, id) in writers.iter_mut().zip([1u8, 3, 5]) {
            w.write_all(&[id; 3]).await.unwrap();
            w.shutdown().await.unwrap();
        }
        let mut replies = Vec::new();
        let mut data: HashMap<u32, Vec<u8>> = HashMap::new();
        let mut fins = 0;
        while fins < 3 {
            match cr.next().await.expect("a frame") {
                Frame::Control {
                    ty: TYPE_SYN_REPLY,
                    mut payload,
                    ..
                } => {
                    let id = payload.get_u32();
                    cr.inflater.decompress(&payload).unwrap();
                    replies.push(id);
                }
                Frame::Data { id, flags, data: d } => {
                    assert!(replies.contains(&id), "data of {id} before its reply");
                    data.entry(id).or_default().extend_from_slice(&d);
                    fins += usize::from(flags & FLAG_FIN != 0);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(replies, [1, 3, 5]);
        for id in [1u32, 3, 5] {
            assert_eq!(data[&id], [id as u8; 3]);
        }
    }

    #[tokio::test]
    async fn client_pings_are_echoed() {
        let (_session, _incoming, mut cw, mut cr) = setup();
        cw.control(TYPE_PING, 0, &7u32.to_be_bytes()).await;
        match cr.next().await {
            Some(Frame::Control {
                ty: TYPE_PING,
                flags: 0,
                payload,
            }) => assert_eq!(&payload[..], &7u32.to_be_bytes()),
            other => panic!("expected PING, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn settings_and_window_updates_are_accepted_and_ignored() {
        let (_session, mut incoming, mut cw, mut cr) = setup();
        // SETTINGS: one entry (INITIAL_WINDOW_SIZE = 64 KiB); WINDOW_UPDATE for stream 1.
        cw.control(TYPE_SETTINGS, 0, &[0, 0, 0, 1, 0, 0, 0, 7, 0, 1, 0, 0])
            .await;
        cw.syn_stream(1, 0, &[]).await;
        cw.control(TYPE_WINDOW_UPDATE, 0, &[0, 0, 0, 1, 0, 1, 0, 0])
            .await;
        cw.control(TYPE_PING, 0, &9u32.to_be_bytes()).await;
        let s = accept(&mut incoming).await;
        assert_eq!(s.id(), 1);
        match cr.next().await {
            Some(Frame::Control { ty: TYPE_PING, .. }) => {}
            other => panic!("the session should still answer, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn client_reset_ends_the_reader_and_fails_writes() {
        let (_session, mut incoming, mut cw, _cr) = setup();
        cw.syn_stream(1, 0, &[]).await;
        let s = accept(&mut incoming).await;
        s.reply().await.unwrap();
        let (mut r, mut w) = s.split();
        cw.data(1, b"partial", false).await;
        cw.rst(1, RST_CANCEL).await;
        let mut got = Vec::new();
        timeout(T, r.read_to_end(&mut got))
            .await
            .expect("EOF after RST")
            .unwrap();
        assert!(b"partial".starts_with(&got));
        assert_eq!(
            w.write_all(b"x").await.unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
    }

    #[tokio::test]
    async fn server_reset_sends_rst_cancel() {
        let (_session, mut incoming, mut cw, mut cr) = setup();
        cw.syn_stream(3, 0, &[]).await;
        let s = accept(&mut incoming).await;
        s.reply().await.unwrap();
        let (_r, mut w) = s.split();
        w.reset();
        assert_eq!(cr.syn_reply().await.0, 3);
        assert_eq!(cr.rst_stream().await, (3, 5), "RST_STREAM CANCEL");
        assert!(w.write_all(b"x").await.is_err());
    }

    #[tokio::test]
    async fn even_or_reused_stream_ids_are_refused() {
        let (_session, mut incoming, mut cw, mut cr) = setup();
        cw.syn_stream(2, 0, &[]).await;
        cw.syn_stream(5, 0, &[]).await;
        cw.syn_stream(3, 0, &[]).await;
        assert_eq!(accept(&mut incoming).await.id(), 5);
        for want in [2u32, 3] {
            assert_eq!(cr.rst_stream().await, (want, RST_PROTOCOL_ERROR));
        }
    }

    #[tokio::test]
    async fn streams_after_client_goaway_are_refused() {
        let (_session, mut incoming, mut cw, mut cr) = setup();
        cw.control(TYPE_GOAWAY, 0, &[0, 0, 0, 0, 0, 0, 0, 0]).await;
        cw.syn_stream(1, 0, &[]).await;
        assert_eq!(cr.rst_stream().await, (1, 3), "RST_STREAM REFUSED_STREAM");
        assert!(incoming.try_recv().is_err());
    }

    #[tokio::test]
    async fn streams_nobody_accepts_are_refused() {
        let (_session, incoming, mut cw, mut cr) = setup();
        drop(incoming);
        cw.syn_stream(1, 0, &[]).await;
        assert_eq!(cr.rst_stream().await, (1, 3), "RST_STREAM REFUSED_STREAM");
    }

    async fn expect_protocol_goaway_and_end(
        session: Session,
        mut incoming: mpsc::Receiver<Stream>,
        mut cr: ClientR,
    ) {
        timeout(T, session.closed())
            .await
            .expect("the session ends");
        assert!(timeout(T, incoming.recv()).await.unwrap().is_none());
        let mut saw_goaway = false;
        while let Some(f) = cr.next().await {
            if let Frame::Control {
                ty: TYPE_GOAWAY,
                payload,
                ..
            } = f
            {
                assert_eq!(&payload[4..], &GOAWAY_PROTOCOL_ERROR.to_be_bytes());
                saw_goaway = true;
            }
        }
        assert!(saw_goaway, "GOAWAY PROTOCOL_ERROR before the end");
    }

    #[tokio::test]
    async fn garbage_frame_ends_the_session_without_panic() {
        let (session, incoming, mut cw, cr) = setup();
        // A control frame of version 2 (SPDY/2).
        cw.raw(&[0x80, 0x02, 0x00, 0x01, 0, 0, 0, 0]).await;
        expect_protocol_goaway_and_end(session, incoming, cr).await;
    }

    #[tokio::test]
    async fn bad_zlib_header_block_ends_the_session_without_panic() {
        let (session, incoming, mut cw, cr) = setup();
        let mut p = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        p.extend_from_slice(b"\x78\x9c this is not deflate");
        cw.control(TYPE_SYN_STREAM, 0, &p).await;
        expect_protocol_goaway_and_end(session, incoming, cr).await;
    }

    #[tokio::test]
    async fn short_control_frames_end_the_session_without_panic() {
        for (ty, payload) in [
            (TYPE_SYN_STREAM, &[0u8, 0, 0, 1][..]),
            (TYPE_RST_STREAM, &[0, 0, 0, 1][..]),
            (TYPE_PING, &[][..]),
            (TYPE_SETTINGS, &[0, 0, 0, 9][..]),
        ] {
            let (session, incoming, mut cw, cr) = setup();
            cw.control(ty, 0, payload).await;
            expect_protocol_goaway_and_end(session, incoming, cr).await;
        }
    }

    #[tokio::test]
    async fn close_flushes_queued_data_then_sends_goaway() {
        let (session, mut incoming, mut cw, mut cr) = setup();
        cw.syn_stream(1, 0, &[]).await;
        cw.syn_stream(3, 0, &[]).await;
        let s = accept(&mut incoming).await;
        let _s3 = accept(&mut incoming).await;
        s.reply().await.unwrap();
        let (_r, mut w) = s.split();
        w.write_all(b"last words").await.unwrap();
        w.shutdown().await.unwrap();
        let closer = session.clone();
        let closing = tokio::spawn(async move { closer.close().await });
        assert_eq!(cr.syn_reply().await.0, 1);
        assert_eq!(cr.data_until_fin(1).await, b"last words");
        match cr.next().await {
            Some(Frame::Control {
                ty: TYPE_GOAWAY,
                payload,
                ..
            }) => assert_eq!(
                &payload[..],
                &[0, 0, 0, 3, 0, 0, 0, 0],
                "last good stream 3"
            ),
            other => panic!("expected GOAWAY, got {other:?}"),
        }
        assert!(cr.next().await.is_none(), "the connection is closed");
        timeout(T, closing).await.unwrap().unwrap();
        assert!(timeout(T, incoming.recv()).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn client_hangup_ends_session_and_streams() {
        let (session, mut incoming, mut cw, cr) = setup();
        cw.syn_stream(1, 0, &[]).await;
        let s = accept(&mut incoming).await;
        let (mut r, mut w) = s.split();
        drop(cw);
        drop(cr);
        timeout(T, session.closed()).await.expect("closed");
        let mut got = Vec::new();
        timeout(T, r.read_to_end(&mut got)).await.unwrap().unwrap();
        assert!(timeout(T, incoming.recv()).await.unwrap().is_none());
        assert!(w.write_all(b"x").await.is_err());
    }

    #[tokio::test]
    async fn large_transfers_arrive_intact_both_ways() {
        const N: usize = 8 << 20;
        let (_session, mut incoming, mut cw, mut cr) = setup();
        cw.syn_stream(1, 0, &[("streamtype", "data")]).await;
        let s = accept(&mut incoming).await;
        s.reply().await.unwrap();
        // The server echoes the stream back, as port-forward's copy loops do.
        let echo = tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let n = tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
            n
        });
        let sent = pattern(N, 3);
        let to_send = sent.clone();
        let sender = tokio::spawn(async move {
            // Frames of varied sizes, some larger than the server's own.
            let mut off = 0;
            let mut i = 0;
            while off < to_send.len() {
                let n = [1, 1000, 32 * 1024, 200_000, 70_000][i % 5].min(to_send.len() - off);
                cw.data(1, &to_send[off..off + n], off + n == to_send.len())
                    .await;
                off += n;
                i += 1;
            }
            cw
        });
        assert_eq!(cr.syn_reply().await.0, 1);
        let got = timeout(Duration::from_secs(60), cr.data_until_fin(1))
            .await
            .unwrap();
        assert_eq!(got.len(), N);
        assert!(got == sent, "echoed data intact");
        assert_eq!(echo.await.unwrap(), N as u64);
        sender.await.unwrap();
    }
}
