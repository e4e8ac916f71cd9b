//! Watch guarantees under concurrency: every watcher sees every event exactly once, in revision
//! order, without gaps — whether it started before the writes, replayed history, was dropped
//! and resumed, or fell so far behind that it was moved back to catching up.

use std::collections::BTreeMap;
use std::time::Duration;

use k3rs_storage::*;

use crate::common::TestDir;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    rev: i64,
    key: String,
    kind: EventKind,
}

async fn open(dir: &TestDir) -> Store {
    let mut cfg = StoreConfig::new(dir.path().join("store"));
    cfg.compaction_window = None;
    Store::open(cfg).await.unwrap()
}

/// Reads a watch until it has delivered `until` (bounded in time).
async fn drain(w: &mut WatchStream, until: i64, out: &mut Vec<Seen>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while w.next_revision() <= until {
        let msg = tokio::time::timeout_at(deadline, w.next())
            .await
            .expect("watch did not catch up within 60s")
            .expect("watch ended early")
            .expect("watch failed");
        if let WatchMessage::Events(evs) = msg {
            for e in evs {
                out.push(Seen {
                    rev: e.kv.mod_revision,
                    key: String::from_utf8_lossy(&e.kv.key).into_owned(),
                    kind: e.kind,
                });
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watcher_sees_each_event_once_in_order_without_gaps() {
    let dir = TestDir::new("watch");
    let store = open(&dir).await;
    let start = store.current_revision() + 1;
    let prefix = KeyRange::prefix("/w/");
    let progress = |r: WatchRequest| r.progress_notify(Duration::from_millis(200));

    // Started before any write; read concurrently.
    let mut early = store
        .watch(progress(WatchRequest::new(prefix.clone())))
        .unwrap();
    // Started before any write but not read until the end: falls behind by far more than its
    // channel holds, so it is moved back to catching up from the store.
    let mut slow = store
        .watch(WatchRequest::new(prefix.clone()).start_revision(start))
        .unwrap();

    let writers: Vec<_> = (0..4)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut acks = Vec::new();
                for i in 0..400 {
                    let key = format!("/w/{t}/{}", i % 25);
                    if i % 7 == 6 {
                        let r = store
                            .delete_range(DeleteRangeRequest::new(KeyRange::key(key.clone())))
                            .await
                            .unwrap();
                        if r.deleted == 1 {
                            acks.push(Seen {
                                rev: r.revision,
                                key,
                                kind: EventKind::Delete,
                            });
                        }
                    } else {
                        let r = store
                            .put(PutRequest::new(key.clone(), format!("{i}")))
                            .await
                            .unwrap();
                        acks.push(Seen {
                            rev: r.revision,
                            key,
                            kind: EventKind::Put,
                        });
                    }
                }
                acks
            })
        })
        .collect();

    let early_task = tokio::spawn(async move {
        let mut seen = Vec::new();
        // Read until told where the writes ended.
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(60), early.next())
                .await
                .expect("early watcher stalled")
                .unwrap()
                .unwrap();
            match msg {
                WatchMessage::Events(evs) => seen.extend(evs.into_iter().map(|e| Seen {
                    rev: e.kv.mod_revision,
                    key: String::from_utf8_lossy(&e.kv.key).into_owned(),
                    kind: e.kind,
                })),
                WatchMessage::Progress { .. } => {
                    if seen.len() >= 4 * 400 - 4 * 60 {
                        // Nothing new for a while and most writes seen: let the caller decide.
                        return (early, seen);
                    }
                }
            }
        }
    });

    // Mid-way: a watcher replaying history from the first revision while writes continue, and
    // one that reads a little, is dropped, and is resumed from where it stopped.
    while store.current_revision() < start + 500 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut replay = store
        .watch(WatchRequest::new(prefix.clone()).start_revision(start))
        .unwrap();
    let mut resumed_seen = Vec::new();
    let mut first = store
        .watch(WatchRequest::new(prefix.clone()).start_revision(start))
        .unwrap();
    drain(&mut first, start + 200, &mut resumed_seen).await;
    let resume_from = first.next_revision();
    drop(first);

    let mut expected: Vec<Seen> = Vec::new();
    for w in writers {
        expected.extend(w.await.unwrap());
    }
    expected.sort_by_key(|s| s.rev);
    let last = store.current_revision();
    assert_eq!(expected.last().unwrap().rev, last);
    // Each write was one revision: revisions are dense.
    for (i, s) in expected.iter().enumerate() {
        assert_eq!(s.rev, start + i as i64, "revisions must be consecutive");
    }

    let (mut early, mut early_seen) = early_task.await.unwrap();
    drain(&mut early, last, &mut early_seen).await;
    let mut replay_seen = Vec::new();
    drain(&mut replay, last, &mut replay_seen).await;
    let mut slow_seen = Vec::new();
    drain(&mut slow, last, &mut slow_seen).await;
    let mut resumed = store
        .watch(WatchRequest::new(prefix.clone()).start_revision(resume_from))
        .unwrap();
    drain(&mut resumed, last, &mut resumed_seen).await;

    for (name, seen) in [
        ("early", &early_seen),
        ("replay", &replay_seen),
        ("slow", &slow_seen),
        ("dropped+resumed", &resumed_seen),
    ] {
        assert_eq!(seen.len(), expected.len(), "{name}: wrong number of events");
        if let Some(i) = (0..seen.len()).find(|&i| seen[i] != expected[i]) {
            panic!(
                "{name}: event {i} is {:?}, expected {:?}",
                seen[i], expected[i]
            );
        }
    }
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_compacted_revision_fails_with_compacted() {
    let dir = TestDir::new("watch-compacted");
    let store = open(&dir).await;
    for i in 0..20 {
        store
            .put(PutRequest::new(format!("k{}", i % 3), "v"))
            .await
            .unwrap();
    }
    // A watcher that has not read yet when history it needs is compacted away.
    let mut behind = store
        .watch(WatchRequest::new(KeyRange::prefix("k")).start_revision(2))
        .unwrap();
    let compact_to = store.current_revision() - 5;
    store.compact(compact_to).await.unwrap();

    let err = store
        .watch(WatchRequest::new(KeyRange::prefix("k")).start_revision(compact_to - 1))
        .unwrap_err();
    assert_eq!(
        err,
        Error::Compacted {
            requested: compact_to - 1,
            compact_revision: compact_to
        }
    );
    match behind.next().await {
        Some(Err(Error::Compacted {
            compact_revision, ..
        })) => {
            assert_eq!(compact_revision, compact_to)
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(
        behind.next().await.is_none(),
        "the stream ends after the error"
    );

    // At the compact revision itself the watch works and replays what is left.
    let mut at = store
        .watch(WatchRequest::new(KeyRange::prefix("k")).start_revision(compact_to))
        .unwrap();
    let mut seen = Vec::new();
    drain(&mut at, store.current_revision(), &mut seen).await;
    assert_eq!(seen.first().map(|s| s.rev), Some(compact_to));
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_notifications_report_the_current_revision_when_idle() {
    let dir = TestDir::new("watch-progress");
    let store = open(&dir).await;
    let mut w = store
        .watch(
            WatchRequest::new(KeyRange::prefix("mine/"))
                .progress_notify(Duration::from_millis(100)),
        )
        .unwrap();
    // Writes elsewhere advance the revision without events for this watcher.
    for i in 0..5 {
        store
            .put(PutRequest::new(format!("other/{i}"), "v"))
            .await
            .unwrap();
    }
    let current = store.current_revision();
    let mut got = BTreeMap::new();
    for _ in 0..20 {
        match tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .unwrap()
        {
            Some(Ok(WatchMessage::Progress { revision })) => {
                got.insert("progress", revision);
                if revision == current {
                    break;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got.get("progress"), Some(&current));
    store.shutdown().await;
}
