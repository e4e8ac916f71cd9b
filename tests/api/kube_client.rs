//! The same core paths through kube-rs: a typed `Api`, and a watcher/reflector that stays in
//! sync across a server restart.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, Config};

use crate::cluster::Cluster;

async fn client(c: &Cluster) -> Client {
    let kc = kube::config::Kubeconfig::read_from(c.kubeconfig()).unwrap();
    let cfg = Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    Client::try_from(cfg).unwrap()
}

fn cm(name: &str, label: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"set": label}},
        "data": {"k": name},
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_api_creates_reads_lists_patches_and_conflicts() {
    let c = Cluster::start();
    let api: Api<ConfigMap> = Api::namespaced(client(&c).await, "default");
    let created = api
        .create(&PostParams::default(), &cm("a", "x"))
        .await
        .unwrap();
    api.create(&PostParams::default(), &cm("b", "y"))
        .await
        .unwrap();
    let err = api
        .create(&PostParams::default(), &cm("a", "x"))
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists")),
        other => panic!("{other:?}"),
    }
    let got = api.get("a").await.unwrap();
    assert_eq!(got.metadata.uid, created.metadata.uid);
    let listed = api
        .list(&ListParams::default().labels("set=x"))
        .await
        .unwrap();
    assert_eq!(
        listed
            .items
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect::<Vec<_>>(),
        vec!["a"]
    );
    let patched = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {"k": "patched"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap()["k"], "patched");
    // Replacing with the resourceVersion read before the patch conflicts.
    let err = api
        .replace("a", &PostParams::default(), &got)
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
        other => panic!("{other:?}"),
    }
    let applied = api
        .patch(
            "c",
            &PatchParams::apply("kube-test"),
            &Patch::Apply(cm("c", "z")),
        )
        .await
        .unwrap();
    assert_eq!(
        applied.metadata.managed_fields.unwrap()[0]
            .manager
            .as_deref(),
        Some("kube-test")
    );
    api.delete("b", &DeleteParams::default()).await.unwrap();
    let err = api.get("b").await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reflector_stays_in_sync_across_a_server_restart() {
    let mut c = Cluster::start();
    let api: Api<ConfigMap> = Api::namespaced(client(&c).await, "default");
    let (reader, writer) = reflector::store::<ConfigMap>();
    let seen = std::sync::Arc::new(parking_lot_free::Seen::default());
    let seen2 = seen.clone();
    let stream = reflector(
        writer,
        watcher(api.clone(), watcher::Config::default().labels("set=r")),
    )
    .applied_objects()
    .for_each(move |o| {
        if let Ok(o) = o {
            seen2.add(o.metadata.name.unwrap_or_default());
        }
        futures::future::ready(())
    });
    let task = tokio::spawn(stream);
    for i in 0..20 {
        api.create(&PostParams::default(), &cm(&format!("r{i}"), "r"))
            .await
            .unwrap();
    }
    wait_until(|| reader.state().len() == 20, "reflector sees the first 20").await;

    tokio::task::block_in_place(|| {
        c.stop();
        c.boot();
    });
    let api: Api<ConfigMap> = Api::namespaced(client(&c).await, "default");
    for i in 20..30 {
        api.create(&PostParams::default(), &cm(&format!("r{i}"), "r"))
            .await
            .unwrap();
    }
    for i in 0..5 {
        api.delete(&format!("r{i}"), &DeleteParams::default())
            .await
            .unwrap();
    }
    let want: BTreeSet<String> = (5..30).map(|i| format!("r{i}")).collect();
    wait_until(
        || {
            reader
                .state()
                .iter()
                .map(|o| o.metadata.name.clone().unwrap())
                .collect::<BTreeSet<_>>()
                == want
        },
        "reflector matches the server after the restart",
    )
    .await;
    let all: BTreeSet<String> = (0..30).map(|i| format!("r{i}")).collect();
    assert_eq!(seen.names(), all, "every created object was seen");
    task.abort();
}

async fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

mod parking_lot_free {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct Seen(Mutex<BTreeSet<String>>);

    impl Seen {
        pub fn add(&self, n: String) {
            self.0.lock().unwrap().insert(n);
        }
        pub fn names(&self) -> BTreeSet<String> {
            self.0.lock().unwrap().clone()
        }
    }
}
