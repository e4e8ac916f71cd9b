//! Reads OCI-layout and docker-archive tarballs (plain, gzip or zstd) into image records and
//! the blob files to store, verifying every digest.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::unpack::decompress;
use super::{io, sha256_file, sha256_hex, ImageConfig, ImageError, ImageRecord, LayerBlob};

pub type Found = Vec<(ImageRecord, Vec<(String, PathBuf)>)>;

fn read_json(p: &Path) -> Result<Value, ImageError> {
    let b = std::fs::read(p).map_err(io(p.display()))?;
    serde_json::from_slice(&b).map_err(|e| ImageError::Invalid(format!("{}: {e}", p.display())))
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

pub fn image_config(cfg: &Value) -> (ImageConfig, Vec<String>) {
    let c = &cfg["config"];
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    (
        ImageConfig {
            entrypoint: strs(&c["Entrypoint"]),
            cmd: strs(&c["Cmd"]),
            env: strs(&c["Env"]),
            working_dir: c["WorkingDir"].as_str().unwrap_or_default().to_string(),
            user: c["User"].as_str().unwrap_or_default().to_string(),
        },
        strs(&cfg["rootfs"]["diff_ids"]),
    )
}

fn verified(dir: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| ImageError::Invalid(format!("unsupported digest {digest:?}")))?;
    let p = dir.join("blobs/sha256").join(hex);
    if !p.exists() {
        return Err(ImageError::Invalid(format!(
            "blob {digest} is missing from the archive"
        )));
    }
    let got = sha256_file(&p)?;
    if got != hex {
        return Err(ImageError::Invalid(format!(
            "blob {digest} is corrupt (its content is sha256:{got})"
        )));
    }
    Ok(p)
}

fn normalize_names(names: &[String]) -> Vec<String> {
    names
        .iter()
        .filter_map(|n| super::normalize_reference(n).ok())
        .collect()
}

fn record(
    names: Vec<String>,
    manifest_digest: &str,
    config_digest: &str,
    cfg: &Value,
    blobs: Vec<LayerBlob>,
) -> Result<ImageRecord, ImageError> {
    let (config, diff_ids) = image_config(cfg);
    if diff_ids.len() != blobs.len() {
        return Err(ImageError::Invalid(format!(
            "image {config_digest}: {} layers but {} diff ids",
            blobs.len(),
            diff_ids.len()
        )));
    }
    let mut repo_digests: Vec<String> = names
        .iter()
        .map(|n| format!("{}@{manifest_digest}", super::repository_of(n)))
        .collect();
    repo_digests.dedup();
    Ok(ImageRecord {
        id: config_digest.to_string(),
        size: blobs.iter().map(|b| b.size).sum(),
        names,
        repo_digests,
        config,
        layers: diff_ids,
        blobs,
        manifest_digest: manifest_digest.to_string(),
        last_used: 0,
        imported: false,
    })
}

fn oci_manifest(
    dir: &Path,
    digest: &str,
    names: Vec<String>,
    out: &mut Found,
) -> Result<(), ImageError> {
    let mp = verified(dir, digest)?;
    let m = read_json(&mp)?;
    if m["manifests"].is_array() {
        // A nested index: the entry for this machine.
        let list = m["manifests"].as_array().cloned().unwrap_or_default();
        let pick = list
            .iter()
            .find(|d| d["platform"]["architecture"] == host_arch())
            .or_else(|| list.first())
            .ok_or_else(|| ImageError::Invalid("empty image index".into()))?;
        return oci_manifest(dir, pick["digest"].as_str().unwrap_or_default(), names, out);
    }
    let config_digest = m["config"]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let cp = verified(dir, &config_digest)?;
    let cfg = read_json(&cp)?;
    let mut files = vec![(digest.to_string(), mp), (config_digest.clone(), cp)];
    let mut blobs = Vec::new();
    for l in m["layers"].as_array().cloned().unwrap_or_default() {
        let d = l["digest"].as_str().unwrap_or_default().to_string();
        let p = verified(dir, &d)?;
        blobs.push(LayerBlob {
            digest: d.clone(),
            media_type: l["mediaType"].as_str().unwrap_or_default().to_string(),
            size: l["size"]
                .as_u64()
                .unwrap_or_else(|| std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0)),
        });
        files.push((d, p));
    }
    out.push((record(names, digest, &config_digest, &cfg, blobs)?, files));
    Ok(())
}

