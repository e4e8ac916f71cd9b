//! `Store`: the public handle. Opens the data directory, runs the state machine under openraft,
//! and runs the leader's background duties (lease expiry, periodic compaction).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use parking_lot::Mutex;

use crate::dir::{self, DirLock};
use crate::error::{Error, OpenError, Result};
use crate::lease::{Clock, Lessor, SystemClock};
use crate::mvcc::{Command, Mvcc, Output};
use crate::raft::{self, LocalRouter, LogStore, NodeId, Raft, StateMachine};
use crate::types::*;
use crate::watch::WatchStream;

/// Configuration of a [`Store`]. Start from [`StoreConfig::new`].
#[derive(Clone)]
pub struct StoreConfig {
    /// Data directory (created if missing).
    pub dir: PathBuf,
    /// Raft node id of this server.
    pub node_id: NodeId,
    /// Address other servers reach this one at (recorded in the raft membership).
    pub advertise: String,
    /// Initialise a one-voter cluster on first start. `false` for a server that joins another.
    pub bootstrap: bool,
    /// sled page cache size in bytes.
    pub cache_capacity_bytes: u64,
    /// Largest accepted request (keys + values), as etcd's `--max-request-bytes`.
    pub max_request_bytes: usize,
    /// Keep at least this much history; `None` disables automatic compaction.
    pub compaction_window: Option<Duration>,
    /// Build a raft snapshot (and purge the log before it) after this many log entries...
    pub snapshot_after_entries: u64,
    /// ...or once the log since the last purge holds this many bytes (batch entries can be
    /// large), so that the log's disk use stays bounded.
    pub snapshot_after_log_bytes: u64,
    /// How often the leader looks for expired leases.
    pub lease_check_interval: Duration,
    /// Time source for lease deadlines.
    pub clock: Arc<dyn Clock>,
    /// In-process raft network; stores that share one form a cluster inside one process.
    pub router: Option<LocalRouter>,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("dir", &self.dir)
            .field("node_id", &self.node_id)
            .field("cache_capacity_bytes", &self.cache_capacity_bytes)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("compaction_window", &self.compaction_window)
            .finish_non_exhaustive()
    }
}

/// Default page cache: small, for edge devices.
pub const DEFAULT_CACHE_CAPACITY: u64 = 32 << 20;
/// Default request limit: 1.5 MiB, as etcd.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 3 << 19;
/// Default history window: 5 minutes, as kube-apiserver's compaction interval.
pub const DEFAULT_COMPACTION_WINDOW: Duration = Duration::from_secs(300);

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            node_id: 1,
            advertise: String::new(),
            bootstrap: true,
            cache_capacity_bytes: DEFAULT_CACHE_CAPACITY,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            compaction_window: Some(DEFAULT_COMPACTION_WINDOW),
            snapshot_after_entries: 10_000,
            snapshot_after_log_bytes: 64 << 20,
            lease_check_interval: Duration::from_millis(500),
            clock: Arc::new(SystemClock::default()),
            router: None,
        }
    }
}

/// A write waiting to be proposed.
struct Proposal {
    cmd: Command,
    size: usize,
    done: tokio::sync::oneshot::Sender<Result<Output>>,
}

/// Most commands and bytes batched into one log entry.
const MAX_BATCH: usize = 1024;
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Log entries proposed but not yet applied. openraft 0.9 appends and fsyncs one entry at a
/// time, so concurrent writes share an fsync only if they share an entry: the proposer keeps
/// few entries in flight and packs everything that queued meanwhile into the next one.
const MAX_IN_FLIGHT: usize = 2;

struct Inner {
    node_id: NodeId,
    proposals: tokio::sync::mpsc::Sender<Proposal>,
    /// Entries in flight (shared by the proposer and the direct path).
    slots: Arc<tokio::sync::Semaphore>,
    raft: Raft,
    mvcc: Arc<Mvcc>,
    lessor: Arc<Lessor>,
    db: sled::Db,
    router: LocalRouter,
    dir: PathBuf,
    max_request_bytes: usize,
    durable: Arc<raft::Durable>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    lock: Mutex<Option<DirLock>>,
    lease_seq: AtomicU64,
}

