//! `k3rs images ls|import|pull|rm|push`: the node's image store for operators (the same store
//! the agent uses, under `<data-dir>/agent/content`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use k3rs_runtime::images::{ImageStore, PullAuth, Registries};

#[derive(Debug, Args)]
pub struct ImagesArgs {
    /// The node's data directory.
    #[arg(
        long,
        short = 'd',
        env = "K3RS_DATA_DIR",
        default_value = "/var/lib/k3rs",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Registries configuration (mirrors, auth, TLS).
    #[arg(
        long,
        env = "K3RS_PRIVATE_REGISTRY",
        default_value = "/etc/k3rs/registries.yaml",
        global = true
    )]
    pub private_registry: PathBuf,
    #[command(subcommand)]
    pub command: ImagesCommand,
}

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// List the images on this node.
    #[command(alias = "list")]
    Ls {
        /// Print only the names.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Import OCI or docker-archive tarballs (.tar, .tar.gz, .tar.zst).
    Import {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Pull an image from its registry (honouring registries.yaml).
    Pull {
        reference: String,
        /// user:password for the registry.
        #[arg(long)]
        creds: Option<String>,
    },
    /// Remove images.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Push an OCI/docker archive to a registry under a new name (for tests and air-gap mirrors).
    Push {
        archive: PathBuf,
        reference: String,
        #[arg(long)]
        username: Option<String>,
        #[arg(long)]
        password: Option<String>,
        /// Talk plain HTTP to the registry.
        #[arg(long)]
        plain_http: bool,
    },
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

#[allow(clippy::print_stdout)]
pub async fn run(args: ImagesArgs) -> Result<()> {
    let root = args.data_dir.join("agent").join("content");
    let store = ImageStore::open(&root)
        .with_context(|| format!("opening the image store in {}", root.display()))?;
    match args.command {
        ImagesCommand::Ls { quiet } => {
            let mut list = store.list();
            list.sort_by(|a, b| a.names.cmp(&b.names));
            if quiet {
                for i in list {
                    for n in &i.names {
                        println!("{n}");
                    }
                }
                return Ok(());
            }
            println!("{:<60} {:<20} {:>10}", "IMAGE", "IMAGE ID", "SIZE");
            for i in list {
                let id: String =
                    i.id.trim_start_matches("sha256:")
                        .chars()
                        .take(12)
                        .collect();
                let names = if i.names.is_empty() {
                    vec!["<none>".to_string()]
                } else {
                    i.names.clone()
                };
                for n in names {
                    println!("{n:<60} {id:<20} {:>10}", human(i.size));
                }
            }
        }
        ImagesCommand::Import { files } => {
            for f in files {
                let store = store.clone();
                let f2 = f.clone();
                let imgs = tokio::task::spawn_blocking(move || store.import_archive(&f2))
                    .await?
                    .with_context(|| format!("importing {}", f.display()))?;
                for i in imgs {
                    println!("imported {} ({})", i.names.join(", "), i.id);
                }
            }
        }
        ImagesCommand::Pull { reference, creds } => {
            let registries = Registries::load(&args.private_registry)
                .with_context(|| format!("reading {}", args.private_registry.display()))?;
            let reference = k3rs_runtime::images::normalize_reference(&reference)?;
            let mut auth = PullAuth::default();
            if let Some(c) = creds {
                let (u, p) = c
                    .split_once(':')
                    .context("--creds: expected user:password")?;
                let host = reference.split('/').next().unwrap_or_default().to_string();
                auth.credentials.push((host, u.to_string(), p.to_string()));
            }
            let rec = store.pull(&reference, &auth, &registries).await?;
            println!("pulled {} ({})", reference, rec.id);
        }
        ImagesCommand::Rm { references } => {
            let mut failed = false;
            for r in references {
                match store.remove(&r) {
                    Ok(()) => println!("deleted {r}"),
                    Err(e) => {
                        eprintln!("k3rs: {r}: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                bail!("some images were not removed");
            }
        }
        ImagesCommand::Push {
            archive,
            reference,
            username,
            password,
            plain_http,
        } => {
            let creds = match (username, password) {
                (Some(u), Some(p)) => Some((u, p)),
                (None, None) => None,
                _ => bail!("--username and --password go together"),
            };
            k3rs_runtime::images::push_archive(&archive, &reference, creds, plain_http)
                .await
                .with_context(|| format!("pushing {} to {reference}", archive.display()))?;
            println!("pushed {reference}");
        }
    }
    Ok(())
}
