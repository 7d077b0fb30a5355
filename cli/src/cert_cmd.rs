//! `moe cert`: a development CA and certificates for routers and workers, so a local
//! cluster runs with mutual TLS in three commands (see README). Production clusters use
//! their own issuer (cert-manager in deploy/k8s) with the same role URIs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use moe_tls::dev_ca::{self, Pem};
use moe_tls::Role;

#[derive(Subcommand)]
pub enum CertCommand {
    /// Make a development CA: DIR/ca.crt and DIR/ca.key.
    NewCa {
        /// Directory for the files (created if missing).
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Days the CA is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace an existing CA (every certificate it signed stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate for a router or a worker, signed by DIR/ca.{crt,key}:
    /// DIR/NAME.crt and DIR/NAME.key.
    Issue {
        /// What the holder may do: `router` (call workers) or `worker` (serve experts).
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Names peers dial it by: IP addresses or DNS names (comma-separated or
        /// repeated). A worker's must include the address it advertises.
        #[arg(long = "name", value_delimiter = ',', required = true)]
        names: Vec<String>,
        /// Directory of the CA and the new files.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// File name stem (default: ROLE-FIRST_NAME).
        #[arg(long)]
        out: Option<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Router,
    Worker,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Router => Role::Router,
            RoleArg::Worker => Role::Worker,
        }
    }
}

/// Writes `pem` as STEM.crt and STEM.key (the key readable by its owner only).
fn write_pair(dir: &Path, stem: &str, pem: &Pem) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (crt, key) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&crt, &pem.cert).with_context(|| format!("writing {}", crt.display()))?;
    write_private(&key, &pem.key)?;
    Ok((crt, key))
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn read_ca(dir: &Path) -> anyhow::Result<Pem> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).with_context(|| {
            format!(
                "reading {} (make a CA first: moe cert new-ca --dir {})",
                p.display(),
                dir.display()
            )
        })
    };
    Ok(Pem {
        cert: read("ca.crt")?,
        key: read("ca.key")?,
    })
}

pub fn run(cmd: CertCommand) -> anyhow::Result<()> {
    match cmd {
        CertCommand::NewCa { dir, days, force } => {
            if dir.join("ca.key").exists() && !force {
                bail!(
                    "{} already exists; pass --force to replace the CA",
                    dir.join("ca.key").display()
                );
            }
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let ca = dev_ca::new_ca("moe-cluster development CA", days)?;
            let (crt, key) = write_pair(&dir, "ca", &ca)?;
            println!("CA certificate {}", crt.display());
            println!("CA key         {} (keep it private)", key.display());
        }
        CertCommand::Issue {
            role,
            names,
            dir,
            out,
            days,
        } => {
            let role = Role::from(role);
            let names: Vec<String> = names
                .into_iter()
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty())
                .collect();
            let Some(first) = names.first() else {
                bail!("--name needs at least one IP address or DNS name");
            };
            let stem = out.unwrap_or_else(|| format!("{role}-{first}"));
            if stem.contains('/') || stem == "ca" {
                bail!("--out {stem:?}: a plain file name other than \"ca\"");
            }
            let ca = read_ca(&dir)?;
            let pem = dev_ca::issue(&ca, role, &names, days)?;
            let (crt, key) = write_pair(&dir, &stem, &pem)?;
            println!(
                "{role} certificate {} for {}",
                crt.display(),
                names.join(", ")
            );
            println!(
                "use: --tls-cert {} --tls-key {} --tls-ca {}",
                crt.display(),
                key.display(),
                dir.join("ca.crt").display()
            );
        }
    }
    Ok(())
}
