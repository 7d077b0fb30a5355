//! The etcd key layout of one cluster (DESIGN.md §4), in one place.
//!
//! Everything lives under `/moe/<cluster>/`: `workers/<id>` (membership, leased),
//! `placement` (the versioned placement), `routers/<id>` (each router and the placement
//! version it routes by, leased), `ready/<worker>` (reserved by DESIGN.md for the
//! placement version a worker has loaded; unused, since the controller publishes only
//! after `LoadExperts` acknowledged, see docs/architecture.md), `load/<router>` (a router's routed-token counts per expert over
//! its last window, leased) and `controller` (the election of the placement controller;
//! etcd's election API keeps its candidates under `controller/<lease id in hex>`).

use crate::error::ControlError;

/// Key names of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterKeys {
    root: String,
}

impl ClusterKeys {
    /// Keys of cluster `cluster`: letters, digits, `-`, `_` and `.` only.
    pub fn new(cluster: &str) -> Result<Self, ControlError> {
        check_name("cluster", cluster)?;
        Ok(Self {
            root: format!("/moe/{cluster}/"),
        })
    }

    /// `/moe/<cluster>/workers/`: the membership prefix.
    pub fn workers_prefix(&self) -> String {
        format!("{}workers/", self.root)
    }

    /// `/moe/<cluster>/workers/<id>`.
    pub fn worker(&self, id: &str) -> String {
        format!("{}{id}", self.workers_prefix())
    }

    /// `/moe/<cluster>/placement`.
    pub fn placement(&self) -> String {
        format!("{}placement", self.root)
    }

    /// `/moe/<cluster>/ready/`: the readiness prefix.
    pub fn ready_prefix(&self) -> String {
        format!("{}ready/", self.root)
    }

    /// `/moe/<cluster>/ready/<worker>`.
    pub fn ready(&self, worker: &str) -> String {
        format!("{}{worker}", self.ready_prefix())
    }

    /// `/moe/<cluster>/routers/`: the routers' presence prefix.
    pub fn routers_prefix(&self) -> String {
        format!("{}routers/", self.root)
    }

    /// `/moe/<cluster>/routers/<id>`: a router and the placement version it routes by.
    pub fn router(&self, id: &str) -> String {
        format!("{}{id}", self.routers_prefix())
    }

    /// `/moe/<cluster>/load/`: the prefix of the routers' load reports.
    pub fn load_prefix(&self) -> String {
        format!("{}load/", self.root)
    }

    /// `/moe/<cluster>/load/<router>`.
    pub fn load(&self, router: &str) -> String {
        format!("{}{router}", self.load_prefix())
    }

    /// `/moe/<cluster>/controller`: the election name of the placement controller.
    pub fn controller(&self) -> String {
        format!("{}controller", self.root)
    }

    /// `/moe/<cluster>/controller/`: where etcd keeps the election's candidates.
    pub fn controller_candidates(&self) -> String {
        format!("{}/", self.controller())
    }
}

/// An id for a process named after its address, usable as one key segment:
/// `id_from_address("worker", "10.0.0.7:50061")` is `worker-10.0.0.7-50061`.
pub fn id_from_address(prefix: &str, address: &str) -> String {
    let mut id = format!("{prefix}-");
    for c in address.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '.' {
            c
        } else {
            '-'
        };
        if !(c == '-' && id.ends_with('-')) {
            id.push(c);
        }
    }
    id.trim_end_matches('-').to_owned()
}

/// The address others should dial to reach a listener bound at `bound`: `bound` itself,
/// unless it is an unspecified address (`0.0.0.0`, `[::]`), in which case this host's
/// name is resolved (through `/etc/hosts`, where Docker and Kubernetes write the
/// container's or pod's own IP) and its first non-loopback address is used, IPv4 first.
/// Falls back to `bound` when nothing resolves.
pub fn advertise_address(bound: std::net::SocketAddr) -> String {
    use std::net::ToSocketAddrs;
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok());
    let Some(host) = host else {
        return bound.to_string();
    };
    let mut addrs: Vec<std::net::SocketAddr> = match (host.as_str(), bound.port()).to_socket_addrs()
    {
        Ok(a) => a.filter(|a| !a.ip().is_loopback()).collect(),
        Err(_) => Vec::new(),
    };
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs
        .first()
        .map_or_else(|| bound.to_string(), |a| a.to_string())
}

/// Checks an id used as one key segment: non-empty, no `/`, printable ASCII.
pub(crate) fn check_name(field: &'static str, name: &str) -> Result<(), ControlError> {
    if name.is_empty() {
        return Err(ControlError::invalid(field, "must not be empty"));
    }
    if name.len() > 200 {
        return Err(ControlError::invalid(field, "longer than 200 bytes"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(ControlError::invalid(
            field,
            format!("{name:?} contains {c:?}; use letters, digits, '-', '_', '.', ':'"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_design() {
        let k = ClusterKeys::new("prod-1").unwrap();
        assert_eq!(k.worker("w0"), "/moe/prod-1/workers/w0");
        assert_eq!(k.workers_prefix(), "/moe/prod-1/workers/");
        assert_eq!(k.placement(), "/moe/prod-1/placement");
        assert_eq!(k.ready("w0"), "/moe/prod-1/ready/w0");
        assert_eq!(k.load_prefix(), "/moe/prod-1/load/");
        assert_eq!(k.load("r0"), "/moe/prod-1/load/r0");
        assert_eq!(k.controller(), "/moe/prod-1/controller");
        assert_eq!(k.router("r0"), "/moe/prod-1/routers/r0");
        assert_eq!(k.controller_candidates(), "/moe/prod-1/controller/");
    }

    #[test]
    fn ids_from_addresses_are_valid_key_segments() {
        assert_eq!(
            id_from_address("worker", "10.0.0.7:50061"),
            "worker-10.0.0.7-50061"
        );
        assert_eq!(id_from_address("worker", "[::1]:5"), "worker-1-5");
        assert_eq!(
            id_from_address("router", "127.0.0.1:50051"),
            "router-127.0.0.1-50051"
        );
        assert!(check_name("id", &id_from_address("router", "[fe80::1%eth0]:9")).is_ok());
    }

    #[test]
    fn bad_names_are_refused_with_the_field() {
        for bad in ["", "a/b", "a b", "ü"] {
            let err = ClusterKeys::new(bad).unwrap_err();
            assert!(err.to_string().starts_with("invalid cluster"), "{err}");
        }
    }
}
