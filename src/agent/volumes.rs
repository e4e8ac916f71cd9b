//! Pod volumes on the node: emptyDir (disk, or tmpfs for medium Memory), hostPath with its
//! type checks, configMap / secret / downwardAPI / projected (service account tokens refreshed
//! before they expire) written atomically through a `..data` symlink swap as upstream's
//! atomic writer does, and persistentVolumeClaims (generic ephemeral ones included) bound to
//! hostPath/local volumes.
//!
//! Layout: `<pods_dir>/<uid>/volumes/<plugin>/<name>` with upstream's plugin directory names
//! (`kubernetes.io~empty-dir`, `kubernetes.io~configmap`, …); hostPath and persistent volumes
//! are used where they are. `fsGroup` is ignored (files are owned by root, modes as asked).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{DownwardAPIVolumeFile, KeyToPath, Pod, Volume};
use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::rest::{status_code, RestClient};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// As upstream's FailedMount events read.
    #[error("MountVolume.SetUp failed for volume {volume:?} : {message}")]
    SetUp { volume: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} is still mounted; not removing the pod's volumes")]
    Busy(String),
}

fn setup_err(volume: &str, message: impl Into<String>) -> VolumeError {
    VolumeError::SetUp {
        volume: volume.to_string(),
        message: message.into(),
    }
}

fn io_err(p: &Path) -> impl FnOnce(std::io::Error) -> VolumeError + '_ {
    move |e| VolumeError::Io(p.display().to_string(), e)
}

/// Files of a volume: relative path → (content, mode).
pub type Files = BTreeMap<String, (Vec<u8>, u32)>;

/// A service account token and when to ask for a new one.
struct Token {
    token: String,
    refresh_at: Instant,
}

pub struct VolumeManager {
    client: RestClient,
    pods_dir: PathBuf,
    local_path_dir: PathBuf,
    node_name: String,
    /// Keyed `<pod uid>/<volume>/<path>`.
    tokens: Mutex<HashMap<String, Token>>,
    /// The node's allocatable resources (resourceFieldRef limits default to them), briefly cached.
    allocatable: Mutex<Option<(Instant, BTreeMap<String, String>)>>,
}

/// Upstream's plugin directory for a kind of volume.
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

/// Decodes the octal escapes (`\040`) of a /proc/self/mountinfo path.
fn unescape_mount_path(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') << 6 | (b[i + 2] - b'0') << 3 | (b[i + 3] - b'0'));
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// Mount points at or under `base`, deepest first.
fn mounts_under(base: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(unescape_mount_path))
        .filter(|p| p.starts_with(base))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn is_mounted(p: &Path) -> bool {
    mounts_under(p).iter().any(|m| m == p)
}

fn umount(p: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid C string; unmounts a mount under the pod's own volume directory.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Mounts a tmpfs (mode 0777, `size` bytes when given) on `dir`.
fn mount_tmpfs(dir: &Path, mode: u32, size: Option<u64>) -> std::io::Result<()> {
    let opts = match size {
        Some(b) => format!("mode={mode:04o},size={b}"),
        None => format!("mode={mode:04o}"),
    };
    let opts = std::ffi::CString::new(opts)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: valid C strings; mounts a tmpfs on the pod's own emptyDir directory.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            opts.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Creates the directory of a configMap/secret/downwardAPI/projected volume. Secrets and
/// projected volumes (service account tokens) live on a tmpfs, as upstream, so they never
/// reach the disk.
fn prepare_payload_dir(dir: &Path, kind: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    if matches!(kind, "secret" | "projected") && !is_mounted(dir) {
        mount_tmpfs(dir, 0o755, None).map_err(|e| format!("mount tmpfs: {e}"))?;
    }
    Ok(())
}

/// Where the reclaim policy of each local-path directory mounted on this node is remembered
/// (`<storage>/.k3rs-reclaim/<dir name>`), so its data can be removed once its volume object
/// is deleted (policy `Delete`) and kept otherwise.
const RECLAIM_DIR: &str = ".k3rs-reclaim";

fn remember_reclaim_policy(storage: &Path, name: &str, policy: &str) -> std::io::Result<()> {
    let dir = storage.join(RECLAIM_DIR);
    let marker = dir.join(name);
    if std::fs::read_to_string(&marker).is_ok_and(|p| p == policy) {
        return Ok(());
    }
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, policy)?;
    std::fs::rename(&tmp, &marker)
}

/// Removes the local-path directories of `storage` whose volume objects are gone (`live`
/// holds the directory names of the local-path volumes that exist) and whose reclaim policy
/// was `Delete`; a `Retain` directory is kept and forgotten. Only directories this node
/// mounted (that have a marker) are considered. Returns the directories removed.
pub fn prune_local_path_dirs(
    storage: &Path,
    live: &std::collections::HashSet<String>,
) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let markers = storage.join(RECLAIM_DIR);
    for e in std::fs::read_dir(&markers).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || !safe_rel(&name) || live.contains(&name) {
            continue;
        }
        let policy = std::fs::read_to_string(e.path()).unwrap_or_default();
        let data = storage.join(&name);
        if policy.trim() == "Delete" && std::fs::symlink_metadata(&data).is_ok() {
            if !mounts_under(&data).is_empty() {
                tracing::warn!(dir = %data.display(), "a deleted volume's directory is still mounted; kept");
                continue;
            }
            match std::fs::remove_dir_all(&data) {
                Ok(()) => removed.push(data),
                Err(err) => {
                    tracing::warn!(dir = %data.display(), error = %err, "removing a deleted volume's data");
                    continue;
                }
            }
        }
        let _ = std::fs::remove_file(e.path());
    }
    removed
}