/// A regular file named by a docker archive's manifest.json, which must stay inside the
/// unpacked archive (no `..`, no absolute path, no symlink leading out; `docker save` links
/// shared layers to each other, so links inside are followed).
fn archive_file(dir: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let escapes = || ImageError::Invalid(format!("{rel:?} escapes the archive"));
    let rel_path = Path::new(rel);
    if rel.is_empty()
        || !rel_path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Err(escapes());
    }
    let p = dir.join(rel_path);
    let real = p
        .canonicalize()
        .map_err(io(format!("{rel} in the archive")))?;
    let root = dir.canonicalize().map_err(io(dir.display()))?;
    if !real.starts_with(&root) {
        return Err(escapes());
    }
    if !std::fs::metadata(&real).is_ok_and(|m| m.is_file()) {
        return Err(ImageError::Invalid(format!(
            "{rel:?} in the archive is not a regular file"
        )));
    }
    Ok(real)
}

fn docker_archive(dir: &Path) -> Result<Found, ImageError> {
    let manifest = read_json(&dir.join("manifest.json"))?;
    let mut out = Vec::new();
    for m in manifest.as_array().cloned().unwrap_or_default() {
        let config_file = archive_file(dir, m["Config"].as_str().unwrap_or_default())?;
        let config_hex = sha256_file(&config_file)?;
        let config_digest = format!("sha256:{config_hex}");
        let cfg = read_json(&config_file)?;
        let mut files = vec![(config_digest.clone(), config_file)];
        let mut blobs = Vec::new();
        let mut descriptors = Vec::new();
        for l in m["Layers"].as_array().cloned().unwrap_or_default() {
            let p = archive_file(dir, l.as_str().unwrap_or_default())?;
            let hex = sha256_file(&p)?;
            let mut magic = [0u8; 4];
            use std::io::Read;
            let _ = std::fs::File::open(&p)
                .map_err(io(p.display()))?
                .read(&mut magic);
            let media_type = if magic[..2] == [0x1f, 0x8b] {
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
            } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
                "application/vnd.oci.image.layer.v1.tar+zstd"
            } else {
                "application/vnd.docker.image.rootfs.diff.tar"
            };
            let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            descriptors.push(serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": size}));
            blobs.push(LayerBlob {
                digest: format!("sha256:{hex}"),
                media_type: media_type.to_string(),
                size,
            });
            files.push((format!("sha256:{hex}"), p));
        }
        // The registry manifest this image would have.
        let manifest_json = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config_digest,
                       "size": std::fs::metadata(dir.join(m["Config"].as_str().unwrap_or_default())).map(|m| m.len()).unwrap_or(0)},
            "layers": descriptors,
        }))
        .unwrap_or_default();
        let manifest_digest = format!("sha256:{}", sha256_hex(&manifest_json));
        let mf = dir.join(format!("manifest-{}", &manifest_digest[7..]));
        std::fs::write(&mf, &manifest_json).map_err(io(mf.display()))?;
        files.push((manifest_digest.clone(), mf));
        let names: Vec<String> = m["RepoTags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        out.push((
            record(
                normalize_names(&names),
                &manifest_digest,
                &config_digest,
                &cfg,
                blobs,
            )?,
            files,
        ));
    }
    Ok(out)
}

/// Unpacks the archive into `tmp` and reads the images it holds.
pub fn read_archive(path: &Path, tmp: &Path) -> Result<Found, ImageError> {
    let reader = decompress(path, "")?;
    let dir = tmp.join("a");
    std::fs::create_dir_all(&dir).map_err(io(dir.display()))?;
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(false);
    ar.unpack(&dir).map_err(|e| {
        ImageError::Invalid(format!(
            "{}: not a readable tar archive: {e}",
            path.display()
        ))
    })?;
    if dir.join("index.json").exists() {
        let index = read_json(&dir.join("index.json"))?;
        let mut out = Vec::new();
        for d in index["manifests"].as_array().cloned().unwrap_or_default() {
            let ann = &d["annotations"];
            let name = ann["io.containerd.image.name"]
                .as_str()
                .or(ann["org.opencontainers.image.ref.name"].as_str())
                .unwrap_or_default();
            let names = if name.is_empty()
                || (!name.contains('/') && !name.contains(':') && !name.contains('.'))
            {
                Vec::new()
            } else {
                normalize_names(&[name.to_string()])
            };
            oci_manifest(
                &dir,
                d["digest"].as_str().unwrap_or_default(),
                names,
                &mut out,
            )?;
        }
        if out.is_empty() {
            return Err(ImageError::Invalid(format!(
                "{}: the OCI index lists no images",
                path.display()
            )));
        }
        return Ok(out);
    }
    if dir.join("manifest.json").exists() {
        return docker_archive(&dir);
    }
    Err(ImageError::Invalid(format!(
        "{}: neither an OCI layout (index.json) nor a docker archive (manifest.json)",
        path.display()
    )))
}
