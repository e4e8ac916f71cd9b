//! `/etc/k3rs/registries.yaml` in k3s's format: `mirrors` (endpoints tried in order, with
//! repository rewrites) and `configs` (auth and TLS per registry host).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::ImageError;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Mirror {
    #[serde(default)]
    pub endpoint: Vec<String>,
    #[serde(default)]
    pub rewrite: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Auth {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: String,
    #[serde(default)]
    pub auth: String,
    #[serde(default)]
    pub identitytoken: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Tls {
    #[serde(default)]
    pub ca_file: String,
    #[serde(default)]
    pub cert_file: String,
    #[serde(default)]
    pub key_file: String,
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RegistryConfig {
    pub auth: Option<Auth>,
    pub tls: Option<Tls>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Registries {
    #[serde(default)]
    pub mirrors: BTreeMap<String, Mirror>,
    #[serde(default)]
    pub configs: BTreeMap<String, RegistryConfig>,
}

/// Where to try a pull: host (with port), plain HTTP or not, the repository to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub plain_http: bool,
    pub repository: String,
}

/// `^library/(.*)` style rewrites with `$1` references (a small regex subset: anchors, `.*`,
/// literal text, one or more groups of `(.*)`).
fn rewrite(pattern: &str, replacement: &str, repo: &str) -> Option<String> {
    let anchored = pattern.starts_with('^');
    let pat = pattern.trim_start_matches('^').trim_end_matches('$');
    let parts: Vec<&str> = pat.split("(.*)").collect();
    let mut caps = Vec::new();
    let mut rest = repo;
    if let Some(first) = parts.first() {
        if anchored {
            rest = rest.strip_prefix(first)?;
        } else {
            let i = rest.find(first)?;
            rest = &rest[i + first.len()..];
        }
    }
    for (k, lit) in parts.iter().enumerate().skip(1) {
        if k == parts.len() - 1 {
            let cap = rest.strip_suffix(lit)?;
            caps.push(cap.to_string());
            rest = "";
        } else {
            let i = rest.find(lit)?;
            caps.push(rest[..i].to_string());
            rest = &rest[i + lit.len()..];
        }
    }
    if parts.len() == 1 && pattern.ends_with('$') && !rest.is_empty() {
        return None;
    }
    let mut out = replacement.to_string();
    for (i, c) in caps.iter().enumerate().rev() {
        out = out.replace(&format!("${}", i + 1), c);
    }
    Some(out)
}

impl Registries {
    /// Reads the file; a missing file means no mirrors and no credentials.
    pub fn load(path: &Path) -> Result<Registries, ImageError> {
        match std::fs::read_to_string(path) {
            Ok(t) if t.trim().is_empty() => Ok(Registries::default()),
            Ok(t) => serde_yaml::from_str(&t)
                .map_err(|e| ImageError::Invalid(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registries::default()),
            Err(e) => Err(ImageError::Io(path.display().to_string(), e)),
        }
    }

    /// The endpoints to try for `registry`/`repository`, mirrors first, then the registry.
    pub fn endpoints(&self, registry: &str, repository: &str) -> Vec<Endpoint> {
        let mut out = Vec::new();
        let mirror = self.mirrors.get(registry).or_else(|| self.mirrors.get("*"));
        let mut default_listed = false;
        if let Some(m) = mirror {
            let mut repo = repository.to_string();
            for (pat, rep) in &m.rewrite {
                if let Some(r) = rewrite(pat, rep, repository) {
                    repo = r;
                    break;
                }
            }
            for e in &m.endpoint {
                let plain = e.starts_with("http://");
                let host = e
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .trim_end_matches('/')
                    .trim_end_matches("/v2")
                    .to_string();
                if host == registry {
                    default_listed = true;
                }
                out.push(Endpoint {
                    repository: if host == registry {
                        repository.to_string()
                    } else {
                        repo.clone()
                    },
                    host,
                    plain_http: plain,
                });
            }
        }
        if !default_listed {
            out.push(Endpoint {
                host: registry.to_string(),
                plain_http: false,
                repository: repository.to_string(),
            });
        }
        out
    }

    /// Basic credentials configured for a host.
    pub fn auth(&self, host: &str) -> Option<(String, String)> {
        use base64::Engine;
        let a = self.configs.get(host)?.auth.as_ref()?;
        if !a.username.is_empty() {
            return Some((a.username.clone(), a.password.clone()));
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&a.auth)
            .ok()?;
        let s = String::from_utf8_lossy(&raw).to_string();
        s.split_once(':')
            .map(|(u, p)| (u.to_string(), p.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_rewrite_and_fall_back_to_the_registry() {
        let r: Registries = serde_yaml::from_str(
            "mirrors:\n  docker.io:\n    endpoint: [\"http://127.0.0.1:5000\"]\n    rewrite:\n      \"^library/(.*)\": \"mirror/$1\"\nconfigs:\n  \"127.0.0.1:5000\":\n    auth: {username: u, password: p}\n",
        )
        .unwrap();
        let e = r.endpoints("docker.io", "library/busybox");
        assert_eq!(
            e,
            vec![
                Endpoint {
                    host: "127.0.0.1:5000".into(),
                    plain_http: true,
                    repository: "mirror/busybox".into()
                },
                Endpoint {
                    host: "docker.io".into(),
                    plain_http: false,
                    repository: "library/busybox".into()
                },
            ]
        );
        assert_eq!(r.auth("127.0.0.1:5000"), Some(("u".into(), "p".into())));
        assert_eq!(r.endpoints("quay.io", "x/y").len(), 1);
    }
}
