//! The placement controller: acts only while this router is elected (etcd's election
//! API on `controller`). When the live workers differ from the placement's, or a
//! rebalance is due, it plans a new placement, has every worker load its new copies,
//! publishes it fenced by its leadership, and once every router routes by it drops the
//! copies no longer assigned.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use moe_control::{
    plan_what_fits, ControlError, DeviceSlot, Election, FencingToken, Leadership, Membership,
    PlacementStore, PlanInput, RouterRecord, StoredPlacement,
};
use moe_model::{LocalExperts, ModelSpec};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::placement_doc::{decode, DocWorker, PlacementDoc};
use super::{doc_worker, Clients, ClusterView, EtcdMembership};
use crate::metrics::RouterMetrics;

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

/// The placement controller's state (acts only while elected).
pub(super) struct Controller {
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
    /// A controller for this router, not yet acting (it acts once elected).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        view: Arc<ClusterView>,
        clients: Arc<Clients>,
        store: PlacementStore,
        metrics: RouterMetrics,
        id: String,
        spec: &ModelSpec,
        replicas: usize,
        source: &EtcdMembership,
        load_timeout: Duration,
    ) -> Self {
        Self {
            view,
            clients,
            store,
            metrics,
            id,
            spec: spec.clone(),
            experts: LocalExperts::all_of(spec),
            expert_bytes: spec.expert_bytes_f32() as u64,
            hidden: spec.hidden_size,
            replicas,
            hot_copies: source.hot_copies,
            min_workers: source.min_workers.max(1),
            load_timeout,
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
        }
    }

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
                    expert_bytes: d.expert_bytes,
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

/// The controller loop: one [`Controller::round`] after every change seen while leading.
pub(super) async fn control(
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
