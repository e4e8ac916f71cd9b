//! Pod volumes on the node: emptyDir (disk, or tmpfs for medium Memory), hostPath with its
//! type checks, configMap / secret / downwardAPI / projected (service account tokens refreshed
//! before they expire) written atomically through a `..data` symlink swap as upstream's
//! atomic writer does, and persistentVolumeClaims bound to hostPath/local volumes.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{DownwardAPIVolumeFile, KeyToPath, Pod, Volume};
use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::rest::{status_code, RestClient};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("MountVolume.SetUp failed for volume {volume:?} : {message}")]
    SetUp { volume: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

fn setup_err(volume: &str, message: impl Into<String>) -> VolumeError {
    VolumeError::SetUp {
        volume: volume.to_string(),
        message: message.into(),
    }
}

/// Files of a volume: relative path → (content, mode).
pub type Files = BTreeMap<String, (Vec<u8>, u32)>;

struct Token {
    token: String,
    refresh_at: Instant,
}

pub struct VolumeManager {
    client: RestClient,
    pods_dir: PathBuf,
    local_path_dir: PathBuf,
    node_name: String,
    tokens: Mutex<HashMap<String, Token>>,
}

fn plugin_dir(kind: &str) -> &'static str {
    match kind {
        "emptyDir" => "kubernetes.io~empty-dir",
        "configMap" => "kubernetes.io~configmap",
        "secret" => "kubernetes.io~secret",
        "downwardAPI" => "kubernetes.io~downward-api",
        "projected" => "kubernetes.io~projected",
        _ => "kubernetes.io~other",
    }
}

fn is_mounted(p: &Path) -> bool {
    let s = p.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(s.as_str()))
}

fn umount(p: &Path) {
    if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
        // SAFETY: unmounting a path under the pod's own volume directory.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Writes `files` into `dir` atomically: a fresh `..<ts>` directory, then `..data` swapped to it
/// with a rename, then user-visible symlinks `name -> ..data/name`. Returns whether anything
/// changed.
pub fn atomic_write(dir: &Path, files: &Files) -> std::io::Result<bool> {
    std::fs::create_dir_all(dir)?;
    let data = dir.join("..data");
    // Unchanged?
    if data.exists() {
        let mut same = true;
        for (rel, (content, mode)) in files {
            let p = data.join(rel);
            match std::fs::read(&p) {
                Ok(c) if &c == content => {
                    let m = std::fs::metadata(&p)
                        .map(|m| m.permissions().mode() & 0o7777)
                        .unwrap_or(0);
                    if m != *mode {
                        same = false;
                    }
                }
                _ => same = false,
            }
        }
        let mut count = 0;
        fn walk(p: &Path, n: &mut usize) {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    walk(&e.path(), n)
                } else {
                    *n += 1
                }
            }
        }
        walk(&data, &mut count);
        if same && count == files.len() {
            return Ok(false);
        }
    }
    let ts = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let new_dir = dir.join(&ts);
    std::fs::create_dir_all(&new_dir)?;
    for (rel, (content, mode)) in files {
        let p = new_dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, content)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))?;
    }
    let old = std::fs::read_link(&data).ok();
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&ts, &tmp_link)?;
    std::fs::rename(&tmp_link, &data)?;
    // Top-level entries.
    let tops: std::collections::BTreeSet<String> = files
        .keys()
        .map(|k| k.split('/').next().unwrap_or(k).to_string())
        .collect();
    for t in &tops {
        let link = dir.join(t);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{t}"), &link)?;
        }
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("..") && !tops.contains(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if let Some(old) = old {
        if old != Path::new(&ts) {
            let _ = std::fs::remove_dir_all(dir.join(old));
        }
    }
    Ok(true)
}

fn b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_default()
}

fn safe_rel(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && path.components().all(|c| matches!(c, Component::Normal(_)))
        && !p.starts_with("..")
}

