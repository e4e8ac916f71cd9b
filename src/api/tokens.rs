//! Service account tokens: ES256 JWTs signed with the server's service account key (created
//! once with the PKI), carrying upstream's claims (`iss`, `sub`, `aud`, `exp`, `iat`, `nbf`,
//! `jti` and the private `kubernetes.io` claim naming the namespace, the service account and
//! the object the token is bound to). Here too: TokenRequest (`POST
//! serviceaccounts/<name>/token`), bearer-token authentication (signature, time, audience, and
//! the service account and bound objects still existing with the same uid), SelfSubjectReview
//! (`kubectl auth whoami`) and the OIDC discovery documents.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use serde_json::{json, Value};

use crate::api::objects;
use crate::api::status::{ApiError, ApiResult, Cause};
use crate::api::{ApiState, User};

/// Clock skew tolerated on `exp`, `nbf` and `iat` (go-jose's default leeway, as upstream).
const LEEWAY: i64 = 60;
/// TokenRequest's default and bounds of `spec.expirationSeconds`.
pub const DEFAULT_EXPIRATION: i64 = 3600;
const MIN_EXPIRATION: i64 = 600;
const MAX_EXPIRATION: i64 = 1 << 32;
/// DER prefix of a P-256 SubjectPublicKeyInfo (the key id is the SHA-256 of the whole SPKI).
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Signs and verifies the cluster's service account tokens.
pub struct Issuer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    /// Uncompressed P-256 point (0x04 ‖ x ‖ y).
    public: Vec<u8>,
    kid: String,
    /// `https://kubernetes.default.svc.<cluster domain>`: the `iss` claim and the API server's
    /// audience.
    pub issuer: String,
    /// The cluster CA (published in every namespace as `kube-root-ca.crt`).
    pub ca_pem: String,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// What a token is bound to besides its service account: (name, uid) pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    pub pod: Option<(String, String)>,
    pub secret: Option<(String, String)>,
    pub node: Option<(String, String)>,
}

fn reference(r: &(String, String)) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("name".into(), json!(r.0));
    if !r.1.is_empty() {
        m.insert("uid".into(), json!(r.1));
    }
    Value::Object(m)
}

/// The claims of a new token, as upstream's `serviceaccount.Claims` builds them.
#[allow(clippy::too_many_arguments)]
pub fn claims(
    issuer: &str,
    ns: &str,
    sa_name: &str,
    sa_uid: &str,
    binding: &Binding,
    audiences: &[String],
    now: i64,
    expiration_seconds: i64,
    jti: &str,
) -> Value {
    let mut k = serde_json::Map::new();
    k.insert("namespace".into(), json!(ns));
    k.insert(
        "serviceaccount".into(),
        json!({"name": sa_name, "uid": sa_uid}),
    );
    if let Some(p) = &binding.pod {
        k.insert("pod".into(), reference(p));
    }
    if let Some(s) = &binding.secret {
        k.insert("secret".into(), reference(s));
    }
    if let Some(n) = &binding.node {
        k.insert("node".into(), reference(n));
    }
    json!({
        "iss": issuer,
        "sub": format!("system:serviceaccount:{ns}:{sa_name}"),
        "aud": audiences,
        "exp": now + expiration_seconds,
        "iat": now,
        "nbf": now,
        "jti": jti,
        "kubernetes.io": Value::Object(k),
    })
}

