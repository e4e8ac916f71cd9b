//! k3rs-storage: the embedded store that replaces etcd.
//!
//! An etcd-like MVCC key-value store (one global revision; per-key create/mod revision and
//! version; ranges at old revisions; transactions; leases; watches; compaction) kept as a
//! deterministic state machine on sled and written through openraft, so a single server is a
//! one-voter raft group and more servers are more voters.
//!
//! This crate knows nothing of Kubernetes, JSON objects or HTTP: keys and values are bytes.

mod codec;
mod dir;
mod error;
pub mod lease;
mod mvcc;
pub mod raft;
mod store;
mod types;
mod watch;

pub use error::{Error, OpenError, Result};
pub use lease::{Clock, ManualClock, SystemClock};
pub use mvcc::{Command, Output};
pub use raft::LocalRouter;
pub use store::{
    Kv, Store, StoreConfig, DEFAULT_CACHE_CAPACITY, DEFAULT_COMPACTION_WINDOW,
    DEFAULT_MAX_REQUEST_BYTES,
};
pub use types::*;
pub use watch::WatchStream;
