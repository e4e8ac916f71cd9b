//! Data-driven MVCC tests: `testdata/mvcc/*.txt` hold scripts of operations with the expected
//! output of each, side by side. `REWRITE=1 cargo test -p k3rs-storage --test store scripts`
//! rewrites the expectations from the actual output (review the diff before committing).
//!
//! Block format: one or more input lines, a `----` line, then the expected output up to a blank
//! line. Lines starting with `#` between blocks are comments.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k3rs_storage::*;

use crate::common::TestDir;

struct Block {
    input: Vec<String>,
    expected: Vec<String>,
    /// Lines of the file before the block's input (comments, blank lines).
    preamble: Vec<String>,
}

fn parse(text: &str) -> (Vec<Block>, Vec<String>) {
    let mut blocks = Vec::new();
    let mut lines = text.lines().peekable();
    let mut preamble = Vec::new();
    while let Some(line) = lines.next() {
        if line.trim().is_empty() || line.starts_with('#') {
            preamble.push(line.to_string());
            continue;
        }
        let mut input = vec![line.to_string()];
        for l in lines.by_ref() {
            if l == "----" {
                break;
            }
            input.push(l.to_string());
        }
        let mut expected = Vec::new();
        for l in lines.by_ref() {
            if l.is_empty() {
                break;
            }
            expected.push(l.to_string());
        }
        blocks.push(Block {
            input,
            expected,
            preamble: std::mem::take(&mut preamble),
        });
    }
    (blocks, preamble)
}

fn kv(kv: &KeyValue) -> String {
    let mut s = format!(
        "{}={} (c={} m={} v={})",
        String::from_utf8_lossy(&kv.key),
        String::from_utf8_lossy(&kv.value),
        kv.create_revision,
        kv.mod_revision,
        kv.version
    );
    if kv.lease != 0 {
        write!(s, " lease={}", kv.lease).unwrap();
    }
    s
}

fn range_out(out: &mut Vec<String>, r: &RangeResponse) {
    for k in &r.kvs {
        out.push(kv(k));
    }
    out.push(format!(
        "count={} more={} rev={}",
        r.count, r.more, r.revision
    ));
}

/// `key`, or `a..c`, or `a..` (to the end), or `p*` (prefix).
fn parse_range(s: &str) -> KeyRange {
    if let Some(p) = s.strip_suffix('*') {
        KeyRange::prefix(p.to_string())
    } else if let Some((a, b)) = s.split_once("..") {
        KeyRange::interval(a.to_string(), b.to_string())
    } else {
        KeyRange::key(s.to_string())
    }
}

/// `""` stands for the empty string.
fn unq(s: &str) -> String {
    if s == "\"\"" {
        String::new()
    } else {
        s.to_string()
    }
}