/// Files from a configMap's or secret's data, with items and modes.
pub fn render_keys(
    data: &BTreeMap<String, Vec<u8>>,
    items: &Option<Vec<KeyToPath>>,
    default_mode: u32,
    kind: &str,
    name: &str,
    optional: bool,
) -> Result<Files, String> {
    let mut out = Files::new();
    match items {
        None => {
            for (k, v) in data {
                out.insert(k.clone(), (v.clone(), default_mode));
            }
        }
        Some(items) => {
            for it in items {
                let Some(v) = data.get(&it.key) else {
                    if optional {
                        continue;
                    }
                    return Err(format!(
                        "{kind} references non-existent {} key: {}",
                        if kind == "secret" { "secret" } else { "config" },
                        it.key
                    ));
                };
                if !safe_rel(&it.path) {
                    return Err(format!("invalid path {:?} in {kind} {name:?}", it.path));
                }
                out.insert(
                    it.path.clone(),
                    (v.clone(), it.mode.map(|m| m as u32).unwrap_or(default_mode)),
                );
            }
        }
    }
    Ok(out)
}

fn field_value(pod: &Pod, path: &str) -> Result<String, String> {
    let m = &pod.metadata;
    let fmt_map = |map: &Option<BTreeMap<String, String>>| {
        map.clone()
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "metadata.labels" => fmt_map(&m.labels),
        "metadata.annotations" => fmt_map(&m.annotations),
        p if p.starts_with("metadata.labels['") && p.ends_with("']") => m
            .labels
            .clone()
            .unwrap_or_default()
            .get(&p["metadata.labels['".len()..p.len() - 2])
            .cloned()
            .unwrap_or_default(),
        p if p.starts_with("metadata.annotations['") && p.ends_with("']") => m
            .annotations
            .clone()
            .unwrap_or_default()
            .get(&p["metadata.annotations['".len()..p.len() - 2])
            .cloned()
            .unwrap_or_default(),
        other => return Err(format!("unsupported fieldRef {other:?}")),
    })
}

fn downward_files(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: u32,
) -> Result<Files, String> {
    let mut out = Files::new();
    for it in items {
        if !safe_rel(&it.path) {
            return Err(format!("invalid path {:?}", it.path));
        }
        let value = if let Some(f) = &it.field_ref {
            field_value(pod, &f.field_path)?
        } else if let Some(r) = &it.resource_field_ref {
            let c = pod
                .spec
                .as_ref()
                .and_then(|s| {
                    s.containers
                        .iter()
                        .find(|c| Some(&c.name) == r.container_name.as_ref())
                })
                .cloned()
                .unwrap_or_default();
            let res = c.resources.unwrap_or_default();
            let (which, name) = r.resource.split_once('.').unwrap_or(("limits", "cpu"));
            let map = if which == "limits" {
                res.limits
            } else {
                res.requests
            };
            let q = map
                .and_then(|m| m.get(name).map(|q| q.0.clone()))
                .unwrap_or_else(|| "0".into());
            let v = crate::controllers::quantity::parse_milli(&q).unwrap_or(0);
            let d = r
                .divisor
                .as_ref()
                .and_then(|d| crate::controllers::quantity::parse_milli(&d.0))
                .filter(|d| *d > 0)
                .unwrap_or(1000);
            ((v + d - 1) / d).to_string()
        } else {
            continue;
        };
        out.insert(
            it.path.clone(),
            (
                value.into_bytes(),
                it.mode.map(|m| m as u32).unwrap_or(default_mode),
            ),
        );
    }
    Ok(out)
}

