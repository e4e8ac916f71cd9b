//! Unit tests of pod volumes: the atomic writer, rendering of configMap/secret/downwardAPI
//! files, hostPath type checks, subPath resolution, and emptyDir/hostPath/downwardAPI set-up
//! and teardown on a temporary directory (the tmpfs case mounts for real: needs root, as CI).

use std::sync::Arc;

use serde_json::json;

use super::*;

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn versions(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("..") && n != "..data")
        .collect()
}

#[test]
fn atomic_writes_swap_data_and_keep_links() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("v");
    let mut files = Files::new();
    files.insert("a".into(), (b"1".to_vec(), 0o644));
    files.insert("sub/b".into(), (b"2".to_vec(), 0o600));
    assert!(atomic_write(&dir, &files).unwrap());
    assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "1");
    assert_eq!(std::fs::read_to_string(dir.join("sub/b")).unwrap(), "2");
    assert_eq!(
        std::fs::read_link(dir.join("a")).unwrap(),
        Path::new("..data/a")
    );
    assert_eq!(
        std::fs::read_link(dir.join("sub")).unwrap(),
        Path::new("..data/sub")
    );
    assert_eq!(mode_of(&dir.join("sub/b")), 0o600);
    let first = std::fs::read_link(dir.join("..data")).unwrap();
    assert!(
        !atomic_write(&dir, &files).unwrap(),
        "unchanged content is not rewritten"
    );
    assert_eq!(std::fs::read_link(dir.join("..data")).unwrap(), first);
    // A mode change alone is a change.
    files.insert("a".into(), (b"1".to_vec(), 0o400));
    assert!(atomic_write(&dir, &files).unwrap());
    assert_eq!(mode_of(&dir.join("a")), 0o400);
    files.insert("a".into(), (b"3".to_vec(), 0o644));
    files.remove("sub/b");
    assert!(atomic_write(&dir, &files).unwrap());
    assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "3");
    assert!(
        std::fs::symlink_metadata(dir.join("sub")).is_err(),
        "stale entries go"
    );
    assert_eq!(versions(&dir).len(), 1, "old versions are removed");
    assert!(std::fs::symlink_metadata(dir.join("..data_tmp")).is_err());
}

#[test]
fn atomic_writes_repair_links_and_clean_crash_leftovers() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("v");
    let mut files = Files::new();
    files.insert("k".into(), (b"v".to_vec(), 0o644));
    atomic_write(&dir, &files).unwrap();
    // A crashed earlier write left a version directory and a temporary link.
    std::fs::create_dir(dir.join("..1")).unwrap();
    std::os::unix::fs::symlink("..1", dir.join("..data_tmp")).unwrap();
    std::fs::remove_file(dir.join("k")).unwrap();
    assert!(
        atomic_write(&dir, &files).unwrap(),
        "a missing link is a change"
    );
    assert_eq!(std::fs::read_to_string(dir.join("k")).unwrap(), "v");
    assert_eq!(versions(&dir).len(), 1);
    for bad in ["../x", "..data", "/etc/x", ""] {
        let mut f = Files::new();
        f.insert(bad.into(), (b"x".to_vec(), 0o644));
        assert!(atomic_write(&dir, &f).is_err(), "{bad:?} refused");
    }
    assert_eq!(std::fs::read_to_string(dir.join("k")).unwrap(), "v");
}

#[test]
fn items_select_keys_and_modes() {
    let mut data = BTreeMap::new();
    data.insert("k1".to_string(), b"v1".to_vec());
    data.insert("k2".to_string(), b"v2".to_vec());
    let all = render_keys(&data, &None, 0o640, "configmap", "c", false).unwrap();
    assert_eq!(all["k1"], (b"v1".to_vec(), 0o640));
    assert_eq!(all.len(), 2);
    let items = Some(vec![KeyToPath {
        key: "k2".into(),
        path: "dir/two".into(),
        mode: Some(0o400),
    }]);
    let f = render_keys(&data, &items, 0o644, "configmap", "c", false).unwrap();
    assert_eq!(f.len(), 1);
    assert_eq!(f["dir/two"], (b"v2".to_vec(), 0o400));
    let bad = Some(vec![KeyToPath {
        key: "k2".into(),
        path: "../x".into(),
        mode: None,
    }]);
    assert!(render_keys(&data, &bad, 0o644, "configmap", "c", false).is_err());
    let missing = Some(vec![KeyToPath {
        key: "nope".into(),
        path: "x".into(),
        mode: None,
    }]);
    assert_eq!(
        render_keys(&data, &missing, 0o644, "configmap", "c", false).unwrap_err(),
        "configmap references non-existent config key: nope"
    );
    assert_eq!(
        render_keys(&data, &missing, 0o644, "secret", "s", false).unwrap_err(),
        "secret references non-existent secret key: nope"
    );
    assert!(render_keys(&data, &missing, 0o644, "configmap", "c", true)
        .unwrap()
        .is_empty());
}