impl Issuer {
    /// The issuer of a cluster from its signing key (PKCS#8 P-256 PEM) and CA.
    pub fn new(key_pem: &str, ca_pem: &str, cluster_domain: &str) -> anyhow::Result<Issuer> {
        let der = match PrivateKeyDer::from_pem_slice(key_pem.as_bytes()) {
            Ok(PrivateKeyDer::Pkcs8(k)) => k,
            Ok(_) => anyhow::bail!("the service account key is not a PKCS#8 key"),
            Err(e) => anyhow::bail!("parsing the service account key: {e}"),
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            der.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| anyhow::anyhow!("the service account key is not a P-256 key: {e}"))?;
        let public = key.public_key().as_ref().to_vec();
        let mut spki = P256_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&public);
        let kid = B64.encode(ring::digest::digest(&ring::digest::SHA256, &spki));
        Ok(Issuer {
            key,
            rng,
            public,
            kid,
            issuer: format!(
                "https://kubernetes.default.svc.{}",
                cluster_domain.trim_end_matches('.')
            ),
            ca_pem: ca_pem.to_string(),
        })
    }

    /// The audiences the API server accepts (and gives tokens that ask for none).
    pub fn audiences(&self) -> Vec<String> {
        vec![self.issuer.clone()]
    }

    /// A compact JWS (ES256) of `claims`.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "ES256", "kid": self.kid});
        let mut out = format!(
            "{}.{}",
            B64.encode(serde_json::to_vec(&header).expect("JSON")),
            B64.encode(serde_json::to_vec(claims).expect("JSON"))
        );
        let sig = self
            .key
            .sign(&self.rng, out.as_bytes())
            .expect("ECDSA signing with a valid key");
        out.push('.');
        out.push_str(&B64.encode(sig.as_ref()));
        out
    }

    /// The claims of a token this issuer signed that is valid at `now` for the API server's
    /// audiences; otherwise why not (for the log; clients only see 401).
    pub fn verify(&self, token: &str, now: i64) -> Result<Value, String> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a compact JWS".into());
        };
        let header: Value = B64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("malformed header")?;
        if header["alg"] != "ES256" {
            return Err(format!("unexpected algorithm {}", header["alg"]));
        }
        if header.get("kid").is_some_and(|k| k != self.kid.as_str()) {
            return Err("signed with another key".into());
        }
        let sig = B64.decode(s).map_err(|_| "malformed signature")?;
        let signed = &token[..h.len() + 1 + p.len()];
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &self.public)
            .verify(signed.as_bytes(), &sig)
            .map_err(|_| "invalid signature")?;
        let claims: Value = B64
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("malformed claims")?;
        if claims["iss"] != self.issuer.as_str() {
            return Err("issued by another issuer".into());
        }
        let exp = claims["exp"].as_i64().ok_or("no expiry")?;
        if now > exp + LEEWAY {
            return Err("service account token has expired".into());
        }
        if claims["nbf"].as_i64().is_some_and(|nbf| now + LEEWAY < nbf) {
            return Err("service account token is not valid yet".into());
        }
        if claims["iat"].as_i64().is_some_and(|iat| now + LEEWAY < iat) {
            return Err("service account token was issued in the future".into());
        }
        let auds: Vec<&str> = match &claims["aud"] {
            Value::String(a) => vec![a.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !auds.iter().any(|a| *a == self.issuer) {
            return Err(format!(
                "token audiences {auds:?} is invalid for the target audiences [{:?}]",
                self.issuer
            ));
        }
        Ok(claims)
    }

    /// The JSON Web Key Set of the signing key.
    pub fn jwks(&self) -> Value {
        json!({"keys": [{
            "use": "sig", "kty": "EC", "kid": self.kid, "crv": "P-256", "alg": "ES256",
            "x": B64.encode(&self.public[1..33]), "y": B64.encode(&self.public[33..65]),
        }]})
    }
}

/// An object of a core/v1 kind by name: from the watch cache when it has it, else from the
/// store (the cache may lag behind a write that just happened).
pub async fn lookup(
    st: &ApiState,
    plural: &str,
    ns: Option<&str>,
    name: &str,
) -> ApiResult<Option<Value>> {
    if let Some(v) = cached(st, plural, ns, name) {
        return Ok(Some(v));
    }
    lookup_store(st, plural, ns, name).await
}

fn core_def(
    st: &ApiState,
    plural: &str,
) -> ApiResult<std::sync::Arc<crate::api::resources::ResourceDef>> {
    st.registry
        .get("", "v1", plural)
        .ok_or_else(|| ApiError::internal(format!("built-in resource {plural} missing")))
}

/// The watch cache's copy of an object, if it has one.
pub fn cached(st: &ApiState, plural: &str, ns: Option<&str>, name: &str) -> Option<Value> {
    let def = core_def(st, plural).ok()?;
    let key = def.key(ns, name);
    let cache = st.caches.get(&def.key_prefix(None));
    let snap = cache.snapshot(&key, None);
    let o = snap
        .objects
        .iter()
        .find(|o| o.key.as_ref() == key.as_bytes())?;
    serde_json::from_slice(&o.value).ok()
}

/// The store's copy of an object (a linearizable read).
pub async fn lookup_store(
    st: &ApiState,
    plural: &str,
    ns: Option<&str>,
    name: &str,
) -> ApiResult<Option<Value>> {
    let def = core_def(st, plural)?;
    Ok(st
        .store
        .get(def.key(ns, name))
        .await?
        .and_then(|kv| serde_json::from_slice(&kv.value).ok()))
}

