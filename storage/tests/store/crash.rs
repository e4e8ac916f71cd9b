//! Crash safety: a child process writes concurrently and reports every acknowledged write; the
//! test SIGKILLs it at random moments, reopens the store and checks nothing acknowledged is lost
//! and the revision never goes backwards.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use k3rs_storage::{KeyRange, RangeRequest, Store, StoreConfig};
use rand::Rng;

use crate::common::TestDir;

fn crash_writer_bin() -> PathBuf {
    // target/<profile>/deps/store-<hash> → target/<profile>/examples/crash_writer
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("examples").join("crash_writer"))
        .unwrap();
    if !bin.exists() {
        // `cargo test` builds examples, `cargo test --test store` does not.
        let profile_dir = bin.parent().unwrap().parent().unwrap();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "k3rs-storage", "--example", "crash_writer"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo to build crash_writer");
        assert!(status.success(), "building the crash_writer example failed");
    }
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

#[test]
fn acknowledged_writes_survive_sigkill_and_revision_never_goes_back() {
    let bin = crash_writer_bin();
    let dir = TestDir::new("crash");
    let data = dir.path().join("store");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rng = rand::thread_rng();
    let mut acked: Vec<(String, i64)> = Vec::new();
    let mut last_revision = 0i64;
    let cycles = 20;
    for cycle in 0..cycles {
        let mut child = Command::new(&bin)
            .arg(&data)
            .arg(format!("c{cycle}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait until the child has opened the store, then let it write for a random while.
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("crash_writer did not start within 60s");
        let ready_rev: i64 = first
            .strip_prefix("READY ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .parse()
            .unwrap();
        assert!(
            ready_rev >= last_revision,
            "cycle {cycle}: revision went back from {last_revision} to {ready_rev} after restart"
        );
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..300)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        let before = acked.len();
        for line in rx.try_iter() {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("ACK"), Some(key), Some(rev)) => {
                    acked.push((key.to_string(), rev.parse().unwrap()))
                }
                _ => panic!("unexpected line {line:?}"),
            }
        }
        assert!(
            acked.len() > before,
            "cycle {cycle}: the child acknowledged no write before it was killed"
        );

        // Reopen and check every acknowledged write so far.
        let (current, missing) = rt.block_on(async {
            let store = Store::open(StoreConfig::new(&data)).await.unwrap();
            let all = store
                .range(RangeRequest::new(KeyRange::prefix("/crash/")))
                .await
                .unwrap();
            let found: std::collections::HashMap<_, _> = all
                .kvs
                .iter()
                .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv))
                .collect();
            let mut missing = Vec::new();
            for (key, rev) in &acked {
                match found.get(key) {
                    Some(kv) if kv.mod_revision == *rev && kv.value.starts_with(key.as_bytes()) => {
                    }
                    other => missing.push(format!("{key}@{rev}: found {other:?}")),
                }
            }
            let current = store.current_revision();
            store.shutdown().await;
            (current, missing)
        });
        assert!(
            missing.is_empty(),
            "cycle {cycle}: {} acknowledged writes lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        let max_acked = acked.iter().map(|(_, r)| *r).max().unwrap();
        assert!(
            current >= max_acked,
            "cycle {cycle}: revision {current} < acked {max_acked}"
        );
        assert!(
            current >= last_revision,
            "cycle {cycle}: revision went back"
        );
        last_revision = current;
    }
    eprintln!(
        "{cycles} kill/reopen cycles, {} acknowledged writes all present, final revision {last_revision}",
        acked.len()
    );
}
