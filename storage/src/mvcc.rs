//! The MVCC key-value state machine: a deterministic `apply(command) -> result` over one sled
//! tree, plus an in-memory key index rebuilt at open.
//!
//! Layout of the state-machine tree (see `codec`):
//! - `r<main:8><sub:4>` → one record per written version (etcd's bolt `key` bucket);
//! - `l<id:8>` → lease TTL;
//! - `m<name>` → meta values (current revision, compact revision, raft applied log id, membership).
//!
//! The index maps every key to the addresses of its versions still in history, as etcd's
//! `treeIndex` does, so that ranges at any retained revision are a walk of the index plus one
//! point read per returned key. Records are immutable once written; only compaction deletes them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::codec::{self, Record, Rev};
use crate::error::Error;
use crate::types::*;
use crate::watch::Hub;

/// A replicated write: the payload of one raft log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    LeaseGrant {
        id: LeaseId,
        ttl_seconds: i64,
    },
    LeaseRevoke {
        id: LeaseId,
    },
    Compact {
        revision: Revision,
    },
    /// Commands batched into one log entry (group commit), applied in order, each with its own
    /// revision and result.
    Batch(Vec<Command>),
}

/// The result of applying a [`Command`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    Compact(CompactResponse),
    /// Results of a [`Command::Batch`], in order.
    Batch(Vec<Result<Output, Error>>),
    /// Raft-internal entries (blank, membership) have no output.
    None,
}

/// The commit point of the state machine, written once after each applied group of raft
/// entries (see the crash-consistency note on [`Mvcc`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CommitRecord {
    /// The raft layer's encoding of the last applied log id.
    pub applied: Option<Vec<u8>>,
    pub revision: Revision,
    pub compact: Revision,
    /// Leases revoked since the previous commit point; their keys are removed after this
    /// record is written (and again at load, if a crash came in between).
    pub removed_leases: Vec<LeaseId>,
}

pub(crate) const META_COMMIT: &str = "commit";
pub(crate) const META_MEMBERSHIP: &str = "membership";

#[derive(Default)]
struct KeyHistory {
    /// Versions still in history, ascending; `true` marks a deletion.
    revs: Vec<(Rev, bool)>,
    /// Of the latest version, when it is live.
    create: i64,
    version: i64,
    lease: LeaseId,
}

impl KeyHistory {
    fn latest_live(&self) -> Option<Rev> {
        match self.revs.last() {
            Some(&(rev, false)) => Some(rev),
            _ => None,
        }
    }

    /// The version visible at `at`, if the key was live then.
    fn at(&self, at: Revision) -> Option<Rev> {
        let idx = self.revs.partition_point(|(r, _)| r.main <= at);
        if idx == 0 {
            return None;
        }
        match self.revs[idx - 1] {
            (rev, false) => Some(rev),
            (_, true) => None,
        }
    }
}

struct LeaseState {
    ttl: i64,
    keys: BTreeSet<Bytes>,
}

#[derive(Default)]
struct State {
    index: BTreeMap<Bytes, KeyHistory>,
    leases: HashMap<LeaseId, LeaseState>,
    current: Revision,
    compact: Revision,
    /// Leases revoked since the last commit point (their keys are still in the tree).
    removed_leases: Vec<LeaseId>,
    /// Raft position of the last applied entry, and entries applied since the commit point.
    last_applied: Option<Vec<u8>>,
    uncommitted_entries: u32,
}

/// Write a commit point after this many applied entries (and at snapshots and shutdown): a
/// crash replays at most this many entries.
const COMMIT_EVERY: u32 = 64;

/// Raft meta captured with a consistent view of the state machine.
pub(crate) struct MetaView {
    pub current: Revision,
    pub compact: Revision,
    pub applied: Option<Vec<u8>>,
    pub membership: Option<Vec<u8>>,
    pub leases: Vec<(LeaseId, i64)>,
}

