//! The `k3rs` binary: command line and process wiring.

mod agent;
mod api;
mod config;
mod controllers;
mod cron;
mod hollow;
mod httputil;
mod images_cli;
mod kubeconfig;
mod pki;
mod rest;
mod server;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// k3rs: a lightweight, all-in-one Kubernetes distribution.
#[derive(Debug, Parser)]
#[command(name = "k3rs", version, about, long_about = None)]
struct Cli {
    /// Log more (debug level).
    #[arg(long, global = true, env = "K3RS_DEBUG")]
    debug: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a server (API server, controllers, scheduler, embedded store and agent).
    Server(Box<config::ServerArgs>),
    /// TEST TOOL: fake nodes for tests and benchmarks (no containers ever run).
    #[command(name = "hollow-nodes")]
    HollowNodes(Box<hollow::HollowArgs>),
    /// Manage the node's images (list, import, pull, remove, push).
    Images(Box<images_cli::ImagesArgs>),
    /// Internal: the per-pod supervisor the agent starts (not for direct use).
    #[command(hide = true)]
    Shim {
        /// The pod's shim directory.
        #[arg(long)]
        dir: std::path::PathBuf,
    },
    /// Run the installed kubectl with the server's admin kubeconfig.
    Kubectl {
        /// Arguments for kubectl.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// The machine architecture as Kubernetes names it.
pub fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => other,
    }
}

fn init_logging(debug: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("K3RS_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if debug {
            "debug,hyper=info,h2=info,rustls=info,openraft=info,sled=info"
        } else {
            "info,openraft=warn,sled=warn"
        })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Bounds glibc's malloc arenas: with many threads, freed memory otherwise stays mapped
/// per arena (see BENCHMARKS.md).
fn tune_allocator() {
    // SAFETY: mallopt only adjusts allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands memory freed after a burst (queued informer events, request buffers) back to the
/// kernel every few seconds; glibc otherwise keeps the peak mapped. Trimming a few hundred
/// MiB of heap takes milliseconds.
fn spawn_heap_trimmer() {
    std::thread::Builder::new()
        .name("heap-trim".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            // SAFETY: malloc_trim is thread-safe and only releases free memory.
            unsafe {
                libc::malloc_trim(0);
            }
        })
        .map(drop)
        .unwrap_or_else(|e| tracing::warn!(error = %e, "starting the heap trimmer"));
}

fn main() {
    // The shim must stay single-threaded (libcontainer forks): dispatch before anything starts.
    {
        let mut args = std::env::args_os().skip(1);
        if args.next().as_deref() == Some(std::ffi::OsStr::new("shim")) {
            let rest: Vec<_> = args.collect();
            if rest.len() == 2 && rest[0] == "--dir" {
                // Its stderr is the pod's shim.log; libcontainer reports through tracing.
                let filter = tracing_subscriber::EnvFilter::try_from_env("K3RS_SHIM_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
                // Not fd 2: the containers' stdio is set up on 0-2 in forked children, where
                // libcontainer still logs.
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(std::path::Path::new(&rest[1]).join("shim.log"));
                if let Ok(f) = log {
                    tracing_subscriber::fmt()
                        .with_env_filter(filter)
                        .with_ansi(false)
                        .with_writer(std::sync::Mutex::new(f))
                        .init();
                }
                k3rs_runtime::shim::shim_main(std::path::Path::new(&rest[1]));
            }
        }
    }
    // Streams (logs, exec, port-forward) move data in buffers of 64–256 KiB: keep those in the
    // heap instead of a fresh mmap each (glibc's default threshold is 128 KiB), so that the
    // pages are reused rather than faulted in and zeroed for every chunk.
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 << 20);
    }
    // One crypto provider for every rustls user in the process (API client, registry pulls).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    init_logging(cli.debug);
    let result = match cli.command {
        Command::Server(_) => {
            let sub = matches
                .subcommand_matches("server")
                .expect("server subcommand matched");
            tune_allocator();
            spawn_heap_trimmer();
            match config::ServerArgs::resolve(sub) {
                Ok(cfg) => tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(server::run(cfg))),
                Err(e) => Err(e),
            }
        }
        Command::Kubectl { args } => kubectl(args),
        Command::Images(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(images_cli::run(*args))),
        Command::Shim { dir } => k3rs_runtime::shim::shim_main(&dir),
        Command::HollowNodes(args) => {
            tune_allocator();
            spawn_heap_trimmer();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(hollow::run(*args)))
        }
    };
    if let Err(e) = result {
        eprintln!("k3rs: {e:#}");
        std::process::exit(1);
    }
}

/// `k3rs kubectl …`: execs kubectl with the admin kubeconfig (unless KUBECONFIG is set).
fn kubectl(args: Vec<String>) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("kubectl");
    if std::env::var_os("KUBECONFIG").is_none() {
        let path = std::env::var("K3RS_KUBECONFIG_OUTPUT")
            .unwrap_or_else(|_| config::DEFAULT_KUBECONFIG.into());
        cmd.env("KUBECONFIG", path);
    }
    let err = cmd.args(args).exec();
    anyhow::bail!("running kubectl: {err} (is kubectl installed and on PATH?)")
}
