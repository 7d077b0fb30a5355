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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use moe_control::{
    plan_what_fits, watch_leader, watch_load, ControlError, DeviceSlot, Election, EtcdClient,
    EtcdConfig, EtcdRegistry, ExpertLoadReport, FencingToken, Leadership, LoadReporter, Membership,
    PlacementPlan, PlacementStore, PlanInput, Registry, RouterPresence, RouterRecord,
    StoredPlacement,
};
use moe_model::{LocalExperts, ModelSpec};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dispatch::RemoteBackend;
use crate::dispatch::WorkerClient;
use crate::metrics::RouterMetrics;

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

/// The placement document under `/moe/<cluster>/placement` (its `placement` field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementDoc {
    /// The controller that wrote it, and its fencing token's revision.
    pub controller: String,
    pub token: i64,
    /// The workers it was loaded on: id → where, and which incarnation.
    pub workers: BTreeMap<String, DocWorker>,
    /// Which device hosts which `(layer, expert)`.
    pub devices: Vec<DocDevice>,
}

/// A worker of a placement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DocWorker {
    pub address: String,
    pub incarnation: u64,
}

/// A device of a placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocDevice {
    pub worker: String,
    pub device: String,
    pub capacity_bytes: u64,
    pub experts: Vec<(usize, u32)>,
}

impl PlacementDoc {
    pub(crate) fn to_plan(&self, version: u64) -> PlacementPlan {
        PlacementPlan {
            version,
            assignments: self
                .devices
                .iter()
                .map(|d| {
                    (
                        DeviceSlot {
                            worker: d.worker.clone(),
                            device: d.device.clone(),
                            capacity_bytes: d.capacity_bytes,
                        },
                        d.experts.iter().copied().collect(),
                    )
                })
                .collect(),
        }
    }

    fn from_plan(
        plan: &PlacementPlan,
        workers: BTreeMap<String, DocWorker>,
        controller: &str,
        token: i64,
    ) -> Self {
        Self {
            controller: controller.to_owned(),
            token,
            workers,
            devices: plan
                .assignments
                .iter()
                .map(|(slot, set)| DocDevice {
                    worker: slot.worker.clone(),
                    device: slot.device.clone(),
                    capacity_bytes: slot.capacity_bytes,
                    experts: set.iter().copied().collect(),
                })
                .collect(),
        }
    }

    /// The same workers and assignments (whoever wrote them).
    fn same_layout(&self, other: &PlacementDoc) -> bool {
        self.workers == other.workers && self.devices == other.devices
    }

    /// Experts assigned to `worker`, per device.
    pub(crate) fn assigned(&self, worker: &str) -> BTreeMap<String, BTreeSet<(usize, u32)>> {
        self.devices
            .iter()
            .filter(|d| d.worker == worker)
            .map(|d| (d.device.clone(), d.experts.iter().copied().collect()))
            .collect()
    }
}

/// Decodes a stored placement written by a controller; `None` (logged) for one that
/// does not decode or does not fit the model.
fn decode(stored: &StoredPlacement, spec: &ModelSpec) -> Option<PlacementDoc> {
    match decode_checked(stored, spec) {
        Ok(doc) => Some(doc),
        Err(e) => {
            tracing::error!(version = stored.version, error = %e, "undecodable placement in etcd; ignoring it");
            None
        }
    }
}

/// A stored placement as a [`PlacementDoc`] that lists each device once and whose
/// every copy is an expert of `spec`'s model (a corrupt document naming others would
/// create routes, and metric series, for experts that do not exist).
pub(crate) fn decode_checked(
    stored: &StoredPlacement,
    spec: &ModelSpec,
) -> Result<PlacementDoc, String> {
    let doc: PlacementDoc =
        serde_json::from_value(stored.placement.clone()).map_err(|e| e.to_string())?;
    let mut seen = BTreeSet::new();
    for d in &doc.devices {
        // Listed twice, a device would be routed to for both lists but told to hold
        // only one (found by fuzzing: fuzz/regressions/placement_document/).
        if !seen.insert((&d.worker, &d.device)) {
            return Err(format!("device {}/{} is listed twice", d.worker, d.device));
        }
        for &(layer, expert) in &d.experts {
            let moe = spec.layers.get(layer) == Some(&moe_model::config::FfnKind::Moe);
            if !moe || expert as usize >= spec.moe.num_experts {
                return Err(format!(
                    "device {}/{} holds expert {expert} of layer {layer}, which this model does not have",
                    d.worker, d.device
                ));
            }
        }
    }
    Ok(doc)
}

