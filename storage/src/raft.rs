//! openraft glue: the type config, the raft log on sled with group-commit fsync, the MVCC state
//! machine adaptor with file snapshots, and an in-process network.
//!
//! Durability: `append` stores entries in sled, then flushes sled and fdatasyncs its file before
//! it reports the entries persisted; raft acknowledges a write only after that, so an
//! acknowledged write is on disk. openraft 0.9 persists one append at a time, so concurrent
//! writes share an fsync by sharing a log entry: `Store` packs them into batch entries.

// openraft's `StorageError` is large and is what its traits return.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::fmt::Debug;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftNetwork,
    RaftNetworkFactory, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::Error;
use crate::lease::Lessor;
use crate::mvcc::{self, Command, Mvcc, Output};

/// Result of applying one log entry, returned to the proposer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResult(pub Result<Output, Error>);

openraft::declare_raft_types!(
    /// Raft types of the k3rs store.
    pub TypeConfig:
        D = Command,
        R = ApplyResult,
        NodeId = u64,
        Node = BasicNode,
        Entry = Entry<TypeConfig>,
        SnapshotData = std::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type NodeId = u64;
type StorageResult<T> = Result<T, StorageError<NodeId>>;

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("serializing raft metadata to memory cannot fail")
}

fn dec<T: for<'a> Deserialize<'a>>(raw: &[u8]) -> Result<T, io::Error> {
    postcard::from_bytes(raw).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

// ---------------------------------------------------------------------------------------------
// Raft log

/// The raft log and vote, in sled trees `raft_log` and `raft_meta`.
#[derive(Clone)]
pub(crate) struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    durable: Arc<Durable>,
}

/// Makes everything written to sled so far durable.
pub(crate) struct Durable {
    db: sled::Db,
    /// sled's data file: sled itself only issues `sync_file_range`, which flushes neither the
    /// disk's write cache nor the file's size, so each flush is followed by an fdatasync.
    data_file: std::fs::File,
    fsyncs: std::sync::atomic::AtomicU64,
    /// Bytes appended to the raft log since the last purge (drives size-based snapshots).
    pub log_bytes_since_purge: std::sync::atomic::AtomicU64,
}

impl Durable {
    fn sync(&self) -> io::Result<()> {
        self.db.flush().map_err(io_err)?;
        self.data_file.sync_data()?;
        self.fsyncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    pub fn fsyncs(&self) -> u64 {
        self.fsyncs.load(std::sync::atomic::Ordering::Relaxed)
    }
}

const META_VOTE: &[u8] = b"vote";
const META_PURGED: &[u8] = b"last_purged";
const META_COMMITTED: &[u8] = b"committed";

impl LogStore {
    /// `sled_dir` is the sled database directory.
    pub fn open(db: &sled::Db, sled_dir: &Path) -> Result<LogStore, sled::Error> {
        let log = db.open_tree("raft_log")?;
        let meta = db.open_tree("raft_meta")?;
        let data_file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(sled_dir.join("db"))?;
        Ok(LogStore {
            log,
            meta,
            durable: Arc::new(Durable {
                db: db.clone(),
                data_file,
                fsyncs: Default::default(),
                log_bytes_since_purge: Default::default(),
            }),
        })
    }

    pub fn durable(&self) -> Arc<Durable> {
        self.durable.clone()
    }

    fn get_meta<T: for<'a> Deserialize<'a>>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        match self.meta.get(key).map_err(|e| StorageIOError::read(&e))? {
            None => Ok(None),
            Some(v) => Ok(Some(dec(&v).map_err(|e| StorageIOError::read(&e))?)),
        }
    }
}

