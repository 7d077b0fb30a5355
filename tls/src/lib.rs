//! moe-tls: mutual TLS between the processes of a cluster.
//!
//! Every router and worker holds a certificate signed by the cluster CA. Its **role** is
//! a URI subject alternative name, `spiffe://moe-cluster/role/router` or
//! `spiffe://moe-cluster/role/worker` ([`Role`]): the SPIFFE form, which cert-manager
//! and other issuers write with a `uris:` entry.
//!
//! - Workers ([`server`]) accept `ExpertService` calls only from clients that presented a
//!   CA-signed certificate with the router role; a client certificate is optional at the
//!   handshake so that health probes (which have none) still connect, and a presented
//!   certificate of another CA or role fails the handshake.
//! - Routers ([`client`]) verify a worker's certificate against the address it
//!   advertises (an IP or DNS subject alternative name) and require the worker role.
//! - Files are re-read when their contents change ([`Material::watch`]): Kubernetes
//!   rotates Secrets in place. New handshakes use the new files; open connections and
//!   their streams carry on.
//! - [`dev_ca`] makes a development CA and certificates (`moe cert`).
//!
//! rustls with the ring provider, chosen explicitly (no process-wide default).

use std::path::PathBuf;
use std::sync::Arc;

pub mod client;
pub mod dev_ca;
mod material;
pub mod role;
pub mod server;

pub use material::{Material, TlsFiles};
pub use role::Role;
pub use rustls::{ClientConfig, ServerConfig};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    File { path: PathBuf, what: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("making a certificate: {0}")]
    Generate(String),
}

/// The crypto provider every config of this crate uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