/// What this router knows of the cluster, for `GET /v1/cluster` and `moe cluster status`.
#[derive(Debug, Default)]
pub struct ClusterView {
    inner: Mutex<ViewState>,
}

#[derive(Debug, Default)]
struct ViewState {
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
    fn update(&self, f: impl FnOnce(&mut ViewState)) {
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

/// The routers' summed per-expert load of the last window.
type LoadView = moe_control::LiveView<BTreeMap<(usize, u32), u64>>;

/// How long to wait before trying a failed step again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// After every router reported a placement, how long before old copies are dropped.
/// Routers report only once no dispatch split by older routes is in flight, so this is
/// only a margin for the report's own travel, not what correctness rests on.
const UNLOAD_GRACE: Duration = Duration::from_millis(100);
/// Deadline of the `Info` call before dropping copies (a clean-up: not worth waiting).
const UNLOAD_INFO_DEADLINE: Duration = Duration::from_millis(500);
/// How long a worker whose load failed is left out of placements.
const EXCLUDE_AFTER_FAILED_LOAD: Duration = Duration::from_secs(10);
/// Deadline of `Info` calls to workers.
const INFO_DEADLINE: Duration = Duration::from_secs(2);

/// The worker clients of this router: one per (id, address, incarnation).
struct Clients {
    backend: Arc<RemoteBackend>,
    known: Mutex<HashMap<(String, String, u64), usize>>,
}

impl Clients {
    /// The backend index of the client for this registration, created on first use.
    fn index(&self, id: &str, w: &DocWorker) -> Option<usize> {
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

    fn client(&self, id: &str, w: &DocWorker) -> Option<Arc<WorkerClient>> {
        self.index(id, w).and_then(|i| self.backend.worker(i))
    }
}

/// The registration of a member, as the placement records it.
fn doc_worker(rec: &moe_control::WorkerRecord) -> DocWorker {
    DocWorker {
        address: rec.address.clone(),
        incarnation: rec.incarnation,
    }
}

/// Routes by the published placement and the membership; reports the version routed by.
async fn follow(
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

/// The placement controller's state (acts only while elected).
struct Controller {
    view: Arc<ClusterView>,
    clients: Arc<Clients>,
    store: PlacementStore,
    metrics: RouterMetrics,
    id: String,
    spec: ModelSpec,
    experts: Vec<(usize, u32)>,
    expert_bytes: u64,
    hidden: usize,
    replicas: usize,
    hot_copies: usize,
    min_workers: usize,
    load_timeout: Duration,
    /// Whether a registration serves this model (false: another hidden size).
    compatible: HashMap<(String, DocWorker), bool>,
    /// Expert load the plans use (the last rebalance's window), if any.
    load: Option<BTreeMap<(usize, u32), u64>>,
    /// Set by a rebalance tick: plan even if the workers did not change.
    rebalance_due: bool,
    /// A just-elected controller checks that every worker holds its copies.
    reconcile: bool,
    /// The last placement this controller published (the watch may lag behind it).
    published: Option<(u64, PlacementDoc)>,
    /// The placement whose superseded copies were all dropped (level-triggered: any
    /// newer placement, whoever published it, gets its clean-up).
    cleaned: Option<u64>,
    /// Since when every router routes by the placement being cleaned up after.
    switched: Option<(u64, Instant)>,
    /// Joining workers whose load failed, left out of placements until the instant given.
    excluded: HashMap<(String, DocWorker), Instant>,
    /// Routers present at the last round, and those that vanished since, with when.
    present: BTreeSet<String>,
    vanished: HashMap<String, Instant>,
    /// How long a vanished router's copies are kept (3 × the lease TTL).
    router_gone_grace: Duration,
}

impl Controller {
    /// The members that take part in the next placement: registered, not draining,
    /// answering and serving this model. Also reports whether one did not answer.
    async fn live(&mut self, members: &Membership) -> (BTreeMap<String, DocWorker>, bool) {
        let now = Instant::now();
        self.excluded.retain(|_, until| *until > now);
        let candidates: Vec<(String, DocWorker)> = members
            .iter()
            .filter(|(_, rec)| !rec.draining)
            .map(|(id, rec)| (id.clone(), doc_worker(rec)))
            .filter(|key| !self.excluded.contains_key(key))
            .collect();
        // New registrations are asked what they serve, all at once (one that does not
        // answer costs one deadline, not one per worker).
        let asks = candidates
            .iter()
            .filter(|key| !self.compatible.contains_key(*key))
            .filter_map(|(id, w)| {
                let client = self.clients.client(id, w)?;
                let key = (id.clone(), w.clone());
                Some(async move { (key, client.info(INFO_DEADLINE).await) })
            });
        let mut unanswered = false;
        for ((id, w), answer) in futures::future::join_all(asks).await {
            match answer {
                Ok(info) => {
                    let ok = info.hidden_size as usize == self.hidden;
                    if !ok {
                        tracing::error!(worker = %id, hidden = info.hidden_size, want = self.hidden, "worker serves another model; leaving it out");
                    }
                    self.compatible.insert((id, w), ok);
                }
                Err(e) => {
                    tracing::warn!(worker = %id, error = %e, "registered worker does not answer yet");
                    unanswered = true;
                }
            }
        }
        let live = candidates
            .into_iter()
            .filter(|key| self.compatible.get(key) == Some(&true))
            .collect();
        (live, unanswered)
    }

    /// One pass: re-place if needed, then drop superseded copies once every router
    /// switched. Returns whether to try again soon (something is pending).
    async fn round(
        &mut self,
        token: &FencingToken,
        members: &Membership,
        stored: Option<&StoredPlacement>,
        routers: &BTreeMap<String, RouterRecord>,
    ) -> anyhow::Result<bool> {
        let (live, unanswered) = self.live(members).await;
        // Until an excluded worker's time is up, come back to it.
        let unanswered = unanswered || !self.excluded.is_empty();
        let mut current = stored.and_then(|s| Some((s.version, decode(s, &self.spec)?)));
        // Our own last write may not have come back through the watch yet.
        if let Some(p) = &self.published {
            if current.as_ref().is_none_or(|(v, _)| *v < p.0) {
                current = Some(p.clone());
            }
        }
        // Versions rise past whatever is stored, even a placement this build cannot read.
        let floor = stored
            .map_or(0, |s| s.version)
            .max(current.as_ref().map_or(0, |c| c.0));
        let stale = match &current {
            None => true,
            Some((_, doc)) => doc.workers != live,
        };
        let mut pending = unanswered;
        if stale || self.rebalance_due || self.reconcile {
            if current.is_none() && live.len() < self.min_workers {
                tracing::info!(
                    live = live.len(),
                    want = self.min_workers,
                    "waiting for workers before the first placement"
                );
                return Ok(pending);
            }
            if live.is_empty() {
                tracing::warn!("no live worker to place experts on");
                return Ok(pending);
            }
            if let Some(published) = self
                .replace(token, members, &live, current.as_ref(), floor)
                .await?
            {
                current = Some(published);
            }
            self.rebalance_due = false;
            self.reconcile = false;
        }
        // Clean-up after the placement in force, once every router routes by it.
        let Some((version, doc)) = current else {
            return Ok(pending);
        };
        // A router whose presence vanished may have crashed, or may be cut off from etcd
        // and still routing by an older placement: its copies stay for a while.
        let now = Instant::now();
        for id in routers.keys() {
            self.vanished.remove(id);
        }
        for id in self.present.iter().filter(|id| !routers.contains_key(*id)) {
            self.vanished.entry(id.clone()).or_insert(now);
        }
        self.present = routers.keys().cloned().collect();
        if self.cleaned == Some(version) {
            return Ok(pending);
        }
        let grace = self.router_gone_grace;
        self.vanished
            .retain(|_, at| now.duration_since(*at) < grace);
        let behind: Vec<&String> = routers
            .iter()
            .filter(|(_, r)| r.placement_version < version)
            .map(|(id, _)| id)
            .chain(self.vanished.keys())
            .collect();
        if !behind.is_empty() {
            tracing::debug!(routers = ?behind, version, "waiting for routers to switch");
            self.switched = None;
            return Ok(true);
        }
        let since = match self.switched {
            Some((v, t)) if v == version => t,
            _ => {
                let t = Instant::now();
                self.switched = Some((version, t));
                t
            }
        };
        if let Some(rest) = UNLOAD_GRACE.checked_sub(since.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        if self.drop_superseded(version, &doc, members).await {
            self.cleaned = Some(version);
        } else {
            pending = true;
        }
        Ok(pending)
    }

    /// Plans over `live`, loads the new copies and publishes (fenced).
    async fn replace(
        &mut self,
        token: &FencingToken,
        members: &Membership,
        live: &BTreeMap<String, DocWorker>,
        current: Option<&(u64, PlacementDoc)>,
        floor: u64,
    ) -> anyhow::Result<Option<(u64, PlacementDoc)>> {
        let slots: Vec<DeviceSlot> = live
            .keys()
            .filter_map(|id| members.get(id))
            .flat_map(|r| {
                r.devices.iter().map(move |d| DeviceSlot {
                    worker: r.worker_id.clone(),
                    device: d.name.clone(),
                    capacity_bytes: d.capacity_bytes,
                })
            })
            .collect();
        let mut previous = current.map(|(v, d)| d.to_plan(*v)).unwrap_or_default();
        previous.assignments.retain(|slot, _| {
            current.is_some_and(|(_, d)| d.workers.get(&slot.worker) == live.get(&slot.worker))
        });
        let (next, missing) = plan_what_fits(&PlanInput {
            experts: &self.experts,
            expert_bytes: self.expert_bytes,
            devices: &slots,
            replicas: self.replicas,
            previous: Some(&previous),
            load: self.load.as_ref(),
            extra_copies: if self.load.is_some() {
                self.hot_copies
            } else {
                0
            },
        })
        .context("planning over the live workers")?;
        if !missing.is_empty() {
            tracing::error!(
                experts = missing.len(),
                first = ?missing.first(),
                "not enough device capacity for every expert: placing the others"
            );
        }
        let doc = PlacementDoc::from_plan(&next, live.clone(), &self.id, token.revision);
        let unchanged = current.is_some_and(|(_, d)| d.same_layout(&doc));
        let version = match current {
            Some((v, _)) if unchanged => *v,
            _ => floor + 1,
        };
        // Only workers that gain copies need to load (all of them when reconciling).
        let before = |id: &str| -> BTreeMap<String, BTreeSet<(usize, u32)>> {
            match current {
                Some((_, d)) if !self.reconcile && d.workers.get(id) == live.get(id) => {
                    d.assigned(id)
                }
                _ => BTreeMap::new(),
            }
        };
        // Phase 1: every worker loads its copies (already held ones are not read again).
        if !unchanged {
            self.view
                .update(|v| v.loading = Some((version, doc.clone())));
        }
        let loads = live.iter().filter_map(|(id, w)| {
            let had = before(id);
            let gains = doc
                .assigned(id)
                .iter()
                .any(|(d, set)| had.get(d).is_none_or(|h| !set.is_subset(h)));
            if !gains {
                return None;
            }
            let client = self.clients.client(id, w)?;
            let assignments: Vec<(String, Vec<(usize, u32)>)> = doc
                .assigned(id)
                .into_iter()
                .map(|(d, set)| (d, set.into_iter().collect()))
                .collect();
            let timeout = self.load_timeout;
            let id = id.clone();
            Some(async move {
                let r = client.load(version, assignments, timeout).await;
                (id, r)
            })
        });
        let loaded = futures::future::join_all(loads).await;
        self.view.update(|v| v.loading = None);
        let failed: Vec<(String, String)> = loaded
            .into_iter()
            .filter_map(|(id, r)| r.err().map(|e| (id, e.to_string())))
            .collect();
        if !failed.is_empty() {
            // A joining worker that cannot load is planned without for a while, rather
            // than holding every change up; one already serving the placement in force
            // keeps its copies and is retried (its load failing is no reason to move
            // everything it serves).
            for (id, _) in &failed {
                let serving = current.is_some_and(|(_, d)| d.workers.get(id) == live.get(id));
                if let (false, Some(w)) = (serving, live.get(id)) {
                    self.excluded.insert(
                        (id.clone(), w.clone()),
                        Instant::now() + EXCLUDE_AFTER_FAILED_LOAD,
                    );
                }
            }
            anyhow::bail!("loading experts failed on {failed:?}");
        }
        if unchanged {
            return Ok(None);
        }
        // Phase 2: publish; routers switch to the loaded copies.
        match self.store.put_placement(version, &doc, token).await {
            Ok(_) => {}
            Err(ControlError::Fenced { .. }) => {
                anyhow::bail!("no longer the controller: placement {version} not published")
            }
            Err(e) => return Err(e).context("publishing the placement"),
        }
        self.metrics.placements_published.inc();
        self.published = Some((version, doc.clone()));
        for d in &doc.devices {
            tracing::info!(worker = %d.worker, device = %d.device, experts = d.experts.len(), version, "placement");
        }
        tracing::info!(version, workers = live.len(), "published placement");
        Ok(Some((version, doc)))
    }

    /// Drops, on every registered worker, the copies placement `version` does not assign
    /// it (all of them on a worker left out, e.g. draining).
    async fn drop_superseded(
        &mut self,
        version: u64,
        doc: &PlacementDoc,
        members: &Membership,
    ) -> bool {
        let mut complete = true;
        let calls: Vec<_> = members
            .iter()
            .filter_map(|(id, rec)| {
                let w = doc_worker(rec);
                if self.compatible.get(&(id.clone(), w.clone())) == Some(&false) {
                    return None;
                }
                let Some(i) = self.clients.index(id, &w) else {
                    complete = false;
                    return None;
                };
                if self.clients.backend.is_marked_down(i) {
                    // Silent lately: not worth waiting on now; tried again later (or it
                    // leaves the membership).
                    complete = false;
                    return None;
                }
                let client = self.clients.backend.worker(i)?;
                let keep = if doc.workers.get(id) == Some(&w) {
                    doc.assigned(id)
                } else {
                    BTreeMap::new()
                };
                // No controller loads a draining worker again: empty it whatever version
                // its copies were loaded for (an abandoned round's included).
                let version = if rec.draining { u64::MAX } else { version };
                let id = id.clone();
                Some(async move {
                    let info = client.info(UNLOAD_INFO_DEADLINE).await?;
                    let extra: Vec<(String, Vec<(usize, u32)>)> = info
                        .devices
                        .iter()
                        .map(|d| {
                            let kept = keep.get(&d.name);
                            let drop: Vec<(usize, u32)> = d
                                .experts
                                .iter()
                                .map(|e| (e.layer as usize, e.expert))
                                .filter(|e| !kept.is_some_and(|k| k.contains(e)))
                                .collect();
                            (d.name.clone(), drop)
                        })
                        .filter(|(_, drop)| !drop.is_empty())
                        .collect();
                    if extra.is_empty() {
                        return Ok::<_, moe_model::ExpertError>(());
                    }
                    let n: usize = extra.iter().map(|(_, d)| d.len()).sum();
                    client.unload(version, extra, INFO_DEADLINE * 5).await?;
                    tracing::info!(worker = %id, experts = n, version, "dropped superseded copies");
                    Ok(())
                })
            })
            .collect();
        for r in futures::future::join_all(calls).await {
            if let Err(e) = r {
                // Tried again at the next round; the copies are not routed to meanwhile.
                tracing::warn!(error = %e, version, "could not drop superseded copies yet");
                complete = false;
            }
        }
        complete
    }
}

/// Publishes this router's per-expert token counts of the last window, for the
/// controller's load-aware replication.
async fn report_load(
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
    tokio::spawn(follow(
        view.clone(),
        spec.clone(),
        clients.clone(),
        members.subscribe(),
        placement.subscribe(),
        presence,
        shutdown.clone(),
    ));

    // etcd connection state and leader changes, for the dashboards.
    {
        let metrics = metrics.clone();
        let view = view.clone();
        let mut conn = members.connection();
        let leader = watch_leader(config.clone());
        let mut leader_rx = leader.subscribe();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _leader = leader;
            let mut last: Option<i64> = None;
            loop {
                let connected =
                    *conn.borrow_and_update() == moe_control::ConnectionState::Connected;
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
        });
    }

    let rebalance = match source.rebalance_interval {
        Some(every) => {
            let reporter = LoadReporter::start(config.clone(), &router_id, source.lease_ttl)
                .context("starting the load reporter")?;
            tokio::spawn(report_load(
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

    let ctl = Controller {
        view,
        clients,
        store,
        metrics: metrics.clone(),
        id: router_id,
        spec: spec.clone(),
        experts: LocalExperts::all_of(spec),
        expert_bytes: spec.expert_bytes_f32() as u64,
        hidden: spec.hidden_size,
        replicas,
        hot_copies: source.hot_copies,
        min_workers: source.min_workers.max(1),
        load_timeout: startup_timeout,
        compatible: HashMap::new(),
        load: None,
        rebalance_due: false,
        reconcile: true,
        published: None,
        cleaned: None,
        switched: None,
        excluded: HashMap::new(),
        present: BTreeSet::new(),
        vanished: HashMap::new(),
        router_gone_grace: source.lease_ttl * 3,
    };
    tokio::spawn(control(
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

/// The controller loop: one [`Controller::round`] after every change seen while leading.
async fn control(
    mut ctl: Controller,
    election: Election,
    members: moe_control::LiveView<Membership>,
    placement: moe_control::LiveView<Option<StoredPlacement>>,
    routers: moe_control::LiveView<BTreeMap<String, RouterRecord>>,
    rebalance: Option<(Duration, LoadView)>,
    shutdown: CancellationToken,
) {
    let mut leadership = election.leadership();
    let mut members_rx = members.subscribe();
    let mut placement_rx = placement.subscribe();
    let mut routers_rx = routers.subscribe();
    let every = rebalance.as_ref().map(|(d, _)| *d);
    let mut next_rebalance = every.map(|d| Instant::now() + d);
    let mut retry = false;
    let mut leading: Option<FencingToken> = None;
    loop {
        let token = match &*leadership.borrow_and_update() {
            Leadership::Leader(t) => Some(t.clone()),
            Leadership::Follower => None,
        };
        if token != leading {
            match &token {
                // A new term (even of this router): check every worker holds its copies,
                // and clean up after the placement in force.
                Some(t) => {
                    tracing::info!(token = %t, "this router is the placement controller");
                    ctl.metrics.controller_leader.set(1);
                    ctl.view.update(|v| v.leading = true);
                    ctl.reconcile = true;
                    ctl.published = None;
                    ctl.cleaned = None;
                }
                None => {
                    tracing::warn!("this router is no longer the placement controller");
                    ctl.metrics.controller_leader.set(0);
                    ctl.view.update(|v| v.leading = false);
                }
            }
            leading = token.clone();
        }
        let routers_now = routers_rx.borrow().clone();
        ctl.view.update(|v| v.routers = routers_now);
        if let Some(token) = token {
            let m = members_rx.borrow_and_update().clone();
            let p = placement_rx.borrow_and_update().clone();
            let r = routers_rx.borrow_and_update().clone();
            // A membership change mid-round (a worker died while being loaded) starts
            // the round over on the new membership instead of waiting on the dead.
            let outcome = tokio::select! {
                r = ctl.round(&token, &m, p.as_ref(), &r) => Some(r),
                _ = members_rx.changed() => None,
                _ = leadership.changed() => None,
            };
            retry = match outcome {
                Some(Ok(pending)) => pending,
                Some(Err(e)) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "placement change failed; retrying"
                    );
                    true
                }
                None => {
                    tracing::info!("membership or leadership changed mid-change: planning again");
                    continue;
                }
            };
        }
        let tick = async {
            match next_rebalance {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = leadership.changed() => if r.is_err() { break },
            r = members_rx.changed() => if r.is_err() { break },
            r = placement_rx.changed() => if r.is_err() { break },
            r = routers_rx.changed() => if r.is_err() { break },
            _ = tokio::time::sleep(RETRY_AFTER), if retry && leading.is_some() => {}
            _ = tick => {
                if let (Some((_, view)), Some(d)) = (&rebalance, every) {
                    let load = view.current();
                    if leading.is_some() && load.values().any(|n| *n > 0) {
                        tracing::info!(experts = load.len(), "rebalancing by observed expert load");
                        ctl.load = Some(load);
                        ctl.rebalance_due = true;
                    }
                    next_rebalance = Some(Instant::now() + d);
                }
            }
        }
    }
    ctl.metrics.controller_leader.set(0);
    if let Err(e) = tokio::time::timeout(Duration::from_secs(2), election.resign()).await {
        tracing::warn!(error = %e, "resigning as controller timed out; leadership passes after the TTL");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_spec() -> ModelSpec {
        use moe_model::tiny::{config_json, Size, StoreDtype};
        let json = config_json(moe_model::Arch::Mixtral, Size::Tiny, StoreDtype::F32);
        ModelSpec::from_json(&json.to_string()).unwrap()
    }

    fn doc() -> PlacementDoc {
        PlacementDoc {
            controller: "r0".into(),
            token: 7,
            workers: [(
                "w0".to_owned(),
                DocWorker {
                    address: "127.0.0.1:1".into(),
                    incarnation: 3,
                },
            )]
            .into(),
            devices: vec![DocDevice {
                worker: "w0".into(),
                device: "cpu:0".into(),
                capacity_bytes: 0,
                experts: vec![(0, 1), (1, 2)],
            }],
        }
    }

    #[test]
    fn placement_doc_round_trips_through_a_plan() {
        let d = doc();
        let plan = d.to_plan(4);
        assert_eq!(plan.version, 4);
        let back = PlacementDoc::from_plan(&plan, d.workers.clone(), "r1", 9);
        assert!(back.same_layout(&d));
        assert_ne!(back, d, "the writer differs");
        assert_eq!(
            d.assigned("w0")["cpu:0"],
            [(0, 1), (1, 2)].into_iter().collect()
        );
        assert!(d.assigned("w1").is_empty());
        let json = serde_json::to_value(&d).unwrap();
        let stored = StoredPlacement {
            version: 4,
            placement: json,
        };
        let spec = tiny_spec();
        assert_eq!(decode(&stored, &spec), Some(d));
        let bad = StoredPlacement {
            version: 5,
            placement: serde_json::json!({"nope": 1}),
        };
        assert_eq!(decode(&bad, &spec), None);
        let mut foreign = doc();
        foreign.devices[0].experts.push((0, 8));
        let stored = StoredPlacement {
            version: 6,
            placement: serde_json::to_value(&foreign).unwrap(),
        };
        let e = decode_checked(&stored, &spec).unwrap_err();
        assert!(e.contains("expert 8 of layer 0"), "{e}");
    }

    /// Found by the `placement_document` fuzz target: the same device twice (another
    /// capacity) was routed to for both expert lists, but `assigned` told its worker to
    /// hold only the second.
    #[test]
    fn a_placement_listing_a_device_twice_is_refused() {
        let text = include_str!(
            "../../fuzz/regressions/placement_document/invalid-device-listed-twice.json"
        );
        let stored: StoredPlacement = serde_json::from_str(text).unwrap();
        let spec = tiny_spec();
        let e = decode_checked(&stored, &spec).unwrap_err();
        assert_eq!(e, "device w0/cpu:0 is listed twice");
        assert_eq!(decode(&stored, &spec), None);
    }
}
