//! Typed errors of the store: opening a data directory, and serving requests.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::types::{LeaseId, Revision};

/// Why a data directory could not be opened. Every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot use store directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "store directory {path} is locked by another running process{}; stop it or choose another --data-dir",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked { path: PathBuf, holder: Option<u32> },
    #[error("{path} is not empty and is not a k3rs store (no FORMAT file); refusing to touch it")]
    NotAStore { path: PathBuf },
    #[error("store directory {path} has format {found:?}; this build reads {expected:?}")]
    UnsupportedFormat {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("store directory {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("store in {path} failed to start raft: {detail}")]
    Raft { path: PathBuf, detail: String },
}

/// Why a request failed. Errors returned by the state machine are deterministic: every replica
/// returns the same one for the same request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Error {
    #[error(
        "required revision {requested} has been compacted (compacted up to {compact_revision})"
    )]
    Compacted {
        requested: Revision,
        compact_revision: Revision,
    },
    #[error("required revision {requested} is a future revision (current {current})")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("requested lease {0} not found")]
    LeaseNotFound(LeaseId),
    #[error("lease {0} already exists")]
    LeaseExists(LeaseId),
    #[error("lease TTL {0}s is out of range (1..={max})", max = crate::lease::MAX_TTL_SECONDS)]
    InvalidTtl(i64),
    #[error("duplicate key {0:?} given in one transaction")]
    DuplicateKey(String),
    #[error("request of {size} bytes is larger than the limit of {limit} bytes")]
    RequestTooLarge { size: usize, limit: usize },
    #[error("empty key")]
    EmptyKey,
    #[error("this server is not the leader{}", leader.map(|l| format!(" (leader is node {l})")).unwrap_or_default())]
    NotLeader { leader: Option<u64> },
    #[error("store is shutting down")]
    ShuttingDown,
    #[error("storage failure: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