/// Counts the regular files under `p`.
fn count_files(p: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => n += count_files(&e.path()),
            Ok(_) => n += 1,
            Err(_) => {}
        }
    }
    n
}

/// Whether `data` holds exactly `files` with their modes.
fn same_files(data: &Path, files: &Files) -> bool {
    files.iter().all(|(rel, (content, mode))| {
        let p = data.join(rel);
        std::fs::read(&p).is_ok_and(|c| &c == content)
            && std::fs::symlink_metadata(&p).is_ok_and(|m| m.permissions().mode() & 0o7777 == *mode)
    }) && count_files(data) == files.len()
}

/// Writes `files` into `dir` atomically, as upstream's atomic writer: a fresh `..<timestamp>`
/// directory, a `..data_tmp` symlink to it renamed over `..data`, user-visible symlinks
/// `name -> ..data/name` for the top-level entries, then stale entries and old versions are
/// removed. Returns whether anything changed (nothing is written when the content and modes
/// are the same).
pub fn atomic_write(dir: &Path, files: &Files) -> std::io::Result<bool> {
    if let Some(bad) = files.keys().find(|k| !safe_rel(k)) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid path {bad:?}"),
        ));
    }
    std::fs::create_dir_all(dir)?;
    let data = dir.join("..data");
    let tops: BTreeSet<String> = files
        .keys()
        .map(|k| k.split('/').next().unwrap_or(k).to_string())
        .collect();
    let links_ok = tops
        .iter()
        .all(|t| std::fs::read_link(dir.join(t)).is_ok_and(|l| l == Path::new("..data").join(t)));
    if std::fs::metadata(&data).is_ok() && links_ok && same_files(&data, files) {
        return Ok(false);
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
    std::fs::set_permissions(&new_dir, std::fs::Permissions::from_mode(0o755))?;
    for (rel, (content, mode)) in files {
        let p = new_dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, content)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))?;
    }
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&ts, &tmp_link)?;
    std::fs::rename(&tmp_link, &data)?;
    for t in &tops {
        let link = dir.join(t);
        let want = Path::new("..data").join(t);
        if std::fs::read_link(&link).is_ok_and(|l| l == want) {
            continue;
        }
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&want, &link)?;
    }
    // Entries no longer in the payload, and older versions (a crash may have left several).
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name == "..data" || name == ts {
            continue;
        }
        if name.starts_with("..") {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_dir_all(e.path());
            } else {
                let _ = std::fs::remove_file(e.path());
            }
        } else if !tops.contains(&name) {
            let _ = std::fs::remove_file(e.path());
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

/// A relative path of normal components not starting with `..` (the writer's own names).
fn safe_rel(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && path.components().all(|c| matches!(c, Component::Normal(_)))
        && !p.starts_with("..")
}

/// Files from a configMap's or secret's data (`kind` is "configmap" or "secret"), with items
/// and modes. A key missing from the data is an error unless the source is optional.
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
                if safe_rel(k) && !k.contains('/') {
                    out.insert(k.clone(), (v.clone(), default_mode));
                }
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

/// A map as upstream's downward API prints it: sorted `key="value"` lines.
fn format_map(map: &Option<BTreeMap<String, String>>) -> String {
    map.iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn field_value(pod: &Pod, path: &str) -> Result<String, String> {
    let m = &pod.metadata;
    let index = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|m| m.get(key))
            .cloned()
            .unwrap_or_default()
    };
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "metadata.labels" => format_map(&m.labels),
        "metadata.annotations" => format_map(&m.annotations),
        p if p.starts_with("metadata.labels['") && p.ends_with("']") => {
            index(&m.labels, &p["metadata.labels['".len()..p.len() - 2])
        }
        p if p.starts_with("metadata.annotations['") && p.ends_with("']") => index(
            &m.annotations,
            &p["metadata.annotations['".len()..p.len() - 2],
        ),
        other => return Err(format!("unsupported fieldPath: {other}")),
    })
}

