//! Pulls through oci-client, trying registries.yaml's mirrors (with rewrites, plain HTTP only
//! for `http://` endpoints) before the registry itself; and pushes an archive (tests, mirrors).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_client::client::{
    Certificate, CertificateEncoding, ClientConfig, ClientProtocol, Config, ImageLayer,
};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::{sha256_hex, ImageError, ImageRecord, LayerBlob, PullAuth, Registries};

const ACCEPTED: &[&str] = &[
    oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE,
    oci_client::manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE,
    oci_client::manifest::IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
    oci_client::manifest::IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
    "application/vnd.oci.image.layer.v1.tar+zstd",
];

fn split(reference: &str) -> (String, String, Option<String>, Option<String>) {
    let (name, digest) = match reference.split_once('@') {
        Some((n, d)) => (n, Some(d.to_string())),
        None => (reference, None),
    };
    let (path, tag) = match name.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, Some(t.to_string())),
        _ => (name, None),
    };
    let (registry, repo) = path.split_once('/').unwrap_or(("docker.io", path));
    (registry.to_string(), repo.to_string(), tag, digest)
}

/// An oci-client for one endpoint: plain HTTP only for that host when asked, TLS roots and
/// verification from registries.yaml's `configs.<host>.tls`.
fn client(host: &str, plain_http: bool, registries: &Registries) -> Result<Client, String> {
    let protocol = if plain_http {
        ClientProtocol::HttpsExcept(vec![host.to_string()])
    } else {
        ClientProtocol::Https
    };
    let mut cfg = ClientConfig {
        protocol,
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(300)),
        ..Default::default()
    };
    if let Some(tls) = registries.configs.get(host).and_then(|c| c.tls.as_ref()) {
        if !tls.ca_file.is_empty() {
            let data = std::fs::read(&tls.ca_file)
                .map_err(|e| format!("reading ca_file {}: {e}", tls.ca_file))?;
            cfg.extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        cfg.accept_invalid_certificates = tls.insecure_skip_verify;
        if !tls.cert_file.is_empty() || !tls.key_file.is_empty() {
            tracing::warn!(
                registry = host,
                "registries.yaml: client certificates (cert_file/key_file) are not supported; connecting without one"
            );
        }
    }
    Client::try_from(cfg).map_err(|e| format!("{host}: client configuration: {e}"))
}

/// The registry's answer in words close to containerd's (what kubelet events show).
fn describe(reference: &str, e: &OciDistributionError) -> String {
    use oci_client::errors::OciErrorCode;
    match e {
        OciDistributionError::UnauthorizedError { url } => format!(
            "failed to resolve reference {reference:?}: unexpected status from GET request to {url}: 401 Unauthorized"
        ),
        OciDistributionError::ImageManifestNotFoundError(_) => {
            format!("failed to resolve reference {reference:?}: {reference}: not found")
        }
        OciDistributionError::RegistryError { envelope, url } => {
            let not_found = envelope.errors.iter().any(|x| {
                matches!(
                    x.code,
                    OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound
                )
            });
            if not_found {
                format!("failed to resolve reference {reference:?}: {reference}: not found")
            } else {
                let msgs: Vec<String> = envelope
                    .errors
                    .iter()
                    .map(|x| {
                        let code = serde_json::to_value(&x.code)
                            .ok()
                            .and_then(|v| v.as_str().map(|s| s.to_lowercase()))
                            .unwrap_or_default();
                        format!("{code}: {}", x.message)
                    })
                    .collect();
                format!("{url}: {}", msgs.join(", "))
            }
        }
        OciDistributionError::ServerError { code, url, message } => {
            format!("unexpected status from GET request to {url}: {code} {message}")
        }
        OciDistributionError::AuthenticationFailure(m) => format!("failed to authorize: {m}"),
        OciDistributionError::RequestError(r) => {
            let mut msg = format!("failed to do request: {r}");
            let mut src = std::error::Error::source(r);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            msg
        }
        other => other.to_string(),
    }
}

