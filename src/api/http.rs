//! HTTPS serving: rustls with optional client certificates verified against the cluster CA
//! (CN → user, O → groups) or else service account bearer tokens, HTTP/1.1 and HTTP/2 (ALPN),
//! one task per connection.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use crate::api::{handle, ApiState, User};
use crate::pki::Pki;

/// The TLS configuration of the API server.
pub fn tls_config(pki: &Pki) -> Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pki.ca.cert_pem.as_bytes()) {
        roots.add(c.context("parsing the CA certificate")?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .context("building the client certificate verifier")?;
    let mut chain: Vec<CertificateDer<'static>> = Vec::new();
    for c in CertificateDer::pem_slice_iter(pki.serving.cert_pem.as_bytes()) {
        chain.push(c.context("parsing the serving certificate")?);
    }
    chain.extend(CertificateDer::pem_slice_iter(pki.ca.cert_pem.as_bytes()).flatten());
    let key = PrivateKeyDer::from_pem_slice(pki.serving.key_pem.as_bytes())
        .context("parsing the serving key")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("configuring TLS")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The identity in a verified client certificate.
pub fn user_from_cert(der: &[u8]) -> Option<User> {
    let (name, groups) = crate::httputil::cert_identity(der)?;
    Some(User { name, groups })
}

/// The user of a request: its verified client certificate's, else its bearer token's (a
/// service account token; one that does not verify is a 401, as upstream), else none.
async fn authenticate<B>(
    st: &ApiState,
    cert_user: Option<User>,
    req: &hyper::Request<B>,
) -> Result<Option<User>, crate::api::status::ApiError> {
    if cert_user.is_some() {
        return Ok(cert_user);
    }
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::api::tokens::bearer);
    match token {
        Some(t) => crate::api::tokens::authenticate(st, t).await.map(Some),
        None => Ok(None),
    }
}

/// Accepts connections until `shutdown` flips.
pub async fn serve(
    st: Arc<ApiState>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let st = st.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let user = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| user_from_cert(c.as_ref()));
            let svc = service_fn(move |req| {
                let st = st.clone();
                let user = user.clone();
                async move {
                    let user = match authenticate(&st, user, &req).await {
                        Ok(u) => u,
                        Err(e) => return Ok(crate::api::error_response(&e)),
                    };
                    Ok::<_, std::convert::Infallible>(handle(st, user, req).await)
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = shutdown.changed() => {}
            }
        });
    }
}
