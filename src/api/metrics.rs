//! `/metrics` in the Prometheus text format: request counts and latency histograms by verb,
//! resource and code, open watches, and store figures.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use parking_lot::Mutex;

const BUCKETS: &[f64] = &[0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; 10],
    sum: f64,
    total: u64,
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
}

impl Metrics {
    pub fn observe(&self, verb: &str, resource: &str, code: u16, took: Duration) {
        *self
            .requests
            .lock()
            .entry((verb.to_string(), resource.to_string(), code))
            .or_default() += 1;
        let mut l = self.latency.lock();
        let h = l
            .entry((verb.to_string(), resource.to_string()))
            .or_default();
        let s = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += s;
        h.total += 1;
    }

    pub fn render(&self, store: &k3rs_storage::Store) -> String {
        let mut out = String::new();
        out.push_str("# HELP apiserver_request_total Counter of apiserver requests broken out by verb, resource and HTTP response code.\n# TYPE apiserver_request_total counter\n");
        for ((verb, res, code), n) in self.requests.lock().iter() {
            let _ = writeln!(
                out,
                "apiserver_request_total{{code=\"{code}\",resource=\"{res}\",verb=\"{verb}\"}} {n}"
            );
        }
        out.push_str("# HELP apiserver_request_duration_seconds Response latency distribution in seconds for each verb and resource.\n# TYPE apiserver_request_duration_seconds histogram\n");
        for ((verb, res), h) in self.latency.lock().iter() {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(out, "apiserver_request_duration_seconds_bucket{{resource=\"{res}\",verb=\"{verb}\",le=\"{b}\"}} {}", h.counts[i]);
            }
            let _ = writeln!(out, "apiserver_request_duration_seconds_bucket{{resource=\"{res}\",verb=\"{verb}\",le=\"+Inf\"}} {}", h.total);
            let _ = writeln!(
                out,
                "apiserver_request_duration_seconds_sum{{resource=\"{res}\",verb=\"{verb}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "apiserver_request_duration_seconds_count{{resource=\"{res}\",verb=\"{verb}\"}} {}",
                h.total
            );
        }
        out.push_str("# HELP k3rs_store_revision Current revision of the embedded store.\n# TYPE k3rs_store_revision gauge\n");
        let _ = writeln!(out, "k3rs_store_revision {}", store.current_revision());
        out.push_str("# HELP apiserver_registered_watchers Number of caught-up store watchers.\n# TYPE apiserver_registered_watchers gauge\n");
        let _ = writeln!(
            out,
            "apiserver_registered_watchers {}",
            store.live_watchers()
        );
        out.push_str("# HELP k3rs_store_fsyncs_total fsyncs of the raft log.\n# TYPE k3rs_store_fsyncs_total counter\n");
        let _ = writeln!(out, "k3rs_store_fsyncs_total {}", store.fsync_count());
        out
    }
}