fn uid(v: &Value) -> &str {
    v.pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Checks that the object a claim names still exists with the uid the claim holds: first
/// against the watch cache, then (when that disagrees) against the store.
async fn still_exists(
    st: &ApiState,
    plural: &str,
    ns: Option<&str>,
    claim: &Value,
    now: i64,
) -> Result<(), String> {
    let name = claim["name"].as_str().unwrap_or_default();
    let want = claim["uid"].as_str().unwrap_or_default();
    let ok = |o: &Option<Value>| -> Result<(), String> {
        let Some(o) = o else {
            return Err(format!("{plural} {name} has been deleted"));
        };
        if !want.is_empty() && uid(o) != want {
            return Err(format!(
                "{plural} {name} UID ({}) does not match claim ({want})",
                uid(o)
            ));
        }
        // A pod being deleted keeps its tokens for a minute (upstream's grace).
        if let Some(t) = o
            .pointer("/metadata/deletionTimestamp")
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        {
            if plural == "pods" && t.as_second() < now - LEEWAY {
                return Err(format!("pod {name} is being deleted"));
            }
        }
        Ok(())
    };
    if ok(&cached(st, plural, ns, name)).is_ok() {
        return Ok(());
    }
    let fresh = lookup_store(st, plural, ns, name)
        .await
        .map_err(|e| e.message)?;
    ok(&fresh)
}

/// The bearer token in an `Authorization` header value, if it holds one.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Authenticates a service account token: the user it stands for, or 401 (upstream's
/// `Unauthorized` Status, whatever the reason; the reason goes to the log).
pub async fn authenticate(st: &ApiState, token: &str) -> ApiResult<User> {
    let Some(issuer) = st.tokens.get() else {
        return Err(ApiError::unauthorized());
    };
    let now = jiff::Timestamp::now().as_second();
    let r = async {
        let claims = issuer.verify(token, now)?;
        let k = &claims["kubernetes.io"];
        let ns = k["namespace"].as_str().unwrap_or_default();
        let sa = k["serviceaccount"]["name"].as_str().unwrap_or_default();
        let sub = format!("system:serviceaccount:{ns}:{sa}");
        if ns.is_empty() || sa.is_empty() || claims["sub"] != sub.as_str() {
            return Err("malformed service account claims".to_string());
        }
        still_exists(st, "serviceaccounts", Some(ns), &k["serviceaccount"], now).await?;
        if k["pod"].is_object() {
            still_exists(st, "pods", Some(ns), &k["pod"], now).await?;
        } else if k["node"].is_object() {
            still_exists(st, "nodes", None, &k["node"], now).await?;
        }
        if k["secret"].is_object() {
            still_exists(st, "secrets", Some(ns), &k["secret"], now).await?;
        }
        Ok(User {
            name: sub,
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
        })
    }
    .await;
    r.map_err(|why| {
        tracing::debug!(reason = %why, "bearer token rejected");
        ApiError::unauthorized()
    })
}

fn rfc3339(secs: i64) -> String {
    jiff::Timestamp::from_second(secs)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn invalid(causes: Vec<Cause>) -> ApiError {
    ApiError::invalid("authentication.k8s.io", "TokenRequest", "", causes)
}

/// `POST /api/v1/namespaces/<ns>/serviceaccounts/<name>/token`: a TokenRequest answered with
/// a signed token (upstream's TokenREST).
pub async fn token_request(st: &ApiState, ns: &str, name: &str, body: Value) -> ApiResult<Value> {
    let issuer = st
        .tokens
        .get()
        .ok_or_else(|| ApiError::internal("service account tokens are not configured"))?;
    let mut tr = body;
    if !tr.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request must be a TokenRequest",
        ));
    }
    match (tr["apiVersion"].as_str(), tr["kind"].as_str()) {
        (None | Some("authentication.k8s.io/v1"), None | Some("TokenRequest")) => {}
        (v, k) => {
            return Err(ApiError::bad_request(format!(
                "expected authentication.k8s.io/v1 TokenRequest, got {} {}",
                v.unwrap_or_default(),
                k.unwrap_or_default()
            )))
        }
    }
    if !tr["spec"].is_object() {
        tr["spec"] = json!({});
    }
    let spec = &mut tr["spec"];
    let expiration = match &spec["expirationSeconds"] {
        Value::Null => DEFAULT_EXPIRATION,
        v => v.as_i64().ok_or_else(|| {
            invalid(vec![Cause::invalid(
                "spec.expirationSeconds",
                v,
                "must be an integer",
            )])
        })?,
    };
    spec["expirationSeconds"] = json!(expiration);
    let mut causes = Vec::new();
    if expiration < MIN_EXPIRATION {
        causes.push(Cause::invalid(
            "spec.expirationSeconds",
            &json!(expiration),
            "may not specify a duration less than 10 minutes",
        ));
    }
    if expiration > MAX_EXPIRATION {
        causes.push(Cause::invalid(
            "spec.expirationSeconds",
            &json!(expiration),
            "may not specify a duration larger than 2^32 seconds",
        ));
    }
    if !causes.is_empty() {
        return Err(invalid(causes));
    }
    let sa_def = core_def(st, "serviceaccounts")?;
    let sa = objects::get(st, &sa_def, Some(ns), name).await?;

    let mut binding = Binding::default();
    if let Some(r) = spec.get("boundObjectRef").filter(|r| r.is_object()) {
        let kind = r["kind"].as_str().unwrap_or_default();
        let api_version = r["apiVersion"].as_str().unwrap_or_default();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let rname = r["name"].as_str().unwrap_or_default();
        let want_uid = r["uid"].as_str().unwrap_or_default();
        let (plural, obj_ns) = match (group, kind) {
            ("", "Pod") => ("pods", Some(ns)),
            ("", "Secret") => ("secrets", Some(ns)),
            ("", "Node") => ("nodes", None),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "cannot bind token to object of type {group}/{version}, Kind={kind}"
                )))
            }
        };
        let def = core_def(st, plural)?;
        let obj = objects::get(st, &def, obj_ns, rname).await?;
        let obj_uid = uid(&obj).to_string();
        match plural {
            "pods" => {
                let pod_sa = obj
                    .pointer("/spec/serviceAccountName")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if pod_sa != name {
                    return Err(ApiError::bad_request(format!(
                        "cannot bind token for serviceaccount {name:?} to pod running with different serviceaccount name."
                    )));
                }
                binding.pod = Some((rname.to_string(), obj_uid.clone()));
                let node = obj
                    .pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if !node.is_empty() {
                    let node_uid = lookup(st, "nodes", None, node)
                        .await?
                        .map(|n| uid(&n).to_string())
                        .unwrap_or_default();
                    binding.node = Some((node.to_string(), node_uid));
                }
            }
            "secrets" => binding.secret = Some((rname.to_string(), obj_uid.clone())),
            _ => binding.node = Some((rname.to_string(), obj_uid.clone())),
        }
        if !want_uid.is_empty() && want_uid != obj_uid {
            return Err(ApiError::conflict(
                group,
                kind,
                rname,
                &format!("the UID in the bound object reference ({want_uid}) does not match the UID in record. The object might have been deleted and then recreated"),
            ));
        }
    }
    let audiences: Vec<String> = spec["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let audiences = if audiences.is_empty() {
        issuer.audiences()
    } else {
        audiences
    };
    spec["audiences"] = json!(audiences);
    if spec.get("boundObjectRef").is_none() {
        spec["boundObjectRef"] = Value::Null;
    }
    let now = jiff::Timestamp::now().as_second();
    let c = claims(
        &issuer.issuer,
        ns,
        name,
        uid(&sa),
        &binding,
        &audiences,
        now,
        expiration,
        &objects::new_uid(),
    );
    let token = issuer.sign(&c);
    tr["apiVersion"] = json!("authentication.k8s.io/v1");
    tr["kind"] = json!("TokenRequest");
    if !tr["metadata"].is_object() {
        tr["metadata"] = json!({});
    }
    tr["metadata"]["name"] = json!(name);
    tr["metadata"]["namespace"] = json!(ns);
    tr["metadata"]["creationTimestamp"] = Value::Null;
    tr["status"] = json!({"token": token, "expirationTimestamp": rfc3339(now + expiration)});
    Ok(tr)
}