/// Crash consistency: a command's effects are plain sled inserts and removes (sled's atomic
/// batches force a synchronous write per batch), and a [`CommitRecord`] written after each
/// applied group of raft entries is the commit point. Effects past the commit point that a crash
/// left behind are undone at load (records newer than the committed revision are dropped) or are
/// idempotent (lease grants; compaction removes records oldest first), and raft replays the
/// entries after `applied`, which, the state machine being deterministic, redoes them exactly.
pub(crate) struct Mvcc {
    tree: RwLock<sled::Tree>,
    state: RwLock<State>,
    pub(crate) hub: Hub,
    path: PathBuf,
}

/// A storage failure while applying: the replica cannot continue.
#[derive(Debug)]
pub(crate) struct Fatal(pub String);

impl From<sled::Error> for Fatal {
    fn from(e: sled::Error) -> Self {
        Fatal(format!("sled: {e}"))
    }
}

fn sled_err(e: sled::Error) -> Error {
    Error::Internal(format!("sled: {e}"))
}

fn range_bounds(range: &KeyRange) -> (Bound<Bytes>, Bound<Bytes>) {
    let lo = Bound::Included(range.start.clone());
    let hi = match &range.end {
        None => Bound::Included(range.start.clone()),
        Some(end) if end.is_empty() => Bound::Unbounded,
        Some(end) => Bound::Excluded(end.clone()),
    };
    (lo, hi)
}

fn range_is_empty(range: &KeyRange) -> bool {
    matches!(&range.end, Some(end) if !end.is_empty() && end[..] <= range.start[..])
}

impl Mvcc {
    /// Loads the state machine from `tree`, rebuilding the index. `path` names the store in
    /// error messages.
    pub fn load(tree: sled::Tree, path: PathBuf) -> Result<Mvcc, String> {
        let state = Self::load_state(&tree)?;
        let hub = Hub::new(state.current, state.compact);
        Ok(Mvcc {
            tree: RwLock::new(tree),
            state: RwLock::new(state),
            hub,
            path,
        })
    }

    fn read_commit(tree: &sled::Tree) -> Result<CommitRecord, String> {
        match tree
            .get(codec::meta_key(META_COMMIT))
            .map_err(|e| e.to_string())?
        {
            Some(v) => postcard::from_bytes(&v).map_err(|e| format!("bad commit record: {e}")),
            None => Ok(CommitRecord {
                revision: 1,
                ..CommitRecord::default()
            }),
        }
    }

    fn load_state(tree: &sled::Tree) -> Result<State, String> {
        let commit = Self::read_commit(tree)?;
        let mut st = State {
            current: commit.revision,
            compact: commit.compact,
            ..State::default()
        };
        // Finish what the last commit point left to do, and undo what came after it.
        for id in &commit.removed_leases {
            tree.remove(codec::lease_key(*id))
                .map_err(|e| e.to_string())?;
        }
        let after = codec::record_key(Rev::new(commit.revision + 1, 0));
        let mut uncommitted = Vec::new();
        for item in tree.range(after..codec::record_key(Rev::new(i64::MAX, u32::MAX))) {
            uncommitted.push(item.map_err(|e| e.to_string())?.0);
        }
        for k in uncommitted {
            tree.remove(k).map_err(|e| e.to_string())?;
        }
        for item in tree.scan_prefix([codec::LEASE_PREFIX]) {
            let (k, v) = item.map_err(|e| e.to_string())?;
            let id = codec::parse_lease_key(&k).ok_or("bad lease key")?;
            st.leases.insert(
                id,
                LeaseState {
                    ttl: codec::decode_i64(&v)?,
                    keys: BTreeSet::new(),
                },
            );
        }
        for item in tree.scan_prefix([codec::RECORD_PREFIX]) {
            let (k, v) = item.map_err(|e| e.to_string())?;
            let rev = codec::parse_record_key(&k).ok_or("bad record key")?;
            let rec = Record::decode(rev, &v)?;
            let h = st.index.entry(rec.key.clone()).or_default();
            if h.lease != 0 && h.latest_live().is_some() {
                if let Some(l) = st.leases.get_mut(&h.lease) {
                    l.keys.remove(&rec.key);
                }
            }
            h.revs.push((rev, rec.tombstone));
            if !rec.tombstone {
                h.create = rec.create_revision;
                h.version = rec.version;
                h.lease = rec.lease;
                if rec.lease != 0 {
                    if let Some(l) = st.leases.get_mut(&rec.lease) {
                        l.keys.insert(rec.key.clone());
                    }
                }
            } else {
                h.lease = 0;
            }
        }
        Ok(st)
    }

