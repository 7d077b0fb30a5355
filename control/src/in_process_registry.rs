//! The registry without etcd: standalone mode (router and experts in one process) and
//! static `--workers` lists.
//!
//! Same semantics as the etcd registry, kept in memory: a registration dropped without
//! revoking disappears once its TTL has passed, a revoked one at once, a newer
//! registration of the same id replaces the older (whose expiry then leaves it alone).
//! Static workers never expire. It is always "connected".

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::error::ControlError;
use crate::lease::LeaseSlot;
use crate::live_view::{ConnectionState, LiveView};
use crate::membership::{
    Membership, Registration, RegistrationState, Registry, RevokeReply, WorkerRecord,
};

/// An in-memory [`Registry`]. Clones share the same membership.
#[derive(Clone)]
pub struct InProcessRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    workers: watch::Sender<Membership>,
    connection: watch::Sender<ConnectionState>,
    /// Worker id → the registration that owns its record (0: static).
    owners: Mutex<HashMap<String, u64>>,
    next_id: AtomicU64,
}

impl Default for InProcessRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl InProcessRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                workers: watch::Sender::new(Membership::new()),
                connection: watch::Sender::new(ConnectionState::Connected),
                owners: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// A registry holding a static membership (`--workers`): these never expire.
    pub fn with_static_workers(
        records: impl IntoIterator<Item = WorkerRecord>,
    ) -> Result<Self, ControlError> {
        let registry = Self::new();
        for r in records {
            r.validate()?;
            registry.inner.insert(0, r);
        }
        Ok(registry)
    }
}

impl Inner {
    fn insert(&self, owner: u64, record: WorkerRecord) {
        let mut owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        owners.insert(record.worker_id.clone(), owner);
        self.workers.send_modify(|m| {
            m.insert(record.worker_id.clone(), record);
        });
    }

    /// Replaces the record if registration `owner` still owns its id (a newer
    /// registration of the same id is not taken over by an old handle's update).
    fn update_if_owner(&self, owner: u64, record: WorkerRecord) {
        let owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        if owners.get(&record.worker_id) == Some(&owner) {
            self.workers.send_modify(|m| {
                m.insert(record.worker_id.clone(), record);
            });
        }
    }

    /// Removes `id` if registration `owner` still owns it.
    fn remove_if_owner(&self, id: &str, owner: u64) {
        let mut owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
        if owners.get(id) == Some(&owner) {
            owners.remove(id);
            self.workers.send_modify(|m| {
                m.remove(id);
            });
        }
    }
}

impl Registry for InProcessRegistry {
    fn register(&self, record: WorkerRecord, ttl: Duration) -> Result<Registration, ControlError> {
        record.validate()?;
        LeaseSlot::new(ttl)?; // the same TTL rules as etcd
        let owner = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let id = record.worker_id.clone();
        self.inner.insert(owner, record);
        let (state_tx, state_rx) = watch::channel(RegistrationState::Connected {
            lease: owner as i64,
        });
        let (revoke_tx, mut revoke_rx) = mpsc::channel::<RevokeReply>(1);
        let stop = CancellationToken::new();
        let guard = stop.clone().drop_guard();
        let inner = self.inner.clone();
        let task_id = id.clone();
        let (value_tx, mut value_rx) = watch::channel(Vec::new());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        // Dropped without revoking: expire as a crashed worker's lease would.
                        tokio::time::sleep(ttl).await;
                        inner.remove_if_owner(&task_id, owner);
                        return;
                    }
                    Some(reply) = revoke_rx.recv() => {
                        inner.remove_if_owner(&task_id, owner);
                        state_tx.send_replace(RegistrationState::Revoked);
                        let _ = reply.send(Ok(()));
                        return;
                    }
                    Ok(()) = value_rx.changed() => {
                        let value = value_rx.borrow_and_update().clone();
                        match serde_json::from_slice::<WorkerRecord>(&value) {
                            Ok(r) => inner.update_if_owner(owner, r),
                            Err(e) => tracing::warn!(worker = %task_id, error = %e, "ignoring an undecodable record update"),
                        }
                    }
                }
            }
        });
        Ok(Registration::new(id, state_rx, revoke_tx, value_tx, guard))
    }

    fn watch_workers(&self) -> LiveView<Membership> {
        LiveView::new(
            self.inner.workers.subscribe(),
            self.inner.connection.subscribe(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::tests::record;

    #[tokio::test(start_paused = true)]
    async fn revoke_removes_at_once_and_drop_expires_after_the_ttl() {
        let reg = InProcessRegistry::new();
        let view = reg.watch_workers();
        assert!(view.is_connected());
        let ttl = Duration::from_secs(5);
        let a = reg.register(record("a"), ttl).unwrap();
        let b = reg.register(record("b"), ttl).unwrap();
        a.wait_registered(Duration::from_secs(1)).await.unwrap();
        assert_eq!(view.current().keys().collect::<Vec<_>>(), ["a", "b"]);

        a.revoke().await.unwrap();
        assert_eq!(view.current().keys().collect::<Vec<_>>(), ["b"]);

        let mut rx = view.subscribe();
        let dropped_at = tokio::time::Instant::now();
        drop(b);
        rx.wait_for(|m| m.is_empty()).await.unwrap();
        assert!(dropped_at.elapsed() >= ttl);
    }

    #[tokio::test(start_paused = true)]
    async fn a_newer_registration_survives_the_older_ones_expiry() {
        let reg = InProcessRegistry::new();
        let ttl = Duration::from_secs(5);
        let old = reg.register(record("w"), ttl).unwrap();
        drop(old);
        let mut newer = record("w");
        newer.address = "10.0.0.2:1".into();
        let _new = reg.register(newer.clone(), ttl).unwrap();
        tokio::time::sleep(ttl * 2).await; // paused clock: advances instantly
        assert_eq!(reg.watch_workers().current()["w"], newer);
    }

    #[tokio::test]
    async fn static_workers_never_expire_and_bad_input_is_refused() {
        // Used behind `dyn Registry`, as the router and worker hold it.
        let reg: Arc<dyn Registry> =
            Arc::new(InProcessRegistry::with_static_workers([record("s0"), record("s1")]).unwrap());
        assert_eq!(reg.watch_workers().current().len(), 2);
        assert!(InProcessRegistry::with_static_workers([record("")]).is_err());
        assert!(reg.register(record("x"), Duration::ZERO).is_err());
    }
}
