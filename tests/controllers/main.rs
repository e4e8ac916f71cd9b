//! End-to-end tests of the control loops and the scheduler: the built `k3rs server` on a free
//! loopback port, hollow nodes (`k3rs hollow-nodes`, the test tool) registered against it, and
//! the installed `kubectl` driving workloads (one test binary).

#[path = "../api/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod daemonset;
mod hollow;
mod lifecycle;
mod nodes;
mod policy;
mod serviceaccounts;
mod services;
mod statefulset;
mod volumes;
mod workloads;