fn pod(v: serde_json::Value) -> Pod {
    serde_json::from_value(v).unwrap()
}

#[test]
fn downward_api_files_render_metadata_and_resources_as_upstream() {
    let p = pod(json!({
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1",
            "labels": {"b": "2", "a": "x\"y"}, "annotations": {"note": "hi"}},
        "spec": {"containers": [
            {"name": "c", "resources": {"limits": {"cpu": "250m", "memory": "64Mi"},
                "requests": {"cpu": "100m"}}},
            {"name": "free"}]}
    }));
    let items: Vec<DownwardAPIVolumeFile> = serde_json::from_value(json!([
        {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
        {"path": "ns", "fieldRef": {"fieldPath": "metadata.namespace"}},
        {"path": "uid", "fieldRef": {"fieldPath": "metadata.uid"}, "mode": 0o600},
        {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
        {"path": "one/label", "fieldRef": {"fieldPath": "metadata.labels['b']"}},
        {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
        {"path": "cpu_limit", "resourceFieldRef": {"containerName": "c", "resource": "limits.cpu"}},
        {"path": "cpu_limit_m", "resourceFieldRef": {"containerName": "c", "resource": "limits.cpu", "divisor": "1m"}},
        {"path": "cpu_request_m", "resourceFieldRef": {"containerName": "c", "resource": "requests.cpu", "divisor": "1m"}},
        {"path": "mem_limit_mi", "resourceFieldRef": {"containerName": "c", "resource": "limits.memory", "divisor": "1Mi"}},
        {"path": "free_mem", "resourceFieldRef": {"containerName": "free", "resource": "limits.memory"}},
        {"path": "free_mem_req", "resourceFieldRef": {"containerName": "free", "resource": "requests.memory"}},
    ]))
    .unwrap();
    let mut alloc = BTreeMap::new();
    alloc.insert("memory".to_string(), "2Gi".to_string());
    let f = downward_files(&p, &items, 0o644, &alloc).unwrap();
    let s = |k: &str| String::from_utf8(f[k].0.clone()).unwrap();
    assert_eq!(s("name"), "p");
    assert_eq!(s("ns"), "ns");
    assert_eq!(f["uid"], (b"u-1".to_vec(), 0o600));
    assert_eq!(s("labels"), "a=\"x\\\"y\"\nb=\"2\"");
    assert_eq!(s("one/label"), "2");
    assert_eq!(s("annotations"), "note=\"hi\"");
    assert_eq!(s("cpu_limit"), "1", "rounded up to whole cores");
    assert_eq!(s("cpu_limit_m"), "250");
    assert_eq!(s("cpu_request_m"), "100");
    assert_eq!(s("mem_limit_mi"), "64");
    assert_eq!(
        s("free_mem"),
        (2u64 << 30).to_string(),
        "no limit: the node's allocatable"
    );
    assert_eq!(s("free_mem_req"), "0");
    assert_eq!(f["name"].1, 0o644);
    let bad: Vec<DownwardAPIVolumeFile> = serde_json::from_value(json!([
        {"path": "x", "resourceFieldRef": {"containerName": "nosuch", "resource": "limits.cpu"}}
    ]))
    .unwrap();
    assert_eq!(
        downward_files(&p, &bad, 0o644, &alloc).unwrap_err(),
        "container nosuch not found"
    );
    let bad: Vec<DownwardAPIVolumeFile> = serde_json::from_value(json!([
        {"path": "x", "fieldRef": {"fieldPath": "spec.nodeName"}}
    ]))
    .unwrap();
    assert!(downward_files(&p, &bad, 0o644, &alloc).is_err());
}

#[test]
fn host_path_types_are_checked_with_upstream_messages() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("dir");
    let file = d.path().join("file");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(&file, b"keep").unwrap();
    let sock = d.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let missing = d.path().join("missing");
    let show = |p: &Path| p.display().to_string();
    let ok: &[(&Path, &str)] = &[
        (&dir, "Directory"),
        (&dir, "DirectoryOrCreate"),
        (&dir, ""),
        (&file, "File"),
        (&file, "FileOrCreate"),
        (&file, ""),
        (&sock, "Socket"),
        (Path::new("/dev/null"), "CharDevice"),
    ];
    for (p, t) in ok {
        assert_eq!(check_host_path(p, t), Ok(()), "{} as {t:?}", p.display());
    }
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"keep",
        "an existing file is kept"
    );
    let errors: &[(&Path, &str, String)] = &[
        (
            &missing,
            "Directory",
            format!("hostPath {} doesn't exist", show(&missing)),
        ),
        (
            &missing,
            "File",
            format!("hostPath {} doesn't exist", show(&missing)),
        ),
        (
            &file,
            "Directory",
            format!(
                "hostPath type check failed: {} is not a directory, it's a File",
                show(&file)
            ),
        ),
        (
            &file,
            "DirectoryOrCreate",
            format!(
                "hostPath type check failed: {} is not a directory, it's a File",
                show(&file)
            ),
        ),
        (
            &dir,
            "FileOrCreate",
            format!(
                "hostPath type check failed: {} is not a file, it's a Directory",
                show(&dir)
            ),
        ),
        (
            &dir,
            "Socket",
            format!(
                "hostPath type check failed: {} is not a socket file, it's a Directory",
                show(&dir)
            ),
        ),
        (
            Path::new("/dev/null"),
            "BlockDevice",
            "hostPath type check failed: /dev/null is not a block device, it's a CharDevice".into(),
        ),
        (
            &dir,
            "Nonsense",
            "Nonsense is an invalid volume type".into(),
        ),
    ];
    for (p, t, want) in errors {
        assert_eq!(
            check_host_path(p, t).unwrap_err(),
            *want,
            "{} as {t:?}",
            p.display()
        );
    }
    assert!(
        std::fs::metadata(&missing).is_err(),
        "checks create nothing"
    );
    // The *OrCreate types create with upstream's modes.
    let newdir = d.path().join("a/b");
    check_host_path(&newdir, "DirectoryOrCreate").unwrap();
    assert!(newdir.is_dir());
    assert_eq!(mode_of(&newdir), 0o755);
    let newfile = d.path().join("new.txt");
    check_host_path(&newfile, "FileOrCreate").unwrap();
    assert!(newfile.is_file());
    assert_eq!(mode_of(&newfile), 0o644);
    let orphan = d.path().join("nodir/new.txt");
    assert!(check_host_path(&orphan, "FileOrCreate")
        .unwrap_err()
        .starts_with("open "));
}