/// `POST /apis/authentication.k8s.io/v1/selfsubjectreviews`: who the caller is.
pub fn self_subject_review(user: &User) -> Value {
    json!({
        "kind": "SelfSubjectReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": objects::now_rfc3339()},
        "status": {"userInfo": {"username": user.name, "groups": user.groups}},
    })
}

/// `/.well-known/openid-configuration` and `/openid/v1/jwks`.
pub fn discovery(st: &ApiState, path: &str) -> Option<Value> {
    let issuer = st.tokens.get()?;
    match path.trim_end_matches('/') {
        "/.well-known/openid-configuration" => Some(json!({
            "issuer": issuer.issuer,
            "jwks_uri": format!("https://{}/openid/v1/jwks", st.config.server_address),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        })),
        "/openid/v1/jwks" => Some(issuer.jwks()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> Issuer {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Issuer::new(&key.serialize_pem(), "CA", "cluster.local").unwrap()
    }

    fn token_claims(iss: &Issuer, aud: &[&str], now: i64, exp: i64) -> Value {
        let auds: Vec<String> = aud.iter().map(|s| s.to_string()).collect();
        claims(
            &iss.issuer,
            "ns1",
            "robot",
            "u-1",
            &Binding {
                pod: Some(("p".into(), "u-p".into())),
                ..Default::default()
            },
            &auds,
            now,
            exp,
            "jti-1",
        )
    }

    #[test]
    fn a_signed_token_verifies_with_upstreams_claims() {
        let iss = issuer();
        let now = 1_800_000_000;
        let t = iss.sign(&token_claims(&iss, &[&iss.issuer.clone()], now, 3600));
        let c = iss.verify(&t, now + 10).unwrap();
        assert_eq!(c["iss"], "https://kubernetes.default.svc.cluster.local");
        assert_eq!(c["sub"], "system:serviceaccount:ns1:robot");
        assert_eq!(c["exp"], now + 3600);
        assert_eq!(c["nbf"], now);
        assert_eq!(c["iat"], now);
        assert_eq!(c["jti"], "jti-1");
        assert_eq!(
            c["kubernetes.io"],
            json!({"namespace": "ns1", "serviceaccount": {"name": "robot", "uid": "u-1"},
                   "pod": {"name": "p", "uid": "u-p"}})
        );
        let header: Value =
            serde_json::from_slice(&B64.decode(t.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], iss.jwks()["keys"][0]["kid"]);
    }

    #[test]
    fn expired_tokens_are_rejected_after_the_leeway() {
        let iss = issuer();
        let now = 1_800_000_000;
        let t = iss.sign(&token_claims(&iss, &[&iss.issuer.clone()], now, 600));
        assert!(iss.verify(&t, now + 600 + 30).is_ok(), "within the leeway");
        let e = iss.verify(&t, now + 600 + 61).unwrap_err();
        assert!(e.contains("expired"), "{e}");
        let e = iss.verify(&t, now - 120).unwrap_err();
        assert!(e.contains("not valid yet"), "{e}");
    }

    #[test]
    fn tokens_for_other_audiences_are_rejected() {
        let iss = issuer();
        let now = 1_800_000_000;
        let t = iss.sign(&token_claims(&iss, &["vault"], now, 3600));
        let e = iss.verify(&t, now).unwrap_err();
        assert!(e.contains("audiences"), "{e}");
        let t = iss.sign(&token_claims(
            &iss,
            &["vault", &iss.issuer.clone()],
            now,
            3600,
        ));
        assert!(
            iss.verify(&t, now).is_ok(),
            "one matching audience is enough"
        );
    }

    #[test]
    fn tampered_or_foreign_tokens_are_rejected() {
        let iss = issuer();
        let now = 1_800_000_000;
        let t = iss.sign(&token_claims(&iss, &[&iss.issuer.clone()], now, 3600));
        let parts: Vec<&str> = t.split('.').collect();
        // Claims changed after signing (another service account).
        let mut c = token_claims(&iss, &[&iss.issuer.clone()], now, 3600);
        c["sub"] = json!("system:serviceaccount:kube-system:admin");
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(serde_json::to_vec(&c).unwrap()),
            parts[2]
        );
        assert_eq!(iss.verify(&forged, now).unwrap_err(), "invalid signature");
        // Signed by another key.
        let other = issuer();
        let t2 = other.sign(&token_claims(&other, &[&other.issuer.clone()], now, 3600));
        assert!(iss.verify(&t2, now).is_err());
        // Not a token at all, or with no signature / algorithm none.
        for bad in [
            "",
            "garbage",
            "a.b",
            "a.b.c.d",
            &format!("{}.{}.", parts[0], parts[1]),
        ] {
            assert!(iss.verify(bad, now).is_err(), "{bad:?}");
        }
        let none = format!("{}.{}.", B64.encode(br#"{"alg":"none"}"#), parts[1]);
        assert!(iss.verify(&none, now).is_err());
        // Another issuer (cluster domain).
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let a = Issuer::new(&key.serialize_pem(), "", "cluster.local").unwrap();
        let b = Issuer::new(&key.serialize_pem(), "", "example.org").unwrap();
        let t3 = a.sign(&token_claims(
            &a,
            &[&a.issuer.clone(), &b.issuer.clone()],
            now,
            3600,
        ));
        assert_eq!(b.verify(&t3, now).unwrap_err(), "issued by another issuer");
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer(""), None);
    }
}
