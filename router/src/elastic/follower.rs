//! The follower (every router): routes by the published placement and the membership,
//! reports the placement version it routes by, and mirrors etcd's connection state and
//! the elected controller into the metrics and the cluster view.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use moe_control::{
    ConnectionState, LeaderInfo, LiveView, Membership, RouterPresence, StoredPlacement,
};
use moe_model::ModelSpec;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::placement_doc::decode;
use super::{doc_worker, Clients, ClusterView};
use crate::dispatch::RemoteBackend;
use crate::metrics::RouterMetrics;

/// Routes by the published placement and the membership; reports the version routed by.
pub(super) async fn follow(
    view: Arc<ClusterView>,
    spec: ModelSpec,
    clients: Arc<Clients>,
    mut members_rx: watch::Receiver<Membership>,
    mut placement_rx: watch::Receiver<Option<StoredPlacement>>,
    presence: RouterPresence,
    shutdown: CancellationToken,
) {
    // The version routed by is reported once no dispatch split by the routes before it
    // is still in flight, so the controller never drops a copy one of them may reach.
    let (report, reports) = watch::channel((0u64, 0u64));
    let reporter = tokio::spawn(report_switches(
        clients.backend.clone(),
        reports,
        presence,
        shutdown.clone(),
    ));
    let mut applied: Option<(u64, HashMap<String, usize>)> = None;
    loop {
        let members = members_rx.borrow_and_update().clone();
        let stored = placement_rx.borrow_and_update().clone();
        view.update(|v| v.members = members.clone());
        if let Some((stored, doc)) = stored.as_ref().and_then(|s| Some((s, decode(s, &spec)?))) {
            let mut index = HashMap::new();
            for (id, w) in &doc.workers {
                let registered = members.get(id).is_some_and(|r| doc_worker(r) == *w);
                if !registered {
                    continue;
                }
                if let Some(i) = clients.index(id, w) {
                    index.insert(id.clone(), i);
                }
            }
            let now = (stored.version, index);
            if applied.as_ref() != Some(&now) {
                let gone: Vec<&String> = doc
                    .workers
                    .keys()
                    .filter(|id| !now.1.contains_key(*id))
                    .collect();
                if !gone.is_empty() {
                    tracing::warn!(workers = ?gone, version = stored.version, "workers left the membership: routing around them");
                }
                let plan = doc.to_plan(stored.version);
                let epoch = clients.backend.set_routes(&plan, &now.1);
                if applied.as_ref().is_none_or(|(v, _)| *v != stored.version) {
                    tracing::info!(version = stored.version, controller = %doc.controller, workers = now.1.len(), "routing by placement");
                }
                report.send_replace((stored.version, epoch));
                view.update(|v| v.routed = now.1.keys().cloned().collect());
                applied = Some(now);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = members_rx.changed() => if r.is_err() { break },
            r = placement_rx.changed() => if r.is_err() { break },
        }
    }
    drop(report);
    let _ = reporter.await;
}

/// Reports each (version, route epoch) sent once the epoch's older dispatches drained;
/// leaves the routers' presence at shutdown.
async fn report_switches(
    backend: Arc<RemoteBackend>,
    mut reports: watch::Receiver<(u64, u64)>,
    mut presence: RouterPresence,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = reports.changed() => if r.is_err() { break },
        }
        let (version, epoch) = *reports.borrow_and_update();
        if !backend.drained(epoch, backend.dispatch_bound()).await {
            tracing::warn!(
                version,
                "dispatches by older routes still in flight after their bound"
            );
        }
        presence.set_version(version);
    }
    match tokio::time::timeout(Duration::from_secs(2), presence.revoke()).await {
        Ok(Ok(())) => tracing::info!("left the routers' presence"),
        _ => tracing::warn!("leaving the routers' presence failed; it expires by TTL"),
    }
}

/// Mirrors etcd's connection state and the elected controller into the metrics (and
/// counts leader changes) and the cluster view, for the dashboards.
pub(super) async fn watch_connection_and_leader(
    mut conn: watch::Receiver<ConnectionState>,
    leader: LiveView<Option<LeaderInfo>>,
    metrics: RouterMetrics,
    view: Arc<ClusterView>,
    shutdown: CancellationToken,
) {
    let mut leader_rx = leader.subscribe();
    let mut last: Option<i64> = None;
    loop {
        let connected = *conn.borrow_and_update() == ConnectionState::Connected;
        metrics.etcd_connected.set(i64::from(connected));
        let leader = leader_rx.borrow_and_update().clone();
        view.update(|v| {
            v.etcd_connected = connected;
            v.controller = leader.as_ref().map(|l| l.candidate.clone());
        });
        let now = leader.as_ref().map(|l| l.token.revision);
        if now.is_some() && now != last {
            metrics.leader_changes.inc();
            last = now;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = conn.changed() => if r.is_err() { return },
            r = leader_rx.changed() => if r.is_err() { return },
        }
    }
}
