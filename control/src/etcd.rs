//! Connecting to etcd: the configuration, deadlines on every call, reconnect backoff,
//! and a cached client for one-shot requests.
//!
//! Why fresh clients: etcd-client does not recover a watch or keep-alive stream whose
//! connection broke, and a long-lived channel may sit in its own reconnect backoff after
//! etcd returns. Every long-running task here (keep-alive, watch, campaign) therefore
//! drops its client on the first error and connects anew after a backoff; one-shot calls
//! go through [`EtcdClient`], which forgets its client on any failure.
//!
//! No global request timeout is set on the channel: a campaign legitimately blocks until
//! elected. Unary calls get their deadline from `deadline()` instead, and open streams
//! are checked by HTTP/2 keep-alive pings, so a silent peer is noticed too.

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tokio::sync::Mutex;

use crate::error::ControlError;
use crate::keys::ClusterKeys;

/// Where etcd is and how patient to be with it.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key layout of the cluster these handles serve.
    pub keys: ClusterKeys,
    /// Deadline to establish a connection.
    pub connect_timeout: Duration,
    /// Deadline of every unary request (get, put, txn, lease grant, keep-alive reply).
    pub request_timeout: Duration,
    /// HTTP/2 ping interval on connections with open streams (watches, keep-alives):
    /// notices a silent peer. At least 5 s: etcd's `--grpc-keepalive-min-time` default,
    /// below which it closes the connection for pinging too often.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is declared dead.
    pub keepalive_timeout: Duration,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// TLS to etcd (`https://` endpoints): files read at every (re)connection, so a
    /// rotated certificate is used from the next reconnect on.
    pub tls: Option<EtcdTls>,
    /// etcd user and password (etcd's own authentication; etcd must have auth enabled).
    pub auth: Option<EtcdAuth>,
}

/// An etcd user and its password (`Debug` leaves the password out).
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdAuth {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAuth")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Where the etcd TLS files are (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed etcd's server certificate.
    pub ca: std::path::PathBuf,
    /// A client certificate and key, for etcd's `--client-cert-auth`.
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl EtcdTls {
    fn options(&self) -> Result<TlsOptions, ControlError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| {
                ControlError::invalid("etcd TLS", format!("cannot read {}: {e}", p.display()))
            })
        };
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&self.ca)?));
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(tls)
    }
}

impl EtcdConfig {
    /// Defaults for `endpoints` and cluster `cluster` (checked: non-empty endpoints, a
    /// cluster name usable as a key segment).
    pub fn new<S: Into<String>>(
        endpoints: impl IntoIterator<Item = S>,
        cluster: &str,
    ) -> Result<Self, ControlError> {
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        if endpoints.is_empty() || endpoints.iter().any(|e| e.trim().is_empty()) {
            return Err(ControlError::invalid(
                "etcd endpoints",
                "need at least one non-empty URL",
            ));
        }
        Ok(Self {
            endpoints,
            keys: ClusterKeys::new(cluster)?,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(3),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            tls: None,
            auth: None,
        })
    }

    /// Opens a new client (lazy: the first request makes the connection).
    pub async fn connect(&self) -> Result<Client, ControlError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(self.keepalive_interval, self.keepalive_timeout)
            // etcd refuses pings on a connection without streams; ours that matter
            // always have one open.
            .with_keep_alive_while_idle(false)
            // A member cut off from its cluster's leader fails requests instead of
            // serving stale watches forever.
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.options()?);
        }
        if let Some(auth) = &self.auth {
            options = options.with_user(auth.user.clone(), auth.password.clone());
        }
        deadline(
            self.connect_timeout,
            "connect",
            Client::connect(&self.endpoints, Some(options)),
        )
        .await
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(self.backoff_min, self.backoff_max)
    }
}

/// Runs `fut` under `limit`, naming `op` in the error.
pub(crate) async fn deadline<T>(
    limit: Duration,
    op: &'static str,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, ControlError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(ControlError::Etcd { op, source }),
        Err(_) => Err(ControlError::DeadlineExceeded { op, after: limit }),
    }
}

/// A client for one-shot requests, shared by clones, replaced after any failure.
#[derive(Clone)]
pub struct EtcdClient {
    config: Arc<EtcdConfig>,
    cached: Arc<Mutex<Option<Client>>>,
}

impl EtcdClient {
    /// A handle that connects on first use.
    pub fn new(config: EtcdConfig) -> Self {
        Self {
            config: Arc::new(config),
            cached: Arc::new(Mutex::new(None)),
        }
    }

    /// The configuration it connects with.
    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    /// Runs one request under the request deadline; a failure drops the cached client so
    /// the next call reconnects.
    pub(crate) async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, ControlError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = {
            let mut cached = self.cached.lock().await;
            match cached.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let c = self.config.connect().await?;
                    *cached = Some(c.clone());
                    c
                }
            }
        };
        let result = deadline(self.config.request_timeout, op, f(client)).await;
        if result.is_err() {
            *self.cached.lock().await = None;
        }
        result
    }
}

/// Exponential reconnect delay with jitter, reset after a success.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Self {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The delay before the next attempt: between half and all of the current step, so
    /// many clients cut off together do not come back in lockstep.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = step / 2;
        let spread = u64::try_from(half.as_micros()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_micros(random_u64() % spread)
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// A random number from the standard library's per-process hash keys: enough for jitter.
fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0x6d6f_652d_6374_726c);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, step) in delays.iter().zip([100u64, 200, 400, 800, 800, 800]) {
            assert!(
                *d >= Duration::from_millis(step / 2) && *d <= Duration::from_millis(step),
                "{delays:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn config_is_checked() {
        assert!(EtcdConfig::new(Vec::<String>::new(), "c").is_err());
        assert!(EtcdConfig::new([""], "c").is_err());
        assert!(EtcdConfig::new(["http://127.0.0.1:2379"], "a/b").is_err());
        let c = EtcdConfig::new(["http://127.0.0.1:2379"], "c").unwrap();
        assert_eq!(c.keys.placement(), "/moe/c/placement");
    }
}
