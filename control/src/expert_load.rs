//! Routed-token counts per expert as the routers observe them, kept in etcd: the input
//! of load-aware placement ([`PlanInput::load`](crate::PlanInput::load)).
//!
//! Each router publishes an [`ExpertLoadReport`] (JSON) at `/moe/<cluster>/load/<router>`
//! under a lease of its own, so a dead router's counts vanish with it. A
//! [`LoadReporter`] does the writing in the background: [`LoadReporter::publish`] never
//! blocks and the latest report wins; its task writes under the request deadline, keeps
//! the lease alive at TTL/2, writes again under a fresh lease when the old one expired
//! (etcd unreachable for longer than the TTL), and reconnects with backoff. Dropping the
//! reporter lets the report expire with its lease, like a crash; [`LoadReporter::revoke`]
//! removes it at once.
//!
//! [`watch_load`] follows the sum over all routers, [`watch_load_reports`] each router's
//! report. Counts are summed as they are: routers should report over the same window.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use etcd_client::PutOptions;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};

use crate::error::ControlError;
use crate::etcd::{deadline, Backoff, EtcdConfig};
use crate::etcd_mirror::{spawn_mirror, Entries, KeyRange};
use crate::keys::check_name;
use crate::lease::{KeepAlive, LeaseSlot, SessionEnd};
use crate::live_view::{ConnectionState, LiveView};
use crate::membership::RevokeReply;
use crate::placement::ExpertKey;

/// What one router saw over its last window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertLoadReport {
    /// The reporting router's id (the last segment of its key).
    pub router: String,
    /// How long the window was, in seconds.
    pub window_secs: f64,
    /// `(layer, expert, routed tokens)`; experts left out count 0.
    pub counts: Vec<(usize, u32, u64)>,
}

impl ExpertLoadReport {
    /// The counts per expert (an expert listed twice counts the sum).
    pub fn totals(&self) -> BTreeMap<ExpertKey, u64> {
        let mut totals = BTreeMap::new();
        add_counts(&mut totals, &self.counts);
        totals
    }

    fn validate(&self) -> Result<(), ControlError> {
        if !(self.window_secs.is_finite() && self.window_secs >= 0.0) {
            return Err(ControlError::invalid(
                "window_secs",
                format!("{} is not a finite number of seconds ≥ 0", self.window_secs),
            ));
        }
        Ok(())
    }
}

fn add_counts(totals: &mut BTreeMap<ExpertKey, u64>, counts: &[(usize, u32, u64)]) {
    for &(layer, expert, tokens) in counts {
        let sum = totals.entry((layer, expert)).or_insert(0);
        *sum = sum.saturating_add(tokens);
    }
}

/// A router's presence in the load reports. A task writes what is published; dropping
/// the handle stops the task without revoking (the report expires with its lease);
/// [`revoke`](Self::revoke) removes it at once.
#[derive(Debug)]
pub struct LoadReporter {
    router: String,
    latest: watch::Sender<Option<Vec<u8>>>,
    state: watch::Receiver<ConnectionState>,
    revoke: mpsc::Sender<RevokeReply>,
    _stop: DropGuard,
}

