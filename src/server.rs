//! `k3rs server`: opens the store, sets up the PKI and kubeconfig, and runs the API server
//! until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result};
use k3rs_storage::{Store, StoreConfig};

use crate::api::{self, ApiConfig, ApiState};
use crate::config::ServerConfig;
use crate::{kubeconfig, pki};

/// sled's page cache for the server's store.
const SERVER_STORE_CACHE: u64 = 8 << 20;

pub async fn run(cfg: ServerConfig) -> Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating --data-dir {}", cfg.data_dir.display()))?;
    let pki = pki::Pki::load_or_create(&cfg.tls_dir(), &cfg.serving_sans())
        .with_context(|| format!("setting up certificates in {}", cfg.tls_dir().display()))?;
    // Reads are served from the API server's watch cache, so sled's page cache mostly holds
    // what writes touch: 8 MiB instead of 32 keeps a node's footprint small.
    let mut store_cfg = StoreConfig::new(cfg.db_dir());
    store_cfg.cache_capacity_bytes = SERVER_STORE_CACHE;
    let store = Store::open(store_cfg)
        .await
        .context("opening the datastore")?;
    let listen = SocketAddr::new(cfg.bind_address, cfg.https_listen_port);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| {
            format!("listening on {listen} (is another server running? see --https-listen-port)")
        })?;
    let local = listener.local_addr()?;
    let (st, ns_rx) = ApiState::new(
        store.clone(),
        ApiConfig {
            server_address: format!("{}:{}", cfg.advertise_address, local.port()),
            event_ttl: cfg.event_ttl,
            cluster_cidr: cfg.cluster_cidr,
            service_cidr: cfg.service_cidr,
            cluster_dns: cfg.cluster_dns,
            cluster_domain: cfg.cluster_domain.clone(),
            service_node_port_range: cfg.service_node_port_range,
            advertise_address: cfg.advertise_address,
            https_port: local.port(),
            node_monitor_grace_period: cfg.node_monitor_grace_period,
        },
    );
    let issuer = api::tokens::Issuer::new(
        &pki.service_account.key_pem,
        &pki.ca.cert_pem,
        &st.config.cluster_domain,
    )
    .context("loading the service account signing key")?;
    let _ = st.tokens.set(issuer);
    api::load_crds(&st).await?;
    let tls = api::http::tls_config(&pki)?;
    api::proxy::init(&pki)?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(api::http::serve(st.clone(), listener, tls, shutdown_rx));
    api::bootstrap(&st).await?;
    let ns_task = tokio::spawn(api::namespaces::run(st.clone(), ns_rx));
    let controllers = crate::controllers::start(st.clone());
    st.ready.store(true, Ordering::SeqCst);

    let host = if cfg.bind_address.is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        cfg.bind_address.to_string()
    };
    let url = if host.contains(':') {
        format!("https://[{host}]:{}", local.port())
    } else {
        format!("https://{host}:{}", local.port())
    };
    kubeconfig::write(
        &cfg.write_kubeconfig,
        &kubeconfig::render(&url, &pki.ca.cert_pem, &pki.admin),
        cfg.write_kubeconfig_mode,
    )?;
    // The embedded agent talks to this server over HTTPS with its own node certificate, as a
    // remote agent would.
    let _agent = if cfg.disable_agent {
        None
    } else {
        let kubeconfig = crate::agent::write_node_kubeconfig(&cfg, &pki, &url)
            .context("writing the agent's kubeconfig")?;
        let acfg = crate::agent::AgentConfig::from_server(&cfg, kubeconfig)?;
        Some(
            crate::agent::start(acfg)
                .await
                .context("starting the embedded agent")?,
        )
    };
    tracing::info!(
        "k3rs server ready at {url} in {:?}; kubeconfig written to {} — use: kubectl --kubeconfig {} get nodes (or KUBECONFIG={})",
        started.elapsed(),
        cfg.write_kubeconfig.display(),
        cfg.write_kubeconfig.display(),
        cfg.write_kubeconfig.display()
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    st.ready.store(false, Ordering::SeqCst);
    let _ = shutdown_tx.send(true);
    let _ = server.await;
    ns_task.abort();
    controllers.shutdown().await;
    st.caches.shutdown();
    drop(st);
    store.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
