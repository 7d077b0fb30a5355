//! Elastic membership and placement for routers started with `--etcd`.
//!
//! Every such router runs two tasks:
//!
//! - **Follow** (every router): mirrors the membership (`workers/`) and the published
//!   placement (`placement`) and routes by them. A worker in the placement is routed to
//!   only while its registration (id, address and incarnation) is the one the placement
//!   was loaded on; one that left (lease expired or revoked, restarted) is dropped from
//!   the routes at once, before any new placement. The router reports the placement
//!   version it routes by under `routers/<id>` (leased).
//! - **Control** (only while elected, etcd's election API on `controller`): when the
//!   live workers differ from the placement's, or a rebalance is due, plans a new
//!   placement (pure planner, least movement from the published one), has every worker
//!   load its new copies (`LoadExperts`, which returns once they are ready), then
//!   publishes the placement with a transaction fenced by its leadership
//!   ([`PlacementStore::put_placement`]). Routers switch on publication, so a copy is
//!   routed to only once ready. Once every live router reports the new version, copies
//!   no longer assigned are unloaded; a draining worker (SIGTERM) is thereby emptied and
//!   exits.
//!
//! Serving never waits for etcd: both tasks keep the last membership and placement seen
//! while etcd is away, and dispatch routes around failed workers on its own.
//!
//! The pieces: [`follower`] (every router: membership and placement into routes),
//! [`controller`] (the elected leader: plans, loads, publishes, cleans up),
//! [`load_report`] (per-expert load, for load-aware rebalancing), and
//! [`placement_doc`] (the placement document in etcd). This module holds what they
//! share: the configuration, the cluster view, the worker clients, and [`start`].

mod controller;
mod follower;
mod load_report;
mod placement_doc;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use moe_control::{
    watch_leader, watch_load, Election, EtcdClient, EtcdConfig, EtcdRegistry, LoadReporter,
    Membership, PlacementStore, Registry, RouterRecord,
};
use moe_model::ModelSpec;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dispatch::RemoteBackend;
use crate::dispatch::WorkerClient;
use crate::metrics::RouterMetrics;

use controller::Controller;
pub(crate) use placement_doc::decode_checked;
pub use placement_doc::{DocDevice, DocWorker, PlacementDoc};

/// Where the membership lives and how this router takes part.
#[derive(Debug, Clone)]
pub struct EtcdMembership {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// Cluster name (key prefix `/moe/<cluster>/`).
    pub cluster: String,
    /// Registered workers to wait for before the first placement.
    pub min_workers: usize,
    /// This router's id in the election and under `routers/` (default: from its
    /// address).
    pub router_id: Option<String>,
    /// TTL of this router's leases (election candidacy, presence, load report).
    pub lease_ttl: Duration,
    /// How often the controller re-plans from the observed expert load (None: never).
    pub rebalance_interval: Option<Duration>,
    /// Extra copies, beyond `--expert-replicas`, the controller may give hot experts.
    pub hot_copies: usize,
    /// TLS to etcd.
    pub tls: Option<moe_control::EtcdTls>,
    /// etcd user and password.
    pub auth: Option<moe_control::EtcdAuth>,
}

/// What this router knows of the cluster, for `GET /v1/cluster` and `moe cluster status`.
#[derive(Debug, Default)]
pub struct ClusterView {
    inner: Mutex<ViewState>,
}

#[derive(Debug, Default)]
pub(super) struct ViewState {
    cluster: String,
    router_id: String,
    leading: bool,
    controller: Option<String>,
    etcd_connected: bool,
    members: Membership,
    routed: BTreeSet<String>,
    routers: BTreeMap<String, RouterRecord>,
    /// A placement the controller is loading and has not published yet.
    loading: Option<(u64, PlacementDoc)>,
}