impl LoadReporter {
    /// Starts reporting as `router` (one key segment: letters, digits, `-_.:`) under a
    /// lease of `ttl`, kept alive at `ttl / 2`. Returns at once; nothing is written until
    /// the first [`publish`](Self::publish). Must be called inside a Tokio runtime.
    pub fn start(config: EtcdConfig, router: &str, ttl: Duration) -> Result<Self, ControlError> {
        check_name("router id", router)?;
        let (latest_tx, latest_rx) = watch::channel(None);
        let (state_tx, state_rx) = watch::channel(ConnectionState::Connecting);
        let writer = Writer {
            key: config.keys.load(router),
            config,
            lease: LeaseSlot::new(ttl)?,
            latest: latest_rx,
            state: state_tx,
        };
        let (revoke_tx, revoke_rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let guard = stop.clone().drop_guard();
        tokio::spawn(writer.run(stop, revoke_rx));
        Ok(Self {
            router: router.to_owned(),
            latest: latest_tx,
            state: state_rx,
            revoke: revoke_tx,
            _stop: guard,
        })
    }

    /// The reporting router's id.
    pub fn router(&self) -> &str {
        &self.router
    }

    /// Hands `report` to the background writer and returns at once; a report not yet
    /// written when the next one comes is skipped. Its `router` is set to this
    /// reporter's id. Fails only for a report that cannot be stored (a window that is
    /// not a finite number of seconds ≥ 0).
    pub fn publish(&self, mut report: ExpertLoadReport) -> Result<(), ControlError> {
        report.validate()?;
        report.router.clone_from(&self.router);
        let value = serde_json::to_vec(&report)
            .map_err(|e| ControlError::invalid("load report", e.to_string()))?;
        self.latest.send_replace(Some(value));
        Ok(())
    }

    /// Where the writer stands: [`ConnectionState::Connected`] while its lease lives and
    /// everything published so far is written.
    pub fn state(&self) -> ConnectionState {
        *self.state.borrow()
    }

    /// A receiver of the writer's state.
    pub fn subscribe(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// Stops reporting and removes the report at once. If etcd is unreachable this fails
    /// with an unavailable error and the report expires with its lease.
    pub async fn revoke(self) -> Result<(), ControlError> {
        let (tx, rx) = oneshot::channel();
        self.revoke
            .send(tx)
            .await
            .map_err(|_| ControlError::Stopped("load reporter"))?;
        rx.await
            .map_err(|_| ControlError::Stopped("load reporter"))?
    }
}

/// The task behind a [`LoadReporter`].
struct Writer {
    config: EtcdConfig,
    key: String,
    lease: LeaseSlot,
    latest: watch::Receiver<Option<Vec<u8>>>,
    state: watch::Sender<ConnectionState>,
}

enum Wake {
    Stop,
    Revoke(RevokeReply),
    Ended(SessionEnd),
}

impl Writer {
    async fn run(mut self, stop: CancellationToken, mut revoke: mpsc::Receiver<RevokeReply>) {
        let mut backoff = self.config.backoff();
        loop {
            // A closed revoke channel means the handle was dropped: `stop` fires too, and
            // a dropped reporter's report must expire, not be revoked.
            let wake = tokio::select! {
                _ = stop.cancelled() => Wake::Stop,
                Some(reply) = revoke.recv() => Wake::Revoke(reply),
                end = self.session(&mut backoff) => Wake::Ended(end),
            };
            let delay = match wake {
                Wake::Stop => return,
                Wake::Revoke(reply) => return self.leave(reply).await,
                Wake::Ended(SessionEnd::LeaseExpired | SessionEnd::Deposed) => {
                    info!(key = %self.key, "load report lease expired; writing under a fresh one");
                    self.lease.forget();
                    Duration::ZERO
                }
                Wake::Ended(SessionEnd::Failed(e)) => {
                    let was = self.state.send_replace(ConnectionState::Disconnected);
                    if was == ConnectionState::Connected {
                        warn!(key = %self.key, error = %e, "etcd unreachable; load reports wait, reconnecting with backoff");
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

    /// Graceful stop: revoke the lease so the report goes at once.
    async fn leave(mut self, reply: RevokeReply) {
        let result = self.lease.revoke(&self.config).await;
        match &result {
            Ok(()) => info!(key = %self.key, "load report revoked"),
            Err(e) => {
                warn!(key = %self.key, error = %e, "revoke failed; the load report expires by TTL")
            }
        }
        let _ = reply.send(result);
    }

    async fn session(&mut self, backoff: &mut Backoff) -> SessionEnd {
        match self.try_session(backoff).await {
            Ok(never) => match never {},
            Err(end) => end,
        }
    }

    /// One connection's worth of reporting: a lease kept alive, and the latest report
    /// written under it, then every newer one. The keep-alive beats while a write waits.
    async fn try_session(&mut self, backoff: &mut Backoff) -> Result<Infallible, SessionEnd> {
        let timeout = self.config.request_timeout;
        let mut client = self.config.connect().await?;
        let lease = self.lease.acquire(&mut client, timeout).await?;
        let keep_alive = KeepAlive::start(&mut client, lease, self.lease.period(), timeout)
            .await?
            .run();
        let writes = async {
            loop {
                // The first round writes what is there: a fresh lease needs it again.
                let value = self.latest.borrow_and_update().clone();
                if let Some(value) = value {
                    let put = PutOptions::new().with_lease(lease);
                    deadline(
                        timeout,
                        "put",
                        client.put(self.key.clone(), value, Some(put)),
                    )
                    .await?;
                }
                if self.state.send_replace(ConnectionState::Connected)
                    == ConnectionState::Disconnected
                {
                    info!(key = %self.key, lease, "etcd reachable again; load reports written");
                }
                backoff.reset();
                if self.latest.changed().await.is_err() {
                    // The handle is gone and `stop` has fired: wait to be cancelled.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            end = keep_alive => Err(end),
            failed = writes => {
                let failed: Result<Infallible, ControlError> = failed;
                match failed {
                    Ok(never) => match never {},
                    Err(e) => Err(SessionEnd::Failed(e)),
                }
            }
        }
    }
}

/// Follows every router's report, by router id; an undecodable one is left out (and
/// logged). Keeps the last value while etcd is unreachable. Must be called inside a
/// Tokio runtime.
pub fn watch_load_reports(config: &EtcdConfig) -> LiveView<BTreeMap<String, ExpertLoadReport>> {
    let range = KeyRange::Prefix(config.keys.load_prefix());
    spawn_mirror(config.clone(), range, decode_reports)
}

/// Follows the routed tokens per expert summed over all routers' reports: a router's
/// counts leave the sum when its report is revoked or its lease expires. Keeps the last
/// value while etcd is unreachable. Must be called inside a Tokio runtime.
pub fn watch_load(config: &EtcdConfig) -> LiveView<BTreeMap<ExpertKey, u64>> {
    let range = KeyRange::Prefix(config.keys.load_prefix());
    spawn_mirror(config.clone(), range, |entries: &Entries| {
        sum_reports(decode_reports(entries).values())
    })
}

/// The counts of `reports`, summed per expert.
pub fn sum_reports<'r>(
    reports: impl IntoIterator<Item = &'r ExpertLoadReport>,
) -> BTreeMap<ExpertKey, u64> {
    let mut totals = BTreeMap::new();
    for r in reports {
        add_counts(&mut totals, &r.counts);
    }
    totals
}

/// Decodes the load prefix; the key names the router, whatever the document says.
fn decode_reports(entries: &Entries) -> BTreeMap<String, ExpertLoadReport> {
    entries
        .iter()
        .filter_map(
            |(router, e)| match serde_json::from_slice::<ExpertLoadReport>(&e.value) {
                Ok(mut r) => {
                    r.router.clone_from(router);
                    Some((router.clone(), r))
                }
                Err(err) => {
                    warn!(%router, error = %err, "ignoring an undecodable load report");
                    None
                }
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd_mirror::RawEntry;

    fn report(router: &str, counts: &[(usize, u32, u64)]) -> ExpertLoadReport {
        ExpertLoadReport {
            router: router.into(),
            window_secs: 10.0,
            counts: counts.to_vec(),
        }
    }

    fn entry(value: &[u8]) -> RawEntry {
        RawEntry {
            value: value.to_vec(),
            create_revision: 1,
            mod_revision: 1,
        }
    }

    #[test]
    fn reports_round_trip_as_compact_json() {
        let r = report("r0", &[(0, 1, 5), (2, 3, 7)]);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"router":"r0","window_secs":10.0,"counts":[[0,1,5],[2,3,7]]}"#
        );
        assert_eq!(serde_json::from_str::<ExpertLoadReport>(&json).unwrap(), r);
    }

    #[test]
    fn reports_are_summed_per_expert_and_bad_ones_left_out() {
        let mut entries = Entries::new();
        let a = report("claims-to-be-b", &[(0, 0, 10), (0, 1, 5), (0, 0, 1)]);
        entries.insert("a".into(), entry(&serde_json::to_vec(&a).unwrap()));
        let b = report("b", &[(0, 0, 7), (1, 3, u64::MAX)]);
        entries.insert("b".into(), entry(&serde_json::to_vec(&b).unwrap()));
        let c = report("c", &[(1, 3, 1)]);
        entries.insert("c".into(), entry(&serde_json::to_vec(&c).unwrap()));
        entries.insert("junk".into(), entry(b"{not json"));

        let reports = decode_reports(&entries);
        assert_eq!(reports.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(reports["a"].router, "a", "the key names the router");
        assert_eq!(
            a.totals(),
            [((0, 0), 11), ((0, 1), 5)].into_iter().collect()
        );
        let sum = sum_reports(reports.values());
        let want: BTreeMap<ExpertKey, u64> = [((0, 0), 18), ((0, 1), 5), ((1, 3), u64::MAX)]
            .into_iter()
            .collect();
        assert_eq!(sum, want);
    }

    #[tokio::test]
    async fn bad_reports_and_ids_are_refused() {
        let config = EtcdConfig::new(["http://127.0.0.1:1"], "c").unwrap();
        let err = LoadReporter::start(config.clone(), "a/b", Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("router id"), "{err}");
        assert!(LoadReporter::start(config.clone(), "r", Duration::ZERO).is_err());
        let reporter = LoadReporter::start(config, "r", Duration::from_secs(5)).unwrap();
        assert_eq!(reporter.router(), "r");
        for window in [f64::NAN, f64::INFINITY, -1.0] {
            let mut r = report("r", &[]);
            r.window_secs = window;
            let err = reporter.publish(r).unwrap_err();
            assert!(err.to_string().contains("window_secs"), "{err}");
        }
        reporter.publish(report("other", &[(0, 0, 1)])).unwrap();
        let stored: ExpertLoadReport =
            serde_json::from_slice(reporter.latest.borrow().as_deref().unwrap()).unwrap();
        assert_eq!(stored.router, "r");
    }
}