/// A resourceFieldRef value: the container's limit or request divided by the divisor, rounded
/// up; limits not set default to the node's allocatable, as upstream.
fn resource_value(
    pod: &Pod,
    r: &k8s_openapi::api::core::v1::ResourceFieldSelector,
    allocatable: &BTreeMap<String, String>,
) -> Result<String, String> {
    use crate::controllers::quantity::parse_milli;
    let name = r.container_name.clone().unwrap_or_default();
    let c = pod
        .spec
        .as_ref()
        .and_then(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .find(|c| c.name == name)
        })
        .ok_or_else(|| format!("container {name} not found"))?;
    let (which, res) = r
        .resource
        .split_once('.')
        .ok_or_else(|| format!("unsupported container resource : {}", r.resource))?;
    let resources = c.resources.clone().unwrap_or_default();
    let set = match which {
        "limits" => resources.limits,
        "requests" => resources.requests,
        _ => return Err(format!("unsupported container resource : {}", r.resource)),
    };
    let q = set
        .and_then(|m| m.get(res).map(|q| q.0.clone()))
        .or_else(|| {
            (which == "limits")
                .then(|| allocatable.get(res).cloned())
                .flatten()
        });
    let value = q.as_deref().and_then(parse_milli).unwrap_or(0);
    let divisor = r
        .divisor
        .as_ref()
        .and_then(|d| parse_milli(&d.0))
        .filter(|d| *d > 0)
        .unwrap_or(1000);
    Ok(((value + divisor - 1).div_euclid(divisor))
        .max(0)
        .to_string())
}

/// The files of a downwardAPI volume (or projection).
pub fn downward_files(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: u32,
    allocatable: &BTreeMap<String, String>,
) -> Result<Files, String> {
    let mut out = Files::new();
    for it in items {
        if !safe_rel(&it.path) {
            return Err(format!("invalid path {:?}", it.path));
        }
        let value = if let Some(f) = &it.field_ref {
            field_value(pod, &f.field_path)?
        } else if let Some(r) = &it.resource_field_ref {
            resource_value(pod, r, allocatable)?
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

/// Checks (and for the *OrCreate types creates) a hostPath as upstream's hostPath plugin:
/// `""` checks nothing (the directory is created, as containerd does for a missing bind
/// source).
pub fn check_host_path(path: &Path, type_: &str) -> Result<(), String> {
    let p = path.display();
    let kind_of = |m: &std::fs::Metadata| {
        let t = m.file_type();
        if t.is_dir() {
            Ok("Directory")
        } else if t.is_file() {
            Ok("File")
        } else if t.is_socket() {
            Ok("Socket")
        } else if t.is_char_device() {
            Ok("CharDevice")
        } else if t.is_block_device() {
            Ok("BlockDevice")
        } else {
            Err("only recognise file, directory, socket, block device and character device")
        }
    };
    let expect = |want: &str, what: &str| -> Result<(), String> {
        let md = std::fs::metadata(path).map_err(|_| format!("hostPath {p} doesn't exist"))?;
        match kind_of(&md) {
            Ok(k) if k == want => Ok(()),
            Ok(k) => Err(format!(
                "hostPath type check failed: {p} is not a {what}, it's a {k}"
            )),
            Err(e) => Err(format!(
                "hostPath type check failed, {p} is not a {what}, unable to determine its type: {e}"
            )),
        }
    };
    let exists = std::fs::metadata(path).is_ok();
    match type_ {
        "" => {
            if !exists {
                std::fs::create_dir_all(path).map_err(|e| format!("mkdir {p}: {e}"))?;
            }
            Ok(())
        }
        "DirectoryOrCreate" => {
            if !exists {
                std::fs::create_dir_all(path).map_err(|e| format!("mkdir {p}: {e}"))?;
                let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755));
            }
            expect("Directory", "directory")
        }
        "Directory" => expect("Directory", "directory"),
        "FileOrCreate" => {
            if !exists {
                // Like upstream, the parent directory must exist.
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(path)
                    .map_err(|e| format!("open {p}: {e}"))?;
                let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644));
            }
            expect("File", "file")
        }
        "File" => expect("File", "file"),
        "Socket" => expect("Socket", "socket file"),
        "CharDevice" => expect("CharDevice", "character device"),
        "BlockDevice" => expect("BlockDevice", "block device"),
        other => Err(format!("{other} is an invalid volume type")),
    }
}