fn oci_reference(
    host: &str,
    repo: &str,
    tag: &Option<String>,
    digest: &Option<String>,
) -> Reference {
    let host = if host == "docker.io" {
        "docker.io"
    } else {
        host
    };
    match (tag, digest) {
        (_, Some(d)) => Reference::with_digest(host.to_string(), repo.to_string(), d.clone()),
        (Some(t), None) => Reference::with_tag(host.to_string(), repo.to_string(), t.clone()),
        (None, None) => Reference::with_tag(host.to_string(), repo.to_string(), "latest".into()),
    }
}

/// Blob files fetched into the caller's temporary directory: (digest, path).
pub type Fetched = Vec<(String, PathBuf)>;

/// Why one endpoint did not give the image: the registry's answer (try the next endpoint) or
/// content that cannot be right (stop).
enum FetchError {
    Registry(OciDistributionError),
    Content(ImageError),
}

/// Layers downloaded at the same time.
const CONCURRENT_DOWNLOADS: usize = 3;

fn sha256_hex_of(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// One endpoint: manifest and config, then every layer the store lacks (`have`), streamed into
/// files under `tmp` with their digests verified on the way (oci-client's `pull_blob`).
async fn fetch(
    c: &Client,
    r: &Reference,
    ra: &RegistryAuth,
    reference: &str,
    tmp: &Path,
    have: &(dyn Fn(&str) -> bool + Sync),
) -> Result<(ImageRecord, Fetched), FetchError> {
    let content = |message: String| {
        FetchError::Content(ImageError::Pull {
            reference: reference.to_string(),
            message,
        })
    };
    let (manifest, manifest_digest, config) = c
        .pull_manifest_and_config(r, ra)
        .await
        .map_err(FetchError::Registry)?;
    let config = config.into_bytes();
    let config_digest = format!("sha256:{}", sha256_hex(&config));
    if manifest.config.digest != config_digest {
        return Err(content(format!(
            "config {} arrived with content {config_digest}",
            manifest.config.digest
        )));
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&config).map_err(|e| content(format!("bad image config: {e}")))?;
    let mut files = Vec::new();
    if !have(&config_digest) {
        let p = tmp.join(&config_digest[7..]);
        std::fs::write(&p, &config)
            .map_err(|e| FetchError::Content(ImageError::Io(p.display().to_string(), e)))?;
        files.push((config_digest.clone(), p));
    }
    let mut blobs = Vec::new();
    for l in &manifest.layers {
        if !ACCEPTED.contains(&l.media_type.as_str()) {
            return Err(content(format!(
                "layer {} has the unsupported media type {}",
                l.digest, l.media_type
            )));
        }
        if sha256_hex_of(&l.digest).is_none() {
            return Err(content(format!("unsupported layer digest {:?}", l.digest)));
        }
        blobs.push(LayerBlob {
            digest: l.digest.clone(),
            media_type: l.media_type.clone(),
            size: u64::try_from(l.size).unwrap_or(0),
        });
    }
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_DOWNLOADS));
    let mut downloads = tokio::task::JoinSet::new();
    let mut wanted = std::collections::HashSet::new();
    for l in &manifest.layers {
        if have(&l.digest) || !wanted.insert(l.digest.clone()) {
            continue;
        }
        let path = tmp.join(sha256_hex_of(&l.digest).unwrap_or_default());
        let (c, r, l, sem) = (c.clone(), r.clone(), l.clone(), sem.clone());
        downloads.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let f = tokio::fs::File::create(&path).await?;
            let mut w = tokio::io::BufWriter::new(f);
            c.pull_blob(&r, &l, &mut w).await?;
            Ok::<_, OciDistributionError>((l.digest, path))
        });
    }
    while let Some(done) = downloads.join_next().await {
        match done {
            Ok(Ok(file)) => files.push(file),
            Ok(Err(e)) => return Err(FetchError::Registry(e)),
            Err(e) => return Err(content(format!("download task: {e}"))),
        }
    }
    let (config, diff_ids) = super::archive::image_config(&cfg);
    if diff_ids.len() != blobs.len() {
        return Err(content(format!(
            "{} layers but {} diff ids",
            blobs.len(),
            diff_ids.len()
        )));
    }
    let rec = ImageRecord {
        id: config_digest,
        names: vec![reference.split('@').next().unwrap_or(reference).to_string()],
        repo_digests: vec![format!(
            "{}@{manifest_digest}",
            super::repository_of(reference)
        )],
        size: blobs.iter().map(|l| l.size).sum(),
        config,
        layers: diff_ids,
        blobs,
        manifest_digest,
        last_used: 0,
        imported: false,
    };
    Ok((rec, files))
}

