//! Cluster membership: what a worker announces ([`WorkerRecord`]), how it stays
//! announced ([`Registration`]), and the [`Registry`] both workers and routers talk to.
//!
//! Two registries share these semantics: [`EtcdRegistry`](crate::EtcdRegistry) (records
//! under `/moe/<cluster>/workers/<id>`, each on its own lease) and
//! [`InProcessRegistry`](crate::InProcessRegistry) (standalone mode and static
//! `--workers` lists, no etcd). A registration that is dropped without
//! [`Registration::revoke`] disappears once its TTL has passed, as a crashed worker's
//! would; a revoked one disappears at once.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::DropGuard;

use crate::error::ControlError;
use crate::keys::check_name;
use crate::live_view::LiveView;

/// One device of a worker that can host experts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Device name on its worker, e.g. `cpu:0`, `cuda:1`.
    pub name: String,
    /// Bytes available for expert weights; 0 means unlimited.
    pub capacity_bytes: u64,
    /// What computes its experts: `cpu` (the CPU kernel), `candle-cpu`, `cuda` (empty
    /// from workers older than this field).
    #[serde(default)]
    pub kind: String,
    /// The precision its experts are stored in: `f32`, `bf16`, `int8` (empty: unknown).
    #[serde(default)]
    pub dtype: String,
    /// Bytes one expert takes on it, at that precision; the planner sizes the device by
    /// it (0, from older workers: the model's f32 size).
    #[serde(default)]
    pub expert_bytes: u64,
}

/// What a worker announces about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Unique id in the cluster; one key segment (letters, digits, `-_.:`).
    pub worker_id: String,
    /// Where its ExpertService listens, `host:port`.
    pub address: String,
    /// Its devices.
    pub devices: Vec<DeviceRecord>,
    /// The worker's software version.
    pub version: String,
    /// Set when the worker was told to leave (SIGTERM): the controller places its experts
    /// elsewhere, unloads them, and the worker exits once it hosts nothing.
    #[serde(default)]
    pub draining: bool,
    /// Distinguishes restarts of the same worker id at the same address: a new process
    /// has a new incarnation, so the controller loads it before anyone routes to it.
    #[serde(default)]
    pub incarnation: u64,
}

impl WorkerRecord {
    /// Checks the fields a registry relies on.
    pub fn validate(&self) -> Result<(), ControlError> {
        check_name("worker_id", &self.worker_id)?;
        if self.address.trim().is_empty() {
            return Err(ControlError::invalid("address", "must not be empty"));
        }
        let mut names = std::collections::BTreeSet::new();
        if let Some(d) = self.devices.iter().find(|d| !names.insert(d.name.as_str())) {
            return Err(ControlError::invalid(
                "devices",
                format!("device {:?} is listed twice", d.name),
            ));
        }
        Ok(())
    }
}

/// The live membership: worker id → record.
pub type Membership = BTreeMap<String, WorkerRecord>;

/// Where a registration stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    /// Not registered yet (the registry has not been reachable so far).
    Registering,
    /// Registered and kept alive under `lease` (in-process: a local id).
    Connected {
        /// The lease the record lives under.
        lease: i64,
    },
    /// Keep-alive failing; reconnecting with backoff. The record stays in etcd until
    /// its lease expires.
    Disconnected,
    /// Registered and kept alive under a fresh lease, the previous one having expired
    /// while the registry was unreachable (the worker had dropped out of the membership
    /// meanwhile); `times` counts such re-registrations. Stays so until the next change.
    Reregistered {
        /// The new lease.
        lease: i64,
        /// Re-registrations so far.
        times: u64,
    },
    /// Left the cluster through [`Registration::revoke`].
    Revoked,
}

impl RegistrationState {
    /// True while the record is known to be registered.
    pub fn is_registered(&self) -> bool {
        matches!(self, Self::Connected { .. } | Self::Reregistered { .. })
    }
}

/// A revoke request carries where to send its outcome.
pub(crate) type RevokeReply = oneshot::Sender<Result<(), ControlError>>;

/// A worker's presence in the cluster. A task keeps it alive; dropping the handle stops
/// the task without revoking (the record then expires by TTL, like a crash);
/// [`revoke`](Self::revoke) leaves at once.
#[derive(Debug)]
pub struct Registration {
    worker_id: String,
    state: watch::Receiver<RegistrationState>,
    revoke: mpsc::Sender<RevokeReply>,
    /// The value to announce; a change is written under the same lease.
    value: watch::Sender<Vec<u8>>,
    _stop: DropGuard,
}

impl Registration {
    pub(crate) fn new(
        worker_id: String,
        state: watch::Receiver<RegistrationState>,
        revoke: mpsc::Sender<RevokeReply>,
        value: watch::Sender<Vec<u8>>,
        stop: DropGuard,
    ) -> Self {
        Self {
            worker_id,
            state,
            revoke,
            value,
            _stop: stop,
        }
    }