    pub fn tree(&self) -> sled::Tree {
        self.tree.read().clone()
    }

    pub fn current_revision(&self) -> Revision {
        self.state.read().current
    }

    pub fn compact_revision(&self) -> Revision {
        self.state.read().compact
    }

    pub fn lease_ttl(&self, id: LeaseId) -> Option<i64> {
        self.state.read().leases.get(&id).map(|l| l.ttl)
    }

    pub fn lease_keys(&self, id: LeaseId) -> Option<Vec<Bytes>> {
        self.state
            .read()
            .leases
            .get(&id)
            .map(|l| l.keys.iter().cloned().collect())
    }

    pub fn leases(&self) -> Vec<(LeaseId, i64)> {
        let st = self.state.read();
        let mut v: Vec<_> = st.leases.iter().map(|(id, l)| (*id, l.ttl)).collect();
        v.sort_unstable();
        v
    }

    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, sled::Error> {
        Ok(self.tree().get(codec::meta_key(name))?.map(|v| v.to_vec()))
    }

    /// Number of versions in history (for footprint reports).
    pub fn history_len(&self) -> usize {
        self.state.read().index.values().map(|h| h.revs.len()).sum()
    }

    fn read_record(&self, tree: &sled::Tree, rev: Rev) -> Result<Option<Record>, Error> {
        match tree.get(codec::record_key(rev)).map_err(sled_err)? {
            None => Ok(None),
            Some(raw) => Record::decode(rev, &raw).map(Some).map_err(|e| {
                Error::Internal(format!("corrupt store {}: {e}", self.path.display()))
            }),
        }
    }

    /// Reads a record that must exist unless compaction raced with the reader.
    fn must_read(&self, tree: &sled::Tree, rev: Rev, at: Revision) -> Result<Record, Error> {
        match self.read_record(tree, rev)? {
            Some(r) => Ok(r),
            None => {
                let compact = self.compact_revision();
                if at < compact {
                    Err(Error::Compacted {
                        requested: at,
                        compact_revision: compact,
                    })
                } else {
                    Err(Error::Internal(format!(
                        "store {}: record {rev:?} missing from history",
                        self.path.display()
                    )))
                }
            }
        }
    }