fn opt<'a>(args: &'a [&'a str], name: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

fn flag(args: &[&str], name: &str) -> bool {
    args.contains(&name)
}

fn num(args: &[&str], name: &str) -> i64 {
    opt(args, name).map_or(0, |v| v.parse().expect("number"))
}

fn txn_op(words: &[&str]) -> TxnOp {
    match words {
        ["put", k, v, rest @ ..] => {
            let mut p = PutRequest::new(unq(k), unq(v));
            p.lease = num(rest, "lease");
            p.prev_kv = flag(rest, "prev");
            TxnOp::Put(p)
        }
        ["del", r, rest @ ..] => {
            let mut d = DeleteRangeRequest::new(parse_range(r));
            d.prev_kv = flag(rest, "prev");
            TxnOp::DeleteRange(d)
        }
        ["get", r, rest @ ..] => {
            let mut q = RangeRequest::new(parse_range(r));
            q.revision = num(rest, "rev");
            q.limit = num(rest, "limit") as usize;
            TxnOp::Range(q)
        }
        other => panic!("bad txn op {other:?}"),
    }
}

fn compare(words: &[&str]) -> Compare {
    let [key, target, op, value] = words else {
        panic!("bad compare {words:?}")
    };
    let op = match *op {
        "=" => CompareOp::Equal,
        "!=" => CompareOp::NotEqual,
        ">" => CompareOp::Greater,
        "<" => CompareOp::Less,
        o => panic!("bad compare op {o}"),
    };
    let n = || value.parse::<i64>().expect("number");
    let target = match *target {
        "version" => CompareTarget::Version(n()),
        "create" => CompareTarget::CreateRevision(n()),
        "mod" => CompareTarget::ModRevision(n()),
        "lease" => CompareTarget::Lease(n()),
        "value" => CompareTarget::Value(unq(value).into()),
        t => panic!("bad compare target {t}"),
    };
    Compare::new(key.to_string(), op, target)
}

fn err(out: &mut Vec<String>, e: Error) {
    out.push(format!("error: {e}"));
}

async fn run_block(store: &Store, clock: &ManualClock, input: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let words: Vec<&str> = input[0].split_whitespace().collect();
    match words.as_slice() {
        ["put", k, v, rest @ ..] => {
            let mut p = PutRequest::new(unq(k), unq(v));
            p.lease = num(rest, "lease");
            p.prev_kv = flag(rest, "prev");
            match store.put(p).await {
                Ok(r) => {
                    out.push(format!("rev={}", r.revision));
                    if let Some(p) = r.prev_kv {
                        out.push(format!("prev: {}", kv(&p)));
                    }
                }
                Err(e) => err(&mut out, e),
            }
        }
        ["del", r, rest @ ..] => {
            let mut d = DeleteRangeRequest::new(parse_range(r));
            d.prev_kv = flag(rest, "prev");
            match store.delete_range(d).await {
                Ok(r) => {
                    out.push(format!("deleted={} rev={}", r.deleted, r.revision));
                    for p in &r.prev_kvs {
                        out.push(format!("prev: {}", kv(p)));
                    }
                }
                Err(e) => err(&mut out, e),
            }
        }
        ["get", r, rest @ ..] => {
            let mut q = RangeRequest::new(parse_range(r));
            q.revision = num(rest, "rev");
            q.limit = num(rest, "limit") as usize;
            q.count_only = flag(rest, "count");
            q.keys_only = flag(rest, "keys");
            match store.range(q).await {
                Ok(r) => range_out(&mut out, &r),
                Err(e) => err(&mut out, e),
            }
        }
        // Pages through a range `limit` keys at a time on one snapshot, as the API server does.
        ["paginate", r, rest @ ..] => {
            let limit = num(rest, "limit") as usize;
            let mut range = parse_range(r);
            let mut rev = num(rest, "rev");
            for _ in 0..100 {
                let q = RangeRequest::new(range.clone()).limit(limit).revision(rev);
                match store.range(q).await {
                    Ok(resp) => {
                        let keys: Vec<_> = resp
                            .kvs
                            .iter()
                            .map(|k| {
                                format!("{}@{}", String::from_utf8_lossy(&k.key), k.mod_revision)
                            })
                            .collect();
                        out.push(format!("page rev={}: {}", resp.revision, keys.join(" ")));
                        rev = resp.revision;
                        if !resp.more {
                            break;
                        }
                        range = range.continue_after(&resp.kvs.last().unwrap().key);
                    }
                    Err(e) => {
                        err(&mut out, e);
                        break;
                    }
                }
            }
        }
        ["txn"] => {
            let mut t = TxnRequest::new();
            for line in &input[1..] {
                let w: Vec<&str> = line.split_whitespace().collect();
                match w.as_slice() {
                    ["if", rest @ ..] => t.compare.push(compare(rest)),
                    ["then", rest @ ..] => t.success.push(txn_op(rest)),
                    ["else", rest @ ..] => t.failure.push(txn_op(rest)),
                    other => panic!("bad txn line {other:?}"),
                }
            }
            match store.txn(t).await {
                Ok(r) => {
                    out.push(format!("succeeded={} rev={}", r.succeeded, r.revision));
                    for resp in &r.responses {
                        match resp {
                            TxnOpResponse::Put(p) => {
                                out.push(format!("  put rev={}", p.revision));
                                if let Some(p) = &p.prev_kv {
                                    out.push(format!("  prev: {}", kv(p)));
                                }
                            }
                            TxnOpResponse::DeleteRange(d) => {
                                out.push(format!("  deleted={} rev={}", d.deleted, d.revision))
                            }
                            TxnOpResponse::Range(r) => {
                                let mut lines = Vec::new();
                                range_out(&mut lines, r);
                                out.extend(lines.into_iter().map(|l| format!("  {l}")));
                            }
                        }
                    }
                }
                Err(e) => err(&mut out, e),
            }
        }
        ["lease-grant", id, ttl] => {
            match store
                .lease_grant_with_id(id.parse().unwrap(), ttl.parse().unwrap())
                .await
            {
                Ok(r) => out.push(format!("granted {} ttl={}", r.id, r.ttl_seconds)),
                Err(e) => err(&mut out, e),
            }
        }
        ["lease-revoke", id] => match store.lease_revoke(id.parse().unwrap()).await {
            Ok(r) => out.push(format!("revoked rev={}", r.revision)),
            Err(e) => err(&mut out, e),
        },
        ["lease-keepalive", id] => match store.lease_keep_alive(id.parse().unwrap()).await {
            Ok(ttl) => out.push(format!("ttl={ttl}")),
            Err(e) => err(&mut out, e),
        },
        ["lease-ttl", id] => match store.lease_time_to_live(id.parse().unwrap()).await {
            Ok(t) => out.push(format!(
                "granted={} remaining={} keys=[{}]",
                t.granted_ttl_seconds,
                t.remaining_seconds,
                t.keys
                    .iter()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
            Err(e) => err(&mut out, e),
        },
        // Moves the lessor's clock and lets it revoke what expired.
        ["advance", secs] => {
            clock.advance(Duration::from_secs(secs.parse().unwrap()));
            match store.revoke_expired_leases().await {
                Ok(n) => out.push(format!("expired={n} rev={}", store.current_revision())),
                Err(e) => err(&mut out, e),
            }
        }
        ["compact", rev] => match store.compact(rev.parse().unwrap()).await {
            Ok(r) => out.push(format!(
                "compacted to {} at rev={}",
                r.compact_revision, r.revision
            )),
            Err(e) => err(&mut out, e),
        },
        ["history"] => out.push(format!("versions={}", store.history_len())),
        ["revision"] => out.push(format!(
            "current={} compact={}",
            store.current_revision(),
            store.compact_revision()
        )),
        // Everything a watch from `from` sees until it has caught up with the store.
        ["watch", r, rest @ ..] => {
            let mut req = WatchRequest::new(parse_range(r));
            req.start_revision = num(rest, "from");
            req.prev_kv = flag(rest, "prev");
            req.filter_put = flag(rest, "noput");
            req.filter_delete = flag(rest, "nodelete");
            req.progress_notify_interval = Some(Duration::from_millis(50));
            match store.watch(req) {
                Err(e) => err(&mut out, e),
                Ok(mut w) => loop {
                    match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
                        Err(_) => panic!("watch did not catch up within 10s"),
                        Ok(None) => {
                            out.push("end".into());
                            break;
                        }
                        Ok(Some(Err(e))) => {
                            err(&mut out, e);
                            break;
                        }
                        Ok(Some(Ok(WatchMessage::Progress { revision }))) => {
                            out.push(format!("progress rev={revision}"));
                            break;
                        }
                        Ok(Some(Ok(WatchMessage::Events(evs)))) => {
                            for e in evs {
                                let mut line = match e.kind {
                                    EventKind::Put => format!("PUT {}", kv(&e.kv)),
                                    EventKind::Delete => format!(
                                        "DELETE {} m={}",
                                        String::from_utf8_lossy(&e.kv.key),
                                        e.kv.mod_revision
                                    ),
                                };
                                if let Some(p) = e.prev_kv {
                                    write!(line, " prev: {}", kv(&p)).unwrap();
                                }
                                out.push(line);
                            }
                        }
                    }
                },
            }
        }
        other => panic!("unknown script command {other:?}"),
    }
    out
}

async fn run_file(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let (blocks, trailer) = parse(&text);
    let dir = TestDir::new("script");
    let clock = Arc::new(ManualClock::default());
    let mut cfg = StoreConfig::new(dir.path().join("store"));
    cfg.clock = clock.clone();
    cfg.compaction_window = None;
    cfg.lease_check_interval = Duration::from_secs(3600);
    let store = Store::open(cfg).await.unwrap();
    let rewrite = std::env::var_os("REWRITE").is_some();
    let mut rewritten = String::new();
    let mut failures = Vec::new();
    for b in &blocks {
        let actual = run_block(&store, &clock, &b.input).await;
        if actual != b.expected {
            failures.push(format!(
                "{}: {}\n  expected:\n    {}\n  actual:\n    {}",
                path.display(),
                b.input.join(" / "),
                b.expected.join("\n    "),
                actual.join("\n    ")
            ));
        }
        for l in &b.preamble {
            writeln!(rewritten, "{l}").unwrap();
        }
        for l in &b.input {
            writeln!(rewritten, "{l}").unwrap();
        }
        writeln!(rewritten, "----").unwrap();
        for l in &actual {
            writeln!(rewritten, "{l}").unwrap();
        }
        writeln!(rewritten).unwrap();
    }
    for l in &trailer {
        if !l.trim().is_empty() {
            writeln!(rewritten, "{l}").unwrap();
        }
    }
    store.shutdown().await;
    if rewrite {
        std::fs::write(path, rewritten.trim_end().to_string() + "\n").unwrap();
    } else if !failures.is_empty() {
        panic!(
            "{} block(s) differ:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

macro_rules! script_tests {
    ($($name:ident => $file:literal,)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            run_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/mvcc").join($file)).await;
        }
    )*};
}

script_tests! {
    revisions_versions_and_deletes_follow_etcd => "basics.txt",
    ranges_read_old_revisions_and_paginate_on_one_snapshot => "ranges.txt",
    transactions_choose_a_branch_atomically => "txn.txt",
    leases_expire_and_take_their_keys_with_them => "leases.txt",
    compaction_drops_history_but_keeps_current_values => "compaction.txt",
    watches_replay_history_in_revision_order => "watch.txt",
}
