//! Request and response types of the key-value API (etcd's data model, in plain Rust).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A store revision. Revision 1 is the empty store; every write that changes at least one key
/// gets the next revision.
pub type Revision = i64;

/// A lease identifier. 0 means "no lease".
pub type LeaseId = i64;

/// One version of a key, as etcd's `mvccpb.KeyValue`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: Bytes,
    pub value: Bytes,
    /// Revision of the last creation of this key (a delete ends a key's life).
    pub create_revision: Revision,
    /// Revision of the last modification (for a delete event: the delete's revision).
    pub mod_revision: Revision,
    /// Number of modifications since the last creation (1 after a create; 0 for a deleted key).
    pub version: i64,
    /// Lease the key is attached to, 0 if none.
    pub lease: LeaseId,
}

/// A set of keys: one key, a half-open interval, or everything under a prefix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    /// First key (inclusive).
    pub start: Bytes,
    /// End (exclusive). `None`: the single key `start`. `Some(empty)`: every key >= `start`.
    pub end: Option<Bytes>,
}

impl KeyRange {
    /// Exactly one key.
    pub fn key(key: impl Into<Bytes>) -> Self {
        KeyRange {
            start: key.into(),
            end: None,
        }
    }

    /// Every key starting with `prefix` (an empty prefix means every key).
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        let start: Bytes = prefix.into();
        let end = prefix_end(&start);
        KeyRange {
            start,
            end: Some(end),
        }
    }

    /// Keys in `[start, end)`. An empty `end` means "to the last key".
    pub fn interval(start: impl Into<Bytes>, end: impl Into<Bytes>) -> Self {
        KeyRange {
            start: start.into(),
            end: Some(end.into()),
        }
    }

    /// Whether `key` is in this set.
    pub fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            None => key == &self.start[..],
            Some(end) => key >= &self.start[..] && (end.is_empty() || key < &end[..]),
        }
    }

    /// The same range, restarted just after `last_key` (for continuing a paginated range).
    pub fn continue_after(&self, last_key: &[u8]) -> Self {
        let mut next = Vec::with_capacity(last_key.len() + 1);
        next.extend_from_slice(last_key);
        next.push(0);
        KeyRange {
            start: Bytes::from(next),
            end: self.end.clone(),
        }
    }

    pub(crate) fn byte_len(&self) -> usize {
        self.start.len() + self.end.as_ref().map_or(0, |e| e.len())
    }
}

/// The smallest key greater than every key with this prefix; empty when there is none
/// (prefix empty or all 0xff), which `KeyRange` reads as "to the end".
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::new()
}

/// A read of a key range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    pub range: KeyRange,
    /// Read at this revision; 0 for the current one.
    pub revision: Revision,
    /// At most this many keys; 0 for no limit.
    pub limit: usize,
    /// Only count the keys.
    pub count_only: bool,
    /// Leave values out.
    pub keys_only: bool,
    /// Serve from the local replica without confirming leadership (may be stale on a follower).
    pub serializable: bool,
}

