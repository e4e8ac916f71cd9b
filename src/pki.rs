//! Cluster PKI: a CA generated at first start and reused, the API server's serving certificate
//! (re-issued when its SANs change or it nears expiry) and client certificates (admin, and later
//! nodes), as PEM files with 0600 private keys.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Leaf certificates are re-issued at start when they expire within this many days.
const RENEW_BEFORE_DAYS: i64 = 90;

/// PEM certificate and key.
#[derive(Clone)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertKey").finish_non_exhaustive()
    }
}

/// The PKI files of a server, under `<data-dir>/server/tls`.
#[derive(Debug)]
pub struct Pki {
    pub ca: CertKey,
    pub serving: CertKey,
    pub admin: CertKey,
    /// The API server's client certificate towards kubelets (CN
    /// `kube-apiserver-kubelet-client`, O `system:masters`): logs, exec, attach, port-forward.
    pub kubelet_client: CertKey,
    /// The key service account tokens are signed with (`service.key`, PKCS#8 P-256 PEM).
    pub service_account: SigningKey,
}

/// A private key in PEM (never printed).
#[derive(Clone)]
pub struct SigningKey {
    pub key_pem: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").finish_non_exhaustive()
    }
}

/// The service account signing key under `dir`, generated once (0600).
fn service_account_key(dir: &Path) -> Result<SigningKey> {
    let path = dir.join("service.key");
    match std::fs::read_to_string(&path) {
        Ok(key_pem) if !key_pem.trim().is_empty() => Ok(SigningKey { key_pem }),
        Ok(_) => bail!("empty service account key {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let key_pem = key.serialize_pem();
            write_private(&path, &key_pem)?;
            Ok(SigningKey { key_pem })
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_private(path: &Path, content: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(content.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_public(path: &Path, content: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn today() -> (i32, u8, u8) {
    let d = jiff::Zoned::now()
        .with_time_zone(jiff::tz::TimeZone::UTC)
        .date();
    (d.year() as i32, d.month() as u8, d.day() as u8)
}

fn validity(params: &mut CertificateParams, years: i32) {
    let (y, m, d) = today();
    // From yesterday, so that a slightly slow clock elsewhere still accepts it.
    let start = jiff::civil::date(y as i16, m as i8, d as i8)
        .yesterday()
        .unwrap_or(jiff::civil::date(y as i16, m as i8, d as i8));
    params.not_before =
        rcgen::date_time_ymd(start.year() as i32, start.month() as u8, start.day() as u8);
    // Avoid 29 February in the target year.
    let d_end = if m == 2 && d == 29 { 28 } else { d };
    params.not_after = rcgen::date_time_ymd(y + years, m, d_end);
}

fn read_pair(dir: &Path, name: &str) -> Result<Option<CertKey>> {
    let crt = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    match (std::fs::read_to_string(&crt), std::fs::read_to_string(&key)) {
        (Ok(cert_pem), Ok(key_pem)) => Ok(Some(CertKey { cert_pem, key_pem })),
        (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        (Err(e), _) | (_, Err(e)) => {
            Err(e).with_context(|| format!("reading {} / {}", crt.display(), key.display()))
        }
    }
}

fn write_pair(dir: &Path, name: &str, ck: &CertKey) -> Result<()> {
    write_private(&dir.join(format!("{name}.key")), &ck.key_pem)?;
    write_public(&dir.join(format!("{name}.crt")), &ck.cert_pem)?;
    Ok(())
}

/// Subject alternative names and expiry of a PEM certificate.
fn inspect(cert_pem: &str) -> Result<(BTreeSet<String>, i64)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("bad PEM: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("bad certificate: {e}"))?;
    let mut sans = BTreeSet::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    sans.insert(d.to_string());
                }
                x509_parser::extensions::GeneralName::IPAddress(raw) => {
                    let ip: Option<IpAddr> = match raw.len() {
                        4 => <[u8; 4]>::try_from(*raw).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*raw).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        sans.insert(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let not_after = cert.validity().not_after.timestamp();
    let now = jiff::Timestamp::now().as_second();
    Ok((sans, (not_after - now) / 86_400))
}

fn issuer(ca: &CertKey) -> Result<Issuer<'static, KeyPair>> {
    let key = KeyPair::from_pem(&ca.key_pem).context("parsing the CA key")?;
    Issuer::from_ca_cert_pem(&ca.cert_pem, key).context("parsing the CA certificate")
}

fn new_ca() -> Result<CertKey> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("k3rs-server-ca@{}", jiff::Timestamp::now().as_second()),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, 10);
    let cert = params.self_signed(&key)?;
    Ok(CertKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a leaf certificate signed by the CA.
pub fn issue(
    ca: &CertKey,
    common_name: &str,
    organizations: &[&str],
    sans: &BTreeSet<String>,
    server: bool,
    client: bool,
) -> Result<CertKey> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    for o in organizations {
        dn.push(DnType::OrganizationName, *o);
    }
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    if server {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    if client {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    params.use_authority_key_identifier_extension = true;
    for s in sans {
        params.subject_alt_names.push(match s.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                s.as_str()
                    .try_into()
                    .with_context(|| format!("SAN {s:?}"))?,
            ),
        });
    }
    validity(&mut params, 1);
    let cert = params.signed_by(&key, &issuer(ca)?)?;
    Ok(CertKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

impl Pki {
    /// Loads the PKI under `dir`, creating what is missing and re-issuing the serving
    /// certificate when `sans` changed or it is about to expire.
    pub fn load_or_create(dir: &Path, sans: &BTreeSet<String>) -> Result<Pki> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let ca = match read_pair(dir, "server-ca")? {
            Some(ca) => ca,
            None => {
                let ca = new_ca()?;
                write_pair(dir, "server-ca", &ca)?;
                ca
            }
        };
        let serving = match read_pair(dir, "serving-kube-apiserver")? {
            Some(ck) => {
                let (have, days_left) = inspect(&ck.cert_pem)?;
                if &have == sans && days_left > RENEW_BEFORE_DAYS {
                    ck
                } else {
                    tracing::info!(sans = ?sans, "re-issuing the serving certificate");
                    let ck = issue(&ca, "kube-apiserver", &[], sans, true, false)?;
                    write_pair(dir, "serving-kube-apiserver", &ck)?;
                    ck
                }
            }
            None => {
                let ck = issue(&ca, "kube-apiserver", &[], sans, true, false)?;
                write_pair(dir, "serving-kube-apiserver", &ck)?;
                ck
            }
        };
        let admin = match read_pair(dir, "client-admin")? {
            Some(ck) if inspect(&ck.cert_pem)?.1 > RENEW_BEFORE_DAYS => ck,
            _ => {
                let ck = issue(
                    &ca,
                    "system:admin",
                    &["system:masters"],
                    &BTreeSet::new(),
                    false,
                    true,
                )?;
                write_pair(dir, "client-admin", &ck)?;
                ck
            }
        };
        let kubelet_client = match read_pair(dir, "client-kube-apiserver-kubelet")? {
            Some(ck) if inspect(&ck.cert_pem)?.1 > RENEW_BEFORE_DAYS => ck,
            _ => {
                let ck = issue(
                    &ca,
                    "kube-apiserver-kubelet-client",
                    &["system:masters"],
                    &BTreeSet::new(),
                    false,
                    true,
                )?;
                write_pair(dir, "client-kube-apiserver-kubelet", &ck)?;
                ck
            }
        };
        if ca.cert_pem.trim().is_empty() {
            bail!("empty CA certificate in {}", dir.display());
        }
        let service_account = service_account_key(dir)?;
        Ok(Pki {
            ca,
            serving,
            admin,
            kubelet_client,
            service_account,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pki_is_created_once_and_serving_cert_follows_sans() {
        let dir = tempfile::tempdir().unwrap();
        let mut sans: BTreeSet<String> = ["localhost", "127.0.0.1", "kubernetes.default.svc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let a = Pki::load_or_create(dir.path(), &sans).unwrap();
        let b = Pki::load_or_create(dir.path(), &sans).unwrap();
        assert_eq!(a.ca.cert_pem, b.ca.cert_pem, "CA reused");
        assert_eq!(
            a.serving.cert_pem, b.serving.cert_pem,
            "serving cert reused"
        );
        assert_eq!(inspect(&a.serving.cert_pem).unwrap().0, sans);
        sans.insert("10.43.0.1".into());
        let c = Pki::load_or_create(dir.path(), &sans).unwrap();
        assert_eq!(a.ca.cert_pem, c.ca.cert_pem);
        assert_ne!(a.serving.cert_pem, c.serving.cert_pem, "new SAN re-issues");
        assert_eq!(inspect(&c.serving.cert_pem).unwrap().0, sans);
        let mode = std::fs::metadata(dir.path().join("server-ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            a.service_account.key_pem, c.service_account.key_pem,
            "the service account key is generated once"
        );
        let mode = std::fs::metadata(dir.path().join("service.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