impl ClusterView {
    pub(super) fn update(&self, f: impl FnOnce(&mut ViewState)) {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// The view as JSON: membership (each worker, draining or not, routed to or not),
    /// the controller, the routers and the placement version each routes by, and a
    /// placement being loaded, if any.
    pub fn to_json(&self) -> serde_json::Value {
        let s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        serde_json::json!({
            "cluster": s.cluster,
            "router_id": s.router_id,
            "this_router_is_controller": s.leading,
            "controller": s.controller,
            "etcd_connected": s.etcd_connected,
            "workers": s.members.values().map(|r| serde_json::json!({
                "id": r.worker_id,
                "address": r.address,
                "devices": r.devices.iter().map(|d| d.name.clone()).collect::<Vec<_>>(),
                "draining": r.draining,
                "routed": s.routed.contains(&r.worker_id),
            })).collect::<Vec<_>>(),
            "routers": s.routers.values().map(|r| serde_json::json!({
                "id": r.router_id,
                "address": r.address,
                "placement_version": r.placement_version,
            })).collect::<Vec<_>>(),
            "loading": s.loading.as_ref().map(|(v, d)| serde_json::json!({
                "version": v,
                "devices": d.devices,
            })),
        })
    }
}

/// The worker clients of this router: one per (id, address, incarnation).
pub(super) struct Clients {
    pub(super) backend: Arc<RemoteBackend>,
    known: Mutex<HashMap<(String, String, u64), usize>>,
}

impl Clients {
    /// The backend index of the client for this registration, created on first use.
    pub(super) fn index(&self, id: &str, w: &DocWorker) -> Option<usize> {
        let key = (id.to_owned(), w.address.clone(), w.incarnation);
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = known.get(&key) {
            return Some(*i);
        }
        match self.backend.connect(&w.address) {
            Ok(c) => {
                let i = self.backend.add_worker(Arc::new(c));
                known.insert(key, i);
                Some(i)
            }
            Err(e) => {
                tracing::error!(worker = %id, address = %w.address, error = %e, "cannot reach worker at its address");
                None
            }
        }
    }

    pub(super) fn client(&self, id: &str, w: &DocWorker) -> Option<Arc<WorkerClient>> {
        self.index(id, w).and_then(|i| self.backend.worker(i))
    }
}

/// The registration of a member, as the placement records it.
pub(super) fn doc_worker(rec: &moe_control::WorkerRecord) -> DocWorker {
    DocWorker {
        address: rec.address.clone(),
        incarnation: rec.incarnation,
    }
}

/// Joins the cluster: starts following membership and placement, campaigns for the
/// controller, and waits (at most `startup_timeout`) until a placement is routed by.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    source: &EtcdMembership,
    backend: Arc<RemoteBackend>,
    metrics: RouterMetrics,
    view: Arc<ClusterView>,
    spec: &ModelSpec,
    replicas: usize,
    startup_timeout: Duration,
    grpc_address: String,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut config =
        EtcdConfig::new(source.endpoints.clone(), &source.cluster).context("--etcd/--cluster")?;
    config.tls = source.tls.clone();
    config.auth = source.auth.clone();
    let router_id = source
        .router_id
        .clone()
        .unwrap_or_else(|| moe_control::id_from_address("router", &grpc_address));
    let registry = EtcdRegistry::new(config.clone());
    let members = registry.watch_workers();
    let routers = registry.watch_routers();
    let store = PlacementStore::new(EtcdClient::new(config.clone()));
    let placement = store.watch_placement();
    let presence = registry
        .register_router(
            &RouterRecord {
                router_id: router_id.clone(),
                address: grpc_address,
                placement_version: 0,
            },
            source.lease_ttl,
        )
        .context("--router-id")?;
    let election = Election::campaign(config.clone(), &router_id, source.lease_ttl)
        .context("joining the controller election")?;
    tracing::info!(cluster = %source.cluster, router = %router_id, min_workers = source.min_workers, "joined the cluster: following membership and placement, campaigning for controller");

    let clients = Arc::new(Clients {
        backend: backend.clone(),
        known: Mutex::new(HashMap::new()),
    });
    view.update(|v| {
        v.cluster = source.cluster.clone();
        v.router_id = router_id.clone();
    });
    tokio::spawn(follower::follow(
        view.clone(),
        spec.clone(),
        clients.clone(),
        members.subscribe(),
        placement.subscribe(),
        presence,
        shutdown.clone(),
    ));

    tokio::spawn(follower::watch_connection_and_leader(
        members.connection(),
        watch_leader(config.clone()),
        metrics.clone(),
        view.clone(),
        shutdown.clone(),
    ));

    let rebalance = match source.rebalance_interval {
        Some(every) => {
            let reporter = LoadReporter::start(config.clone(), &router_id, source.lease_ttl)
                .context("starting the load reporter")?;
            tokio::spawn(load_report::report_load(
                reporter,
                metrics.clone(),
                spec.clone(),
                router_id.clone(),
                every,
                shutdown.clone(),
            ));
            Some((every, watch_load(&config)))
        }
        None => None,
    };

    let ctl = Controller::new(
        view,
        clients,
        store,
        metrics.clone(),
        router_id,
        spec,
        replicas,
        source,
        startup_timeout,
    );
    tokio::spawn(controller::control(
        ctl, election, members, placement, routers, rebalance, shutdown,
    ));

    // Serve once a placement is routed by.
    let deadline = Instant::now() + startup_timeout;
    while backend.placement().version == 0 {
        if Instant::now() >= deadline {
            anyhow::bail!(
                "no placement within {startup_timeout:?}: are at least {} workers registered in cluster {:?}, and a controller elected? (see the log)",
                source.min_workers.max(1),
                source.cluster
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