    /// Replaces the announced record (same id, same lease), e.g. to mark the worker
    /// draining. Returns at once; the write happens on the registration's task, now if
    /// connected or on reconnection.
    pub fn update(&self, record: &WorkerRecord) -> Result<(), ControlError> {
        record.validate()?;
        if record.worker_id != self.worker_id {
            return Err(ControlError::invalid(
                "worker_id",
                format!("cannot change {} to {}", self.worker_id, record.worker_id),
            ));
        }
        let value = serde_json::to_vec(record)
            .map_err(|e| ControlError::invalid("worker record", e.to_string()))?;
        self.update_raw(value);
        Ok(())
    }

    /// The value announced (or to be announced on reconnection).
    #[cfg(test)]
    pub(crate) fn current_value(&self) -> Vec<u8> {
        self.value.borrow().clone()
    }

    /// Replaces the announced value as is.
    pub(crate) fn update_raw(&self, value: Vec<u8>) {
        self.value.send_replace(value);
    }

    /// The registered worker's id.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The state now.
    pub fn state(&self) -> RegistrationState {
        self.state.borrow().clone()
    }

    /// A receiver of state changes (Connected, Disconnected, Reregistered, ...).
    pub fn subscribe(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// Waits until the record is registered, at most `timeout`.
    pub async fn wait_registered(&self, timeout: Duration) -> Result<(), ControlError> {
        let mut rx = self.state.clone();
        let registered = tokio::time::timeout(timeout, async {
            rx.wait_for(RegistrationState::is_registered).await.is_ok()
        })
        .await;
        match registered {
            Ok(true) => Ok(()),
            Ok(false) => Err(ControlError::Stopped("registration")),
            Err(_) => Err(ControlError::DeadlineExceeded {
                op: "register",
                after: timeout,
            }),
        }
    }

    /// Leaves the cluster: the record disappears at once. If the registry is
    /// unreachable this fails with an unavailable error and the record expires by TTL.
    pub async fn revoke(self) -> Result<(), ControlError> {
        let (tx, rx) = oneshot::channel();
        self.revoke
            .send(tx)
            .await
            .map_err(|_| ControlError::Stopped("registration"))?;
        rx.await
            .map_err(|_| ControlError::Stopped("registration"))?
    }
}

/// Membership: workers register, everyone watches.
///
/// Both calls spawn tasks, so they must run inside a Tokio runtime.
pub trait Registry: Send + Sync {
    /// Announces `record` under a lease of `ttl` kept alive at `ttl / 2`. Returns at
    /// once; [`Registration::wait_registered`] waits for the first success. A record
    /// with the same id replaces the one before.
    fn register(&self, record: WorkerRecord, ttl: Duration) -> Result<Registration, ControlError>;

    /// The live membership: the initial list, then every join, leave and expiry. While
    /// the registry is unreachable it keeps the last membership seen.
    fn watch_workers(&self) -> LiveView<Membership>;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(id: &str) -> WorkerRecord {
        WorkerRecord {
            worker_id: id.into(),
            address: format!("127.0.0.1:{}", 7000 + id.len()),
            devices: vec![DeviceRecord {
                name: "cpu:0".into(),
                capacity_bytes: 1 << 30,
                kind: "cpu".into(),
                dtype: "int8".into(),
                expert_bytes: 1234,
            }],
            version: "0.1.0".into(),
            draining: false,
            incarnation: 1,
        }
    }

    #[test]
    fn record_round_trips_as_json() {
        let r = record("w0");
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"worker_id\":\"w0\""), "{json}");
        assert!(json.contains("\"capacity_bytes\":1073741824"), "{json}");
        assert!(json.contains("\"dtype\":\"int8\""), "{json}");
        assert_eq!(serde_json::from_str::<WorkerRecord>(&json).unwrap(), r);
    }

    #[test]
    fn a_record_from_before_device_kinds_still_reads() {
        let json = r#"{"worker_id":"w0","address":"a:1","version":"0.1.0",
            "devices":[{"name":"cpu:0","capacity_bytes":0}]}"#;
        let r: WorkerRecord = serde_json::from_str(json).unwrap();
        assert_eq!(r.devices[0].expert_bytes, 0);
        assert_eq!(r.devices[0].dtype, "");
    }

    #[test]
    fn records_are_validated() {
        assert!(record("w0").validate().is_ok());
        let err = record("a/b").validate().unwrap_err();
        assert!(err.to_string().contains("worker_id"), "{err}");
        let mut r = record("w0");
        r.address = " ".into();
        assert!(r.validate().unwrap_err().to_string().contains("address"));
        let mut r = record("w0");
        r.devices.push(r.devices[0].clone());
        assert!(r.validate().unwrap_err().to_string().contains("devices"));
    }
}
