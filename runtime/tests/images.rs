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
