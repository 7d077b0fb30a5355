//! The client side: a rustls config that presents the [`Material`]'s certificate and
//! verifies the server's against the current CA, its address and its role, and a
//! connector for tonic channels.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tonic::transport::Uri;

use crate::role::{self, Role};
use crate::{Material, TlsError};

#[derive(Debug)]
struct Resolver(Arc<Material>);

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The CA chain and the name (WebPKI rules), then `role`.
#[derive(Debug)]
struct RoleServerVerifier {
    material: Arc<Material>,
    role: Role,
}

impl RoleServerVerifier {
    fn verifier(&self) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        self.material
            .current()
            .verifiers
            .as_ref()
            .map(|v| v.server.clone())
            .ok_or_else(|| rustls::Error::General("no CA to verify servers with".into()))
    }
}

impl ServerCertVerifier for RoleServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.verifier()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp,
            now,
        )?;
        role::require(end_entity, self.role).map_err(rustls::Error::General)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.material
            .provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client config for `material` that accepts only servers with `server_role`. ALPN h2.
pub fn config(material: Arc<Material>, server_role: Role) -> Result<Arc<ClientConfig>, TlsError> {
    if !material.verifies_peers() {
        return Err(TlsError::Config(
            "verifying servers needs a CA file (--tls-ca)".into(),
        ));
    }
    let mut cfg = ClientConfig::builder_with_provider(material.provider().clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(RoleServerVerifier {
            material: material.clone(),
            role: server_role,
        }))
        .with_client_cert_resolver(Arc::new(Resolver(material)));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Connects to `http://host:port` URIs over TLS (for
/// `tonic::transport::Endpoint::connect_with_connector*`): TCP_NODELAY, the handshake
/// against the URI's host (an IP address or DNS name), both bounded by `timeout`.
#[derive(Clone)]
pub struct Connector {
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl Connector {
    pub fn new(config: Arc<ClientConfig>, timeout: Duration) -> Connector {
        Connector {
            tls: tokio_rustls::TlsConnector::from(config),
            timeout,
        }
    }
}

type Io = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<Uri> for Connector {
    type Response = Io;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Io>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (tls, timeout) = (self.tls.clone(), self.timeout);
        Box::pin(async move {
            let invalid = |what: &str| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{what} in {uri}"))
            };
            let host = uri.host().ok_or_else(|| invalid("no host"))?.to_owned();
            let port = uri.port_u16().ok_or_else(|| invalid("no port"))?;
            // IPv6 literals come bracketed in URIs.
            let bare = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let name = ServerName::try_from(bare.clone()).map_err(|_| invalid("bad host name"))?;
            let connect = async {
                let tcp = TcpStream::connect((bare.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                tls.connect(name, tcp).await
            };
            match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(s)) => Ok(TokioIo::new(s)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "TLS connect to {host}:{port} took over {} ms",
                        timeout.as_millis()
                    ),
                )),
            }
        })
    }
}