/// The embedded store. Cheap to clone; all clones share one open store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .field("node_id", &self.inner.node_id)
            .finish()
    }
}

fn open_err(dir: &Path, e: sled::Error) -> OpenError {
    match e {
        sled::Error::Io(source) => OpenError::Io {
            path: dir.to_path_buf(),
            source,
        },
        other => OpenError::Corrupt {
            path: dir.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

fn map_write_err(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Error {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Error::NotLeader {
            leader: f.leader_id,
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Error::Internal(e.to_string())
        }
        RaftError::Fatal(_) => Error::ShuttingDown,
    }
}

fn map_read_err(e: RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>) -> Error {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => Error::NotLeader {
            leader: f.leader_id,
        },
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => {
            Error::Internal(format!("no quorum: {q}"))
        }
        RaftError::Fatal(_) => Error::ShuttingDown,
    }
}

/// Mixes a counter into a 63-bit positive id (splitmix64).
fn lease_id_from(seed: u64) -> LeaseId {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ((z >> 1) as i64).max(1)
}

impl Store {
    /// Opens (or creates) the store in `cfg.dir`, replays the raft log, and on a bootstrapping
    /// server waits until it leads its one-voter group.
    pub async fn open(cfg: StoreConfig) -> Result<Store, OpenError> {
        let dir = cfg.dir.clone();
        let lock = dir::prepare(&dir)?;
        let sled_dir = dir.join("sled");
        let db = sled::Config::new()
            .path(&sled_dir)
            .cache_capacity(cfg.cache_capacity_bytes)
            .flush_every_ms(None)
            .open()
            .map_err(|e| open_err(&dir, e))?;
        let tree = raft::open_active_tree(&db).map_err(|e| open_err(&dir, e))?;
        let mvcc =
            Arc::new(
                Mvcc::load(tree, dir.clone()).map_err(|detail| OpenError::Corrupt {
                    path: dir.clone(),
                    detail,
                })?,
            );
        let lessor = Arc::new(Lessor::new(cfg.clock.clone()));
        let log = LogStore::open(&db, &sled_dir).map_err(|e| open_err(&dir, e))?;
        let durable = log.durable();
        let sm = StateMachine::new(mvcc.clone(), lessor.clone(), db.clone(), &dir).map_err(
            |source| OpenError::Io {
                path: dir.join("snapshots"),
                source,
            },
        )?;
        let raft_err = |detail: String| OpenError::Raft {
            path: dir.clone(),
            detail,
        };
        let config = openraft::Config {
            cluster_name: "k3rs".into(),
            heartbeat_interval: 100,
            election_timeout_min: 400,
            election_timeout_max: 800,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_after_entries.max(1)),
            max_in_snapshot_log_to_keep: 1000.min(cfg.snapshot_after_entries),
            purge_batch_size: 512,
            max_payload_entries: 512,
            ..Default::default()
        }
        .validate()
        .map_err(|e| raft_err(e.to_string()))?;
        let router = cfg.router.clone().unwrap_or_default();
        let raft = Raft::new(
            cfg.node_id,
            Arc::new(config),
            router.clone(),
            log.clone(),
            sm,
        )
        .await
        .map_err(|e| raft_err(e.to_string()))?;
        router.add(cfg.node_id, raft.clone());
        let (proposals, proposal_rx) = tokio::sync::mpsc::channel(4 * MAX_BATCH);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        let proposer_task = tokio::spawn(proposer(raft.clone(), proposal_rx, slots.clone()));
        let store = Store {
            inner: Arc::new(Inner {
                node_id: cfg.node_id,
                proposals,
                slots,
                raft: raft.clone(),
                mvcc: mvcc.clone(),
                lessor: lessor.clone(),
                db,
                router,
                dir: dir.clone(),
                max_request_bytes: cfg.max_request_bytes,
                durable,
                tasks: Mutex::new(vec![proposer_task]),
                lock: Mutex::new(Some(lock)),
                lease_seq: AtomicU64::new(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0),
                ),
            }),
        };
        if let Err(e) = store.start(&cfg).await {
            store.clone().shutdown().await;
            return Err(raft_err(e));
        }
        Ok(store)
    }

    async fn start(&self, cfg: &StoreConfig) -> Result<(), String> {
        let raft = &self.inner.raft;
        let id = self.inner.node_id;
        let initialized = raft.is_initialized().await.map_err(|e| e.to_string())?;
        if cfg.bootstrap && !initialized {
            // A one-voter initialize elects this node at once.
            let mut members = BTreeMap::new();
            members.insert(id, BasicNode::new(cfg.advertise.clone()));
            raft.initialize(members).await.map_err(|e| e.to_string())?;
        }
        // Read the membership inside the raft core: published metrics may lag behind.
        let voters: BTreeSet<NodeId> = raft
            .with_raft_state(|st| st.membership_state.effective().voter_ids().collect())
            .await
            .map_err(|e| e.to_string())?;
        let sole_voter = voters.len() == 1 && voters.contains(&id);
        if sole_voter {
            if initialized {
                // Restart: do not sit out an election timeout, nobody else can win.
                raft.trigger().elect().await.map_err(|e| e.to_string())?;
            }
            raft.wait(Some(Duration::from_secs(30)))
                .metrics(
                    |m| m.current_leader == Some(id) && m.state == ServerState::Leader,
                    "become leader",
                )
                .await
                .map_err(|e| format!("did not become leader of its own one-voter group: {e}"))?;
            raft.ensure_linearizable()
                .await
                .map_err(|e| format!("could not catch up the state machine: {e}"))?;
        }
        self.inner.lessor.promote(&self.inner.mvcc.leases());
        let weak = Arc::downgrade(&self.inner);
        let mut tasks = self.inner.tasks.lock();
        tasks.push(tokio::spawn(lease_loop(
            weak.clone(),
            cfg.lease_check_interval,
        )));
        if let Some(window) = cfg.compaction_window {
            tasks.push(tokio::spawn(compaction_loop(weak.clone(), window)));
        }
        tasks.push(tokio::spawn(log_size_loop(
            weak.clone(),
            cfg.snapshot_after_log_bytes,
        )));
        tasks.push(tokio::spawn(leadership_loop(weak)));
        Ok(())
    }

    /// Stops raft and the background tasks and flushes. The data directory is released when
    /// the last clone of this handle (and every watch stream) is dropped.
    pub async fn shutdown(self) {
        for t in self.inner.tasks.lock().drain(..) {
            t.abort();
        }
        let _ = self.inner.raft.shutdown().await;
        if let Err(e) = self.inner.mvcc.commit_point() {
            tracing::warn!(error = %e.0, "writing the final commit point failed");
        }
        self.inner.router.remove(self.inner.node_id);
        let _ = self.inner.db.flush_async().await;
        self.inner.lock.lock().take();
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The raft handle, for membership changes and metrics.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The revision of the latest write applied on this server.
    pub fn current_revision(&self) -> Revision {
        self.inner.mvcc.current_revision()
    }

    /// The revision a linearizable read would see now (confirms leadership first).
    pub async fn read_revision(&self) -> Result<Revision> {
        self.linearize().await?;
        Ok(self.inner.mvcc.current_revision())
    }

    /// Revisions before this one are gone from history.
    pub fn compact_revision(&self) -> Revision {
        self.inner.mvcc.compact_revision()
    }

    fn check_size(&self, size: usize) -> Result<()> {
        if size > self.inner.max_request_bytes {
            return Err(Error::RequestTooLarge {
                size,
                limit: self.inner.max_request_bytes,
            });
        }
        Ok(())
    }

    /// Proposes a command and waits for its result. While this server is between terms (an
    /// election it will win, or has just won) the write is retried, boundedly.
    async fn write(&self, cmd: Command, size: usize) -> Result<Output> {
        let raft = &self.inner.raft;
        let me = self.inner.node_id;
        for attempt in 0..5 {
            let direct = if self.inner.slots.available_permits() == MAX_IN_FLIGHT {
                // Nothing in flight: propose from this task, skipping the proposer's hops.
                self.inner.slots.clone().try_acquire_owned().ok()
            } else {
                None
            };
            if let Some(permit) = direct {
                let res = match raft.client_write_ff(cmd.clone()).await {
                    Err(_) => Err(Error::ShuttingDown),
                    Ok(rx) => match rx.await {
                        Err(_) => Err(Error::ShuttingDown),
                        Ok(Err(e)) => Err(map_write_err(RaftError::APIError(e))),
                        Ok(Ok(resp)) => resp.data.0,
                    },
                };
                drop(permit);
                match res {
                    Err(Error::NotLeader { leader })
                        if attempt < 4 && leader.is_none_or(|l| l == me) =>
                    {
                        wait_for_leader(raft).await;
                        continue;
                    }
                    other => return other,
                }
            }
            let (done, rx) = tokio::sync::oneshot::channel();
            let proposal = Proposal {
                cmd: cmd.clone(),
                size,
                done,
            };
            if self.inner.proposals.send(proposal).await.is_err() {
                return Err(Error::ShuttingDown);
            }
            match rx.await.unwrap_or(Err(Error::ShuttingDown)) {
                Err(Error::NotLeader { leader })
                    if attempt < 4 && leader.is_none_or(|l| l == me) =>
                {
                    wait_for_leader(raft).await;
                }
                other => return other,
            }
        }
        Err(Error::NotLeader { leader: None })
    }

    async fn linearize(&self) -> Result<()> {
        self.inner
            .raft
            .ensure_linearizable()
            .await
            .map(|_| ())
            .map_err(map_read_err)
    }

    /// Reads a range. Linearizable unless `req.serializable`.
    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        self.check_size(req.range.byte_len())?;
        if !req.serializable {
            self.linearize().await?;
        }
        self.inner.mvcc.range(&req)
    }

    /// The current value of one key (linearizable).
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<KeyValue>> {
        Ok(self
            .range(RangeRequest::new(KeyRange::key(key)))
            .await?
            .kvs
            .pop())
    }

    pub async fn put(&self, req: PutRequest) -> Result<PutResponse> {
        self.check_size(req.key.len() + req.value.len())?;
        if req.key.is_empty() {
            return Err(Error::EmptyKey);
        }
        let size = req.key.len() + req.value.len();
        match self.write(Command::Put(req), size).await? {
            Output::Put(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    pub async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        self.check_size(req.range.byte_len())?;
        let size = req.range.byte_len();
        match self.write(Command::DeleteRange(req), size).await? {
            Output::DeleteRange(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        let size: usize = req
            .compare
            .iter()
            .map(|c| {
                c.key.len()
                    + match &c.target {
                        CompareTarget::Value(v) => v.len(),
                        _ => 8,
                    }
            })
            .chain(
                req.success
                    .iter()
                    .chain(req.failure.iter())
                    .map(|op| match op {
                        TxnOp::Put(p) => p.key.len() + p.value.len(),
                        TxnOp::DeleteRange(d) => d.range.byte_len(),
                        TxnOp::Range(r) => r.range.byte_len(),
                    }),
            )
            .sum();
        self.check_size(size)?;
        match self.write(Command::Txn(req), size).await? {
            Output::Txn(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Grants a lease with a server-chosen id.
    pub async fn lease_grant(&self, ttl_seconds: i64) -> Result<LeaseGrantResponse> {
        for _ in 0..8 {
            let id = lease_id_from(self.inner.lease_seq.fetch_add(1, Ordering::Relaxed));
            match self.lease_grant_with_id(id, ttl_seconds).await {
                Err(Error::LeaseExists(_)) => continue,
                other => return other,
            }
        }
        Err(Error::Internal("could not pick an unused lease id".into()))
    }

    /// Grants a lease with the caller's id.
    pub async fn lease_grant_with_id(
        &self,
        id: LeaseId,
        ttl_seconds: i64,
    ) -> Result<LeaseGrantResponse> {
        if !(1..=crate::lease::MAX_TTL_SECONDS).contains(&ttl_seconds) {
            return Err(Error::InvalidTtl(ttl_seconds));
        }
        match self
            .write(Command::LeaseGrant { id, ttl_seconds }, 16)
            .await?
        {
            Output::LeaseGrant(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Restarts a lease's countdown; returns its TTL. Only the leader keeps deadlines.
    pub async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64> {
        self.linearize().await?;
        let ttl = self
            .inner
            .mvcc
            .lease_ttl(id)
            .ok_or(Error::LeaseNotFound(id))?;
        self.inner.lessor.renew(id, ttl);
        Ok(ttl)
    }

    /// Revokes a lease and deletes its keys (in one revision).
    pub async fn lease_revoke(&self, id: LeaseId) -> Result<LeaseRevokeResponse> {
        match self.write(Command::LeaseRevoke { id }, 8).await? {
            Output::LeaseRevoke(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    pub async fn lease_time_to_live(&self, id: LeaseId) -> Result<LeaseTimeToLive> {
        self.linearize().await?;
        let ttl = self
            .inner
            .mvcc
            .lease_ttl(id)
            .ok_or(Error::LeaseNotFound(id))?;
        let remaining = self
            .inner
            .lessor
            .remaining_millis(id)
            .map_or(ttl, |ms| (ms as i64 + 999) / 1000);
        Ok(LeaseTimeToLive {
            id,
            granted_ttl_seconds: ttl,
            remaining_seconds: remaining,
            keys: self.inner.mvcc.lease_keys(id).unwrap_or_default(),
        })
    }

    /// All leases: (id, granted TTL).
    pub fn leases(&self) -> Vec<(LeaseId, i64)> {
        self.inner.mvcc.leases()
    }

    /// Revokes every lease whose deadline passed (the leader's lessor does this periodically;
    /// tests with a manual clock call it directly). Returns how many were revoked.
    pub async fn revoke_expired_leases(&self) -> Result<usize> {
        revoke_expired(&self.inner).await
    }

    /// Drops history before `revision`.
    pub async fn compact(&self, revision: Revision) -> Result<CompactResponse> {
        match self.write(Command::Compact { revision }, 8).await? {
            Output::Compact(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Watches a key range. Fails at once with `Compacted` when the start revision is gone.
    pub fn watch(&self, req: WatchRequest) -> Result<WatchStream> {
        self.check_size(req.range.byte_len())?;
        WatchStream::new(self.inner.mvcc.clone(), req)
    }

    /// Builds a raft snapshot now and waits for it.
    pub async fn snapshot(&self) -> Result<()> {
        let before = self.inner.raft.metrics().borrow().snapshot;
        self.inner
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let applied = self.inner.raft.metrics().borrow().last_applied;
        self.inner
            .raft
            .wait(Some(Duration::from_secs(60)))
            .metrics(
                |m| m.snapshot != before && m.snapshot >= applied.min(m.last_applied),
                "snapshot",
            )
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(())
    }

    /// Bytes the data directory takes on disk.
    pub fn disk_usage_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            let Ok(rd) = std::fs::read_dir(p) else {
                return 0;
            };
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => {
                        use std::os::unix::fs::MetadataExt;
                        m.blocks() * 512
                    }
                    Err(_) => 0,
                })
                .sum()
        }
        walk(&self.inner.dir)
    }

    /// fsyncs of the raft log so far (concurrent writes share them).
    pub fn fsync_count(&self) -> u64 {
        self.inner.durable.fsyncs()
    }

    /// Watchers currently registered as caught up.
    pub fn live_watchers(&self) -> usize {
        self.inner.mvcc.hub.watcher_count()
    }

    /// Versions kept in history (every key's retained revisions).
    pub fn history_len(&self) -> usize {
        self.inner.mvcc.history_len()
    }

    /// Flushes everything written so far to disk.
    pub async fn flush(&self) -> Result<()> {
        self.inner
            .db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(|e| Error::Internal(e.to_string()))
    }
}

/// Waits (boundedly) until some server leads.
async fn wait_for_leader(raft: &Raft) {
    let _ = raft
        .wait(Some(Duration::from_secs(2)))
        .metrics(
            |m| m.current_leader.is_some() && m.state != ServerState::Candidate,
            "a leader",
        )
        .await;
}

/// Packs queued writes into log entries (group commit) and hands out their results.
async fn proposer(
    raft: Raft,
    mut rx: tokio::sync::mpsc::Receiver<Proposal>,
    slots: Arc<tokio::sync::Semaphore>,
) {
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        // Everything that queued while the previous entries were in flight joins this one.
        let mut bytes = first.size;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.size;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let (cmd, waiters) = if batch.len() == 1 {
            let p = batch.pop().expect("one proposal");
            (p.cmd, vec![p.done])
        } else {
            let mut cmds = Vec::with_capacity(batch.len());
            let mut waiters = Vec::with_capacity(batch.len());
            for p in batch {
                cmds.push(p.cmd);
                waiters.push(p.done);
            }
            (Command::Batch(cmds), waiters)
        };
        let batched = waiters.len() > 1;
        match raft.client_write_ff(cmd).await {
            Err(_) => {
                for w in waiters {
                    let _ = w.send(Err(Error::ShuttingDown));
                }
            }
            Ok(response) => {
                tokio::spawn(async move {
                    let res = response.await;
                    drop(permit);
                    let res: Result<Output> = match res {
                        Err(_) => Err(Error::ShuttingDown),
                        Ok(Err(e)) => Err(map_write_err(RaftError::APIError(e))),
                        Ok(Ok(resp)) => resp.data.0,
                    };
                    match (batched, res) {
                        (true, Ok(Output::Batch(results))) if results.len() == waiters.len() => {
                            for (w, r) in waiters.into_iter().zip(results) {
                                let _ = w.send(r);
                            }
                        }
                        (true, Ok(other)) => {
                            let e = unexpected(other);
                            for w in waiters {
                                let _ = w.send(Err(e.clone()));
                            }
                        }
                        (_, Err(e)) => {
                            for w in waiters {
                                let _ = w.send(Err(e.clone()));
                            }
                        }
                        (false, Ok(out)) => {
                            for w in waiters {
                                let _ = w.send(Ok(out.clone()));
                            }
                        }
                    }
                });
            }
        }
    }
}

fn unexpected(o: Output) -> Error {
    Error::Internal(format!("unexpected state machine output {o:?}"))
}

async fn revoke_expired(inner: &Inner) -> Result<usize> {
    if inner.raft.current_leader().await != Some(inner.node_id) {
        return Ok(0);
    }
    let mut n = 0;
    for id in inner.lessor.expired() {
        let res = inner
            .raft
            .client_write(Command::LeaseRevoke { id })
            .await
            .map_err(map_write_err)?;
        match res.data.0 {
            Ok(_) => n += 1,
            Err(Error::LeaseNotFound(_)) => inner.lessor.forget(id),
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

async fn lease_loop(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = revoke_expired(&inner).await {
            tracing::warn!(error = %e, "lease expiry failed");
        }
    }
}

/// Keeps at least `window` of history: samples the revision every `window / 10` and compacts to
/// the newest sample that is at least `window` old.
async fn compaction_loop(inner: Weak<Inner>, window: Duration) {
    let step = (window / 10).max(Duration::from_millis(100));
    let mut samples: VecDeque<(Instant, Revision)> = VecDeque::new();
    let mut tick = tokio::time::interval(step);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        samples.push_back((now, inner.mvcc.current_revision()));
        let mut target = None;
        while let Some(&(t, rev)) = samples.front() {
            if now.duration_since(t) >= window {
                target = Some(rev);
                samples.pop_front();
            } else {
                break;
            }
        }
        let Some(rev) = target else { continue };
        if rev <= inner.mvcc.compact_revision()
            || inner.raft.current_leader().await != Some(inner.node_id)
        {
            continue;
        }
        match inner
            .raft
            .client_write(Command::Compact { revision: rev })
            .await
        {
            Ok(r) => match r.data.0 {
                Ok(_) => tracing::debug!(revision = rev, "periodic compaction"),
                Err(Error::Compacted { .. }) => {}
                Err(e) => tracing::warn!(error = %e, "periodic compaction failed"),
            },
            Err(e) => tracing::warn!(error = %e, "periodic compaction failed"),
        }
    }
}

/// Triggers a snapshot when the raft log grew past `limit` bytes since the last purge.
async fn log_size_loop(inner: Weak<Inner>, limit: u64) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let bytes = inner
            .durable
            .log_bytes_since_purge
            .load(std::sync::atomic::Ordering::Relaxed);
        if bytes >= limit {
            tracing::debug!(bytes, "raft log is large: snapshot");
            let before = inner.raft.metrics().borrow().snapshot;
            let _ = inner.raft.trigger().snapshot().await;
            // Do not re-trigger before the snapshot happened.
            let _ = inner
                .raft
                .wait(Some(Duration::from_secs(60)))
                .metrics(|m| m.snapshot != before, "snapshot")
                .await;
            inner
                .durable
                .log_bytes_since_purge
                .store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Gives every lease a full TTL whenever this server becomes leader.
async fn leadership_loop(inner: Weak<Inner>) {
    let mut metrics = match inner.upgrade() {
        Some(i) => i.raft.metrics(),
        None => return,
    };
    let mut was_leader = true; // promoted at start already
    loop {
        if metrics.changed().await.is_err() {
            return;
        }
        let Some(inner) = inner.upgrade() else { return };
        let is_leader = metrics.borrow().current_leader == Some(inner.node_id);
        if is_leader && !was_leader {
            inner.lessor.promote(&inner.mvcc.leases());
        }
        was_leader = is_leader;
    }
}

/// The store interface the API server is written against, so that another backend (an external
/// etcd) can sit behind it.
#[async_trait::async_trait]
pub trait Kv: Send + Sync + 'static {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse>;
    async fn put(&self, req: PutRequest) -> Result<PutResponse>;
    async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse>;
    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse>;
    async fn lease_grant(&self, ttl_seconds: i64) -> Result<LeaseGrantResponse>;
    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64>;
    async fn lease_revoke(&self, id: LeaseId) -> Result<LeaseRevokeResponse>;
    async fn compact(&self, revision: Revision) -> Result<CompactResponse>;
    async fn watch(
        &self,
        req: WatchRequest,
    ) -> Result<futures::stream::BoxStream<'static, Result<WatchMessage>>>;
    fn current_revision(&self) -> Revision;
}

#[async_trait::async_trait]
impl Kv for Store {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        Store::range(self, req).await
    }
    async fn put(&self, req: PutRequest) -> Result<PutResponse> {
        Store::put(self, req).await
    }
    async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        Store::delete_range(self, req).await
    }
    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        Store::txn(self, req).await
    }
    async fn lease_grant(&self, ttl_seconds: i64) -> Result<LeaseGrantResponse> {
        Store::lease_grant(self, ttl_seconds).await
    }
    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64> {
        Store::lease_keep_alive(self, id).await
    }
    async fn lease_revoke(&self, id: LeaseId) -> Result<LeaseRevokeResponse> {
        Store::lease_revoke(self, id).await
    }
    async fn compact(&self, revision: Revision) -> Result<CompactResponse> {
        Store::compact(self, revision).await
    }
    async fn watch(
        &self,
        req: WatchRequest,
    ) -> Result<futures::stream::BoxStream<'static, Result<WatchMessage>>> {
        use futures::StreamExt;
        Ok(Store::watch(self, req)?.into_stream().boxed())
    }
    fn current_revision(&self) -> Revision {
        Store::current_revision(self)
    }
}