impl VolumeManager {
    pub fn new(
        client: RestClient,
        pods_dir: PathBuf,
        local_path_dir: PathBuf,
        node_name: String,
    ) -> VolumeManager {
        VolumeManager {
            client,
            pods_dir,
            local_path_dir,
            node_name,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    fn dir(&self, pod: &Pod, kind: &str, name: &str) -> PathBuf {
        self.pods_dir
            .join(pod.metadata.uid.clone().unwrap_or_default())
            .join("volumes")
            .join(plugin_dir(kind))
            .join(name)
    }

    /// subPath inside a volume, refusing anything that leaves it.
    pub fn sub_path(base: &Path, sub: &str) -> Result<PathBuf, VolumeError> {
        if !safe_rel(sub) {
            return Err(VolumeError::Invalid(format!("invalid subPath {sub:?}")));
        }
        let p = base.join(sub);
        if !p.exists() {
            std::fs::create_dir_all(&p).map_err(|e| VolumeError::Io(p.display().to_string(), e))?;
        }
        let real =
            std::fs::canonicalize(&p).map_err(|e| VolumeError::Io(p.display().to_string(), e))?;
        let root = std::fs::canonicalize(base)
            .map_err(|e| VolumeError::Io(base.display().to_string(), e))?;
        if !real.starts_with(&root) {
            return Err(VolumeError::Invalid(format!(
                "subPath {sub:?} leaves the volume"
            )));
        }
        Ok(real)
    }

    async fn get_obj(&self, ns: &str, kind: &str, name: &str) -> Result<Option<Value>, String> {
        match self
            .client
            .get(&format!("/api/v1/namespaces/{ns}/{kind}/{name}"))
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err(e) if status_code(&e) == Some(404) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn data_of(
        &self,
        ns: &str,
        kind: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
        let Some(obj) = self.get_obj(ns, kind, name).await? else {
            return Ok(None);
        };
        let mut m = BTreeMap::new();
        for (k, v) in obj["data"].as_object().cloned().unwrap_or_default() {
            let s = v.as_str().unwrap_or_default();
            m.insert(
                k,
                if kind == "secrets" {
                    b64(s)
                } else {
                    s.as_bytes().to_vec()
                },
            );
        }
        if kind == "configmaps" {
            for (k, v) in obj["binaryData"].as_object().cloned().unwrap_or_default() {
                m.insert(k, b64(v.as_str().unwrap_or_default()));
            }
        }
        Ok(Some(m))
    }

    async fn token(
        &self,
        pod: &Pod,
        key: &str,
        audience: Option<String>,
        expiration: i64,
    ) -> Result<String, String> {
        if let Some(t) = self.tokens.lock().get(key) {
            if Instant::now() < t.refresh_at {
                return Ok(t.token.clone());
            }
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let mut spec = json!({
            "expirationSeconds": expiration.max(600),
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1",
                "name": pod.metadata.name, "uid": pod.metadata.uid},
        });
        if let Some(a) = audience.filter(|a| !a.is_empty()) {
            spec["audiences"] = json!([a]);
        }
        let resp = self
            .client
            .post(
                &format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"),
                &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}),
            )
            .await
            .map_err(|e| format!("failed to fetch token: {e}"))?;
        let token = resp["status"]["token"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let secs = expiration.max(600) as u64;
        self.tokens.lock().insert(
            key.to_string(),
            Token {
                token: token.clone(),
                refresh_at: Instant::now() + Duration::from_secs(secs * 8 / 10),
            },
        );
        Ok(token)
    }

    /// The files of a configMap/secret/downwardAPI/projected volume; None if not such a kind.
    async fn render(&self, pod: &Pod, v: &Volume) -> Result<Option<(&'static str, Files)>, String> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        if let Some(c) = &v.config_map {
            let mode = c.default_mode.unwrap_or(0o644) as u32;
            let optional = c.optional.unwrap_or(false);
            return match self.data_of(&ns, "configmaps", &c.name).await? {
                Some(d) => Ok(Some((
                    "configMap",
                    render_keys(&d, &c.items, mode, "configmap", &c.name, optional)?,
                ))),
                None if optional => Ok(Some(("configMap", Files::new()))),
                None => Err(format!("configmap {:?} not found", c.name)),
            };
        }
        if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let mode = s.default_mode.unwrap_or(0o644) as u32;
            let optional = s.optional.unwrap_or(false);
            return match self.data_of(&ns, "secrets", &name).await? {
                Some(d) => Ok(Some((
                    "secret",
                    render_keys(&d, &s.items, mode, "secret", &name, optional)?,
                ))),
                None if optional => Ok(Some(("secret", Files::new()))),
                None => Err(format!("secret {name:?} not found")),
            };
        }
        if let Some(d) = &v.downward_api {
            let mode = d.default_mode.unwrap_or(0o644) as u32;
            return Ok(Some((
                "downwardAPI",
                downward_files(pod, d.items.as_deref().unwrap_or_default(), mode)?,
            )));
        }
        if let Some(p) = &v.projected {
            let mode = p.default_mode.unwrap_or(0o644) as u32;
            let mut files = Files::new();
            for src in p.sources.iter().flatten() {
                if let Some(c) = &src.config_map {
                    let optional = c.optional.unwrap_or(false);
                    match self.data_of(&ns, "configmaps", &c.name).await? {
                        Some(d) => files.extend(render_keys(
                            &d,
                            &c.items,
                            mode,
                            "configmap",
                            &c.name,
                            optional,
                        )?),
                        None if optional => {}
                        None => return Err(format!("configmap {:?} not found", c.name)),
                    }
                }
                if let Some(s) = &src.secret {
                    let optional = s.optional.unwrap_or(false);
                    match self.data_of(&ns, "secrets", &s.name).await? {
                        Some(d) => files.extend(render_keys(
                            &d, &s.items, mode, "secret", &s.name, optional,
                        )?),
                        None if optional => {}
                        None => return Err(format!("secret {:?} not found", s.name)),
                    }
                }
                if let Some(d) = &src.downward_api {
                    files.extend(downward_files(
                        pod,
                        d.items.as_deref().unwrap_or_default(),
                        mode,
                    )?);
                }
                if let Some(t) = &src.service_account_token {
                    let key = format!(
                        "{}/{}/{}",
                        pod.metadata.uid.clone().unwrap_or_default(),
                        v.name,
                        t.path
                    );
                    let token = self
                        .token(
                            pod,
                            &key,
                            t.audience.clone(),
                            t.expiration_seconds.unwrap_or(3607),
                        )
                        .await?;
                    files.insert(t.path.clone(), (token.into_bytes(), mode));
                }
            }
            return Ok(Some(("projected", files)));
        }
        Ok(None)
    }

