//! Load reports: this router's per-expert token counts, published to etcd for the
//! controller's load-aware replication.

use std::time::Duration;

use moe_control::{ExpertLoadReport, LoadReporter};
use moe_model::ModelSpec;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::RouterMetrics;

/// Publishes this router's per-expert token counts of the last window, for the
/// controller's load-aware replication.
pub(super) async fn report_load(
    reporter: LoadReporter,
    metrics: RouterMetrics,
    spec: ModelSpec,
    router: String,
    every: Duration,
    shutdown: CancellationToken,
) {
    let read = || metrics.expert_token_counts(&spec);
    // Each report covers the last two intervals, so the controller, ticking at the same
    // interval, sees every burst of load at least once.
    let mut older = (read(), Instant::now());
    let mut newer = older.clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = read();
        let counts = now
            .iter()
            .map(|(k, n)| {
                (
                    k.0,
                    k.1,
                    n.saturating_sub(older.0.get(k).copied().unwrap_or(0)),
                )
            })
            .filter(|(_, _, n)| *n > 0)
            .collect();
        if let Err(e) = reporter.publish(ExpertLoadReport {
            router: router.clone(),
            window_secs: older.1.elapsed().as_secs_f64(),
            counts,
        }) {
            tracing::warn!(error = %e, "could not publish the expert load report");
        }
        older = std::mem::replace(&mut newer, (now, Instant::now()));
    }
}
