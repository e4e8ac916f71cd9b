//! Store benchmark (`make bench`): durable put throughput and latency at 1/16/256 writers
//! against the disk's raw write+fdatasync latency measured in the same run, range of 10k keys,
//! watch delivery latency with 100 watchers, and footprint after 100k writes and a compaction.
//!
//! Prints a Markdown report. `K3RS_BENCH_DIR` chooses where data goes (default: the system
//! temporary directory); `K3RS_BENCH_QUICK=1` runs a smaller version.

#![allow(clippy::print_stdout)]

use std::fmt::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k3rs_storage::*;

fn quick() -> bool {
    std::env::var_os("K3RS_BENCH_QUICK").is_some()
}

fn bench_dir(name: &str) -> tempfile::TempDir {
    let base = std::env::var_os("K3RS_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix(&format!("k3rs-bench-{name}-"))
        .tempdir_in(base)
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

struct Raw {
    append_p50: Duration,
    overwrite_p50: Duration,
    /// sled insert + `Db::flush` + fdatasync of sled's file: the floor for a log kept in sled.
    sled_p50: Duration,
}

/// The disk's physical limit for one durable writer: write 1 KiB, fdatasync, repeat.
fn raw_fdatasync(n: usize) -> Raw {
    let dir = bench_dir("raw");
    let buf = vec![0x5au8; 1024];
    // Appending (what a log does: the file grows, so metadata is synced too).
    let f = std::fs::File::create(dir.path().join("append")).unwrap();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f.write_all_at(&buf, (i * buf.len()) as u64).unwrap();
        f.sync_data().unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    let append_p50 = percentile(&lat, 0.5);
    // Overwriting a preallocated file (the cheapest durable write there is).
    let f = std::fs::File::create(dir.path().join("prealloc")).unwrap();
    f.set_len((n * buf.len()) as u64).unwrap();
    f.sync_all().unwrap();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f.write_all_at(&buf, (i * buf.len()) as u64).unwrap();
        f.sync_data().unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    let overwrite_p50 = percentile(&lat, 0.5);
    let db = sled::Config::new()
        .path(dir.path().join("sled"))
        .flush_every_ms(None)
        .open()
        .unwrap();
    let data = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("sled").join("db"))
        .unwrap();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let t = Instant::now();
        db.insert(i.to_be_bytes(), &buf[..]).unwrap();
        db.flush().unwrap();
        data.sync_data().unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    Raw {
        append_p50,
        overwrite_p50,
        sled_p50: percentile(&lat, 0.5),
    }
}

async fn open(dir: &tempfile::TempDir) -> Store {
    let mut cfg = StoreConfig::new(dir.path().join("store"));
    cfg.compaction_window = None;
    Store::open(cfg).await.unwrap()
}

struct PutFigures {
    writers: usize,
    total: usize,
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

async fn durable_puts(writers: usize, total: usize) -> PutFigures {
    let dir = bench_dir("put");
    let store = open(&dir).await;
    let value = bytes::Bytes::from(vec![0x42u8; 1024]);
    // Warm up.
    for i in 0..200 {
        store
            .put(PutRequest::new(format!("/warm/{i}"), value.clone()))
            .await
            .unwrap();
    }
    let per_writer = total / writers;
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            let value = value.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_writer);
                for i in 0..per_writer {
                    let key = format!("/registry/bench/w{w}/k{}", i % 1000);
                    let t = Instant::now();
                    store
                        .put(PutRequest::new(key, value.clone()))
                        .await
                        .unwrap();
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::with_capacity(total);
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    lat.sort();
    store.shutdown().await;
    PutFigures {
        writers,
        total: lat.len(),
        per_sec: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
    }
}

async fn range_10k() -> (Duration, Duration) {
    let dir = bench_dir("range");
    let store = open(&dir).await;
    let value = bytes::Bytes::from(vec![0x42u8; 1024]);
    // Batches of 100 keys per transaction to load quickly.
    for b in 0..100 {
        let ops = (0..100)
            .map(|i| {
                TxnOp::Put(PutRequest::new(
                    format!("/registry/pods/ns/p{:05}", b * 100 + i),
                    value.clone(),
                ))
            })
            .collect::<Vec<_>>();
        store.txn(TxnRequest::new().and_then(ops)).await.unwrap();
    }
    // Noise outside the prefix.
    for i in 0..1000 {
        store
            .put(PutRequest::new(format!("/registry/other/{i}"), "x"))
            .await
            .unwrap();
    }
    let mut lat = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let r = store
            .range(RangeRequest::new(KeyRange::prefix("/registry/pods/")))
            .await
            .unwrap();
        lat.push(t.elapsed());
        assert_eq!(r.kvs.len(), 10_000);
    }
    lat.sort();
    store.shutdown().await;
    (percentile(&lat, 0.5), percentile(&lat, 1.0))
}

async fn watch_latency(watchers: usize, writes: usize) -> (Duration, Duration) {
    let dir = bench_dir("watch");
    let store = open(&dir).await;
    let sent: Arc<parking_lot::Mutex<std::collections::HashMap<i64, Instant>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let mut w = store
            .watch(WatchRequest::new(KeyRange::prefix("/watched/")))
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut got: Vec<(i64, Instant)> = Vec::with_capacity(writes);
            while got.len() < writes {
                match w.next().await {
                    Some(Ok(WatchMessage::Events(evs))) => {
                        let now = Instant::now();
                        got.extend(evs.iter().map(|e| (e.kv.mod_revision, now)));
                    }
                    Some(Ok(_)) => {}
                    other => panic!("watch ended: {other:?}"),
                }
            }
            got
        }));
    }
    for i in 0..writes {
        let t = Instant::now();
        let r = store
            .put(PutRequest::new(format!("/watched/{}", i % 50), "v"))
            .await
            .unwrap();
        sent.lock().insert(r.revision, t);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut lat = Vec::new();
    for t in tasks {
        for (rev, at) in t.await.unwrap() {
            let start = sent.lock()[&rev];
            lat.push(at.saturating_duration_since(start));
        }
    }
    lat.sort();
    store.shutdown().await;
    (percentile(&lat, 0.5), percentile(&lat, 0.99))
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

struct Footprint {
    writes: usize,
    keys: usize,
    disk_before: u64,
    /// On-disk size after each round of churn + compaction + snapshot.
    disk_after: Vec<u64>,
    rss: u64,
    history_after: usize,
}

/// `rounds` times: `writes` puts of 1 KiB over `keys` keys, then compact everything and
/// snapshot (which purges the raft log). Disk use must level off, not grow with each round.
async fn footprint(writes: usize, keys: usize, rounds: usize) -> Footprint {
    let dir = bench_dir("footprint");
    let store = open(&dir).await;
    let value = bytes::Bytes::from(vec![0x42u8; 1024]);
    let writers = 64;
    let mut disk_before = 0;
    let mut disk_after = Vec::new();
    for round in 0..rounds {
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let store = store.clone();
                let value = value.clone();
                tokio::spawn(async move {
                    for i in 0..writes / writers {
                        let key = format!("/registry/churn/{}", (i * writers + w) % keys);
                        store
                            .put(PutRequest::new(key, value.clone()))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        store.flush().await.unwrap();
        if round == 0 {
            disk_before = store.disk_usage_bytes();
        }
        store.compact(store.current_revision()).await.unwrap();
        store.snapshot().await.unwrap();
        // Let sled reclaim segments freed by compaction and log purge.
        for _ in 0..3 {
            store
                .put(PutRequest::new("/registry/tick", "x"))
                .await
                .unwrap();
            store.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        disk_after.push(store.disk_usage_bytes());
    }
    let rss_peak = rss_bytes();
    // Freed heap that glibc keeps in its arenas is not the store's: give it back first.
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe { libc::malloc_trim(0) };
    eprintln!("rss before malloc_trim {}", mib(rss_peak));
    let f = Footprint {
        writes,
        keys,
        disk_before,
        disk_after,
        rss: rss_bytes(),
        history_after: store.history_len(),
    };
    store.shutdown().await;
    f
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or("?".into(), |kb| format!("{:.0} GiB", kb as f64 / 1048576.0));
    format!("{cpu}, {cores} cores, {mem} RAM, Linux {}", kernel.trim())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let q = quick();
    if std::env::var_os("K3RS_BENCH_ONLY_FOOTPRINT").is_some() {
        let f = rt.block_on(footprint(100_000, 10_000, 3));
        let after: Vec<_> = f.disk_after.iter().map(|b| mib(*b)).collect();
        println!(
            "disk before {} after rounds {after:?} rss {}",
            mib(f.disk_before),
            mib(f.rss)
        );
        // SAFETY: glibc's malloc_trim only returns free heap pages to the kernel.
        unsafe { libc::malloc_trim(0) };
        println!("rss after malloc_trim {}", mib(rss_bytes()));
        return;
    }
    if let Ok(n) = std::env::var("K3RS_BENCH_ONLY_PUTS") {
        // Profiling aid: one durable-put run with N writers.
        let writers: usize = n.parse().expect("K3RS_BENCH_ONLY_PUTS=<writers>");
        let f = rt.block_on(durable_puts(writers, 40_000));
        println!(
            "{} writers: {:.0}/s p50 {} p99 {}",
            f.writers,
            f.per_sec,
            us(f.p50),
            us(f.p99)
        );
        return;
    }
    let mut out = String::new();
    let w = &mut out;
    writeln!(
        w,
        "### Store ({})\n",
        if q { "quick run" } else { "full run" }
    )
    .ok();
    writeln!(
        w,
        "Machine: {}. Data dir on {}.\n",
        machine(),
        std::env::var("K3RS_BENCH_DIR")
            .unwrap_or_else(|_| std::env::temp_dir().display().to_string())
    )
    .ok();
    eprintln!("raw fdatasync...");
    let raw = raw_fdatasync(if q { 300 } else { 2000 });
    writeln!(
        w,
        "Same disk, same run, one writer, 1 KiB: write + fdatasync p50 {} appending to a file, {} \
         overwriting a preallocated one; sled insert + flush + fdatasync (the floor for a log kept \
         in sled) {}.\n",
        us(raw.append_p50),
        us(raw.overwrite_p50),
        us(raw.sled_p50)
    )
    .ok();
    writeln!(
        w,
        "| durable puts, 1 KiB | puts | throughput | p50 | p99 | p50 / append+fdatasync | p50 / sled floor |"
    )
    .ok();
    writeln!(w, "|---|---|---|---|---|---|---|").ok();
    for (writers, total) in [(1, 3000), (16, 30_000), (256, 100_000)] {
        let total = if q { total / 10 } else { total };
        eprintln!("{writers} writers...");
        let f = rt.block_on(durable_puts(writers, total));
        writeln!(
            w,
            "| {} writer{} | {} | {:.0}/s | {} | {} | {:.2}× | {:.2}× |",
            f.writers,
            if f.writers == 1 { "" } else { "s" },
            f.total,
            f.per_sec,
            us(f.p50),
            us(f.p99),
            f.p50.as_secs_f64() / raw.append_p50.as_secs_f64(),
            f.p50.as_secs_f64() / raw.sled_p50.as_secs_f64()
        )
        .ok();
    }
    eprintln!("range...");
    let (r50, rmax) = rt.block_on(range_10k());
    writeln!(
        w,
        "\nRange of 10,000 keys (1 KiB values) under a prefix, linearizable: median {}, worst of 20 {}.\n",
        ms(r50),
        ms(rmax)
    )
    .ok();
    eprintln!("watch...");
    let (w50, w99) = rt.block_on(watch_latency(100, if q { 100 } else { 500 }));
    writeln!(
        w,
        "Watch delivery, 100 watchers, put issued → event received: p50 {}, p99 {}.\n",
        us(w50),
        us(w99)
    )
    .ok();
    eprintln!("footprint...");
    let f = rt.block_on(footprint(if q { 10_000 } else { 100_000 }, 10_000, 3));
    let after: Vec<_> = f.disk_after.iter().map(|b| mib(*b)).collect();
    writeln!(
        w,
        "Footprint, {} puts of 1 KiB over {} keys per round: on disk {} after the first round before compaction; after each round's compaction + snapshot: {} ({} versions left in history); process RSS at the end {} (sled cache capacity {}).",
        f.writes,
        f.keys,
        mib(f.disk_before),
        after.join(", "),
        f.history_after,
        mib(f.rss),
        mib(DEFAULT_CACHE_CAPACITY)
    )
    .ok();
    println!("{out}");
}