/// Resolves a volumeMount's subPath inside `base`, creating missing directories (with the
/// volume directory's mode) one level at a time and refusing any component — a symlink
/// included — that leads outside the volume. Nothing is created outside it.
fn resolve_sub_path(base: &Path, sub: &str) -> Result<PathBuf, VolumeError> {
    let sp = Path::new(sub);
    if sp.is_absolute() {
        return Err(VolumeError::Invalid(format!(
            "subPath {sub:?} must be a relative path"
        )));
    }
    if sub.is_empty()
        || !sp
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(VolumeError::Invalid(format!(
            "subPath {sub:?} must not contain '..'"
        )));
    }
    let root = std::fs::canonicalize(base).map_err(io_err(base))?;
    let mode = std::fs::metadata(&root)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o755);
    let mut cur = root.clone();
    for c in Path::new(sub).components() {
        let next = cur.join(c);
        match std::fs::symlink_metadata(&next) {
            Ok(_) => {
                let real = std::fs::canonicalize(&next).map_err(io_err(&next))?;
                if !real.starts_with(&root) {
                    return Err(VolumeError::Invalid(format!(
                        "subpath {:?} not within volume path {:?}",
                        real.display().to_string(),
                        root.display().to_string()
                    )));
                }
                cur = real;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // `cur` is canonical and inside the volume: creating one level is safe.
                match std::fs::create_dir(&next) {
                    Ok(()) => {
                        let _ =
                            std::fs::set_permissions(&next, std::fs::Permissions::from_mode(mode));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(VolumeError::Io(next.display().to_string(), e)),
                }
                let real = std::fs::canonicalize(&next).map_err(io_err(&next))?;
                if !real.starts_with(&root) {
                    return Err(VolumeError::Invalid(format!(
                        "subpath {:?} not within volume path {:?}",
                        real.display().to_string(),
                        root.display().to_string()
                    )));
                }
                cur = real;
            }
            Err(e) => return Err(VolumeError::Io(next.display().to_string(), e)),
        }
    }
    Ok(cur)
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
            allocatable: Mutex::new(None),
        }
    }

    fn dir(&self, pod: &Pod, kind: &str, name: &str) -> PathBuf {
        self.pods_dir
            .join(pod.metadata.uid.clone().unwrap_or_default())
            .join("volumes")
            .join(plugin_dir(kind))
            .join(name)
    }

    /// Resolves `volumeMounts[].subPath` inside the volume directory `base` (see
    /// [`resolve_sub_path`]): missing directories are created, escapes refused.
    pub fn sub_path(base: &Path, sub: &str) -> Result<PathBuf, VolumeError> {
        resolve_sub_path(base, sub)
    }

    async fn get_obj(&self, path: &str) -> Result<Option<Value>, String> {
        match self.client.get(path).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if status_code(&e) == Some(404) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A configMap's or secret's data, decoded; None when it does not exist.
    async fn data_of(
        &self,
        ns: &str,
        kind: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
        let Some(obj) = self
            .get_obj(&format!("/api/v1/namespaces/{ns}/{kind}/{name}"))
            .await?
        else {
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

    /// The node's allocatable resources (cached for a minute); empty when unknown.
    async fn node_allocatable(&self) -> BTreeMap<String, String> {
        if let Some((at, m)) = self.allocatable.lock().as_ref() {
            if at.elapsed() < Duration::from_secs(60) {
                return m.clone();
            }
        }
        let m: BTreeMap<String, String> = match self
            .client
            .get(&format!("/api/v1/nodes/{}", self.node_name))
            .await
        {
            Ok(node) => node["status"]["allocatable"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "reading the node's allocatable resources");
                BTreeMap::new()
            }
        };
        *self.allocatable.lock() = Some((Instant::now(), m.clone()));
        m
    }

    /// A token from the TokenRequest API, bound to the pod, reused until 80 % of its lifetime
    /// (at most 24 h) has passed, as upstream's token manager.
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
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let expiration = expiration.max(600);
        let mut spec = json!({
            "expirationSeconds": expiration,
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
            .filter(|t| !t.is_empty())
            .ok_or_else(|| "failed to fetch token: the answer has no token".to_string())?
            .to_string();
        // The server may grant another lifetime than asked (it may extend it).
        let ttl = resp["status"]["expirationTimestamp"]
            .as_str()
            .and_then(|s| s.parse::<jiff::Timestamp>().ok())
            .map(|exp| exp.as_second() - jiff::Timestamp::now().as_second())
            .filter(|s| *s > 0)
            .unwrap_or(expiration) as u64;
        let refresh = Duration::from_secs(ttl * 8 / 10).min(Duration::from_secs(24 * 3600));
        self.tokens.lock().insert(
            key.to_string(),
            Token {
                token: token.clone(),
                refresh_at: Instant::now() + refresh,
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
        let needs_node = |items: &Option<Vec<DownwardAPIVolumeFile>>| {
            items
                .iter()
                .flatten()
                .any(|i| i.resource_field_ref.is_some())
        };
        if let Some(d) = &v.downward_api {
            let mode = d.default_mode.unwrap_or(0o644) as u32;
            let alloc = if needs_node(&d.items) {
                self.node_allocatable().await
            } else {
                BTreeMap::new()
            };
            return Ok(Some((
                "downwardAPI",
                downward_files(pod, d.items.as_deref().unwrap_or_default(), mode, &alloc)?,
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
                    let alloc = if needs_node(&d.items) {
                        self.node_allocatable().await
                    } else {
                        BTreeMap::new()
                    };
                    files.extend(downward_files(
                        pod,
                        d.items.as_deref().unwrap_or_default(),
                        mode,
                        &alloc,
                    )?);
                }
                if let Some(t) = &src.service_account_token {
                    if !safe_rel(&t.path) {
                        return Err(format!("invalid path {:?}", t.path));
                    }
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
                            t.expiration_seconds.unwrap_or(3600),
                        )
                        .await?;
                    files.insert(t.path.clone(), (token.into_bytes(), mode));
                }
            }
            return Ok(Some(("projected", files)));
        }
        Ok(None)
    }

    /// The host directory of a claim: its bound volume's hostPath or local path (a
    /// `k3rs.io/local-path` volume lives in this node's storage directory and is created).
    /// Messages as upstream's kubelet.
    async fn claim_path(&self, pod: &Pod, claim: &str, ephemeral: bool) -> Result<PathBuf, String> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let pvc = self
            .get_obj(&format!(
                "/api/v1/namespaces/{ns}/persistentvolumeclaims/{claim}"
            ))
            .await
            .map_err(|e| format!("error processing PVC {ns}/{claim}: {e}"))?
            .ok_or_else(|| {
                format!(
                    "error processing PVC {ns}/{claim}: persistentvolumeclaim {claim:?} not found"
                )
            })?;
        if ephemeral {
            let owned = pvc["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|o| {
                    o["controller"] == true && o["uid"].as_str() == pod.metadata.uid.as_deref()
                });
            if !owned {
                return Err(format!(
                    "error processing PVC {ns}/{claim}: PVC was not created for pod {ns}/{} (pod is not owner)",
                    pod.metadata.name.as_deref().unwrap_or_default()
                ));
            }
        }
        if !pvc["metadata"]["deletionTimestamp"].is_null() {
            return Err(format!(
                "can't start pod because PVC {ns}/{claim} is being deleted"
            ));
        }
        let phase = pvc["status"]["phase"].as_str().unwrap_or_default();
        let pv_name = pvc["spec"]["volumeName"].as_str().unwrap_or_default();
        if phase != "Bound" || pv_name.is_empty() {
            return Err(format!(
                "PVC {ns}/{claim} has non-bound phase ({phase:?}) or empty pvc.Spec.VolumeName ({pv_name:?})"
            ));
        }
        let pv = self
            .get_obj(&format!("/api/v1/persistentvolumes/{pv_name}"))
            .await
            .map_err(|e| format!("failed to fetch PV {pv_name:?} from API server: {e}"))?
            .ok_or_else(|| {
                format!("failed to fetch PV {pv_name:?} from API server: persistentvolume {pv_name:?} not found")
            })?;
        let claim_ref = &pv["spec"]["claimRef"];
        if claim_ref.is_null() {
            return Err(format!(
                "found PV object {pv_name:?} but it has a nil ClaimRef"
            ));
        }
        let (ref_uid, claim_uid) = (
            claim_ref["uid"].as_str().unwrap_or_default(),
            pvc["metadata"]["uid"].as_str().unwrap_or_default(),
        );
        if ref_uid != claim_uid {
            return Err(format!(
                "found PV object {pv_name:?} but its ClaimRef.UID ({ref_uid:?}) does not point to claim.UID ({claim_uid:?})"
            ));
        }
        if pv["spec"]["volumeMode"] == "Block" {
            return Err(format!(
                "persistentvolume {pv_name:?} is a Block volume; k3rs mounts Filesystem volumes only"
            ));
        }
        if let Some(path) = pv["spec"]["hostPath"]["path"].as_str() {
            if pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"]
                == "k3rs.io/local-path"
            {
                let name = Path::new(path)
                    .file_name()
                    .ok_or_else(|| format!("persistentvolume {pv_name:?} has path {path:?}"))?;
                let p = self.local_path_dir.join(name);
                let policy = pv["spec"]["persistentVolumeReclaimPolicy"]
                    .as_str()
                    .unwrap_or("Delete");
                remember_reclaim_policy(&self.local_path_dir, &name.to_string_lossy(), policy)
                    .map_err(|e| format!("recording the reclaim policy of {pv_name:?}: {e}"))?;
                if std::fs::metadata(&p).is_err() {
                    std::fs::create_dir_all(&p)
                        .map_err(|e| format!("mkdir {}: {e}", p.display()))?;
                    // As local-path-provisioner: world-writable.
                    let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777));
                }
                return Ok(p);
            }
            let type_ = pv["spec"]["hostPath"]["type"].as_str().unwrap_or_default();
            check_host_path(Path::new(path), type_)?;
            return Ok(PathBuf::from(path));
        }
        if let Some(path) = pv["spec"]["local"]["path"].as_str() {
            if std::fs::metadata(path).is_err() {
                return Err(format!("path {path:?} does not exist"));
            }
            return Ok(PathBuf::from(path));
        }
        Err(format!(
            "persistentvolume {pv_name:?} is neither hostPath nor local; k3rs cannot mount it"
        ))
    }

    /// Sets up one volume; returns its host path.
    async fn setup_one(&self, pod: &Pod, v: &Volume) -> Result<PathBuf, String> {
        if let Some(e) = &v.empty_dir {
            let d = self.dir(pod, "emptyDir", &v.name);
            std::fs::create_dir_all(&d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
            match e.medium.as_deref().unwrap_or_default() {
                "" => {}
                "Memory" => {
                    if !is_mounted(&d) {
                        let size = e
                            .size_limit
                            .as_ref()
                            .and_then(|q| crate::controllers::quantity::parse_bytes(&q.0))
                            .filter(|b| *b > 0);
                        mount_tmpfs(&d, 0o777, size).map_err(|e| format!("mount tmpfs: {e}"))?;
                    }
                }
                other => {
                    return Err(format!(
                        "emptyDir medium {other:?} is not supported by k3rs"
                    ))
                }
            }
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777))
                .map_err(|e| format!("chmod {}: {e}", d.display()))?;
            return Ok(d);
        }
        if let Some(h) = &v.host_path {
            let p = PathBuf::from(&h.path);
            check_host_path(&p, h.type_.as_deref().unwrap_or_default())?;
            return Ok(p);
        }
        if let Some(c) = &v.persistent_volume_claim {
            return self.claim_path(pod, &c.claim_name, false).await;
        }
        if v.ephemeral.is_some() {
            let claim = format!(
                "{}-{}",
                pod.metadata.name.as_deref().unwrap_or_default(),
                v.name
            );
            return self.claim_path(pod, &claim, true).await;
        }
        match self.render(pod, v).await? {
            Some((kind, files)) => {
                let d = self.dir(pod, kind, &v.name);
                prepare_payload_dir(&d, kind)?;
                atomic_write(&d, &files).map_err(|e| format!("writing {}: {e}", d.display()))?;
                Ok(d)
            }
            None => Err("this volume type is not supported by k3rs".into()),
        }
    }

    /// Prepares every volume of the pod; returns, per volume name, the host path to
    /// bind-mount. Errors name the volume, as upstream's FailedMount events.
    pub async fn setup(&self, pod: &Pod) -> Result<BTreeMap<String, PathBuf>, VolumeError> {
        let mut out = BTreeMap::new();
        for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let p = self
                .setup_one(pod, v)
                .await
                .map_err(|e| setup_err(&v.name, e))?;
            out.insert(v.name.clone(), p);
        }
        Ok(out)
    }

    /// Re-writes configMap/secret/downwardAPI/projected volumes whose content changed (and
    /// tokens due for refresh). Every volume is tried; the first error is returned. A source
    /// that went missing leaves the last content in place. Volumes not set up (or torn down
    /// already) are left alone.
    pub async fn refresh(&self, pod: &Pod) -> Result<(), VolumeError> {
        let mut first = None;
        for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let r = match self.render(pod, v).await {
                // Not set up (yet, or any more after a teardown): nothing to refresh.
                Ok(Some((kind, _))) if !self.dir(pod, kind, &v.name).is_dir() => Ok(()),
                Ok(Some((kind, files))) => {
                    let d = self.dir(pod, kind, &v.name);
                    atomic_write(&d, &files)
                        .map(|changed| {
                            if changed {
                                tracing::debug!(volume = %v.name, dir = %d.display(), "volume updated");
                            }
                        })
                        .map_err(|e| format!("writing {}: {e}", d.display()))
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                first.get_or_insert(setup_err(&v.name, e));
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Removes the data of local-path volumes mounted on this node whose volume objects were
    /// deleted with reclaim policy `Delete` (the controller deletes the object; the data is
    /// on the node). Nothing is removed when the volumes cannot be listed. Returns the
    /// directories removed. The kubelet calls it now and then (every minute or so).
    #[allow(dead_code)] // for the kubelet's housekeeping loop (wired by the lead)
    pub async fn prune_local_path(&self) -> Result<Vec<PathBuf>, VolumeError> {
        if std::fs::read_dir(self.local_path_dir.join(RECLAIM_DIR)).is_err() {
            return Ok(Vec::new());
        }
        let list = self
            .client
            .get("/api/v1/persistentvolumes")
            .await
            .map_err(|e| VolumeError::Invalid(format!("listing persistent volumes: {e}")))?;
        let items = list["items"].as_array().ok_or_else(|| {
            VolumeError::Invalid("listing persistent volumes: no items in the answer".into())
        })?;
        let live = items
            .iter()
            .filter(|pv| {
                pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"]
                    == "k3rs.io/local-path"
            })
            .filter_map(|pv| pv["spec"]["hostPath"]["path"].as_str())
            .filter_map(|p| Path::new(p).file_name())
            .map(|n| n.to_string_lossy().to_string())
            .collect();
        let storage = self.local_path_dir.clone();
        tokio::task::spawn_blocking(move || prune_local_path_dirs(&storage, &live))
            .await
            .map_err(|e| VolumeError::Invalid(format!("pruning local-path volumes: {e}")))
    }

    /// Unmounts everything mounted under the pod's volume directory (tmpfs emptyDirs) and
    /// removes it; hostPath and persistent volumes live elsewhere and are never touched.
    /// Refuses to remove anything while a mount remains. Idempotent.
    pub async fn teardown(&self, pod_uid: &str) -> Result<(), VolumeError> {
        if pod_uid.is_empty() || !safe_rel(pod_uid) {
            return Err(VolumeError::Invalid(format!("invalid pod uid {pod_uid:?}")));
        }
        let base = self.pods_dir.join(pod_uid).join("volumes");
        self.tokens
            .lock()
            .retain(|k, _| !k.starts_with(&format!("{pod_uid}/")));
        if std::fs::symlink_metadata(&base).is_err() {
            return Ok(());
        }
        for m in mounts_under(&base) {
            if let Err(e) = umount(&m) {
                tracing::warn!(mount = %m.display(), error = %e, "unmounting a pod volume");
            }
        }
        if let Some(m) = mounts_under(&base).first() {
            return Err(VolumeError::Busy(m.display().to_string()));
        }
        match std::fs::remove_dir_all(&base) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(VolumeError::Io(base.display().to_string(), e)),
        }
    }
}

#[cfg(test)]
mod tests;
