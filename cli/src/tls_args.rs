//! TLS flags shared by `moe router`, `moe serve` and `moe worker`: the cluster's mutual
//! TLS (router ↔ worker), the public API's TLS (router), and etcd's TLS and auth.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use moe_control::{EtcdAuth, EtcdConfig, EtcdTls};
use moe_tls::{Material, Role, TlsFiles};

/// Mutual TLS between routers and workers.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterTlsArgs {
    /// This process's certificate (PEM, leaf first), signed by the cluster CA and
    /// carrying its role as a URI SAN (`moe cert issue`). Routers and workers need it
    /// unless `--insecure`.
    #[arg(long, env = "MOE_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "MOE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA (PEM; several certificates during a CA rotation).
    #[arg(long, env = "MOE_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Run router ↔ worker traffic without TLS: anyone who can reach a worker's port can
    /// then call ExpertService (load, unload, compute). For a trusted network only.
    #[arg(long, env = "MOE_INSECURE", conflicts_with = "tls_cert")]
    pub insecure: bool,
    /// How often certificate, key and CA files are re-read (seconds); changed files are
    /// used by new connections without a restart.
    #[arg(long, env = "MOE_TLS_RELOAD_SECS", default_value_t = 5)]
    pub tls_reload_secs: u64,
}

impl ClusterTlsArgs {
    /// The process's mutual-TLS material for `role`, or `None` with `--insecure`;
    /// an error when neither was asked for.
    pub fn material(&self, role: Role) -> anyhow::Result<Option<Arc<Material>>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                let files = TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: Some(ca.clone()),
                };
                Ok(Some(
                    Material::load(files, Some(role)).context("--tls-cert/--tls-key/--tls-ca")?,
                ))
            }
            _ if self.insecure => {
                tracing::warn!("--insecure: router-worker traffic is neither encrypted nor authenticated; any process that can reach a worker's gRPC port can load, unload and compute experts");
                Ok(None)
            }
            _ => anyhow::bail!(
                "a {role} needs mutual TLS: --tls-cert, --tls-key and --tls-ca (make them with \
                 `moe cert new-ca` and `moe cert issue --role {role} --name ADDRESS`), or \
                 --insecure to run without"
            ),
        }
    }

    pub fn reload_every(&self) -> Duration {
        Duration::from_secs(self.tls_reload_secs.max(1))
    }
}

/// TLS on a router's client-facing ports.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiTlsArgs {
    /// Serve the client APIs (gRPC and HTTP ports) over TLS with this certificate (PEM,
    /// leaf first; any issuer, no role needed).
    #[arg(long, env = "MOE_API_TLS_CERT", requires = "api_tls_key")]
    pub api_tls_cert: Option<PathBuf>,
    /// The API certificate's private key (PEM).
    #[arg(long, env = "MOE_API_TLS_KEY", requires = "api_tls_cert")]
    pub api_tls_key: Option<PathBuf>,
}

impl ApiTlsArgs {
    pub fn material(&self) -> anyhow::Result<Option<Arc<Material>>> {
        let (Some(cert), Some(key)) = (&self.api_tls_cert, &self.api_tls_key) else {
            return Ok(None);
        };
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: None,
        };
        Ok(Some(
            Material::load(files, None).context("--api-tls-cert/--api-tls-key")?,
        ))
    }
}

/// TLS and authentication towards etcd.
#[derive(clap::Args, Debug, Clone)]
pub struct EtcdSecurityArgs {
    /// The CA of etcd's server certificate (PEM); the `--etcd` URLs must be https://.
    #[arg(long, env = "MOE_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate for etcd's `--client-cert-auth` (PEM).
    #[arg(long, env = "MOE_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<PathBuf>,
    /// The etcd client certificate's key (PEM).
    #[arg(long, env = "MOE_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (etcd's own authentication).
    #[arg(long, env = "MOE_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// A file holding the etcd user's password (not a flag value: flags show in `ps`).
    #[arg(long, env = "MOE_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdSecurityArgs {
    /// The TLS and auth settings for `endpoints` (TLS needs https:// endpoints).
    pub fn resolve(
        &self,
        endpoints: &[String],
    ) -> anyhow::Result<(Option<EtcdTls>, Option<EtcdAuth>)> {
        let tls = match &self.etcd_ca {
            Some(ca) => {
                anyhow::ensure!(
                    endpoints.iter().all(|e| e.starts_with("https://")),
                    "--etcd-ca needs https:// --etcd endpoints (got {endpoints:?})"
                );
                Some(EtcdTls {
                    ca: ca.clone(),
                    identity: self.etcd_cert.clone().zip(self.etcd_key.clone()),
                })
            }
            None => None,
        };
        let auth = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(user), Some(file)) => {
                let password = std::fs::read_to_string(file)
                    .with_context(|| format!("reading --etcd-password-file {}", file.display()))?;
                Some(EtcdAuth {
                    user: user.clone(),
                    password: password.trim_end_matches(['\r', '\n']).to_owned(),
                })
            }
            _ => None,
        };
        Ok((tls, auth))
    }

    /// Applies the flags to `cfg`.
    pub fn apply(&self, cfg: &mut EtcdConfig) -> anyhow::Result<()> {
        (cfg.tls, cfg.auth) = self.resolve(&cfg.endpoints)?;
        Ok(())
    }
}