/// Pulls `reference` (normalized), trying registries.yaml's endpoints in order; returns the
/// record and the blob files fetched into `tmp` (blobs the store already has, per `have`, are
/// not downloaded).
pub async fn pull(
    reference: &str,
    auth: &PullAuth,
    registries: &Registries,
    tmp: &Path,
    have: &(dyn Fn(&str) -> bool + Sync),
) -> Result<(ImageRecord, Fetched), ImageError> {
    let (registry, repo, tag, digest) = split(reference);
    let mut errors = Vec::new();
    for ep in registries.endpoints(&registry, &repo) {
        let creds = auth
            .for_host(&registry)
            .or_else(|| auth.for_host(&ep.host))
            .or_else(|| registries.auth(&ep.host))
            .or_else(|| registries.auth(&registry));
        let ra = match creds {
            Some((u, p)) => RegistryAuth::Basic(u, p),
            None => RegistryAuth::Anonymous,
        };
        let c = match client(&ep.host, ep.plain_http, registries) {
            Ok(c) => c,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let r = oci_reference(&ep.host, &ep.repository, &tag, &digest);
        match fetch(&c, &r, &ra, reference, tmp, have).await {
            Ok(found) => return Ok(found),
            Err(FetchError::Content(e)) => return Err(e),
            Err(FetchError::Registry(e)) => {
                let msg = describe(reference, &e);
                tracing::debug!(endpoint = %ep.host, "pull of {reference} failed: {msg}");
                errors.push(msg);
                // Whatever this endpoint left half-fetched is not kept.
                if let Ok(rd) = std::fs::read_dir(tmp) {
                    for e in rd.flatten() {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
    }
    Err(ImageError::Pull {
        reference: reference.to_string(),
        message: errors.join("; "),
    })
}

/// Pushes the first image of an archive to `reference`.
pub async fn push_archive(
    archive: &Path,
    reference: &str,
    creds: Option<(String, String)>,
    plain_http: bool,
) -> Result<(), ImageError> {
    let reference = super::normalize_reference(reference)?;
    let tmp = tempfile::tempdir().map_err(|e| ImageError::Io("tempdir".into(), e))?;
    let found = super::archive::read_archive(archive, tmp.path())?;
    let (rec, files) = found
        .into_iter()
        .next()
        .ok_or_else(|| ImageError::Invalid("the archive holds no image".into()))?;
    let read = |d: &str| -> Result<Vec<u8>, ImageError> {
        let p = files
            .iter()
            .find(|(x, _)| x == d)
            .map(|(_, p)| p.clone())
            .ok_or_else(|| ImageError::Invalid(format!("blob {d} missing")))?;
        std::fs::read(&p).map_err(|e| ImageError::Io(p.display().to_string(), e))
    };
    let mut layers = Vec::new();
    for b in &rec.blobs {
        let mt = if b.media_type.contains("docker") {
            if b.media_type.ends_with("gzip") {
                oci_client::manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE
            } else {
                oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE
            }
        } else {
            b.media_type.as_str()
        };
        layers.push(ImageLayer::new(read(&b.digest)?, mt.to_string(), None));
    }
    let config = Config::new(
        read(&rec.id)?,
        oci_client::manifest::IMAGE_CONFIG_MEDIA_TYPE.to_string(),
        None,
    );
    let (registry, repo, tag, digest) = split(&reference);
    let c = client(&registry, plain_http, &Registries::default()).map_err(|message| {
        ImageError::Pull {
            reference: reference.clone(),
            message,
        }
    })?;
    let r = oci_reference(&registry, &repo, &tag, &digest);
    let auth = match creds {
        Some((u, p)) => RegistryAuth::Basic(u, p),
        None => RegistryAuth::Anonymous,
    };
    c.push(&r, &layers, config, &auth, None)
        .await
        .map_err(|e| ImageError::Pull {
            reference: reference.clone(),
            message: format!("push: {e}"),
        })?;
    Ok(())
}