impl RangeRequest {
    pub fn new(range: KeyRange) -> Self {
        RangeRequest {
            range,
            revision: 0,
            limit: 0,
            count_only: false,
            keys_only: false,
            serializable: false,
        }
    }
    pub fn revision(mut self, revision: Revision) -> Self {
        self.revision = revision;
        self
    }
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
    pub fn count_only(mut self) -> Self {
        self.count_only = true;
        self
    }
    pub fn keys_only(mut self) -> Self {
        self.keys_only = true;
        self
    }
    pub fn serializable(mut self) -> Self {
        self.serializable = true;
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    /// More keys exist in the range beyond `limit`.
    pub more: bool,
    /// Number of keys in the whole range at `revision` (not limited).
    pub count: usize,
    /// The revision the read was served at; pass it back to continue on the same snapshot.
    pub revision: Revision,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    pub key: Bytes,
    pub value: Bytes,
    pub lease: LeaseId,
    pub prev_kv: bool,
}

impl PutRequest {
    pub fn new(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        PutRequest {
            key: key.into(),
            value: value.into(),
            lease: 0,
            prev_kv: false,
        }
    }
    pub fn lease(mut self, lease: LeaseId) -> Self {
        self.lease = lease;
        self
    }
    pub fn prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResponse {
    pub revision: Revision,
    pub prev_kv: Option<KeyValue>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeRequest {
    pub range: KeyRange,
    pub prev_kv: bool,
}

impl DeleteRangeRequest {
    pub fn new(range: KeyRange) -> Self {
        DeleteRangeRequest {
            range,
            prev_kv: false,
        }
    }
    pub fn prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeResponse {
    /// The store revision after the request (unchanged when nothing was deleted).
    pub revision: Revision,
    pub deleted: i64,
    pub prev_kvs: Vec<KeyValue>,
}

/// What a [`Compare`] looks at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// 0 for an absent key.
    Version(i64),
    /// 0 for an absent key.
    CreateRevision(Revision),
    /// 0 for an absent key.
    ModRevision(Revision),
    /// An absent key compares as no value (never equal).
    Value(Bytes),
    /// 0 for an absent key or a key without lease.
    Lease(LeaseId),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

/// A condition of a transaction on one key, as etcd's `Compare`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub key: Bytes,
    pub op: CompareOp,
    pub target: CompareTarget,
}

impl Compare {
    pub fn new(key: impl Into<Bytes>, op: CompareOp, target: CompareTarget) -> Self {
        Compare {
            key: key.into(),
            op,
            target,
        }
    }
    /// The key exists.
    pub fn exists(key: impl Into<Bytes>) -> Self {
        Self::new(key, CompareOp::Greater, CompareTarget::Version(0))
    }
    /// The key does not exist.
    pub fn absent(key: impl Into<Bytes>) -> Self {
        Self::new(key, CompareOp::Equal, CompareTarget::Version(0))
    }
    /// The key was last modified at `revision` (optimistic concurrency).
    pub fn mod_revision_is(key: impl Into<Bytes>, revision: Revision) -> Self {
        Self::new(key, CompareOp::Equal, CompareTarget::ModRevision(revision))
    }
}

/// One operation inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOpResponse {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
}

/// If all `compare` hold, run `success`, else `failure`; atomically, in one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

impl TxnRequest {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn when(mut self, compare: impl IntoIterator<Item = Compare>) -> Self {
        self.compare.extend(compare);
        self
    }
    pub fn and_then(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.success.extend(ops);
        self
    }
    pub fn or_else(mut self, ops: impl IntoIterator<Item = TxnOp>) -> Self {
        self.failure.extend(ops);
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    pub succeeded: bool,
    pub responses: Vec<TxnOpResponse>,
    /// The store revision after the transaction.
    pub revision: Revision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrantResponse {
    pub id: LeaseId,
    pub ttl_seconds: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRevokeResponse {
    pub revision: Revision,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseTimeToLive {
    pub id: LeaseId,
    pub granted_ttl_seconds: i64,
    /// Seconds until expiry, as seen by this server's lessor.
    pub remaining_seconds: i64,
    pub keys: Vec<Bytes>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactResponse {
    /// The store revision when the compaction was applied.
    pub revision: Revision,
    pub compact_revision: Revision,
}

/// What kind of change a watch event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// For `Put`: the new version. For `Delete`: the key with an empty value, `mod_revision` set
    /// to the delete's revision, `version` 0.
    pub kv: KeyValue,
    /// The version before this change, when the watch asked for it.
    pub prev_kv: Option<KeyValue>,
}

/// A watch of a key range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchRequest {
    pub range: KeyRange,
    /// First revision to report; 0 for "changes after the current revision".
    pub start_revision: Revision,
    pub prev_kv: bool,
    pub filter_put: bool,
    pub filter_delete: bool,
    /// When no event was sent for this long, send a progress notification.
    pub progress_notify_interval: Option<std::time::Duration>,
}

impl WatchRequest {
    pub fn new(range: KeyRange) -> Self {
        WatchRequest {
            range,
            start_revision: 0,
            prev_kv: false,
            filter_put: false,
            filter_delete: false,
            progress_notify_interval: None,
        }
    }
    pub fn start_revision(mut self, revision: Revision) -> Self {
        self.start_revision = revision;
        self
    }
    pub fn prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }
    pub fn progress_notify(mut self, every: std::time::Duration) -> Self {
        self.progress_notify_interval = Some(every);
        self
    }
}

/// What a watch stream yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchMessage {
    /// Events in revision order. Events of one revision are never split across messages.
    Events(Vec<Event>),
    /// Every event up to and including `revision` has been delivered (a bookmark).
    Progress { revision: Revision },
}
