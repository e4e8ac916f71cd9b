//! Opening a data directory that is locked, foreign, of another format or corrupt fails with a
//! clear error naming the path, and never resets it; oversized requests are refused.

use k3rs_storage::*;

use crate::common::TestDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_in_use_by_another_process_is_refused_with_its_path() {
    let dir = TestDir::new("locked");
    let path = dir.path().join("store");
    let store = Store::open(StoreConfig::new(&path)).await.unwrap();
    let err = Store::open(StoreConfig::new(&path)).await.unwrap_err();
    assert!(
        matches!(err, OpenError::Locked { holder: Some(pid), .. } if pid == std::process::id()),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    store.shutdown().await;
    // Released on shutdown.
    let again = Store::open(StoreConfig::new(&path)).await.unwrap();
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_with_other_content_is_not_touched() {
    let dir = TestDir::new("foreign");
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    let err = Store::open(StoreConfig::new(dir.path())).await.unwrap_err();
    assert!(matches!(err, OpenError::NotAStore { .. }), "{err:?}");
    assert!(err.to_string().contains(&dir.path().display().to_string()));
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("notes.txt")],
        "nothing was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_another_format_is_refused() {
    let dir = TestDir::new("format");
    let path = dir.path().join("store");
    let store = Store::open(StoreConfig::new(&path)).await.unwrap();
    store.put(PutRequest::new("k", "v")).await.unwrap();
    store.shutdown().await;
    std::fs::write(path.join("FORMAT"), "k3rs-store v999\n").unwrap();
    let err = Store::open(StoreConfig::new(&path)).await.unwrap_err();
    assert!(
        matches!(err, OpenError::UnsupportedFormat { ref found, .. } if found == "k3rs-store v999"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_data_fails_to_open_instead_of_being_reset() {
    let dir = TestDir::new("corrupt");
    let path = dir.path().join("store");
    let store = Store::open(StoreConfig::new(&path)).await.unwrap();
    for i in 0..50 {
        store
            .put(PutRequest::new(format!("k{i}"), "v"))
            .await
            .unwrap();
    }
    store.shutdown().await;
    // Damage one stored record behind the store's back.
    {
        let db = sled::open(path.join("sled")).unwrap();
        let tree = db.open_tree("sm-0").unwrap();
        let (k, _) = tree.scan_prefix(b"r").next().unwrap().unwrap();
        tree.insert(k, &[0xde, 0xad][..]).unwrap();
        db.flush().unwrap();
    }
    let err = Store::open(StoreConfig::new(&path)).await.unwrap_err();
    assert!(matches!(err, OpenError::Corrupt { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    // The data is still there for an operator to inspect.
    let db = sled::open(path.join("sled")).unwrap();
    assert!(db.open_tree("sm-0").unwrap().len() > 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_size_limit_are_refused() {
    let dir = TestDir::new("limit");
    let mut cfg = StoreConfig::new(dir.path().join("store"));
    assert_eq!(
        cfg.max_request_bytes,
        1536 * 1024,
        "etcd's default of 1.5 MiB"
    );
    cfg.max_request_bytes = 4096;
    let store = Store::open(cfg).await.unwrap();
    let err = store
        .put(PutRequest::new("big", vec![0u8; 5000]))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        Error::RequestTooLarge {
            size: 5003,
            limit: 4096
        }
    );
    let err = store
        .txn(TxnRequest::new().and_then([
            TxnOp::Put(PutRequest::new("a", vec![0u8; 3000])),
            TxnOp::Put(PutRequest::new("b", vec![0u8; 3000])),
        ]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RequestTooLarge { .. }));
    assert_eq!(
        store.get("big").await.unwrap(),
        None,
        "nothing half-written"
    );
    store
        .put(PutRequest::new("ok", vec![0u8; 4000]))
        .await
        .unwrap();
    store.shutdown().await;
}
