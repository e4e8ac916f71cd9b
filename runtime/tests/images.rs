//! The image store on real archives: OCI layouts and docker archives, plain, gzip and zstd;
//! layers unpacked once with overlay whiteouts and opaque directories; corrupted blobs
//! refused without leaving anything behind; the air-gap directory imported once.

use std::io::Write;
use std::path::Path;

use k3rs_runtime::images::{sha256_hex, ImageStore};
use serde_json::json;

fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// An OCI layout with one image of the given layers (uncompressed tars), as a tarball.
fn oci_archive(name: &str, layers: &[Vec<u8>], corrupt_layer: bool) -> Vec<u8> {
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(l)))
        .collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"], "User": "1000"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let cfg_d = sha256_hex(&config);
    blobs.push((cfg_d.clone(), config.clone()));
    let mut descs = Vec::new();
    for l in layers {
        let d = sha256_hex(l);
        let mut data = l.clone();
        if corrupt_layer {
            data[600] ^= 0xff;
        }
        blobs.push((d.clone(), data));
        descs.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{d}"), "size": l.len()}));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{cfg_d}"), "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let man_d = sha256_hex(&manifest);
    blobs.push((man_d.clone(), manifest.clone()));
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{man_d}"), "size": manifest.len(),
            "annotations": {"io.containerd.image.name": name}}],
    }))
    .unwrap();
    let names: Vec<String> = blobs
        .iter()
        .map(|(d, _)| format!("blobs/sha256/{d}"))
        .collect();
    let mut entries: Vec<(&str, &[u8])> = vec![
        ("index.json", &index),
        ("oci-layout", b"{\"imageLayoutVersion\":\"1.0.0\"}"),
    ];
    for (i, (_, data)) in blobs.iter().enumerate() {
        entries.push((&names[i], data));
    }
    tar_of(&entries)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn write(dir: &Path, name: &str, data: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn oci_and_docker_archives_import_plain_and_gzipped() {
    let d = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&d.path().join("content")).unwrap();
    let layer = tar_of(&[("bin/hello", b"hi")]);
    let oci = oci_archive("example.com/app:v1", std::slice::from_ref(&layer), false);
    let imgs = store
        .import_archive(&write(d.path(), "a.tar", &oci))
        .unwrap();
    assert_eq!(imgs[0].names, ["example.com/app:v1"]);
    assert_eq!(imgs[0].config.cmd, ["sh"]);
    assert_eq!(imgs[0].config.user, "1000");
    assert!(imgs[0].repo_digests[0].starts_with("example.com/app@sha256:"));
    let gz = oci_archive("example.com/app:v2", &[tar_of(&[("x", b"y")])], false);
    let imgs2 = store
        .import_archive(&write(d.path(), "b.tar.gz", &gzip(&gz)))
        .unwrap();
    assert_eq!(imgs2[0].names, ["example.com/app:v2"]);
    // zstd, compressed by Debian's zstd (installed by scripts/deps.sh).
    let zst_in = write(
        d.path(),
        "z.tar",
        &oci_archive("example.com/app:zst", &[tar_of(&[("z", b"z")])], false),
    );
    let st = std::process::Command::new("zstd")
        .args(["-q", "-f"])
        .arg(&zst_in)
        .arg("-o")
        .arg(d.path().join("z.tar.zst"))
        .status()
        .expect("zstd");
    assert!(st.success());
    let imgs_z = store.import_archive(&d.path().join("z.tar.zst")).unwrap();
    assert_eq!(imgs_z[0].names, ["example.com/app:zst"]);
    assert_eq!(store.layer_dirs(&imgs_z[0]).unwrap().len(), 1);
    // docker archive: manifest.json + config + layer.tar
    let config = serde_json::to_vec(&json!({"config": {"Entrypoint": ["/bin/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&layer))]}}))
    .unwrap();
    let cfg_name = format!("{}.json", sha256_hex(&config));
    let manifest = serde_json::to_vec(
        &json!([{"Config": cfg_name, "RepoTags": ["busybox:docker"], "Layers": ["l1/layer.tar"]}]),
    )
    .unwrap();
    let docker = tar_of(&[
        ("manifest.json", &manifest),
        (&cfg_name, &config),
        ("l1/layer.tar", &layer),
    ]);
    let imgs3 = store
        .import_archive(&write(d.path(), "c.tar", &docker))
        .unwrap();
    assert_eq!(imgs3[0].names, ["docker.io/library/busybox:docker"]);
    assert_eq!(imgs3[0].config.entrypoint, ["/bin/hello"]);
    let dirs = store.layer_dirs(&imgs3[0]).unwrap();
    assert_eq!(
        std::fs::read_to_string(dirs[0].join("bin/hello")).unwrap(),
        "hi"
    );
    assert_eq!(store.list().len(), 4);
    assert!(store.get("busybox:docker").is_some());
    store.remove("busybox:docker").unwrap();
    assert!(store.get("busybox:docker").is_none());
}

#[test]
fn whiteouts_and_opaque_directories_become_overlay_markers() {
    // Needs root for the 0:0 character device and the trusted.* xattr (CI is root).
    let d = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&d.path().join("content")).unwrap();
    let lower = tar_of(&[("etc/keep", b"1"), ("etc/gone", b"2"), ("data/old", b"3")]);
    let upper = tar_of(&[
        ("etc/.wh.gone", b""),
        ("data/.wh..wh..opq", b""),
        ("data/new", b"4"),
    ]);
    let arc = oci_archive("example.com/wh:1", &[lower, upper], false);
    let imgs = store
        .import_archive(&write(d.path(), "w.tar", &arc))
        .unwrap();
    let dirs = store.layer_dirs(&imgs[0]).unwrap();
    assert_eq!(dirs.len(), 2);
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let wh = std::fs::symlink_metadata(dirs[1].join("etc/gone")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    let mut buf = [0u8; 4];
    let p = std::ffi::CString::new(dirs[1].join("data").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: reading an xattr into our buffer.
    let n = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(n, 1);
    assert_eq!(buf[0], b'y');
    assert!(!dirs[1].join("data/.wh..wh..opq").exists());
    // Unpacked once: asking again gives the same directories without work.
    assert_eq!(store.layer_dirs(&imgs[0]).unwrap(), dirs);
}

#[test]
fn a_corrupted_blob_is_refused_and_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("content");
    let store = ImageStore::open(&root).unwrap();
    let layer = tar_of(&[("f", &[7u8; 2048])]);
    let arc = oci_archive("example.com/bad:1", &[layer], true);
    let err = store
        .import_archive(&write(d.path(), "bad.tar", &arc))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is corrupt"), "{err}");
    assert!(store.list().is_empty());
    assert_eq!(
        std::fs::read_dir(root.join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
}

#[test]
fn the_air_gap_directory_is_imported_once() {
    let d = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&d.path().join("content")).unwrap();
    let dir = d.path().join("images");
    std::fs::create_dir_all(&dir).unwrap();
    write(
        &dir,
        "one.tar",
        &oci_archive("example.com/one:1", &[tar_of(&[("a", b"1")])], false),
    );
    write(&dir, "notes.txt", b"not an image");
    let first = store.import_dir(&dir);
    assert_eq!(first.len(), 1);
    assert!(first[0].is_ok());
    assert!(store.import_dir(&dir).is_empty(), "already imported");
    write(
        &dir,
        "two.tar.gz",
        &gzip(&oci_archive(
            "example.com/two:1",
            &[tar_of(&[("b", b"2")])],
            false,
        )),
    );
    let second = store.import_dir(&dir);
    assert_eq!(second.len(), 1);
    // A reopened store remembers both the images and what it imported.
    let again = ImageStore::open(&d.path().join("content")).unwrap();
    assert_eq!(again.list().len(), 2);
    assert!(again.import_dir(&dir).is_empty());
}

/// The test image from `scripts/build-test-images.sh`, built into `dir`.
fn build_busybox(dir: &Path) -> std::path::PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-test-images.sh");
    let out = std::process::Command::new("sh")
        .arg(script)
        .arg(dir)
        .output()
        .expect("running scripts/build-test-images.sh");
    assert!(
        out.status.success(),
        "build-test-images.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("busybox.tar")
}

#[test]
fn the_scripts_busybox_imports_as_tar_gzip_and_zstd() {
    let d = tempfile::tempdir().unwrap();
    let tar = build_busybox(d.path());
    let gz = write(
        d.path(),
        "busybox.tar.gz",
        &gzip(&std::fs::read(&tar).unwrap()),
    );
    let zst = d.path().join("busybox.tar.zst");
    let st = std::process::Command::new("zstd")
        .args(["-q", "-f"])
        .arg(&tar)
        .arg("-o")
        .arg(&zst)
        .status()
        .expect("zstd");
    assert!(st.success());
    let mut ids = Vec::new();
    for (i, archive) in [&tar, &gz, &zst].into_iter().enumerate() {
        // A fresh store per format, so each import really reads its archive.
        let store = ImageStore::open(&d.path().join(format!("content{i}"))).unwrap();
        let imgs = store.import_archive(archive).unwrap();
        assert_eq!(imgs.len(), 1);
        let img = &imgs[0];
        assert_eq!(img.names, ["docker.io/library/busybox:latest"]);
        assert_eq!(img.config.cmd, ["sh"]);
        assert_eq!(
            img.config.env,
            ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        );
        assert!(img.repo_digests[0].starts_with("docker.io/library/busybox@sha256:"));
        assert!(store.get("busybox").is_some());
        let dirs = store.layer_dirs(img).unwrap();
        assert_eq!(dirs.len(), 1);
        use std::os::unix::fs::PermissionsExt;
        let bb = std::fs::metadata(dirs[0].join("bin/busybox")).unwrap();
        assert!(bb.permissions().mode() & 0o111 != 0);
        assert_eq!(
            std::fs::read_link(dirs[0].join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        let tmp = std::fs::metadata(dirs[0].join("tmp")).unwrap();
        assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777);
        assert!(std::fs::read_to_string(dirs[0].join("etc/passwd"))
            .unwrap()
            .contains("nobody:x:65534:65534"));
        ids.push(img.id.clone());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one image whatever the compression");
}

#[test]
fn the_test_image_script_is_deterministic() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let x = std::fs::read(build_busybox(a.path())).unwrap();
    let y = std::fs::read(build_busybox(b.path())).unwrap();
    assert_eq!(sha256_hex(&x), sha256_hex(&y));
}

/// Debian's docker-registry with htpasswd auth on 127.0.0.1:<free port>; killed by PID on drop.
struct Registry {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const USER: &str = "puller";
const PASS: &str = "pullpass";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts docker-registry with `config` (YAML) written into `dir`, listening on `port`.
fn spawn_registry(dir: tempfile::TempDir, port: u16, config: String) -> Registry {
    std::fs::write(dir.path().join("config.yml"), config).unwrap();
    let child = std::process::Command::new("docker-registry")
        .arg("serve")
        .arg(dir.path().join("config.yml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
        .spawn()
        .expect("starting docker-registry (Debian package docker-registry)");
    let reg = Registry {
        child,
        port,
        _dir: dir,
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "docker-registry did not listen on {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    reg
}

/// Plain HTTP with htpasswd auth (USER/PASS), storing its content in `data`.
fn start_registry(data: &Path) -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let out = std::process::Command::new("htpasswd")
        .args(["-Bbn", USER, PASS])
        .output()
        .expect("htpasswd (apache2-utils)");
    assert!(out.status.success());
    std::fs::write(dir.path().join("htpasswd"), &out.stdout).unwrap();
    let config = format!(
        "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd: {{realm: k3rs-test, path: {}}}\n",
        data.display(),
        dir.path().join("htpasswd").display()
    );
    spawn_registry(dir, port, config)
}

/// HTTPS (no auth) with the given certificate, serving the content in `data`.
fn start_tls_registry(data: &Path, cert: &Path, key: &Path) -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = format!(
        "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp:\n  addr: 127.0.0.1:{port}\n  tls: {{certificate: {}, key: {}}}\n",
        data.display(),
        cert.display(),
        key.display()
    );
    spawn_registry(dir, port, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_from_a_local_registry_with_credentials_mirrors_and_errors() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    use k3rs_runtime::images::{push_archive, ImageError, PullAuth, Registries};
    let d = tempfile::tempdir().unwrap();
    let archive = build_busybox(d.path());
    let reg = start_registry(&d.path().join("registry-data"));
    let host = format!("127.0.0.1:{}", reg.port);
    push_archive(
        &archive,
        &format!("{host}/test/busybox:v1"),
        Some((USER.into(), PASS.into())),
        true,
    )
    .await
    .unwrap();
    // Plain HTTP only because registries.yaml says so.
    let yaml = d.path().join("registries.yaml");
    std::fs::write(
        &yaml,
        format!("mirrors:\n  \"{host}\":\n    endpoint: [\"http://{host}\"]\n"),
    )
    .unwrap();
    let registries = Registries::load(&yaml).unwrap();
    let store = ImageStore::open(&d.path().join("content")).unwrap();

    // With an imagePullSecret's credentials.
    let secret = format!(r#"{{"auths":{{"{host}":{{"username":"{USER}","password":"{PASS}"}}}}}}"#);
    let auth = PullAuth::from_dockerconfigjson(secret.as_bytes()).unwrap();
    let rec = store
        .pull(&format!("{host}/test/busybox:v1"), &auth, &registries)
        .await
        .unwrap();
    assert_eq!(rec.names, [format!("{host}/test/busybox:v1")]);
    assert_eq!(rec.config.cmd, ["sh"]);
    assert!(rec.repo_digests[0].starts_with(&format!("{host}/test/busybox@sha256:")));
    // The same image as the archive's (same config digest).
    let local = ImageStore::open(&d.path().join("local")).unwrap();
    assert_eq!(local.import_archive(&archive).unwrap()[0].id, rec.id);
    assert_eq!(
        store.get(&format!("{host}/test/busybox:v1")),
        Some(rec.clone())
    );
    let dirs = tokio::task::spawn_blocking({
        let (store, rec) = (store.clone(), rec.clone());
        move || store.layer_dirs(&rec)
    })
    .await
    .unwrap()
    .unwrap();
    assert!(dirs[0].join("bin/busybox").is_file());

    // Wrong credentials: the registry's refusal is the message.
    let wrong = PullAuth {
        credentials: vec![(host.clone(), USER.into(), "wrong".into())],
    };
    let err = store
        .pull(&format!("{host}/test/busybox:v1"), &wrong, &registries)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Pull { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "failed to pull and unpack image \"{host}/test/busybox:v1\": "
        )),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("unauthorized"), "{msg}");
    // No credentials at all: refused too.
    let none = store
        .pull(
            &format!("{host}/test/busybox:v1"),
            &PullAuth::default(),
            &registries,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(none.to_lowercase().contains("unauthorized"), "{none}");

    // A missing image: "not found", as containerd says it.
    let missing = store
        .pull(&format!("{host}/test/nosuch:v1"), &auth, &registries)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        missing.starts_with(&format!(
            "failed to pull and unpack image \"{host}/test/nosuch:v1\": "
        )),
        "{missing}"
    );
    assert!(missing.ends_with(": not found"), "{missing}");

    // A docker.io mirror with a rewrite and the mirror's credentials from registries.yaml:
    // docker.io/library/busybox:v1 is fetched as <mirror>/test/busybox:v1.
    std::fs::write(
        &yaml,
        format!(
            "mirrors:\n  docker.io:\n    endpoint: [\"http://{host}\"]\n    rewrite:\n      \"^library/(.*)\": \"test/$1\"\nconfigs:\n  \"{host}\":\n    auth: {{username: {USER}, password: {PASS}}}\n"
        ),
    )
    .unwrap();
    let mirrored = Registries::load(&yaml).unwrap();
    let via_mirror = store
        .pull("busybox:v1", &PullAuth::default(), &mirrored)
        .await
        .unwrap();
    assert_eq!(via_mirror.id, rec.id);
    assert!(store.get("docker.io/library/busybox:v1").is_some_and(|i| i
        .names
        .contains(&"docker.io/library/busybox:v1".to_string())));
    assert_eq!(
        std::fs::read_dir(d.path().join("content/tmp"))
            .unwrap()
            .count(),
        0,
        "nothing half-fetched is left"
    );

    // A layer corrupted in the registry's storage is refused; the store stays as it was.
    let layer_hex = &rec.blobs[0].digest[7..];
    let data = d
        .path()
        .join("registry-data/docker/registry/v2/blobs/sha256")
        .join(&layer_hex[..2])
        .join(layer_hex)
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();
    let fresh_root = d.path().join("fresh");
    let fresh = ImageStore::open(&fresh_root).unwrap();
    let err = fresh
        .pull(&format!("{host}/test/busybox:v1"), &auth, &registries)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.to_lowercase().contains("digest"), "{err}");
    assert!(fresh.list().is_empty());
    for sub in ["blobs/sha256", "tmp", "layers"] {
        assert_eq!(
            std::fs::read_dir(fresh_root.join(sub)).unwrap().count(),
            0,
            "{sub} is empty"
        );
    }
}

/// A docker archive whose manifest names `layer` for its only layer, with extra tar entries.
fn docker_archive_naming(layer: &str, extra: Vec<tar::Header>, layer_data: &[u8]) -> Vec<u8> {
    let config = serde_json::to_vec(&json!({"config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(layer_data))]}}))
    .unwrap();
    let manifest = serde_json::to_vec(
        &json!([{"Config": "config.json", "RepoTags": ["example.com/d:1"], "Layers": [layer]}]),
    )
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", &manifest[..]),
        ("config.json", &config[..]),
        ("real/layer.tar", layer_data),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    }
    for mut h in extra {
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
    }
    b.into_inner().unwrap()
}

fn symlink_header(name: &str, target: &str) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_path(name).unwrap();
    h.set_link_name(target).unwrap();
    h.set_size(0);
    h.set_mode(0o777);
    h
}

#[test]
fn docker_archives_may_not_name_files_outside_themselves() {
    let d = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&d.path().join("content")).unwrap();
    let layer = tar_of(&[("f", b"1")]);
    std::fs::write(d.path().join("outside.tar"), &layer).unwrap();
    // `..` in the manifest.
    let dotdot = docker_archive_naming("../../../outside.tar", vec![], &layer);
    let err = store
        .import_archive(&write(d.path(), "dotdot.tar", &dotdot))
        .unwrap_err()
        .to_string();
    assert!(err.contains("escapes the archive"), "{err}");
    // A symlink in the archive leading out of it.
    let outside = d.path().join("outside.tar");
    let link = docker_archive_naming(
        "l/layer.tar",
        vec![symlink_header("l/layer.tar", outside.to_str().unwrap())],
        &layer,
    );
    let err = store
        .import_archive(&write(d.path(), "link.tar", &link))
        .unwrap_err()
        .to_string();
    assert!(err.contains("escapes the archive"), "{err}");
    assert!(store.list().is_empty());
    assert!(outside.is_file(), "the outside file is untouched");
    // `docker save` links shared layers to each other inside the archive: that is fine.
    let shared = docker_archive_naming(
        "l/layer.tar",
        vec![symlink_header("l/layer.tar", "../real/layer.tar")],
        &layer,
    );
    let imgs = store
        .import_archive(&write(d.path(), "shared.tar", &shared))
        .unwrap();
    assert_eq!(imgs[0].names, ["example.com/d:1"]);
    let dirs = store.layer_dirs(&imgs[0]).unwrap();
    assert_eq!(std::fs::read_to_string(dirs[0].join("f")).unwrap(), "1");
    let blob = d
        .path()
        .join("content/blobs/sha256")
        .join(&imgs[0].blobs[0].digest[7..]);
    assert!(std::fs::symlink_metadata(blob).unwrap().is_file());
}

/// A CA and a server certificate for 127.0.0.1 it signed, as PEM files in `dir`.
fn tls_files(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &Issuer::new(ca_params, ca_key))
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_over_tls_trust_the_configured_ca() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    use k3rs_runtime::images::{push_archive, PullAuth, Registries};
    let d = tempfile::tempdir().unwrap();
    let archive = build_busybox(d.path());
    let data = d.path().join("registry-data");
    // Pushed over plain HTTP; a second registry serves the same storage over HTTPS.
    let plain = start_registry(&data);
    push_archive(
        &archive,
        &format!("127.0.0.1:{}/test/busybox:tls", plain.port),
        Some((USER.into(), PASS.into())),
        true,
    )
    .await
    .unwrap();
    let (ca, cert, key) = tls_files(d.path());
    let tls = start_tls_registry(&data, &cert, &key);
    let host = format!("127.0.0.1:{}", tls.port);
    let reference = format!("{host}/test/busybox:tls");
    let store = ImageStore::open(&d.path().join("content")).unwrap();
    let yaml = d.path().join("registries.yaml");
    let load = |text: String| {
        std::fs::write(&yaml, text).unwrap();
        Registries::load(&yaml).unwrap()
    };
    // Not trusted without the CA.
    let err = store
        .pull(&reference, &PullAuth::default(), &Registries::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // Trusted with ca_file.
    let with_ca = load(format!(
        "configs:\n  \"{host}\":\n    tls:\n      ca_file: {}\n",
        ca.display()
    ));
    let rec = store
        .pull(&reference, &PullAuth::default(), &with_ca)
        .await
        .unwrap();
    assert_eq!(rec.names, std::slice::from_ref(&reference));
    store.remove(&reference).unwrap();
    // Or with verification off.
    let skip = load(format!(
        "configs:\n  \"{host}\":\n    tls: {{insecure_skip_verify: true}}\n"
    ));
    store
        .pull(&reference, &PullAuth::default(), &skip)
        .await
        .unwrap();
    // An unreadable ca_file is an error, not a silent fallback.
    let bad = load(format!(
        "configs:\n  \"{host}\":\n    tls: {{ca_file: {}}}\n",
        d.path().join("nosuch.pem").display()
    ));
    let err = store
        .pull(&reference, &PullAuth::default(), &bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("nosuch.pem"), "{err}");
}

#[test]
fn layers_keep_links_devices_and_ownership_and_refuse_escaping_entries() {
    // Needs root: device nodes and chown (CI is root).
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("content");
    let store = ImageStore::open(&root).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o640);
    h.set_uid(1234);
    h.set_gid(5678);
    h.set_mtime(1_000_000);
    h.set_cksum();
    b.append_data(&mut h, "etc/file", &b"hello"[..]).unwrap();
    let mut hl = tar::Header::new_gnu();
    hl.set_entry_type(tar::EntryType::Link);
    hl.set_size(0);
    hl.set_uid(0);
    hl.set_gid(0);
    hl.set_mtime(0);
    hl.set_mode(0o777);
    b.append_link(&mut hl, "etc/hard", "etc/file").unwrap();
    let mut sl = tar::Header::new_gnu();
    sl.set_entry_type(tar::EntryType::Symlink);
    sl.set_size(0);
    sl.set_uid(0);
    sl.set_gid(0);
    sl.set_mtime(0);
    sl.set_mode(0o777);
    b.append_link(&mut sl, "etc/abs", "/etc/shadow").unwrap();
    let mut dev = tar::Header::new_gnu();
    dev.set_entry_type(tar::EntryType::Char);
    dev.set_device_major(1).unwrap();
    dev.set_device_minor(3).unwrap();
    dev.set_size(0);
    dev.set_uid(0);
    dev.set_gid(0);
    dev.set_mtime(0);
    dev.set_mode(0o666);
    dev.set_cksum();
    b.append_data(&mut dev, "dev/null", std::io::empty())
        .unwrap();
    let mut fifo = tar::Header::new_gnu();
    fifo.set_entry_type(tar::EntryType::Fifo);
    fifo.set_size(0);
    fifo.set_uid(0);
    fifo.set_gid(0);
    fifo.set_mtime(0);
    fifo.set_mode(0o600);
    fifo.set_cksum();
    b.append_data(&mut fifo, "run/pipe", std::io::empty())
        .unwrap();
    let good = b.into_inner().unwrap();
    let imgs = store
        .import_archive(&write(
            d.path(),
            "good.tar",
            &oci_archive("example.com/l:1", &[good], false),
        ))
        .unwrap();
    let dirs = store.layer_dirs(&imgs[0]).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let f = std::fs::metadata(dirs[0].join("etc/file")).unwrap();
    assert_eq!((f.uid(), f.gid(), f.mode() & 0o7777), (1234, 5678, 0o640));
    assert_eq!(f.mtime(), 1_000_000);
    let hard = std::fs::metadata(dirs[0].join("etc/hard")).unwrap();
    assert_eq!(hard.ino(), f.ino());
    assert_eq!(
        std::fs::read_link(dirs[0].join("etc/abs")).unwrap(),
        Path::new("/etc/shadow"),
        "absolute symlink targets are kept as they are"
    );
    let null = std::fs::symlink_metadata(dirs[0].join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert_eq!(null.mode() & 0o7777, 0o666);
    let pipe = std::fs::symlink_metadata(dirs[0].join("run/pipe")).unwrap();
    assert!(pipe.file_type().is_fifo());

    // A whiteout beneath a symlink leading out of the layer must not delete anything there.
    let victim_dir = d.path().join("victim");
    std::fs::create_dir_all(&victim_dir).unwrap();
    std::fs::write(victim_dir.join("precious"), b"keep").unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut sl = tar::Header::new_gnu();
    sl.set_entry_type(tar::EntryType::Symlink);
    sl.set_size(0);
    sl.set_uid(0);
    sl.set_gid(0);
    sl.set_mtime(0);
    sl.set_mode(0o777);
    b.append_link(&mut sl, "etc", &victim_dir).unwrap();
    let mut wh = tar::Header::new_gnu();
    wh.set_size(0);
    wh.set_uid(0);
    wh.set_gid(0);
    wh.set_mtime(0);
    wh.set_mode(0o644);
    wh.set_cksum();
    b.append_data(&mut wh, "etc/.wh.precious", std::io::empty())
        .unwrap();
    let sneaky = b.into_inner().unwrap();
    let imgs = store
        .import_archive(&write(
            d.path(),
            "sneaky.tar",
            &oci_archive("example.com/sneaky:1", &[sneaky], false),
        ))
        .unwrap();
    let err = store.layer_dirs(&imgs[0]).unwrap_err().to_string();
    assert!(err.contains("leads out of the layer"), "{err}");
    assert_eq!(std::fs::read(victim_dir.join("precious")).unwrap(), b"keep");

    // An entry named ../escape (written raw: tar's builder refuses such names).
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &b"x"[..]).unwrap();
    let evil = b.into_inner().unwrap();
    let imgs = store
        .import_archive(&write(
            d.path(),
            "evil.tar",
            &oci_archive("example.com/evil:1", &[evil], false),
        ))
        .unwrap();
    let err = store.layer_dirs(&imgs[0]).unwrap_err().to_string();
    assert!(err.contains("escapes the layer"), "{err}");
    assert!(!d.path().join("content/layers/escape").exists());
    assert!(!root.join("layers").join(&imgs[0].layers[0][7..]).exists());
    assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
}
