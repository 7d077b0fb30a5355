//! Roles carried in certificates as SPIFFE-style URI subject alternative names.

use std::fmt;
use std::str::FromStr;

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The trust domain of the role URIs.
pub const TRUST_DOMAIN: &str = "moe-cluster";

/// What a process of the cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Router,
    Worker,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::Router, Role::Worker];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Router => "router",
            Role::Worker => "worker",
        }
    }

    /// The URI subject alternative name that grants this role.
    pub fn uri(self) -> String {
        format!("spiffe://{TRUST_DOMAIN}/role/{}", self.as_str())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?} (router or worker)"))
    }
}

/// What a certificate says about itself: its roles and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    pub roles: Vec<Role>,
    /// `notAfter`, Unix seconds.
    pub not_after: i64,
}

/// Reads the roles and expiry of a DER certificate.
pub fn facts(cert: &CertificateDer<'_>) -> Result<CertFacts, String> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut roles = Vec::new();
    let san = x509
        .subject_alternative_name()
        .map_err(|e| format!("bad subject alternative names: {e}"))?;
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                roles.extend(Role::ALL.into_iter().filter(|r| *uri == r.uri()));
            }
        }
    }
    Ok(CertFacts {
        roles,
        not_after: x509.validity().not_after.timestamp(),
    })
}

/// Checks that `cert` carries `role`; the error says what it carries instead.
pub fn require(cert: &CertificateDer<'_>, role: Role) -> Result<(), String> {
    let f = facts(cert)?;
    if f.roles.contains(&role) {
        Ok(())
    } else {
        let has: Vec<&str> = f.roles.iter().map(|r| r.as_str()).collect();
        Err(format!(
            "the certificate lacks the {role} role (URI SAN {}); it has {:?}",
            role.uri(),
            has
        ))
    }
}
