//! Raft snapshots: a store builds one and purges its log; a server that joins later catches up
//! by installing it, and then serves identical ranges at the same revisions.

use std::time::Duration;

use k3rs_storage::*;
use openraft::BasicNode;

use crate::common::TestDir;

fn config(dir: &TestDir, name: &str, node: u64, router: &LocalRouter) -> StoreConfig {
    let mut cfg = StoreConfig::new(dir.path().join(name));
    cfg.node_id = node;
    cfg.router = Some(router.clone());
    cfg.compaction_window = None;
    cfg.snapshot_after_entries = 300;
    cfg
}

async fn everything(store: &Store, revision: i64) -> RangeResponse {
    store
        .range(
            RangeRequest::new(KeyRange::prefix(""))
                .revision(revision)
                .serializable(),
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_server_catches_up_from_a_snapshot_with_identical_ranges_and_revision() {
    let dir = TestDir::new("snapshot");
    let router = LocalRouter::new();
    let leader = Store::open(config(&dir, "a", 1, &router)).await.unwrap();

    // History with overwrites, deletes, a lease with keys, and a compaction.
    let lease = leader.lease_grant(600).await.unwrap().id;
    for i in 0..1200 {
        let key = format!("/registry/things/ns{}/obj{}", i % 3, i % 150);
        if i % 11 == 10 {
            leader
                .delete_range(DeleteRangeRequest::new(KeyRange::key(key)))
                .await
                .unwrap();
        } else {
            let mut put = PutRequest::new(key, format!("value-{i}-{}", "x".repeat(i % 200)));
            if i % 50 == 0 {
                put.lease = lease;
            }
            leader.put(put).await.unwrap();
        }
    }
    let compact_to = leader.current_revision() - 400;
    leader.compact(compact_to).await.unwrap();
    leader.snapshot().await.unwrap();
    let m = leader.raft().metrics().borrow().clone();
    assert!(m.snapshot.is_some(), "a snapshot was built");
    leader
        .raft()
        .wait(Some(Duration::from_secs(30)))
        .metrics(|m| m.purged.is_some(), "log purged after the snapshot")
        .await
        .unwrap();

    // A new server joins as a learner: the log it would need is gone, so it gets the snapshot.
    let mut cfg_b = config(&dir, "b", 2, &router);
    cfg_b.bootstrap = false;
    let follower = Store::open(cfg_b).await.unwrap();
    leader
        .raft()
        .add_learner(2, BasicNode::new(""), true)
        .await
        .unwrap();
    let applied = leader.raft().metrics().borrow().last_applied;
    follower
        .raft()
        .wait(Some(Duration::from_secs(30)))
        .metrics(|m| m.last_applied >= applied, "follower caught up")
        .await
        .unwrap();
    assert!(
        follower.raft().metrics().borrow().snapshot.is_some(),
        "the follower installed a snapshot"
    );

    assert_eq!(follower.current_revision(), leader.current_revision());
    assert_eq!(follower.compact_revision(), compact_to);
    for rev in [0, compact_to, compact_to + 123] {
        let a = everything(&leader, rev).await;
        let b = everything(&follower, rev).await;
        assert!(a.count > 100);
        assert_eq!(a, b, "ranges at revision {rev} differ");
    }
    assert_eq!(follower.leases(), leader.leases());
    let err = follower
        .range(
            RangeRequest::new(KeyRange::prefix(""))
                .revision(compact_to - 1)
                .serializable(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Compacted { .. }), "{err:?}");

    // Writes after the snapshot reach the follower through the log, and its watchers.
    let mut w = follower
        .watch(WatchRequest::new(KeyRange::prefix("/after/")))
        .unwrap();
    let r = leader.put(PutRequest::new("/after/x", "1")).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .unwrap();
    match msg {
        Some(Ok(WatchMessage::Events(evs))) => assert_eq!(evs[0].kv.mod_revision, r.revision),
        other => panic!("unexpected {other:?}"),
    }
    // A follower refuses linearizable work; it names the leader.
    assert_eq!(
        follower.put(PutRequest::new("k", "v")).await.unwrap_err(),
        Error::NotLeader { leader: Some(1) }
    );
    let before = everything(&leader, 0).await;
    follower.shutdown().await;
    leader.shutdown().await;

    // The leader restarts from its snapshot plus the log after it.
    let leader = Store::open(config(&dir, "a", 1, &LocalRouter::new()))
        .await
        .unwrap();
    assert_eq!(everything(&leader, 0).await, before);
    leader.shutdown().await;
}
