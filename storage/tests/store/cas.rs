//! Optimistic concurrency: compare-and-swap increments from many tasks lose no update.

use k3rs_storage::*;

use crate::common::TestDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_compare_and_swap_increments_lose_no_update() {
    let dir = TestDir::new("cas");
    let store = Store::open(StoreConfig::new(dir.path().join("store")))
        .await
        .unwrap();
    store.put(PutRequest::new("counter", "0")).await.unwrap();
    let tasks = 16;
    let per_task = 40;
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut conflicts = 0;
                for _ in 0..per_task {
                    let mut cur = store.get("counter").await.unwrap().unwrap();
                    loop {
                        let n: u64 = std::str::from_utf8(&cur.value).unwrap().parse().unwrap();
                        let r = store
                            .txn(
                                TxnRequest::new()
                                    .when([Compare::mod_revision_is("counter", cur.mod_revision)])
                                    .and_then([TxnOp::Put(PutRequest::new(
                                        "counter",
                                        (n + 1).to_string(),
                                    ))])
                                    .or_else([TxnOp::Range(RangeRequest::new(KeyRange::key(
                                        "counter",
                                    )))]),
                            )
                            .await
                            .unwrap();
                        if r.succeeded {
                            break;
                        }
                        conflicts += 1;
                        // The failure branch returns the current value: retry from it.
                        match &r.responses[0] {
                            TxnOpResponse::Range(rr) => cur = rr.kvs[0].clone(),
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    let mut conflicts = 0;
    for h in handles {
        conflicts += h.await.unwrap();
    }
    let v = store.get("counter").await.unwrap().unwrap();
    assert_eq!(
        std::str::from_utf8(&v.value).unwrap(),
        (tasks * per_task).to_string()
    );
    assert_eq!(v.version, (tasks * per_task + 1) as i64);
    eprintln!(
        "{} increments, {conflicts} conflicts retried",
        tasks * per_task
    );
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_fsyncs() {
    let dir = TestDir::new("group-commit");
    let store = Store::open(StoreConfig::new(dir.path().join("store")))
        .await
        .unwrap();
    let before = store.fsync_count();
    let writers = 64;
    let per_writer = 20;
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..per_writer {
                    store
                        .put(PutRequest::new(format!("gc/{w}/{i}"), "v"))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let fsyncs = store.fsync_count() - before;
    let writes = (writers * per_writer) as u64;
    assert!(fsyncs > 0, "acknowledged writes were fsynced");
    assert!(
        fsyncs * 4 <= writes,
        "{writes} concurrent writes took {fsyncs} fsyncs: not grouped"
    );
    let all = store
        .range(RangeRequest::new(KeyRange::prefix("gc/")).count_only())
        .await
        .unwrap();
    assert_eq!(all.count as u64, writes);
    eprintln!("{writes} writes from {writers} writers shared {fsyncs} fsyncs");
    store.shutdown().await;
}