    async fn claim_path(&self, pod: &Pod, claim: &str) -> Result<PathBuf, String> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let pvc = self
            .get_obj(&ns, "persistentvolumeclaims", claim)
            .await?
            .ok_or_else(|| format!("persistentvolumeclaim {claim:?} not found"))?;
        let pv_name = pvc["spec"]["volumeName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if pv_name.is_empty() || pvc["status"]["phase"] != "Bound" {
            return Err(format!("unbound immediate PersistentVolumeClaims: persistentvolumeclaim {claim:?} is not bound"));
        }
        let pv = self
            .client
            .get(&format!("/api/v1/persistentvolumes/{pv_name}"))
            .await
            .map_err(|e| e.to_string())?;
        let path = pv["spec"]["hostPath"]["path"]
            .as_str()
            .or(pv["spec"]["local"]["path"].as_str())
            .ok_or_else(|| format!("persistentvolume {pv_name:?} is neither hostPath nor local"))?
            .to_string();
        let mut p = PathBuf::from(&path);
        // local-path volumes live under this node's storage directory.
        if pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == "k3rs.io/local-path"
        {
            if let Some(name) = Path::new(&path).file_name() {
                if !p.starts_with(&self.local_path_dir) {
                    p = self.local_path_dir.join(name);
                }
            }
        }
        let _ = &self.node_name;
        std::fs::create_dir_all(&p).map_err(|e| format!("creating {}: {e}", p.display()))?;
        Ok(p)
    }

    fn host_path(v: &Volume) -> Result<Option<PathBuf>, String> {
        let Some(h) = &v.host_path else {
            return Ok(None);
        };
        let p = PathBuf::from(&h.path);
        let t = h.type_.clone().unwrap_or_default();
        let md = std::fs::metadata(&p);
        use std::os::unix::fs::FileTypeExt;
        match t.as_str() {
            "DirectoryOrCreate" => {
                if md.is_err() {
                    std::fs::create_dir_all(&p)
                        .map_err(|e| format!("creating {}: {e}", p.display()))?;
                    let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755));
                }
            }
            "Directory" => {
                if !md.as_ref().is_ok_and(|m| m.is_dir()) {
                    return Err(format!(
                        "hostPath type check failed: {} is not a directory",
                        h.path
                    ));
                }
            }
            "FileOrCreate" => {
                if md.is_err() {
                    if let Some(parent) = p.parent() {
                        let _ = std::fs::create_dir_all(parent);
                    }
                    std::fs::write(&p, b"")
                        .map_err(|e| format!("creating {}: {e}", p.display()))?;
                }
            }
            "File" => {
                if !md.as_ref().is_ok_and(|m| m.is_file()) {
                    return Err(format!(
                        "hostPath type check failed: {} is not a file",
                        h.path
                    ));
                }
            }
            "Socket" => {
                if !md.as_ref().is_ok_and(|m| m.file_type().is_socket()) {
                    return Err(format!(
                        "hostPath type check failed: {} is not a socket file",
                        h.path
                    ));
                }
            }
            "CharDevice" => {
                if !md.as_ref().is_ok_and(|m| m.file_type().is_char_device()) {
                    return Err(format!(
                        "hostPath type check failed: {} is not a character device",
                        h.path
                    ));
                }
            }
            "BlockDevice" => {
                if !md.as_ref().is_ok_and(|m| m.file_type().is_block_device()) {
                    return Err(format!(
                        "hostPath type check failed: {} is not a block device",
                        h.path
                    ));
                }
            }
            _ => {
                if md.is_err() {
                    std::fs::create_dir_all(&p)
                        .map_err(|e| format!("creating {}: {e}", p.display()))?;
                }
            }
        }
        Ok(Some(p))
    }

    /// Prepares every volume; returns volume name → host path.
    pub async fn setup(&self, pod: &Pod) -> Result<BTreeMap<String, PathBuf>, VolumeError> {
        let mut out = BTreeMap::new();
        for v in pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default()
        {
            if let Some(e) = &v.empty_dir {
                let d = self.dir(pod, "emptyDir", &v.name);
                std::fs::create_dir_all(&d).map_err(|e| setup_err(&v.name, e.to_string()))?;
                let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777));
                if e.medium.as_deref() == Some("Memory") && !is_mounted(&d) {
                    let size = e
                        .size_limit
                        .as_ref()
                        .and_then(|q| crate::controllers::quantity::parse_bytes(&q.0))
                        .map(|b| format!(",size={b}"))
                        .unwrap_or_default();
                    let opts =
                        std::ffi::CString::new(format!("mode=1777{size}")).unwrap_or_default();
                    let target = std::ffi::CString::new(d.as_os_str().as_encoded_bytes())
                        .unwrap_or_default();
                    // SAFETY: mounting a tmpfs on the pod's own emptyDir directory.
                    let rc = unsafe {
                        libc::mount(
                            c"tmpfs".as_ptr(),
                            target.as_ptr(),
                            c"tmpfs".as_ptr(),
                            libc::MS_NOSUID | libc::MS_NODEV,
                            opts.as_ptr().cast(),
                        )
                    };
                    if rc != 0 {
                        return Err(setup_err(
                            &v.name,
                            format!("mounting tmpfs: {}", std::io::Error::last_os_error()),
                        ));
                    }
                }
                out.insert(v.name.clone(), d);
                continue;
            }
            match Self::host_path(&v) {
                Ok(Some(p)) => {
                    out.insert(v.name.clone(), p);
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(setup_err(&v.name, e)),
            }
            if let Some(c) = &v.persistent_volume_claim {
                let p = self
                    .claim_path(pod, &c.claim_name)
                    .await
                    .map_err(|e| setup_err(&v.name, e))?;
                out.insert(v.name.clone(), p);
                continue;
            }
            match self.render(pod, &v).await {
                Ok(Some((kind, files))) => {
                    let d = self.dir(pod, kind, &v.name);
                    atomic_write(&d, &files).map_err(|e| setup_err(&v.name, e.to_string()))?;
                    out.insert(v.name.clone(), d);
                }
                Ok(None) => {
                    return Err(setup_err(
                        &v.name,
                        "this volume type is not supported by k3rs yet",
                    ));
                }
                Err(e) => return Err(setup_err(&v.name, e)),
            }
        }
        Ok(out)
    }

    /// Re-writes configMap/secret/downwardAPI/projected volumes whose content changed.
    pub async fn refresh(&self, pod: &Pod) -> Result<(), VolumeError> {
        for v in pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default()
        {
            match self.render(pod, &v).await {
                Ok(Some((kind, files))) => {
                    let d = self.dir(pod, kind, &v.name);
                    atomic_write(&d, &files).map_err(|e| setup_err(&v.name, e.to_string()))?;
                }
                Ok(None) => {}
                Err(e) => return Err(setup_err(&v.name, e)),
            }
        }
        Ok(())
    }

    /// Unmounts tmpfs volumes and removes the pod's volume directories. Idempotent.
    pub async fn teardown(&self, pod_uid: &str) -> Result<(), VolumeError> {
        let base = self.pods_dir.join(pod_uid).join("volumes");
        let ed = base.join(plugin_dir("emptyDir"));
        if let Ok(rd) = std::fs::read_dir(&ed) {
            for e in rd.flatten() {
                if is_mounted(&e.path()) {
                    umount(&e.path());
                }
            }
        }
        self.tokens
            .lock()
            .retain(|k, _| !k.starts_with(&format!("{pod_uid}/")));
        match std::fs::remove_dir_all(&base) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VolumeError::Io(base.display().to_string(), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            std::fs::metadata(dir.join("sub/b"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert!(
            !atomic_write(&dir, &files).unwrap(),
            "unchanged content is not rewritten"
        );
        files.insert("a".into(), (b"3".to_vec(), 0o644));
        files.remove("sub/b");
        assert!(atomic_write(&dir, &files).unwrap());
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "3");
        assert!(!dir.join("sub").exists());
        let versions = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.starts_with("..") && n != "..data"
            })
            .count();
        assert_eq!(versions, 1, "old versions are removed");
    }

    #[test]
    fn items_select_keys_and_modes() {
        let mut data = BTreeMap::new();
        data.insert("k1".to_string(), b"v1".to_vec());
        data.insert("k2".to_string(), b"v2".to_vec());
        let items: Option<Vec<KeyToPath>> = Some(vec![KeyToPath {
            key: "k2".into(),
            path: "dir/two".into(),
            mode: Some(0o400),
        }]);
        let f = render_keys(&data, &items, 0o644, "configmap", "c", false).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f["dir/two"], (b"v2".to_vec(), 0o400));
        let bad: Option<Vec<KeyToPath>> = Some(vec![KeyToPath {
            key: "k2".into(),
            path: "../x".into(),
            mode: None,
        }]);
        assert!(render_keys(&data, &bad, 0o644, "configmap", "c", false).is_err());
        let missing: Option<Vec<KeyToPath>> = Some(vec![KeyToPath {
            key: "nope".into(),
            path: "x".into(),
            mode: None,
        }]);
        assert!(render_keys(&data, &missing, 0o644, "configmap", "c", false).is_err());
        assert!(render_keys(&data, &missing, 0o644, "configmap", "c", true)
            .unwrap()
            .is_empty());
        assert!(VolumeManager::sub_path(Path::new("/tmp"), "../etc").is_err());
    }
}
