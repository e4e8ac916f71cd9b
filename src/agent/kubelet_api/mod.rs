//! The kubelet API (`:10250`, HTTPS): containerLogs, exec, attach, portForward, stats/summary,
//! metrics, healthz and pods, for the API server's proxy and for admins.

pub mod logs;
pub mod spdy;
pub mod stats;
