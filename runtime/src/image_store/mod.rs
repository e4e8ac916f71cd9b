//! The node's image store: blobs by digest (verified), an index of images by name, layers
//! unpacked once (overlay whiteouts and opaque directories), air-gap import of OCI and
//! docker-archive tarballs, and pulls through oci-client honouring registries.yaml.

mod archive;
mod pull;
mod registries;
mod unpack;

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

pub use pull::push_archive;
pub use registries::Registries;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {0:?} not found")]
    NotFound(String),
    #[error("failed to pull and unpack image {reference:?}: {message}")]
    Pull { reference: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ImageError {
    let w = what.to_string();
    move |e| ImageError::Io(w, e)
}

/// What a container needs from its image's configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// One layer blob of an image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerBlob {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    /// `sha256:<config digest>`.
    pub id: String,
    /// Normalized names, e.g. `docker.io/library/busybox:latest`.
    pub names: Vec<String>,
    /// `<repository>@sha256:<manifest digest>`.
    pub repo_digests: Vec<String>,
    /// Bytes of the (compressed) layers.
    pub size: u64,
    pub config: ImageConfig,
    /// Diff ids, bottom-most first.
    pub layers: Vec<String>,
    pub blobs: Vec<LayerBlob>,
    pub manifest_digest: String,
    #[serde(default)]
    pub last_used: u64,
    /// Whether the image came from an archive (air-gap import): such images are used as
    /// they are, without asking a registry, and kept by garbage collection.
    #[serde(default)]
    pub imported: bool,
}

/// Credentials from imagePullSecrets: (registry host, user, password).
#[derive(Debug, Clone, Default)]
pub struct PullAuth {
    pub credentials: Vec<(String, String, String)>,
}

impl PullAuth {
    /// Reads a `.dockerconfigjson` (`{"auths": {host: {username, password} | {auth}}}`).
    pub fn from_dockerconfigjson(json: &[u8]) -> Result<PullAuth, ImageError> {
        use base64::Engine;
        let v: serde_json::Value = serde_json::from_slice(json)
            .map_err(|e| ImageError::Invalid(format!("dockerconfigjson: {e}")))?;
        let auths = v.get("auths").unwrap_or(&v);
        let mut out = PullAuth::default();
        if let Some(m) = auths.as_object() {
            for (host, a) in m {
                let host = host
                    .trim_start_matches("https://")
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .trim_end_matches("/v1")
                    .trim_end_matches("/v2")
                    .to_string();
                let host = if host == "index.docker.io" || host == "registry-1.docker.io" {
                    "docker.io".to_string()
                } else {
                    host
                };
                let (mut u, mut p) = (
                    a["username"].as_str().unwrap_or_default().to_string(),
                    a["password"].as_str().unwrap_or_default().to_string(),
                );
                if u.is_empty() {
                    if let Some(enc) = a["auth"].as_str() {
                        if let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(enc) {
                            let s = String::from_utf8_lossy(&raw).to_string();
                            if let Some((a, b)) = s.split_once(':') {
                                u = a.to_string();
                                p = b.to_string();
                            }
                        }
                    }
                }
                if !u.is_empty() {
                    out.credentials.push((host, u, p));
                }
            }
        }
        Ok(out)
    }

    pub fn for_host(&self, host: &str) -> Option<(String, String)> {
        self.credentials
            .iter()
            .find(|(h, _, _)| h == host)
            .map(|(_, u, p)| (u.clone(), p.clone()))
    }
}

/// `busybox` → `docker.io/library/busybox:latest`; keeps digests; upstream's error text.
pub fn normalize_reference(r: &str) -> Result<String, ImageError> {
    let bad = || {
        ImageError::Invalid(format!(
            "couldn't parse image reference {r:?}: invalid reference format"
        ))
    };
    if r.is_empty() || r.chars().any(|c| c.is_whitespace()) {
        return Err(bad());
    }
    let (name, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    if let Some(d) = digest {
        if !d.starts_with("sha256:")
            || d.len() != 71
            || !d[7..].bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(bad());
        }
    }
    // Split the tag off the last path component.
    let (path, tag) = match name.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, Some(t)),
        _ => (name, None),
    };
    if path.is_empty() || path.ends_with('/') || path.starts_with('/') || path.contains("//") {
        return Err(bad());
    }
    let first = path.split('/').next().unwrap_or_default();
    let has_registry =
        path.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = if has_registry && (first == "docker.io" || first == "index.docker.io") {
        // Docker Hub spelled out: official images still live under library/.
        let rest = &path[first.len() + 1..];
        if rest.contains('/') {
            format!("docker.io/{rest}")
        } else {
            format!("docker.io/library/{rest}")
        }
    } else if has_registry {
        path.to_string()
    } else if path.contains('/') {
        format!("docker.io/{path}")
    } else {
        format!("docker.io/library/{path}")
    };
    let repo = full.split_once('/').map(|x| x.1).unwrap_or_default();
    if repo.chars().any(|c| c.is_ascii_uppercase())
        || !repo
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c))
    {
        return Err(bad());
    }
    if let Some(t) = tag {
        if t.is_empty()
            || t.len() > 128
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(bad());
        }
    }
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => format!("{full}:{t}@{d}"),
        (None, Some(d)) => format!("{full}@{d}"),
        (Some(t), None) => format!("{full}:{t}"),
        (None, None) => format!("{full}:latest"),
    })
}

