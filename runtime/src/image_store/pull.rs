//! Pulls through oci-client, trying registries.yaml's mirrors (with rewrites, plain HTTP only
//! for `http://` endpoints) before the registry itself; and pushes an archive (tests, mirrors).

use std::path::Path;

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
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

fn client(plain_http_host: Option<&str>) -> Client {
    let protocol = match plain_http_host {
        Some(h) => ClientProtocol::HttpsExcept(vec![h.to_string()]),
        None => ClientProtocol::Https,
    };
    Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(std::time::Duration::from_secs(10)),
        read_timeout: Some(std::time::Duration::from_secs(300)),
        ..Default::default()
    })
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

/// Pulls `reference` (normalized); returns the record and the blobs to store.
pub async fn pull(
    reference: &str,
    auth: &PullAuth,
    registries: &Registries,
) -> Result<(ImageRecord, Vec<(String, Vec<u8>)>), ImageError> {
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
        let c = client(ep.plain_http.then_some(ep.host.as_str()));
        let r = oci_reference(&ep.host, &ep.repository, &tag, &digest);
        match c.pull(&r, &ra, ACCEPTED.to_vec()).await {
            Ok(data) => {
                let manifest = data.manifest.ok_or_else(|| ImageError::Pull {
                    reference: reference.to_string(),
                    message: "the registry sent no image manifest".into(),
                })?;
                let config_digest = format!("sha256:{}", sha256_hex(&data.config.data));
                let cfg: serde_json::Value =
                    serde_json::from_slice(&data.config.data).map_err(|e| ImageError::Pull {
                        reference: reference.to_string(),
                        message: format!("bad image config: {e}"),
                    })?;
                let mut blobs = vec![(config_digest.clone(), data.config.data.to_vec())];
                let mut layers = Vec::new();
                for (i, l) in data.layers.iter().enumerate() {
                    let d = format!("sha256:{}", sha256_hex(&l.data));
                    let want = manifest
                        .layers
                        .get(i)
                        .map(|x| x.digest.clone())
                        .unwrap_or_default();
                    if !want.is_empty() && want != d {
                        return Err(ImageError::Pull {
                            reference: reference.to_string(),
                            message: format!("layer {want} arrived with content {d}"),
                        });
                    }
                    layers.push(LayerBlob {
                        digest: d.clone(),
                        media_type: l.media_type.clone(),
                        size: l.data.len() as u64,
                    });
                    blobs.push((d, l.data.to_vec()));
                }
                let manifest_digest = data.digest.clone().unwrap_or_else(|| {
                    format!(
                        "sha256:{}",
                        sha256_hex(&serde_json::to_vec(&manifest).unwrap_or_default())
                    )
                });
                let (config, diff_ids) = super::archive::image_config(&cfg);
                let rec = ImageRecord {
                    id: config_digest,
                    names: vec![reference.split('@').next().unwrap_or(reference).to_string()],
                    repo_digests: vec![format!(
                        "{}@{manifest_digest}",
                        super::repository_of(reference)
                    )],
                    size: layers.iter().map(|l| l.size).sum(),
                    config,
                    layers: diff_ids,
                    blobs: layers,
                    manifest_digest,
                    last_used: 0,
                };
                return Ok((rec, blobs));
            }
            Err(e) => errors.push(format!("{}: {e}", ep.host)),
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
    let c = client(plain_http.then_some(registry.as_str()));
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
