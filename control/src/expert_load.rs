//! Routed-token counts per expert as the routers observe them, kept in etcd: the input
//! of load-aware placement ([`PlanInput::load`](crate::PlanInput::load)).
//!
//! Each router publishes an [`ExpertLoadReport`] (JSON) at `/moe/<cluster>/load/<router>`
//! under a lease of its own, so a dead router's counts vanish with it. A
//! [`LoadReporter`] does the writing in the background, through the same keeper as a
//! worker's registration: [`LoadReporter::publish`] never blocks and the latest report
//! wins; the lease is kept alive at TTL/2, re-granted when it expired (etcd unreachable
//! for longer than the TTL) with the latest report written again, and the connection
//! retried with backoff. Dropping the
//! reporter lets the report expire with its lease, like a crash; [`LoadReporter::revoke`]
//! removes it at once.
//!
//! [`watch_load`] follows the sum over all routers, [`watch_load_reports`] each router's
//! report. Counts are summed as they are: routers should report over the same window.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::warn;

use crate::error::ControlError;
use crate::etcd::EtcdConfig;
use crate::etcd_mirror::{spawn_mirror, Entries, KeyRange};
use crate::etcd_registry::EtcdRegistry;
use crate::keys::check_name;
use crate::live_view::LiveView;
use crate::membership::{Registration, RegistrationState};
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

/// A router's presence in the load reports: a leased record like a worker's
/// registration (the registry's keeper writes it, keeps the lease alive at TTL/2,
/// re-grants it after expiry and writes the latest report again on reconnection).
/// Dropping the handle lets the report expire with its lease, like a crash;
/// [`revoke`](Self::revoke) removes it at once.
#[derive(Debug)]
pub struct LoadReporter {
    router: String,
    registration: Registration,
}

impl LoadReporter {
    /// Starts reporting as `router` (one key segment: letters, digits, `-_.:`) under a
    /// lease of `ttl`, kept alive at `ttl / 2`, with an empty report until the first
    /// [`publish`](Self::publish). Returns at once; must be called inside a Tokio
    /// runtime.
    pub fn start(config: EtcdConfig, router: &str, ttl: Duration) -> Result<Self, ControlError> {
        check_name("router id", router)?;
        let empty = ExpertLoadReport {
            router: router.to_owned(),
            window_secs: 0.0,
            counts: Vec::new(),
        };
        let value = serde_json::to_vec(&empty)
            .map_err(|e| ControlError::invalid("load report", e.to_string()))?;
        let key = config.keys.load(router);
        let registration =
            EtcdRegistry::new(config).announce(router.to_owned(), key, value, ttl)?;
        Ok(Self {
            router: router.to_owned(),
            registration,
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
        self.registration.update_raw(value);
        Ok(())
    }

    /// Where the writer stands (registered, disconnected, registered again, ...).
    pub fn state(&self) -> RegistrationState {
        self.registration.state()
    }

    /// A receiver of the writer's state.
    pub fn subscribe(&self) -> watch::Receiver<RegistrationState> {
        self.registration.subscribe()
    }

    /// Stops reporting and removes the report at once. If etcd is unreachable this fails
    /// with an unavailable error and the report expires with its lease.
    pub async fn revoke(self) -> Result<(), ControlError> {
        self.registration.revoke().await
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
            serde_json::from_slice(&reporter.registration.current_value()).unwrap();
        assert_eq!(stored.router, "r");
    }
}
