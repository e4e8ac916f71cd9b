//! Crash-test child: opens a store and writes from several tasks as fast as it can, printing
//! `ACK <key> <revision>` after each acknowledged put, until it is killed.
//!
//! Usage: `crash_writer <data-dir> <tag>` (run by the store's crash-safety test).

#![allow(clippy::print_stdout)]

use std::io::Write;

use k3rs_storage::{PutRequest, Store, StoreConfig};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(tag)) = (args.next(), args.next()) else {
        eprintln!("usage: crash_writer <data-dir> <tag>");
        std::process::exit(2);
    };
    let store = match Store::open(StoreConfig::new(dir)).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("crash_writer: {e}");
            std::process::exit(1);
        }
    };
    println!("READY {}", store.current_revision());
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        let tag = tag.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let key = format!("/crash/{tag}/{t}/{i}");
                let value = format!("{key}={}", "x".repeat(100 + (i as usize % 400)));
                match store.put(PutRequest::new(key.clone(), value)).await {
                    Ok(r) => {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "ACK {key} {}", r.revision);
                        let _ = out.flush();
                    }
                    Err(e) => {
                        eprintln!("crash_writer: put failed: {e}");
                        std::process::exit(1);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}