/// The repository part of a normalized reference (without tag or digest).
pub fn repository_of(reference: &str) -> String {
    let name = reference.split('@').next().unwrap_or(reference);
    match name.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => p.to_string(),
        _ => name.to_string(),
    }
}

struct Inner {
    root: PathBuf,
    images: Mutex<Vec<ImageRecord>>,
    unpacking: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    imported: Mutex<HashSet<String>>,
}

#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImageStore({})", self.inner.root.display())
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut f = std::fs::File::open(path).map_err(io(path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io(path.display()))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ImageStore {
    pub fn open(root: &Path) -> Result<ImageStore, ImageError> {
        for d in ["blobs/sha256", "layers", "tmp"] {
            std::fs::create_dir_all(root.join(d)).map_err(io(root.join(d).display()))?;
        }
        // Half-done work of an earlier run.
        if let Ok(rd) = std::fs::read_dir(root.join("tmp")) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
                let _ = std::fs::remove_file(e.path());
            }
        }
        let images: Vec<ImageRecord> = std::fs::read(root.join("images.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let imported: HashSet<String> = std::fs::read_to_string(root.join("imported"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect();
        Ok(ImageStore {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                images: Mutex::new(images),
                unpacking: Mutex::new(HashMap::new()),
                imported: Mutex::new(imported),
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.inner
            .root
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    fn tmp_dir(&self) -> Result<tempfile::TempDir, ImageError> {
        tempfile::Builder::new()
            .prefix("t")
            .tempdir_in(self.inner.root.join("tmp"))
            .map_err(io("creating a temporary directory"))
    }

    fn save(&self, images: &[ImageRecord]) -> Result<(), ImageError> {
        let tmp = self.inner.root.join("images.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(images).unwrap_or_default())
            .map_err(io(tmp.display()))?;
        std::fs::rename(&tmp, self.inner.root.join("images.json")).map_err(io("images.json"))
    }

    /// Adds (or merges by id) a record whose blobs are in the store.
    fn add(&self, mut rec: ImageRecord) -> Result<ImageRecord, ImageError> {
        let mut g = self.inner.images.lock();
        // A name moves to the newest image carrying it.
        for other in g.iter_mut() {
            if other.id != rec.id {
                other.names.retain(|n| !rec.names.contains(n));
            }
        }
        if let Some(existing) = g.iter_mut().find(|i| i.id == rec.id) {
            for n in &rec.names {
                if !existing.names.contains(n) {
                    existing.names.push(n.clone());
                }
            }
            for d in &rec.repo_digests {
                if !existing.repo_digests.contains(d) {
                    existing.repo_digests.push(d.clone());
                }
            }
            existing.last_used = now_secs();
            existing.imported |= rec.imported;
            rec = existing.clone();
        } else {
            rec.last_used = now_secs();
            g.push(rec.clone());
        }
        self.save(&g)?;
        Ok(rec)
    }

    pub fn get(&self, reference: &str) -> Option<ImageRecord> {
        let g = self.inner.images.lock();
        let norm = normalize_reference(reference).ok();
        let id = if reference.starts_with("sha256:") {
            reference.to_string()
        } else {
            format!("sha256:{reference}")
        };
        g.iter()
            .find(|i| {
                i.id == id
                    || i.names
                        .iter()
                        .any(|n| Some(n) == norm.as_ref() || n == reference)
                    || i.repo_digests
                        .iter()
                        .any(|d| Some(d) == norm.as_ref() || d == reference)
            })
            .cloned()
    }

    pub fn list(&self) -> Vec<ImageRecord> {
        self.inner.images.lock().clone()
    }

    /// Removes an image by name or id (a name only, when the image has other names).
    pub fn remove(&self, reference: &str) -> Result<(), ImageError> {
        let rec = self
            .get(reference)
            .ok_or_else(|| ImageError::NotFound(reference.to_string()))?;
        let norm = normalize_reference(reference).ok();
        let mut g = self.inner.images.lock();
        let by_name = norm.as_ref().is_some_and(|n| rec.names.contains(n)) && rec.names.len() > 1;
        if by_name {
            if let Some(i) = g.iter_mut().find(|i| i.id == rec.id) {
                i.names.retain(|n| Some(n) != norm.as_ref());
            }
        } else {
            g.retain(|i| i.id != rec.id);
        }
        self.save(&g)?;
        let keep: HashSet<String> = g
            .iter()
            .flat_map(|i| {
                i.blobs
                    .iter()
                    .map(|b| b.digest.clone())
                    .chain([
                        i.id.clone(),
                        format!("sha256:{}", i.manifest_digest.trim_start_matches("sha256:")),
                    ])
                    .collect::<Vec<_>>()
            })
            .collect();
        let keep_layers: HashSet<String> = g.iter().flat_map(|i| i.layers.clone()).collect();
        drop(g);
        if !by_name {
            for b in &rec.blobs {
                if !keep.contains(&b.digest) {
                    let _ = std::fs::remove_file(self.blob_path(&b.digest));
                }
            }
            for d in [&rec.id, &rec.manifest_digest] {
                if !keep.contains(d) {
                    let _ = std::fs::remove_file(self.blob_path(d));
                }
            }
            for l in &rec.layers {
                if !keep_layers.contains(l) {
                    let _ = std::fs::remove_dir_all(
                        self.inner
                            .root
                            .join("layers")
                            .join(l.trim_start_matches("sha256:")),
                    );
                }
            }
        }
        Ok(())
    }

    /// Bytes used by blobs and unpacked layers.
    pub fn disk_usage(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            let mut n = 0;
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    if let Ok(m) = e.metadata() {
                        if m.is_dir() {
                            n += walk(&e.path());
                        } else {
                            n += m.len();
                        }
                    }
                }
            }
            n
        }
        walk(&self.inner.root)
    }

    /// Removes images not in `in_use` (ids), least recently used first, until `bytes_to_free`.
    pub fn gc(&self, in_use: &HashSet<String>, bytes_to_free: u64) -> Result<u64, ImageError> {
        let mut candidates: Vec<ImageRecord> = self
            .list()
            .into_iter()
            .filter(|i| !in_use.contains(&i.id))
            .collect();
        candidates.sort_by_key(|i| i.last_used);
        let mut freed = 0;
        for c in candidates {
            if freed >= bytes_to_free {
                break;
            }
            let before = self.disk_usage();
            self.remove(&c.id)?;
            freed += before.saturating_sub(self.disk_usage());
        }
        Ok(freed)
    }

    /// Unpacked layer directories, bottom-most first (each unpacked once). Blocking.
    pub fn layer_dirs(&self, image: &ImageRecord) -> Result<Vec<PathBuf>, ImageError> {
        let mut out = Vec::new();
        for (i, blob) in image.blobs.iter().enumerate() {
            let diff_id =
                image.layers.get(i).cloned().ok_or_else(|| {
                    ImageError::Invalid(format!("image {} lacks diff ids", image.id))
                })?;
            let dir = self
                .inner
                .root
                .join("layers")
                .join(diff_id.trim_start_matches("sha256:"));
            if !dir.exists() {
                let lock = {
                    let mut g = self.inner.unpacking.lock();
                    g.entry(diff_id.clone()).or_default().clone()
                };
                let _held = lock.lock();
                if !dir.exists() {
                    let tmp = self.tmp_dir()?;
                    let target = tmp.path().join("l");
                    unpack::unpack_layer(
                        &self.blob_path(&blob.digest),
                        &blob.media_type,
                        &target,
                        &diff_id,
                    )?;
                    std::fs::rename(&target, &dir).map_err(io(dir.display()))?;
                }
            }
            out.push(dir);
        }
        if let Some(i) = self
            .inner
            .images
            .lock()
            .iter_mut()
            .find(|i| i.id == image.id)
        {
            i.last_used = now_secs();
        }
        Ok(out)
    }

    /// Imports an OCI layout or docker-archive tarball (.tar, .tar.gz, .tar.zst). Blocking.
    pub fn import_archive(&self, path: &Path) -> Result<Vec<ImageRecord>, ImageError> {
        let tmp = self.tmp_dir()?;
        let recs = archive::read_archive(path, tmp.path())?;
        let mut out = Vec::new();
        for (rec, files) in recs {
            for (digest, file) in files {
                let dst = self.blob_path(&digest);
                if !dst.exists() {
                    std::fs::rename(&file, &dst)
                        .or_else(|_| std::fs::copy(&file, &dst).map(drop))
                        .map_err(io(dst.display()))?;
                }
            }
            let mut rec = rec;
            rec.imported = true;
            out.push(self.add(rec)?);
        }
        Ok(out)
    }

    /// Imports archives in `dir` not imported before (by name, size and mtime). Blocking.
    pub fn import_dir(&self, dir: &Path) -> Vec<Result<Vec<ImageRecord>, ImageError>> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(dir) else {
            return out;
        };
        let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for p in files {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            if !(name.ends_with(".tar")
                || name.ends_with(".tar.gz")
                || name.ends_with(".tgz")
                || name.ends_with(".tar.zst")
                || name.ends_with(".tzst"))
            {
                continue;
            }
            let Ok(m) = std::fs::metadata(&p) else {
                continue;
            };
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let key = format!("{}\t{}\t{mtime}", p.display(), m.len());
            if self.inner.imported.lock().contains(&key) {
                continue;
            }
            let r = self.import_archive(&p);
            if r.is_ok() {
                let mut g = self.inner.imported.lock();
                g.insert(key);
                let text: Vec<String> = g.iter().cloned().collect();
                let _ = std::fs::write(self.inner.root.join("imported"), text.join("\n"));
            }
            out.push(r.map_err(|e| ImageError::Invalid(format!("{}: {e}", p.display()))));
        }
        out
    }

    /// Pulls an image (already normalized or not) into the store.
    pub async fn pull(
        &self,
        reference: &str,
        auth: &PullAuth,
        registries: &Registries,
    ) -> Result<ImageRecord, ImageError> {
        let reference = normalize_reference(reference)?;
        let tmp = self.tmp_dir()?;
        let have = |digest: &str| self.blob_path(digest).exists();
        let (rec, files) = pull::pull(&reference, auth, registries, tmp.path(), &have).await?;
        for (digest, file) in files {
            let dst = self.blob_path(&digest);
            if !dst.exists() {
                std::fs::rename(&file, &dst).map_err(io(dst.display()))?;
            }
        }
        self.add(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalize_as_docker_does() {
        assert_eq!(
            normalize_reference("busybox").unwrap(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            normalize_reference("foo/bar:1").unwrap(),
            "docker.io/foo/bar:1"
        );
        assert_eq!(
            normalize_reference("127.0.0.1:5000/x").unwrap(),
            "127.0.0.1:5000/x:latest"
        );
        assert_eq!(
            normalize_reference("docker.io/busybox:1").unwrap(),
            "docker.io/library/busybox:1"
        );
        assert_eq!(
            normalize_reference("index.docker.io/foo/bar").unwrap(),
            "docker.io/foo/bar:latest"
        );
        assert_eq!(
            normalize_reference("docker.io/library/busybox:latest").unwrap(),
            "docker.io/library/busybox:latest"
        );
        assert!(normalize_reference("a//b").is_err());
        assert!(normalize_reference("busybox@sha256:abc").is_err());
        assert_eq!(
            normalize_reference("localhost/x:v2").unwrap(),
            "localhost/x:v2"
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            normalize_reference(&format!("busybox@{d}")).unwrap(),
            format!("docker.io/library/busybox@{d}")
        );
        let e = normalize_reference("A B").unwrap_err().to_string();
        assert_eq!(
            e,
            "couldn't parse image reference \"A B\": invalid reference format"
        );
        assert!(normalize_reference("Upper/case").is_err());
        assert!(normalize_reference("x:").is_err());
        assert_eq!(
            repository_of("docker.io/library/busybox:latest"),
            "docker.io/library/busybox"
        );
        assert_eq!(repository_of("127.0.0.1:5000/x:v1"), "127.0.0.1:5000/x");
    }

    #[test]
    fn docker_config_json_gives_credentials() {
        let j = br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"127.0.0.1:5000":{"username":"a","password":"b"}}}"#;
        let a = PullAuth::from_dockerconfigjson(j).unwrap();
        assert_eq!(a.for_host("docker.io"), Some(("u".into(), "p".into())));
        assert_eq!(a.for_host("127.0.0.1:5000"), Some(("a".into(), "b".into())));
    }
}
