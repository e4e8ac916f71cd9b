//! End-to-end tests of the node agent (needs root; CI is root): the built `k3rs server` with
//! its embedded agent runs real containers through libcontainer inside a network namespace
//! each test creates, driven with the installed `kubectl` (one test binary).

mod debug;
mod deploy;
mod images;
mod lifecycle;
mod node;
mod pods;
mod probes;
mod stats;
mod streaming;
