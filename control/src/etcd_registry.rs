//! The etcd [`Registry`]: each worker's record at `/moe/<cluster>/workers/<id>` on its
//! own lease, and a resilient watch of that prefix.
//!
//! The keep-alive runs in its own task (one per registration) so request load cannot
//! starve it. When etcd is unreachable it reconnects with backoff; on return it keeps
//! the old lease if etcd still has it, or registers again under a fresh one (state
//! [`RegistrationState::Reregistered`]). The record is re-put on every reconnection,
//! which also restores it if someone deleted the key by hand.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use etcd_client::{GetOptions, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::ControlError;
use crate::etcd::{deadline, Backoff, EtcdConfig};
use crate::etcd_mirror::{spawn_mirror, Entries, KeyRange};
use crate::keys::check_name;
use crate::lease::{KeepAlive, LeaseSlot, SessionEnd};
use crate::live_view::LiveView;
use crate::membership::{
    Membership, Registration, RegistrationState, Registry, RevokeReply, WorkerRecord,
};

/// Membership in etcd. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EtcdRegistry {
    config: EtcdConfig,
}

impl EtcdRegistry {
    /// A registry that connects lazily: nothing fails if etcd is down now.
    pub fn new(config: EtcdConfig) -> Self {
        Self { config }
    }

    /// A registry for `endpoints` and `cluster` with default timeouts, after checking
    /// once that etcd answers (a clear startup error for a wrong address).
    pub async fn connect<S: Into<String>>(
        endpoints: impl IntoIterator<Item = S>,
        cluster: &str,
    ) -> Result<Self, ControlError> {
        let registry = Self::new(EtcdConfig::new(endpoints, cluster)?);
        registry.check().await?;
        Ok(registry)
    }

    /// Checks that etcd answers a read within the request deadline.
    pub async fn check(&self) -> Result<(), ControlError> {
        let mut client = self.config.connect().await?;
        let key = self.config.keys.workers_prefix();
        let options = GetOptions::new().with_prefix().with_count_only();
        deadline(
            self.config.request_timeout,
            "get",
            client.get(key, Some(options)),
        )
        .await?;
        Ok(())
    }

    /// The configuration it connects with.
    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }
}

impl EtcdRegistry {
    /// Keeps `value` at `key` under a lease of `ttl` (kept alive at TTL/2, re-granted
    /// after expiry, re-put on reconnection), as a worker's record is kept; `id` names
    /// the registration.
    pub(crate) fn announce(
        &self,
        id: String,
        key: String,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<Registration, ControlError> {
        let (state_tx, state_rx) = watch::channel(RegistrationState::Registering);
        let (value_tx, value_rx) = watch::channel(value);
        let keeper = Keeper {
            key,
            config: self.config.clone(),
            value: value_rx,
            lease: LeaseSlot::new(ttl)?,
            announced: None,
            registrations: 0,
            state: state_tx,
        };
        let (revoke_tx, revoke_rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let guard = stop.clone().drop_guard();
        tokio::spawn(keeper.run(stop, revoke_rx));
        Ok(Registration::new(id, state_rx, revoke_tx, value_tx, guard))
    }

    /// Announces a router at `/moe/<cluster>/routers/<id>` under a lease of `ttl`; the
    /// controller reads which placement version every router routes by from these.
    pub fn register_router(
        &self,
        record: &RouterRecord,
        ttl: Duration,
    ) -> Result<RouterPresence, ControlError> {
        check_name("router_id", &record.router_id)?;
        let value = serde_json::to_vec(record)
            .map_err(|e| ControlError::invalid("router record", e.to_string()))?;
        let key = self.config.keys.router(&record.router_id);
        Ok(RouterPresence {
            record: record.clone(),
            registration: self.announce(record.router_id.clone(), key, value, ttl)?,
        })
    }

    /// The live routers: router id → record.
    pub fn watch_routers(&self) -> LiveView<BTreeMap<String, RouterRecord>> {
        let range = KeyRange::Prefix(self.config.keys.routers_prefix());
        spawn_mirror(self.config.clone(), range, |entries: &Entries| {
            entries
                .iter()
                .filter_map(|(id, e)| {
                    serde_json::from_slice::<RouterRecord>(&e.value)
                        .ok()
                        .map(|r| (id.clone(), r))
                })
                .collect()
        })
    }
}

/// What a router announces: who it is and which placement version it routes by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterRecord {
    /// Unique id among the cluster's routers.
    pub router_id: String,
    /// Its client-facing gRPC address.
    pub address: String,
    /// The placement version its routes follow (0: none yet).
    pub placement_version: u64,
}

/// A router's presence in etcd; [`set_version`](Self::set_version) reports a switch.
#[derive(Debug)]
pub struct RouterPresence {
    record: RouterRecord,
    registration: Registration,
}

impl RouterPresence {
    /// Reports that the router's routes now follow placement `version`.
    pub fn set_version(&mut self, version: u64) {
        if self.record.placement_version == version {
            return;
        }
        self.record.placement_version = version;
        if let Ok(value) = serde_json::to_vec(&self.record) {
            self.registration.update_raw(value);
        }
    }

    /// Leaves at once (the key goes with the revoked lease).
    pub async fn revoke(self) -> Result<(), ControlError> {
        self.registration.revoke().await
    }
}

impl Registry for EtcdRegistry {
    fn register(&self, record: WorkerRecord, ttl: Duration) -> Result<Registration, ControlError> {
        record.validate()?;
        let value = serde_json::to_vec(&record)
            .map_err(|e| ControlError::invalid("worker record", e.to_string()))?;
        let key = self.config.keys.worker(&record.worker_id);
        self.announce(record.worker_id, key, value, ttl)
    }