#[test]
fn sub_paths_stay_inside_the_volume() {
    let d = tempfile::tempdir().unwrap();
    let vol = d.path().join("vol");
    let outside = d.path().join("outside");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::set_permissions(&vol, std::fs::Permissions::from_mode(0o777)).unwrap();
    let real_vol = std::fs::canonicalize(&vol).unwrap();
    // Missing directories are created with the volume's mode.
    let p = VolumeManager::sub_path(&vol, "a/b").unwrap();
    assert_eq!(p, real_vol.join("a/b"));
    assert!(p.is_dir());
    assert_eq!(mode_of(&p), 0o777);
    // Existing files are fine (a configMap key is a symlink into ..data).
    std::fs::create_dir(vol.join("..data")).unwrap();
    std::fs::write(vol.join("..data/key"), b"v").unwrap();
    std::os::unix::fs::symlink("..data/key", vol.join("key")).unwrap();
    assert_eq!(
        VolumeManager::sub_path(&vol, "key").unwrap(),
        real_vol.join("..data/key")
    );
    // A symlink leaving the volume is refused and nothing is created through it.
    std::os::unix::fs::symlink(&outside, vol.join("escape")).unwrap();
    let e = VolumeManager::sub_path(&vol, "escape/x")
        .unwrap_err()
        .to_string();
    assert!(e.contains("not within volume path"), "{e}");
    assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
    std::os::unix::fs::symlink("/etc/passwd", vol.join("passwd")).unwrap();
    assert!(VolumeManager::sub_path(&vol, "passwd").is_err());
    for bad in ["../outside", "a/../../outside", "/etc", ""] {
        assert!(
            VolumeManager::sub_path(&vol, bad).is_err(),
            "{bad:?} refused"
        );
    }
}

