//! Integration tests of the k3rs store, through its public API (one test binary).

mod cas;
mod common;
mod crash;
mod errors;
mod scripts;
mod snapshot;
mod watch;
