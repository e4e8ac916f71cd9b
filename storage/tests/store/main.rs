//! Integration tests of the k3rs store, through its public API (one test binary).

mod common;
mod scripts;
mod cas;
mod crash;
mod watch;
mod errors;
mod snapshot;