/// A client to a closed port: the volumes these tests set up never need the API.
fn manager(root: &Path) -> VolumeManager {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = crate::rest::Target {
        host: "127.0.0.1".into(),
        port,
        tls: Arc::new(tls),
    };
    VolumeManager::new(
        RestClient::new(target),
        root.join("pods"),
        root.join("storage"),
        "node-1".into(),
    )
}

/// Mount options of the mount at `p`, if any.
fn mount_options(p: &Path) -> Option<String> {
    let s = p.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(s.as_str()))
        .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
}

// Needs root: mounts a tmpfs for the medium-Memory emptyDir (CI runs as root).
#[tokio::test]
async fn volumes_are_set_up_in_upstream_layout_and_torn_down() {
    let d = tempfile::tempdir().unwrap();
    let host = d.path().join("host");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("data"), b"precious").unwrap();
    let vm = manager(d.path());
    let p = pod(json!({
        "metadata": {"name": "p", "namespace": "ns", "uid": "uid-1", "labels": {"app": "x"}},
        "spec": {"containers": [{"name": "c"}], "volumes": [
            {"name": "scratch", "emptyDir": {}},
            {"name": "mem", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
            {"name": "host", "hostPath": {"path": host.to_str().unwrap(), "type": "Directory"}},
            {"name": "info", "downwardAPI": {"items": [
                {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
        ]}
    }));
    let got = vm.setup(&p).await.unwrap();
    let vols = d.path().join("pods/uid-1/volumes");
    assert_eq!(got["scratch"], vols.join("kubernetes.io~empty-dir/scratch"));
    assert_eq!(got["mem"], vols.join("kubernetes.io~empty-dir/mem"));
    assert_eq!(got["host"], host);
    assert_eq!(got["info"], vols.join("kubernetes.io~downward-api/info"));
    assert_eq!(mode_of(&got["scratch"]), 0o777);
    assert_eq!(
        std::fs::read_to_string(got["info"].join("labels")).unwrap(),
        "app=\"x\""
    );
    let opts = mount_options(&got["mem"]).expect("the Memory emptyDir is a mount");
    assert!(opts.contains("size=1024k"), "{opts}");
    std::fs::write(got["mem"].join("f"), b"in memory").unwrap();
    std::fs::write(got["scratch"].join("f"), b"on disk").unwrap();
    // Setting up again changes nothing (and does not stack a second tmpfs).
    let again = vm.setup(&p).await.unwrap();
    assert_eq!(again, got);
    assert_eq!(mounts_under(&vols).len(), 1);
    assert_eq!(std::fs::read(got["mem"].join("f")).unwrap(), b"in memory");
    vm.refresh(&p).await.unwrap();

    vm.teardown("uid-1").await.unwrap();
    assert!(
        mount_options(&got["mem"]).is_none(),
        "the tmpfs is unmounted"
    );
    assert!(!vols.exists());
    vm.refresh(&p).await.unwrap();
    assert!(
        !vols.exists(),
        "a late refresh does not bring torn-down volumes back"
    );
    assert_eq!(std::fs::read(host.join("data")).unwrap(), b"precious");
    vm.teardown("uid-1").await.unwrap();
    assert!(vm.teardown("../x").await.is_err());
}

#[tokio::test]
async fn setup_errors_name_the_volume() {
    let d = tempfile::tempdir().unwrap();
    let vm = manager(d.path());
    let missing = d.path().join("nope");
    let p = pod(json!({
        "metadata": {"name": "p", "namespace": "ns", "uid": "uid-2"},
        "spec": {"containers": [{"name": "c"}], "volumes": [
            {"name": "h", "hostPath": {"path": missing.to_str().unwrap(), "type": "Directory"}}]}
    }));
    assert_eq!(
        vm.setup(&p).await.unwrap_err().to_string(),
        format!(
            "MountVolume.SetUp failed for volume \"h\" : hostPath {} doesn't exist",
            missing.display()
        )
    );
    let p = pod(json!({
        "metadata": {"name": "p", "namespace": "ns", "uid": "uid-2"},
        "spec": {"containers": [{"name": "c"}], "volumes": [
            {"name": "huge", "emptyDir": {"medium": "HugePages"}}]}
    }));
    assert_eq!(
        vm.setup(&p).await.unwrap_err().to_string(),
        "MountVolume.SetUp failed for volume \"huge\" : emptyDir medium \"HugePages\" is not supported by k3rs"
    );
    // The API is unreachable here: the error still names the volume.
    let p = pod(json!({
        "metadata": {"name": "p", "namespace": "ns", "uid": "uid-2"},
        "spec": {"containers": [{"name": "c"}], "volumes": [
            {"name": "cfg", "configMap": {"name": "x"}}]}
    }));
    let e = vm.setup(&p).await.unwrap_err().to_string();
    assert!(
        e.starts_with("MountVolume.SetUp failed for volume \"cfg\" : "),
        "{e}"
    );
    vm.teardown("uid-2").await.unwrap();
}

#[test]
fn mountinfo_paths_are_unescaped() {
    assert_eq!(unescape_mount_path("/a\\040b\\011c"), Path::new("/a b\tc"));
    assert_eq!(unescape_mount_path("/x\\"), Path::new("/x\\"));
}

// Needs root: mounts a tmpfs for the secret volume (CI runs as root).
#[tokio::test]
async fn secret_and_projected_payloads_live_on_tmpfs() {
    let d = tempfile::tempdir().unwrap();
    let vm = manager(d.path());
    let secret = d.path().join("pods/u/volumes/kubernetes.io~secret/s");
    let config = d.path().join("pods/u/volumes/kubernetes.io~configmap/c");
    prepare_payload_dir(&secret, "secret").unwrap();
    prepare_payload_dir(&secret, "secret").unwrap();
    prepare_payload_dir(&config, "configMap").unwrap();
    let opts = mount_options(&secret).expect("the secret volume is a tmpfs");
    assert!(opts.contains("mode=755"), "{opts}");
    assert!(mount_options(&config).is_none(), "configMaps stay on disk");
    let mut f = Files::new();
    f.insert("password".into(), (b"hunter2".to_vec(), 0o400));
    atomic_write(&secret, &f).unwrap();
    assert_eq!(std::fs::read(secret.join("password")).unwrap(), b"hunter2");
    assert_eq!(
        mounts_under(&d.path().join("pods/u")).len(),
        1,
        "mounted once"
    );
    vm.teardown("u").await.unwrap();
    assert!(mount_options(&secret).is_none());
    assert!(!d.path().join("pods/u/volumes").exists());
}

#[test]
fn deleted_local_path_volumes_lose_their_data_unless_retained() {
    let d = tempfile::tempdir().unwrap();
    let storage = d.path();
    for (name, policy) in [
        ("pvc-a_ns_a", "Delete"),
        ("pvc-b_ns_b", "Delete"),
        ("pvc-c_ns_c", "Retain"),
    ] {
        std::fs::create_dir_all(storage.join(name)).unwrap();
        std::fs::write(storage.join(name).join("data"), b"x").unwrap();
        remember_reclaim_policy(storage, name, policy).unwrap();
    }
    // Never mounted here: no marker, never touched.
    std::fs::create_dir_all(storage.join("pvc-d_ns_d")).unwrap();
    let live: std::collections::HashSet<String> = ["pvc-a_ns_a".to_string()].into();
    let removed = prune_local_path_dirs(storage, &live);
    assert_eq!(removed, vec![storage.join("pvc-b_ns_b")]);
    assert!(
        storage.join("pvc-a_ns_a/data").exists(),
        "a live volume is kept"
    );
    assert!(
        !storage.join("pvc-b_ns_b").exists(),
        "a deleted volume's data goes"
    );
    assert!(
        storage.join("pvc-c_ns_c/data").exists(),
        "Retain keeps the data"
    );
    assert!(storage.join("pvc-d_ns_d").exists());
    assert!(
        !storage.join(RECLAIM_DIR).join("pvc-c_ns_c").exists(),
        "and forgets it"
    );
    assert!(storage.join(RECLAIM_DIR).join("pvc-a_ns_a").exists());
    assert!(
        prune_local_path_dirs(storage, &live).is_empty(),
        "idempotent"
    );
}
