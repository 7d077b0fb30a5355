//! Fixtures of the etcd tests: an `etcd` of the test's own and a TCP proxy that can cut
//! a client off from it (both from `moe-testkit`, shared with the end-to-end tests),
//! worker records and client settings, and deadline helpers (no sleeps as
//! synchronisation: every wait is on a change, under a generous deadline).
//!
//! Needs the `etcd` binary (Debian `etcd-server`, 3.4) on `PATH`.
#![allow(dead_code)] // each test file uses a different part

use std::future::Future;
use std::time::Duration;

use moe_control::{DeviceRecord, EtcdConfig, WorkerRecord};
pub use moe_testkit::{Etcd, TcpProxy};
use tokio::sync::watch;

/// How long any wait may take before the test fails. Generous: shared 2-core machines.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Sends the library's logs to the test's captured output (shown when a test fails).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "moe_control=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Awaits `fut` under [`DEADLINE`], failing the test with `what` on timeout.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// Waits until `rx`'s value satisfies `pred`; returns that value.
pub async fn wait_until<T: Clone>(
    what: &str,
    rx: &mut watch::Receiver<T>,
    pred: impl FnMut(&T) -> bool,
) -> T {
    within(what, async {
        match rx.wait_for(pred).await {
            Ok(v) => v.clone(),
            Err(_) => panic!("the sender of {what} went away"),
        }
    })
    .await
}

/// A worker record for tests.
pub fn record(id: &str) -> WorkerRecord {
    WorkerRecord {
        worker_id: id.into(),
        address: format!("{id}.test:50051"),
        devices: vec![DeviceRecord {
            name: "cpu:0".into(),
            capacity_bytes: 1 << 30,
            kind: "cpu".into(),
            dtype: "f32".into(),
            expert_bytes: 0,
        }],
        version: "test".into(),
        draining: false,
        incarnation: 1,
    }
}

/// Client settings for tests: the defaults with a short reconnect backoff.
pub fn config(endpoint: &str, cluster: &str) -> EtcdConfig {
    let mut c = EtcdConfig::new([endpoint], cluster).expect("valid config");
    c.backoff_max = Duration::from_millis(500);
    c
}

/// Starts an etcd of the test's own (and the test's log capture).
pub fn start_etcd() -> Etcd {
    init_tracing();
    Etcd::start()
}
