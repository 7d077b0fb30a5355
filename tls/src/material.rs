//! The key, certificate chain and CA a process uses, re-read when the files change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

use crate::role::{self, Role};
use crate::TlsError;

/// Where a process's TLS files are (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates peers must chain to (a server that verifies no client, such
    /// as a public API, needs none).
    pub ca: Option<PathBuf>,
}

/// One reading of the files.
pub(crate) struct Loaded {
    /// The raw file contents, to see whether they changed.
    raw: [Vec<u8>; 3],
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) verifiers: Option<Verifiers>,
    pub(crate) not_after: i64,
}

/// Peer verification against the CA file.
pub(crate) struct Verifiers {
    pub(crate) client: Arc<dyn ClientCertVerifier>,
    pub(crate) server: Arc<WebPkiServerVerifier>,
}

/// A process's TLS identity and trust, shared by its servers and clients. Cheap to read
/// on every handshake.
pub struct Material {
    files: TlsFiles,
    role: Option<Role>,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Loaded>>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("files", &self.files)
            .field("role", &self.role)
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

fn bad(path: &Path, what: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        what: what.into(),
    }
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

impl Material {
    /// Reads the files; with `role`, the certificate must carry it (a router started
    /// with a worker's certificate is a configuration error, found at start).
    pub fn load(files: TlsFiles, role: Option<Role>) -> Result<Arc<Material>, TlsError> {
        let provider = crate::provider();
        let loaded = Self::read_all(&files, role, &provider)?;
        Ok(Arc::new(Material {
            files,
            role,
            provider,
            current: RwLock::new(Arc::new(loaded)),
        }))
    }

    fn read_all(
        files: &TlsFiles,
        role: Option<Role>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Loaded, TlsError> {
        Self::parse(files, role, provider, Self::raw(files)?)
    }

    fn raw(files: &TlsFiles) -> Result<[Vec<u8>; 3], TlsError> {
        let ca = match &files.ca {
            Some(ca) => read(ca)?,
            None => Vec::new(),
        };
        Ok([read(&files.cert)?, read(&files.key)?, ca])
    }

    fn parse(
        files: &TlsFiles,
        role: Option<Role>,
        provider: &Arc<CryptoProvider>,
        raw: [Vec<u8>; 3],
    ) -> Result<Loaded, TlsError> {
        let chain = certs(&files.cert, &raw[0])?;
        let facts = role::facts(&chain[0]).map_err(|e| bad(&files.cert, e))?;
        if let Some(role) = role.filter(|r| !facts.roles.contains(r)) {
            return Err(bad(
                &files.cert,
                format!(
                    "a {role} needs a certificate with the URI SAN {} (`moe cert issue --role {role}`)",
                    role.uri()
                ),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&raw[1])
            .map_err(|e| bad(&files.key, format!("no usable private key: {e}")))?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| bad(&files.key, format!("unsupported private key: {e}")))?;
        let certified = CertifiedKey::new(chain, signing);
        certified.keys_match().map_err(|e| {
            bad(
                &files.key,
                format!("does not match {}: {e}", files.cert.display()),
            )
        })?;
        let verifiers = match &files.ca {
            Some(ca) => Some(Self::verifiers(ca, &raw[2], provider)?),
            None => None,
        };
        Ok(Loaded {
            raw,
            key: Arc::new(certified),
            verifiers,
            not_after: facts.not_after,
        })
    }

    fn verifiers(
        path: &Path,
        pem: &[u8],
        provider: &Arc<CryptoProvider>,
    ) -> Result<Verifiers, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in certs(path, pem)? {
            roots
                .add(ca)
                .map_err(|e| bad(path, format!("not a usable CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| bad(path, e.to_string()))?;
        let server = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| bad(path, e.to_string()))?;
        Ok(Verifiers { client, server })
    }

    /// Whether peers can be verified (a CA file was given).
    pub fn verifies_peers(&self) -> bool {
        self.current().verifiers.is_some()
    }

    pub(crate) fn current(&self) -> Arc<Loaded> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(crate) fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// The role this process's certificate must carry, if any.
    pub fn role(&self) -> Option<Role> {
        self.role
    }

    /// The files.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// When the certificate in use expires (Unix seconds).
    pub fn not_after(&self) -> i64 {
        self.current().not_after
    }

    /// Reads the files again; if their contents changed and are valid, later handshakes
    /// use them. Ok(true) when it switched. On error the old material stays in use.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let f = &self.files;
        let raw = Self::raw(f)?;
        if raw == self.current().raw {
            return Ok(false);
        }
        let loaded = Self::parse(f, self.role, &self.provider, raw)?;
        match self.current.write() {
            Ok(mut c) => *c = Arc::new(loaded),
            Err(p) => *p.into_inner() = Arc::new(loaded),
        }
        Ok(true)
    }

    /// Checks the files every `every` in a task of the current runtime. A change is
    /// logged; a broken file (a half-written rotation) is logged and retried.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut last_error = String::new();
            loop {
                tick.tick().await;
                let Some(m) = me.upgrade() else { return };
                match m.reload_if_changed() {
                    Ok(true) => {
                        last_error.clear();
                        tracing::info!(cert = %m.files.cert.display(), not_after = m.not_after(), "TLS files changed: new handshakes use them");
                    }
                    Ok(false) => last_error.clear(),
                    Err(e) => {
                        let e = e.to_string();
                        if e != last_error {
                            tracing::warn!(error = %e, "TLS files changed but cannot be used; keeping the previous ones");
                            last_error = e;
                        }
                    }
                }
            }
        })
    }
}