    fn watch_workers(&self) -> LiveView<Membership> {
        let range = KeyRange::Prefix(self.config.keys.workers_prefix());
        spawn_mirror(self.config.clone(), range, decode_members)
    }
}

/// Decodes the workers prefix; a record that does not parse is left out (and logged).
fn decode_members(entries: &Entries) -> Membership {
    entries
        .iter()
        .filter_map(
            |(id, e)| match serde_json::from_slice::<WorkerRecord>(&e.value) {
                Ok(r) => Some((id.clone(), r)),
                Err(err) => {
                    warn!(worker = %id, error = %err, "ignoring an undecodable worker record");
                    None
                }
            },
        )
        .collect()
}

/// The task behind an etcd [`Registration`].
struct Keeper {
    config: EtcdConfig,
    key: String,
    /// The value to keep at `key`; a change is put under the same lease.
    value: watch::Receiver<Vec<u8>>,
    lease: LeaseSlot,
    /// The lease under which the record was last announced as registered.
    announced: Option<i64>,
    registrations: u64,
    state: watch::Sender<RegistrationState>,
}

enum Wake {
    Stop,
    Revoke(RevokeReply),
    Ended(SessionEnd),
}

impl Keeper {
    async fn run(mut self, stop: CancellationToken, mut revoke: mpsc::Receiver<RevokeReply>) {
        let mut backoff = self.config.backoff();
        loop {
            // A closed revoke channel means the handle was dropped: `stop` fires too, and
            // a dropped registration must expire, not be revoked.
            let wake = tokio::select! {
                _ = stop.cancelled() => Wake::Stop,
                Some(reply) = revoke.recv() => Wake::Revoke(reply),
                end = self.session(&mut backoff) => Wake::Ended(end),
            };
            let delay = match wake {
                Wake::Stop => return,
                Wake::Revoke(reply) => return self.leave(reply).await,
                Wake::Ended(SessionEnd::LeaseExpired | SessionEnd::Deposed) => {
                    info!(key = %self.key, "registration lease expired; registering again");
                    self.lease.forget();
                    Duration::ZERO
                }
                Wake::Ended(SessionEnd::Failed(e)) => {
                    let was = self.state.send_replace(RegistrationState::Disconnected);
                    if was.is_registered() {
                        warn!(key = %self.key, error = %e, "etcd unreachable; keeping the registration alive with backoff");
                    }
                    backoff.next_delay()
                }
            };
            let wake = tokio::select! {
                _ = stop.cancelled() => Some(Wake::Stop),
                Some(reply) = revoke.recv() => Some(Wake::Revoke(reply)),
                _ = tokio::time::sleep(delay) => None,
            };
            match wake {
                Some(Wake::Stop) => return,
                Some(Wake::Revoke(reply)) => return self.leave(reply).await,
                Some(Wake::Ended(_)) | None => {}
            }
        }
    }

    /// Graceful leave: revoke the lease so the record goes at once.
    async fn leave(mut self, reply: RevokeReply) {
        let result = self.lease.revoke(&self.config).await;
        match &result {
            Ok(()) => info!(key = %self.key, "registration revoked"),
            Err(e) => {
                warn!(key = %self.key, error = %e, "revoke failed; the record expires by TTL")
            }
        }
        self.state.send_replace(RegistrationState::Revoked);
        let _ = reply.send(result);
    }

    async fn session(&mut self, backoff: &mut Backoff) -> SessionEnd {
        match self.try_session(backoff).await {
            Ok(never) => match never {},
            Err(end) => end,
        }
    }

    /// One connection's worth of registration: (re)register, then keep alive.
    async fn try_session(&mut self, backoff: &mut Backoff) -> Result<Infallible, SessionEnd> {
        let timeout = self.config.request_timeout;
        let mut client = self.config.connect().await?;
        let lease = self.lease.acquire(&mut client, timeout).await?;
        let keep_alive = KeepAlive::start(&mut client, lease, self.lease.period(), timeout).await?;
        let put = PutOptions::new().with_lease(lease);
        let value = self.value.borrow_and_update().clone();
        deadline(
            timeout,
            "put",
            client.put(self.key.clone(), value, Some(put.clone())),
        )
        .await?;
        // Registered from here on: count it before anything else can fail.
        if self.announced != Some(lease) {
            self.registrations += 1;
            self.announced = Some(lease);
            if self.registrations > 1 {
                info!(key = %self.key, lease, "registered again under a fresh lease");
            }
        }
        let state = match self.registrations {
            1 => RegistrationState::Connected { lease },
            n => RegistrationState::Reregistered {
                lease,
                times: n - 1,
            },
        };
        if self.state.send_replace(state) == RegistrationState::Disconnected {
            info!(key = %self.key, lease, "etcd reachable again; registration kept alive");
        }
        backoff.reset();
        let keep_alive = keep_alive.run();
        tokio::pin!(keep_alive);
        loop {
            tokio::select! {
                end = &mut keep_alive => return Err(end),
                changed = self.value.changed() => {
                    if changed.is_err() {
                        // The handle is gone; `stop` ends this task soon.
                        return Err((&mut keep_alive).await);
                    }
                    let value = self.value.borrow_and_update().clone();
                    // The keep-alive goes on while the update is written.
                    let write = deadline(
                        timeout,
                        "put",
                        client.put(self.key.clone(), value, Some(put.clone())),
                    );
                    tokio::select! {
                        end = &mut keep_alive => return Err(end),
                        r = write => { r?; }
                    }
                    debug!(key = %self.key, "record updated");
                }
            }
        }
    }
}