    /// A range read at a committed revision.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, Error> {
        let (addrs, count, at) = {
            let st = self.state.read();
            collect_range(&st, req)?
        };
        self.materialize(&self.tree(), addrs, count, at, req)
    }

    fn materialize(
        &self,
        tree: &sled::Tree,
        addrs: Vec<Rev>,
        count: usize,
        at: Revision,
        req: &RangeRequest,
    ) -> Result<RangeResponse, Error> {
        let mut kvs = Vec::with_capacity(addrs.len());
        for rev in addrs {
            let mut kv = self.must_read(tree, rev, at)?.to_key_value();
            if req.keys_only {
                kv.value = Bytes::new();
            }
            kvs.push(kv);
        }
        Ok(RangeResponse {
            kvs,
            more: req.limit != 0 && count > req.limit,
            count,
            revision: at,
        })
    }

    /// Records with main revision in `[from, to]`, in order, at least `limit` of them unless the
    /// interval holds fewer, never splitting one revision.
    pub(crate) fn scan_records(
        &self,
        from: Revision,
        to: Revision,
        limit: usize,
    ) -> Result<Vec<Record>, Error> {
        let tree = self.tree();
        let lo = codec::record_key(Rev::new(from, 0));
        let hi = codec::record_key(Rev::new(to, u32::MAX));
        let mut out: Vec<Record> = Vec::new();
        for item in tree.range(lo..=hi) {
            let (k, v) = item.map_err(sled_err)?;
            let rev = codec::parse_record_key(&k)
                .ok_or_else(|| Error::Internal("bad record key".into()))?;
            if out.len() >= limit && out.last().is_some_and(|l| l.rev.main != rev.main) {
                break;
            }
            out.push(Record::decode(rev, &v).map_err(Error::Internal)?);
        }
        Ok(out)
    }

    /// The version a record replaced, for `prev_kv`. `None` when it was compacted away.
    pub(crate) fn prev_of(&self, rec: &Record) -> Result<Option<KeyValue>, Error> {
        match rec.prev {
            None => Ok(None),
            Some(prev) => Ok(self
                .read_record(&self.tree(), prev)?
                .map(|r| r.to_key_value())),
        }
    }

    /// Captures a consistent view for a snapshot. Call only where no apply runs concurrently.
    pub(crate) fn meta_view(&self) -> Result<MetaView, sled::Error> {
        let applied = Self::read_commit(&self.tree())
            .map_err(sled::Error::Unsupported)?
            .applied;
        let membership = self.meta(META_MEMBERSHIP)?;
        let st = self.state.read();
        let mut leases: Vec<_> = st.leases.iter().map(|(id, l)| (*id, l.ttl)).collect();
        leases.sort_unstable();
        Ok(MetaView {
            current: st.current,
            compact: st.compact,
            applied,
            membership,
            leases,
        })
    }

    /// Replaces the whole state with the contents of `tree` (after a snapshot install).
    pub(crate) fn replace_tree(&self, tree: sled::Tree) -> Result<(), String> {
        let state = Self::load_state(&tree)?;
        let (current, compact) = (state.current, state.compact);
        *self.tree.write() = tree;
        *self.state.write() = state;
        self.hub.reset(current, compact);
        Ok(())
    }

    /// The raft position recorded at the last commit point.
    pub fn applied(&self) -> Result<Option<Vec<u8>>, String> {
        Ok(Self::read_commit(&self.tree())?.applied)
    }

    pub fn set_membership(&self, membership: Vec<u8>) -> Result<(), Fatal> {
        self.tree()
            .insert(codec::meta_key(META_MEMBERSHIP), membership)?;
        Ok(())
    }

    /// Records that everything up to raft position `applied` is applied, writing a commit
    /// point every [`COMMIT_EVERY`] entries.
    pub fn applied_up_to(&self, applied: Vec<u8>, entries: u32) -> Result<(), Fatal> {
        let due = {
            let mut st = self.state.write();
            st.last_applied = Some(applied);
            st.uncommitted_entries += entries;
            st.uncommitted_entries >= COMMIT_EVERY
        };
        if due {
            self.commit_point()?;
        }
        Ok(())
    }

    /// Writes the commit point: everything applied so far.
    pub fn commit_point(&self) -> Result<(), Fatal> {
        let tree = self.tree();
        let (record, removed) = {
            let mut st = self.state.write();
            if st.last_applied.is_none() {
                return Ok(());
            }
            st.uncommitted_entries = 0;
            let removed = std::mem::take(&mut st.removed_leases);
            (
                CommitRecord {
                    applied: st.last_applied.clone(),
                    revision: st.current,
                    compact: st.compact,
                    removed_leases: removed.clone(),
                },
                removed,
            )
        };
        let raw = postcard::to_stdvec(&record).map_err(|e| Fatal(e.to_string()))?;
        tree.insert(codec::meta_key(META_COMMIT), raw)?;
        for id in removed {
            tree.remove(codec::lease_key(id))?;
        }
        Ok(())
    }

    /// Applies one command. The outer error is a storage failure (fatal for the replica); the
    /// inner one is the command's deterministic result.
    pub fn apply(&self, cmd: &Command) -> Result<Result<Output, Error>, Fatal> {
        match cmd {
            Command::Compact { revision } => self.apply_compact(*revision),
            Command::LeaseGrant { id, ttl_seconds } => self.apply_lease_grant(*id, *ttl_seconds),
            Command::LeaseRevoke { id } => self.apply_lease_revoke(*id),
            Command::Put(p) => {
                let txn = TxnRequest {
                    compare: vec![],
                    success: vec![TxnOp::Put(p.clone())],
                    failure: vec![],
                };
                Ok(self.apply_txn(&txn)?.map(single_op_output))
            }
            Command::DeleteRange(d) => {
                let txn = TxnRequest {
                    compare: vec![],
                    success: vec![TxnOp::DeleteRange(d.clone())],
                    failure: vec![],
                };
                Ok(self.apply_txn(&txn)?.map(single_op_output))
            }
            Command::Txn(t) => Ok(self.apply_txn(t)?.map(Output::Txn)),
            Command::Batch(_) => Ok(Err(Error::Internal("nested command batch".into()))),
        }
    }

    fn compare_holds(&self, st: &State, tree: &sled::Tree, c: &Compare) -> Result<bool, Error> {
        use std::cmp::Ordering;
        let live = st
            .index
            .get(&c.key)
            .and_then(|h| h.latest_live().map(|rev| (h, rev)));
        let ord: Option<Ordering> = match &c.target {
            CompareTarget::Version(v) => Some(live.map_or(0, |(h, _)| h.version).cmp(v)),
            CompareTarget::CreateRevision(v) => Some(live.map_or(0, |(h, _)| h.create).cmp(v)),
            CompareTarget::ModRevision(v) => Some(live.map_or(0, |(_, r)| r.main).cmp(v)),
            CompareTarget::Lease(v) => Some(live.map_or(0, |(h, _)| h.lease).cmp(v)),
            CompareTarget::Value(v) => match live {
                None => None,
                Some((_, rev)) => {
                    let rec = self.must_read(tree, rev, st.current)?;
                    Some(rec.value[..].cmp(&v[..]))
                }
            },
        };
        Ok(match (ord, c.op) {
            (None, _) => false,
            (Some(o), CompareOp::Equal) => o == Ordering::Equal,
            (Some(o), CompareOp::NotEqual) => o != Ordering::Equal,
            (Some(o), CompareOp::Greater) => o == Ordering::Greater,
            (Some(o), CompareOp::Less) => o == Ordering::Less,
        })
    }

    fn apply_txn(&self, txn: &TxnRequest) -> Result<Result<TxnResponse, Error>, Fatal> {
        let tree = self.tree();
        let st = self.state.read();
        let main = st.current + 1;
        // Evaluate and execute against the state before the transaction, collecting writes.
        let plan = (|| -> Result<(bool, Vec<Record>, Vec<TxnOpResponse>), Error> {
            let mut succeeded = true;
            for c in &txn.compare {
                if !self.compare_holds(&st, &tree, c)? {
                    succeeded = false;
                    break;
                }
            }
            let ops = if succeeded {
                &txn.success
            } else {
                &txn.failure
            };
            check_no_duplicate_writes(ops)?;
            let mut records: Vec<Record> = Vec::new();
            let mut responses = Vec::with_capacity(ops.len());
            for op in ops {
                match op {
                    TxnOp::Put(p) => {
                        if p.key.is_empty() {
                            return Err(Error::EmptyKey);
                        }
                        if p.lease != 0 && !st.leases.contains_key(&p.lease) {
                            return Err(Error::LeaseNotFound(p.lease));
                        }
                        let h = st.index.get(&p.key);
                        let prev = h.and_then(|h| h.latest_live().map(|r| (h, r)));
                        let prev_kv = match (p.prev_kv, prev) {
                            (true, Some((_, rev))) => {
                                Some(self.must_read(&tree, rev, st.current)?.to_key_value())
                            }
                            _ => None,
                        };
                        let rev = Rev::new(main, records.len() as u32);
                        records.push(Record {
                            key: p.key.clone(),
                            value: p.value.clone(),
                            rev,
                            create_revision: prev.map_or(main, |(h, _)| h.create),
                            version: prev.map_or(1, |(h, _)| h.version + 1),
                            lease: p.lease,
                            tombstone: false,
                            prev: prev.map(|(_, r)| r),
                        });
                        responses.push(TxnOpResponse::Put(PutResponse {
                            revision: main,
                            prev_kv,
                        }));
                    }
                    TxnOp::DeleteRange(d) => {
                        let mut deleted = 0;
                        let mut prev_kvs = Vec::new();
                        if !range_is_empty(&d.range) {
                            for (key, h) in st.index.range(range_bounds(&d.range)) {
                                let Some(prev) = h.latest_live() else {
                                    continue;
                                };
                                if d.prev_kv {
                                    prev_kvs.push(
                                        self.must_read(&tree, prev, st.current)?.to_key_value(),
                                    );
                                }
                                deleted += 1;
                                records.push(tombstone(
                                    key.clone(),
                                    Rev::new(main, records.len() as u32),
                                    prev,
                                ));
                            }
                        }
                        responses.push(TxnOpResponse::DeleteRange(DeleteRangeResponse {
                            revision: 0, // filled below
                            deleted,
                            prev_kvs,
                        }));
                    }
                    TxnOp::Range(r) => {
                        let resp = if r.revision > 0 || records.is_empty() {
                            let (addrs, count, at) = collect_range(&st, r)?;
                            self.materialize(&tree, addrs, count, at, r)?
                        } else {
                            self.range_with_overlay(&st, &tree, r, &records)?
                        };
                        responses.push(TxnOpResponse::Range(resp));
                    }
                }
            }
            Ok((succeeded, records, responses))
        })();
        let (succeeded, records, mut responses) = match plan {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let revision = if records.is_empty() { st.current } else { main };
        for r in &mut responses {
            if let TxnOpResponse::DeleteRange(d) = r {
                d.revision = revision;
            }
            if let TxnOpResponse::Put(p) = r {
                p.revision = revision;
            }
        }
        drop(st);
        self.commit(records)?;
        Ok(Ok(TxnResponse {
            succeeded,
            responses,
            revision,
        }))
    }

    /// A range inside a transaction at the current revision, seeing the transaction's earlier
    /// writes (as etcd's write transactions do).
    fn range_with_overlay(
        &self,
        st: &State,
        tree: &sled::Tree,
        req: &RangeRequest,
        pending: &[Record],
    ) -> Result<RangeResponse, Error> {
        enum Src<'a> {
            Stored(Rev),
            Pending(&'a Record),
        }
        let mut view: BTreeMap<Bytes, Src> = BTreeMap::new();
        if !range_is_empty(&req.range) {
            for (key, h) in st.index.range(range_bounds(&req.range)) {
                if let Some(rev) = h.latest_live() {
                    view.insert(key.clone(), Src::Stored(rev));
                }
            }
        }
        for rec in pending.iter().filter(|r| req.range.contains(&r.key)) {
            if rec.tombstone {
                view.remove(&rec.key);
            } else {
                view.insert(rec.key.clone(), Src::Pending(rec));
            }
        }
        let count = view.len();
        let take = if req.count_only {
            0
        } else if req.limit == 0 {
            count
        } else {
            req.limit
        };
        let mut kvs = Vec::with_capacity(take.min(count));
        for src in view.values().take(take) {
            let mut kv = match src {
                Src::Stored(rev) => self.must_read(tree, *rev, st.current)?.to_key_value(),
                Src::Pending(rec) => rec.to_key_value(),
            };
            if req.keys_only {
                kv.value = Bytes::new();
            }
            kvs.push(kv);
        }
        Ok(RangeResponse {
            more: req.limit != 0 && count > req.limit,
            kvs,
            count,
            revision: pending.first().map_or(st.current, |r| r.rev.main),
        })
    }

    /// Stores new records (in revision order), then indexes them and wakes watchers.
    fn commit(&self, records: Vec<Record>) -> Result<(), Fatal> {
        let Some(main) = records.first().map(|r| r.rev.main) else {
            return Ok(());
        };
        let tree = self.tree();
        for rec in &records {
            tree.insert(&codec::record_key(rec.rev)[..], rec.encode())?;
        }
        let records: Vec<Arc<Record>> = records.into_iter().map(Arc::new).collect();
        {
            let mut st = self.state.write();
            for rec in &records {
                let st = &mut *st;
                let h = st.index.entry(rec.key.clone()).or_default();
                if h.lease != 0 && h.latest_live().is_some() {
                    if let Some(l) = st.leases.get_mut(&h.lease) {
                        l.keys.remove(&rec.key);
                    }
                }
                h.revs.push((rec.rev, rec.tombstone));
                if rec.tombstone {
                    h.lease = 0;
                } else {
                    h.create = rec.create_revision;
                    h.version = rec.version;
                    h.lease = rec.lease;
                    if rec.lease != 0 {
                        if let Some(l) = st.leases.get_mut(&rec.lease) {
                            l.keys.insert(rec.key.clone());
                        }
                    }
                }
            }
            st.current = main;
        }
        self.hub.publish(main, &records);
        Ok(())
    }

    fn apply_lease_grant(&self, id: LeaseId, ttl: i64) -> Result<Result<Output, Error>, Fatal> {
        let err = {
            let st = self.state.read();
            if id <= 0 {
                Some(Error::Internal(format!("invalid lease id {id}")))
            } else if st.leases.contains_key(&id) {
                Some(Error::LeaseExists(id))
            } else if !(1..=crate::lease::MAX_TTL_SECONDS).contains(&ttl) {
                Some(Error::InvalidTtl(ttl))
            } else {
                None
            }
        };
        if let Some(e) = err {
            return Ok(Err(e));
        }
        self.tree()
            .insert(codec::lease_key(id), &codec::encode_i64(ttl)[..])?;
        self.state.write().leases.insert(
            id,
            LeaseState {
                ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok(Ok(Output::LeaseGrant(LeaseGrantResponse {
            id,
            ttl_seconds: ttl,
        })))
    }

    fn apply_lease_revoke(&self, id: LeaseId) -> Result<Result<Output, Error>, Fatal> {
        let records = {
            let st = self.state.read();
            let Some(lease) = st.leases.get(&id) else {
                return Ok(Err(Error::LeaseNotFound(id)));
            };
            let main = st.current + 1;
            let mut records = Vec::new();
            for key in &lease.keys {
                if let Some(prev) = st.index.get(key).and_then(|h| h.latest_live()) {
                    records.push(tombstone(
                        key.clone(),
                        Rev::new(main, records.len() as u32),
                        prev,
                    ));
                }
            }
            records
        };
        let revision = records.first().map(|r| r.rev.main);
        self.commit(records)?;
        let mut st = self.state.write();
        st.leases.remove(&id);
        // The lease's own key goes after the next commit point: replaying this revoke after a
        // crash must still find the lease.
        st.removed_leases.push(id);
        let revision = revision.unwrap_or(st.current);
        Ok(Ok(Output::LeaseRevoke(LeaseRevokeResponse { revision })))
    }

    fn apply_compact(&self, revision: Revision) -> Result<Result<Output, Error>, Fatal> {
        let (current, old_compact) = {
            let st = self.state.read();
            (st.current, st.compact)
        };
        if revision <= old_compact {
            return Ok(Err(Error::Compacted {
                requested: revision,
                compact_revision: old_compact,
            }));
        }
        if revision > current {
            return Ok(Err(Error::FutureRevision {
                requested: revision,
                current,
            }));
        }
        let tree = self.tree();
        // Keys written in (old_compact, revision] may have versions that are no longer needed.
        let mut touched: BTreeSet<Bytes> = BTreeSet::new();
        let lo = codec::record_key(Rev::new(old_compact.max(0) + 1, 0));
        let hi = codec::record_key(Rev::new(revision, u32::MAX));
        for item in tree.range(lo..=hi) {
            let (_, v) = item?;
            match Record::decode_key(&v) {
                Ok(k) => {
                    touched.insert(Bytes::copy_from_slice(k));
                }
                Err(e) => {
                    return Err(Fatal(format!(
                        "corrupt record in {} during compaction: {e}",
                        self.path.display()
                    )))
                }
            }
        }
        let mut doomed: Vec<Rev> = Vec::new();
        {
            let st = self.state.read();
            for key in &touched {
                let Some(h) = st.index.get(key) else { continue };
                let keep_from = h.revs.partition_point(|(r, _)| r.main <= revision);
                if keep_from == 0 {
                    continue;
                }
                let (latest, tomb) = h.revs[keep_from - 1];
                doomed.extend(h.revs[..keep_from - 1].iter().map(|(r, _)| *r));
                if tomb {
                    doomed.push(latest);
                }
            }
        }
        // In memory first, so that a concurrent reader that misses a record below finds the
        // new compact revision and reports `Compacted`.
        {
            let mut st = self.state.write();
            for key in &touched {
                let Some(h) = st.index.get_mut(key) else {
                    continue;
                };
                let keep_from = h.revs.partition_point(|(r, _)| r.main <= revision);
                if keep_from == 0 {
                    continue;
                }
                let tomb = h.revs[keep_from - 1].1;
                let cut = if tomb { keep_from } else { keep_from - 1 };
                h.revs.drain(..cut);
                if h.revs.is_empty() {
                    st.index.remove(key);
                }
            }
            st.compact = revision;
        }
        // Oldest first: a crash part-way leaves, for every key, a suffix of its history, which
        // replaying the compaction finishes (a deletion is never removed before what it deleted).
        doomed.sort_unstable();
        for rev in &doomed {
            tree.remove(&codec::record_key(*rev)[..])?;
        }
        self.hub.set_compact(revision);
        tracing::debug!(revision, removed = doomed.len(), "compacted");
        Ok(Ok(Output::Compact(CompactResponse {
            revision: current,
            compact_revision: revision,
        })))
    }
}

fn tombstone(key: Bytes, rev: Rev, prev: Rev) -> Record {
    Record {
        key,
        value: Bytes::new(),
        rev,
        create_revision: 0,
        version: 0,
        lease: 0,
        tombstone: true,
        prev: Some(prev),
    }
}

/// Which versions a range returns: their addresses (up to the limit), the total count, and the
/// revision read at.
fn collect_range(st: &State, req: &RangeRequest) -> Result<(Vec<Rev>, usize, Revision), Error> {
    let at = if req.revision <= 0 {
        st.current
    } else {
        req.revision
    };
    if at > st.current {
        return Err(Error::FutureRevision {
            requested: at,
            current: st.current,
        });
    }
    if at < st.compact {
        return Err(Error::Compacted {
            requested: at,
            compact_revision: st.compact,
        });
    }
    let mut addrs = Vec::new();
    let mut count = 0usize;
    if !range_is_empty(&req.range) {
        for (_, h) in st.index.range(range_bounds(&req.range)) {
            if let Some(rev) = h.at(at) {
                count += 1;
                if !req.count_only && (req.limit == 0 || addrs.len() < req.limit) {
                    addrs.push(rev);
                }
            }
        }
    }
    Ok((addrs, count, at))
}

/// etcd refuses a transaction branch that writes one key twice (a put and a put, or a put and a
/// delete range covering it).
fn check_no_duplicate_writes(ops: &[TxnOp]) -> Result<(), Error> {
    let mut puts: BTreeSet<&Bytes> = BTreeSet::new();
    for op in ops {
        if let TxnOp::Put(p) = op {
            if !puts.insert(&p.key) {
                return Err(Error::DuplicateKey(
                    String::from_utf8_lossy(&p.key).into_owned(),
                ));
            }
        }
    }
    for op in ops {
        if let TxnOp::DeleteRange(d) = op {
            if let Some(k) = puts.iter().find(|k| d.range.contains(k)) {
                return Err(Error::DuplicateKey(String::from_utf8_lossy(k).into_owned()));
            }
        }
    }
    Ok(())
}

/// The answer to a one-operation transaction built for a plain put or delete.
fn single_op_output(mut r: TxnResponse) -> Output {
    match r.responses.pop() {
        Some(TxnOpResponse::Put(p)) => Output::Put(p),
        Some(TxnOpResponse::DeleteRange(d)) => Output::DeleteRange(d),
        _ => Output::Txn(r),
    }
}