fn index_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let lo = match range.start_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let hi = match range.end_bound() {
            Bound::Included(i) => Bound::Included(index_key(*i)),
            Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.log.range::<[u8; 8], _>((lo, hi)) {
            let (_, v) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            out.push(dec(&v).map_err(|e| StorageIOError::read_logs(&e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta(META_PURGED)?;
        let last = match self.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = dec(&v).map_err(|e| StorageIOError::read_logs(&e))?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.meta
            .insert(META_VOTE, enc(vote))
            .map_err(|e| StorageIOError::write_vote(&e))?;
        self.durable
            .sync()
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.get_meta(META_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.meta
            .insert(META_COMMITTED, enc(&committed))
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>(META_COMMITTED)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        // Plain inserts in index order (a sled batch would force a synchronous write of its
        // own): a crash keeps a prefix, never a hole, and nothing is acknowledged before the
        // flush below.
        let mut bytes = 0;
        for e in entries {
            let raw = enc(&e);
            bytes += raw.len() as u64;
            self.log
                .insert(&index_key(e.log_id.index)[..], raw)
                .map_err(|e| StorageIOError::write_logs(&e))?;
        }
        self.durable
            .log_bytes_since_purge
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        // openraft 0.9 waits for this callback before its next log IO anyway, so flushing
        // here, on the raft core's thread, saves a thread hop.
        callback.log_io_completed(self.durable.sync());
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Newest first, so that a crash part-way leaves a prefix.
        let mut keys = Vec::new();
        for item in self.log.range(index_key(log_id.index)..) {
            keys.push(item.map_err(|e| StorageIOError::write_logs(&e))?.0);
        }
        for k in keys.into_iter().rev() {
            self.log
                .remove(k)
                .map_err(|e| StorageIOError::write_logs(&e))?;
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.meta
            .insert(META_PURGED, enc(&log_id))
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.durable
            .log_bytes_since_purge
            .store(0, std::sync::atomic::Ordering::Relaxed);
        // Oldest first, after recording the new purge point.
        let mut keys = Vec::new();
        for item in self.log.range(..=index_key(log_id.index)) {
            keys.push(item.map_err(|e| StorageIOError::write_logs(&e))?.0);
        }
        for k in keys {
            self.log
                .remove(k)
                .map_err(|e| StorageIOError::write_logs(&e))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// State machine

/// Name of the tree that holds the active state machine (swapped on snapshot install).
const CONTROL_ACTIVE: &[u8] = b"active_sm_tree";

pub(crate) fn open_active_tree(db: &sled::Db) -> Result<sled::Tree, sled::Error> {
    let control = db.open_tree("control")?;
    let name = match control.get(CONTROL_ACTIVE)? {
        Some(n) => n.to_vec(),
        None => {
            control.insert(CONTROL_ACTIVE, b"sm-0".as_slice())?;
            b"sm-0".to_vec()
        }
    };
    db.open_tree(name)
}

#[derive(Clone)]
pub(crate) struct StateMachine {
    pub mvcc: Arc<Mvcc>,
    pub lessor: Arc<Lessor>,
    db: sled::Db,
    snapshot_dir: PathBuf,
    /// Held (shared) by a snapshot being built; compaction and snapshot install take it
    /// exclusively, so that a build never sees records disappear under it.
    snapshot_lock: Arc<tokio::sync::RwLock<()>>,
}

impl StateMachine {
    pub fn new(mvcc: Arc<Mvcc>, lessor: Arc<Lessor>, db: sled::Db, dir: &Path) -> io::Result<Self> {
        let snapshot_dir = dir.join("snapshots");
        std::fs::create_dir_all(&snapshot_dir)?;
        // Leftovers of interrupted transfers or builds.
        for e in std::fs::read_dir(&snapshot_dir)? {
            let e = e?;
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(StateMachine {
            mvcc,
            lessor,
            db,
            snapshot_dir,
            snapshot_lock: Arc::new(tokio::sync::RwLock::new(())),
        })
    }

    fn current_snapshot_path(&self) -> PathBuf {
        self.snapshot_dir.join("current.snap")
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let applied = match self
            .mvcc
            .applied()
            .map_err(|e| StorageIOError::read_state_machine(&io_err(e)))?
        {
            Some(v) => dec(&v).map_err(|e| StorageIOError::read_state_machine(&e))?,
            None => None,
        };
        let membership = match self
            .mvcc
            .meta(mvcc::META_MEMBERSHIP)
            .map_err(|e| StorageIOError::read_state_machine(&e))?
        {
            Some(v) => dec(&v).map_err(|e| StorageIOError::read_state_machine(&e))?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<ApplyResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut last = None;
        let mut n = 0;
        for entry in entries {
            n += 1;
            let log_id = entry.log_id;
            last = Some(log_id);
            match entry.payload {
                EntryPayload::Blank => out.push(ApplyResult(Ok(Output::None))),
                EntryPayload::Membership(m) => {
                    self.mvcc
                        .set_membership(enc(&StoredMembership::new(Some(log_id), m)))
                        .map_err(|e| StorageIOError::apply(log_id, &io_err(e.0)))?;
                    out.push(ApplyResult(Ok(Output::None)));
                }
                EntryPayload::Normal(Command::Batch(cmds)) => {
                    let _exclusive = if cmds.iter().any(|c| matches!(c, Command::Compact { .. })) {
                        Some(self.snapshot_lock.write().await)
                    } else {
                        None
                    };
                    let mut results = Vec::with_capacity(cmds.len());
                    for cmd in &cmds {
                        results.push(self.apply_one(log_id, cmd)?);
                    }
                    out.push(ApplyResult(Ok(Output::Batch(results))));
                }
                EntryPayload::Normal(cmd) => {
                    let _exclusive = match cmd {
                        Command::Compact { .. } => Some(self.snapshot_lock.write().await),
                        _ => None,
                    };
                    out.push(ApplyResult(self.apply_one(log_id, &cmd)?));
                }
            }
        }
        if let Some(log_id) = last {
            self.mvcc
                .applied_up_to(enc(&Some(log_id)), n)
                .map_err(|e| StorageIOError::apply(log_id, &io_err(e.0)))?;
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let guard = self.snapshot_lock.clone().read_owned().await;
        if let Err(e) = self.mvcc.commit_point() {
            tracing::error!(error = %e.0, "writing a commit point before a snapshot failed");
        }
        SnapshotBuilder {
            sm: self.clone(),
            view: self.mvcc.meta_view(),
            tree: self.mvcc.tree(),
            _guard: guard,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<std::fs::File>> {
        let path = self
            .snapshot_dir
            .join(format!("recv-{}.tmp", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        // The open handle keeps the data; the name is not needed any more.
        let _ = std::fs::remove_file(&path);
        Ok(Box::new(f))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<std::fs::File>,
    ) -> StorageResult<()> {
        let _exclusive = self.snapshot_lock.write().await;
        let sm = self.clone();
        let meta2 = meta.clone();
        tokio::task::spawn_blocking(move || sm.install_blocking(&meta2, *snapshot))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &io_err(e)))?
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.lessor.promote(&self.mvcc.leases());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let path = self.current_snapshot_path();
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageIOError::read_snapshot(None, &e).into()),
        };
        let header = read_header(&mut f).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        f.rewind()
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(Some(Snapshot {
            meta: header.meta,
            snapshot: Box::new(f),
        }))
    }
}

impl StateMachine {
    fn apply_one(
        &self,
        log_id: LogId<NodeId>,
        cmd: &Command,
    ) -> StorageResult<Result<Output, Error>> {
        let res = self
            .mvcc
            .apply(cmd)
            .map_err(|e| StorageIOError::apply(log_id, &io_err(e.0)))?;
        match (cmd, &res) {
            (Command::LeaseGrant { id, ttl_seconds }, Ok(_)) => {
                self.lessor.renew(*id, *ttl_seconds)
            }
            (Command::LeaseRevoke { id }, _) => self.lessor.forget(*id),
            _ => {}
        }
        Ok(res)
    }

    fn install_blocking(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        mut file: std::fs::File,
    ) -> io::Result<()> {
        file.rewind()?;
        // Verify the whole file before touching the state machine.
        verify_snapshot(&mut file)?;
        file.rewind()?;
        let control = self.db.open_tree("control").map_err(io_err)?;
        let old_name = control
            .get(CONTROL_ACTIVE)
            .map_err(io_err)?
            .map(|v| v.to_vec())
            .unwrap_or_else(|| b"sm-0".to_vec());
        let n: u64 = String::from_utf8_lossy(&old_name)
            .trim_start_matches("sm-")
            .parse()
            .unwrap_or(0);
        let new_name = format!("sm-{}", n + 1);
        let _ = self.db.drop_tree(new_name.as_bytes());
        let tree = self.db.open_tree(new_name.as_bytes()).map_err(io_err)?;
        let mut reader = BufReader::new(&mut file);
        let header = read_header(&mut reader)?;
        // The new tree becomes active only after it is complete and flushed.
        read_entries(&mut reader, |k, v| {
            tree.insert(k, v).map(|_| ()).map_err(io_err)
        })?;
        // The snapshot's own raft position is authoritative.
        let commit = mvcc::CommitRecord {
            applied: Some(enc(&meta.last_log_id)),
            revision: header.current,
            compact: header.compact,
            removed_leases: Vec::new(),
        };
        tree.insert(codec::meta_key(mvcc::META_COMMIT), enc(&commit))
            .map_err(io_err)?;
        tree.insert(
            codec::meta_key(mvcc::META_MEMBERSHIP),
            enc(&meta.last_membership),
        )
        .map_err(io_err)?;
        self.db.flush().map_err(io_err)?;
        control
            .insert(CONTROL_ACTIVE, new_name.as_bytes())
            .map_err(io_err)?;
        self.db.flush().map_err(io_err)?;
        self.mvcc
            .replace_tree(tree)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let _ = self.db.drop_tree(&old_name);
        // Keep the installed snapshot as the current one.
        file.rewind()?;
        let tmp = self.snapshot_dir.join("install.tmp");
        {
            let mut out = std::fs::File::create(&tmp)?;
            io::copy(&mut file, &mut out)?;
            out.sync_all()?;
        }
        std::fs::rename(&tmp, self.current_snapshot_path())?;
        sync_dir(&self.snapshot_dir)?;
        tracing::info!(
            snapshot = %header.meta.snapshot_id,
            revision = header.current,
            "installed snapshot"
        );
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

// ---------------------------------------------------------------------------------------------
// Snapshot file
//
// "K3RSSNP1" | u32 header length | header (postcard) | entries | 0xFFFFFFFF | crc32 (all before)
// entry: u32 key length | key | u32 value length | value

const SNAP_MAGIC: &[u8; 8] = b"K3RSSNP1";
const SNAP_END: u32 = u32::MAX;

#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    meta: SnapshotMeta<NodeId, BasicNode>,
    current: i64,
    compact: i64,
}

struct CrcWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_entry(w: &mut impl Write, k: &[u8], v: &[u8]) -> io::Result<()> {
    w.write_all(&(k.len() as u32).to_le_bytes())?;
    w.write_all(k)?;
    w.write_all(&(v.len() as u32).to_le_bytes())?;
    w.write_all(v)
}

fn read_header(r: &mut impl Read) -> io::Result<SnapshotHeader> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != SNAP_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a k3rs snapshot (bad magic)",
        ));
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 64 << 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "snapshot header too large",
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    dec(&buf)
}

fn read_entries(
    r: &mut impl Read,
    mut f: impl FnMut(Vec<u8>, Vec<u8>) -> io::Result<()>,
) -> io::Result<()> {
    loop {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let klen = u32::from_le_bytes(len);
        if klen == SNAP_END {
            return Ok(());
        }
        let mut k = vec![0u8; klen as usize];
        r.read_exact(&mut k)?;
        r.read_exact(&mut len)?;
        let mut v = vec![0u8; u32::from_le_bytes(len) as usize];
        r.read_exact(&mut v)?;
        f(k, v)?;
    }
}

/// Checks the trailing checksum of a snapshot file.
fn verify_snapshot(file: &mut std::fs::File) -> io::Result<()> {
    let len = file.seek(io::SeekFrom::End(0))?;
    if len < 12 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "snapshot truncated",
        ));
    }
    file.rewind()?;
    let mut crc = crc32fast::Hasher::new();
    let mut r = BufReader::new(&mut *file).take(len - 4);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
    }
    let mut tail = [0u8; 4];
    file.seek(io::SeekFrom::End(-4))?;
    file.read_exact(&mut tail)?;
    if crc.finalize() != u32::from_le_bytes(tail) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "snapshot checksum mismatch",
        ));
    }
    Ok(())
}

pub(crate) struct SnapshotBuilder {
    sm: StateMachine,
    view: Result<mvcc::MetaView, sled::Error>,
    tree: sled::Tree,
    _guard: tokio::sync::OwnedRwLockReadGuard<()>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let view = match &self.view {
            Ok(v) => v,
            Err(e) => return Err(StorageIOError::read_state_machine(e).into()),
        };
        let last_log_id: Option<LogId<NodeId>> = match &view.applied {
            Some(v) => dec(v).map_err(|e| StorageIOError::read_state_machine(&e))?,
            None => None,
        };
        let membership: StoredMembership<NodeId, BasicNode> = match &view.membership {
            Some(v) => dec(v).map_err(|e| StorageIOError::read_state_machine(&e))?,
            None => StoredMembership::default(),
        };
        let snapshot_id = match &last_log_id {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, view.current),
            None => format!("0-0-{}", view.current),
        };
        let header = SnapshotHeader {
            meta: SnapshotMeta {
                last_log_id,
                last_membership: membership,
                snapshot_id,
            },
            current: view.current,
            compact: view.compact,
        };
        let leases = view.leases.clone();
        let tree = self.tree.clone();
        let sm = self.sm.clone();
        let header_bytes = enc(&header);
        let meta = header.meta.clone();
        let path = tokio::task::spawn_blocking(move || -> io::Result<PathBuf> {
            let tmp = sm.snapshot_dir.join("build.tmp");
            let file = std::fs::File::create(&tmp)?;
            let mut w = CrcWriter {
                inner: BufWriter::with_capacity(256 << 10, file),
                crc: crc32fast::Hasher::new(),
            };
            w.write_all(SNAP_MAGIC)?;
            w.write_all(&(header_bytes.len() as u32).to_le_bytes())?;
            w.write_all(&header_bytes)?;
            let commit = mvcc::CommitRecord {
                applied: Some(enc(&header.meta.last_log_id)),
                revision: header.current,
                compact: header.compact,
                removed_leases: Vec::new(),
            };
            write_entry(&mut w, &codec::meta_key(mvcc::META_COMMIT), &enc(&commit))?;
            write_entry(
                &mut w,
                &codec::meta_key(mvcc::META_MEMBERSHIP),
                &enc(&header.meta.last_membership),
            )?;
            for (id, ttl) in leases {
                write_entry(&mut w, &codec::lease_key(id), &codec::encode_i64(ttl))?;
            }
            let hi = codec::record_key(codec::Rev::new(header.current, u32::MAX));
            for item in tree.range(&[codec::RECORD_PREFIX][..]..=&hi[..]) {
                let (k, v) = item.map_err(io_err)?;
                write_entry(&mut w, &k, &v)?;
            }
            w.write_all(&SNAP_END.to_le_bytes())?;
            let crc = w.crc.clone().finalize();
            let mut inner = w.inner.into_inner().map_err(|e| e.into_error())?;
            inner.write_all(&crc.to_le_bytes())?;
            inner.sync_all()?;
            let dest = sm.current_snapshot_path();
            std::fs::rename(&tmp, &dest)?;
            sync_dir(&sm.snapshot_dir)?;
            // The state machine is not fsynced on apply; once a snapshot exists the raft log
            // before it may be purged, so make the state machine durable first.
            sm.db.flush().map_err(io_err)?;
            Ok(dest)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, &io_err(e)))?
        .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let f = std::fs::File::open(&path).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        tracing::debug!(snapshot = %meta.snapshot_id, "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(f),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// In-process network

/// Routes raft messages between stores in one process (single-server clusters, tests). A
/// network transport between servers plugs in beside it.
#[derive(Clone, Default)]
pub struct LocalRouter {
    nodes: Arc<RwLock<HashMap<NodeId, Raft>>>,
}

impl std::fmt::Debug for LocalRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<_> = self.nodes.read().keys().copied().collect();
        f.debug_struct("LocalRouter").field("nodes", &ids).finish()
    }
}

impl LocalRouter {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn add(&self, id: NodeId, raft: Raft) {
        self.nodes.write().insert(id, raft);
    }

    pub(crate) fn remove(&self, id: NodeId) {
        self.nodes.write().remove(&id);
    }

    fn get(&self, id: NodeId) -> Result<Raft, Unreachable> {
        self.nodes.read().get(&id).cloned().ok_or_else(|| {
            Unreachable::new(&io::Error::new(
                io::ErrorKind::NotConnected,
                format!("node {id} is not running"),
            ))
        })
    }
}

pub struct LocalConnection {
    router: LocalRouter,
    target: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for LocalRouter {
    type Network = LocalConnection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        LocalConnection {
            router: self.clone(),
            target,
        }
    }
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl RaftNetwork<TypeConfig> for LocalConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let raft = self.router.get(self.target)?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        let raft = self.router.get(self.target)?;
        raft.vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let raft = self.router.get(self.target)?;
        let mut dest = raft
            .begin_receiving_snapshot()
            .await
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let mut src = snapshot.snapshot;
        let copied = tokio::task::spawn_blocking(move || -> io::Result<std::fs::File> {
            src.rewind()?;
            io::copy(&mut *src, &mut *dest)?;
            dest.flush()?;
            Ok(*dest)
        })
        .await
        .map_err(|e| StreamingError::Network(NetworkError::new(&io_err(e))))?
        .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        raft.install_full_snapshot(
            vote,
            Snapshot {
                meta: snapshot.meta,
                snapshot: Box::new(copied),
            },
        )
        .await
        .map_err(|e| StreamingError::RemoteError(RemoteError::new(self.target, e)))
    }
}
