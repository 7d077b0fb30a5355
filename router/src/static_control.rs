//! A static cluster (`--workers`, no etcd): this router places the experts on the
//! listed workers at start and, being the only controller there is, keeps them placed.
//!
//! Every [`HEAL_INTERVAL`] it asks each worker what it hosts (`Info`) and:
//! - **reloads drift**: a worker that answers but lacks copies the placement assigns it
//!   (it restarted at the same address, or something unloaded them) is told to load its
//!   assignment again (`LoadExperts`), then routed to again;
//! - **re-places around the dead**: once a worker of the placement has not answered for
//!   [`REPLACE_AFTER`], the experts are planned again over the workers that answer (the
//!   same planner as with etcd, least movement from the placement in force), the new
//!   copies are loaded, the routes switch, and copies no longer assigned are dropped
//!   once no dispatch routed the old way is in flight;
//! - **takes returning workers back**: a listed worker outside the placement that
//!   answers again is planned back in the same way.
//!
//! What it saw goes to [`StaticView`] (`/v1/cluster` → `static_workers`, the status
//! page) and to `moe_live_workers`. One router per static worker set: two routers
//! healing the same workers would fight over them (use etcd for several routers).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use moe_control::{plan_what_fits, DeviceSlot, PlacementPlan, PlanInput};
use moe_model::{LocalExperts, ModelSpec};
use moe_proto::v1::InfoResponse;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::dispatch::RemoteBackend;
use crate::dispatch::WorkerClient;
use crate::metrics::RouterMetrics;
use crate::serve::{ExpertSource, RouterConfig};

/// How often the workers are asked what they host.
pub const HEAL_INTERVAL: Duration = Duration::from_secs(1);
/// How long a worker of the placement may stay silent before its experts are placed on
/// the others.
pub const REPLACE_AFTER: Duration = Duration::from_secs(3);
/// Deadline of each `Info` call.
const INFO_DEADLINE: Duration = Duration::from_secs(2);

/// Experts per device of one worker.
type Hosted = BTreeMap<String, BTreeSet<(usize, u32)>>;

/// What the healer last saw of each listed worker.
#[derive(Debug, Default)]
pub struct StaticView {
    workers: Mutex<Vec<Value>>,
}

impl StaticView {
    fn set(&self, workers: Vec<Value>) {
        *self.workers.lock().unwrap_or_else(PoisonError::into_inner) = workers;
    }

    /// One entry per listed worker: address, whether it answers, whether it is routed
    /// to, experts it hosts and experts the placement assigns it.
    pub fn to_json(&self) -> Value {
        Value::Array(
            self.workers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// Places the experts on the listed workers (waiting, bounded, for each to answer),
/// routes by that placement, and starts healing it until `stop`.
pub(crate) async fn start(
    cfg: &RouterConfig,
    spec: &ModelSpec,
    metrics: &RouterMetrics,
    stop: CancellationToken,
) -> anyhow::Result<(Arc<RemoteBackend>, Arc<StaticView>)> {
    let ExpertSource::Remote { workers } = &cfg.experts else {
        anyhow::bail!("not a static configuration");
    };
    let clients: Vec<Arc<WorkerClient>> = workers
        .iter()
        .map(|a| {
            WorkerClient::new(a, Duration::from_secs(2), cfg.dispatch.worker_tls.clone())
                .map(Arc::new)
        })
        .collect::<Result<_, _>>()?;
    let deadline = tokio::time::Instant::now() + cfg.startup_timeout;
    let mut slots = Vec::new();
    for c in &clients {
        let info = loop {
            match c.info(INFO_DEADLINE).await {
                Ok(i) => break i,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::info!(worker = %c.addr(), error = %e, "waiting for worker");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => anyhow::bail!(
                    "worker {} did not answer within {:?}: {e}",
                    c.addr(),
                    cfg.startup_timeout
                ),
            }
        };
        check_worker(
            c.addr(),
            &info,
            spec.hidden_size,
            cfg.engine.max_batch_tokens,
        )?;
        slots.push(device_slots(c.addr(), &info));
    }
    let mut healer = Healer {
        backend: Arc::new(
            RemoteBackend::new(
                clients.clone(),
                spec.hidden_size,
                tokio::runtime::Handle::current(),
                cfg.dispatch.clone(),
                metrics.clone(),
            )
            // A dispatch whose experts lost every copy waits (bounded) for the healer.
            .with_wait_for_copies(),
        ),
        index: clients
            .iter()
            .enumerate()
            .map(|(i, c)| (c.addr().to_owned(), i))
            .collect(),
        silent_since: vec![None; clients.len()],
        planned: (0..clients.len()).collect(),
        clients,
        slots,
        experts: LocalExperts::all_of(spec),
        expert_bytes: spec.expert_bytes_f32() as u64,
        replicas: cfg.replicas,
        hidden: spec.hidden_size,
        max_rows: cfg.engine.max_batch_tokens,
        load_timeout: cfg.startup_timeout,
        metrics: metrics.clone(),
        view: Arc::new(StaticView::default()),
    };
    let all: BTreeSet<usize> = (0..healer.clients.len()).collect();
    let first = healer.plan_over(&all, &PlacementPlan::default(), 1)?;
    healer
        .load_all(&first, &all, &vec![None; all.len()])
        .await
        .context("loading experts on the workers")?;
    healer.backend.set_routes(&first, &healer.index);
    let (backend, view) = (healer.backend.clone(), healer.view.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(HEAL_INTERVAL) => {}
            }
            healer.round().await;
        }
    });
    Ok((backend, view))
}

/// Refuses a worker that serves another model or takes smaller dispatches than this
/// router's steps.
fn check_worker(
    addr: &str,
    info: &InfoResponse,
    hidden_size: usize,
    max_batch_tokens: usize,
) -> anyhow::Result<()> {
    if info.hidden_size as usize != hidden_size {
        anyhow::bail!(
            "worker {addr} serves a model with hidden size {}, the router's has {hidden_size}",
            info.hidden_size,
        );
    }
    let rows = info.max_dispatch_rows as usize;
    if rows != 0 && rows < max_batch_tokens {
        anyhow::bail!(
            "worker {addr} accepts at most {rows} rows per dispatch (its --max-dispatch-rows) and this router's steps have up to {max_batch_tokens} (--max-batch-tokens): raise the one or lower the other"
        );
    }
    Ok(())
}

fn device_slots(addr: &str, info: &InfoResponse) -> Vec<DeviceSlot> {
    info.devices
        .iter()
        .map(|d| DeviceSlot {
            worker: addr.to_owned(),
            device: d.name.clone(),
            capacity_bytes: d.capacity_bytes,
            expert_bytes: d.bytes_per_expert,
        })
        .collect()
}

fn hosted(info: &InfoResponse) -> Hosted {
    info.devices
        .iter()
        .map(|d| {
            let set = d
                .experts
                .iter()
                .map(|e| (e.layer as usize, e.expert))
                .collect();
            (d.name.clone(), set)
        })
        .collect()
}

/// The plan's experts per device of `worker`.
fn assigned(plan: &PlacementPlan, worker: &str) -> Hosted {
    plan.assignments
        .iter()
        .filter(|(slot, _)| slot.worker == worker)
        .map(|(slot, set)| (slot.device.clone(), set.clone()))
        .collect()
}

/// Experts of `want` that `have` lacks.
fn lacking(want: &Hosted, have: &Hosted) -> usize {
    want.iter()
        .map(|(d, set)| {
            set.iter()
                .filter(|e| !have.get(d).is_some_and(|h| h.contains(e)))
                .count()
        })
        .sum()
}

fn as_lists(h: &Hosted) -> Vec<(String, Vec<(usize, u32)>)> {
    h.iter()
        .map(|(d, set)| (d.clone(), set.iter().copied().collect()))
        .collect()
}

struct Healer {
    backend: Arc<RemoteBackend>,
    clients: Vec<Arc<WorkerClient>>,
    /// Worker address → client index (the order of `--workers`).
    index: HashMap<String, usize>,
    /// Each worker's devices, from its last answer.
    slots: Vec<Vec<DeviceSlot>>,
    /// Since when each worker has not answered.
    silent_since: Vec<Option<Instant>>,
    /// The workers the placement in force was planned over (some may hold nothing).
    planned: BTreeSet<usize>,
    experts: Vec<(usize, u32)>,
    expert_bytes: u64,
    replicas: usize,
    hidden: usize,
    max_rows: usize,
    load_timeout: Duration,
    metrics: RouterMetrics,
    view: Arc<StaticView>,
}

impl Healer {
    /// Plans over the devices of `members`, moving as little as possible from `previous`;
    /// what does not fit is left out (requests needing it fail UNAVAILABLE naming it).
    fn plan_over(
        &self,
        members: &BTreeSet<usize>,
        previous: &PlacementPlan,
        version: u64,
    ) -> anyhow::Result<PlacementPlan> {
        let slots: Vec<DeviceSlot> = members
            .iter()
            .flat_map(|&i| self.slots[i].iter().cloned())
            .collect();
        let mut previous = previous.clone();
        previous.assignments.retain(|s, _| slots.contains(s));
        let (mut next, missing) = plan_what_fits(&PlanInput {
            experts: &self.experts,
            expert_bytes: self.expert_bytes,
            devices: &slots,
            replicas: self.replicas,
            previous: Some(&previous),
            load: None,
            extra_copies: 0,
        })
        .context("planning the static placement")?;
        if !missing.is_empty() {
            tracing::error!(
                experts = missing.len(),
                first = ?missing.first(),
                "not enough device capacity on the answering workers for every expert: placing the others"
            );
        }
        next.version = version;
        for (slot, experts) in &next.assignments {
            tracing::info!(worker = %slot.worker, device = %slot.device, experts = experts.len(), version, "placement");
        }
        Ok(next)
    }

    /// Has every worker of `members` that lacks some of its copies in `plan` load its
    /// whole assignment (copies already held are not read again); `have` is what each
    /// hosts, if known.
    async fn load_all(
        &self,
        plan: &PlacementPlan,
        members: &BTreeSet<usize>,
        have: &[Option<Hosted>],
    ) -> anyhow::Result<Vec<usize>> {
        let loads = members.iter().filter_map(|&i| {
            let c = self.clients[i].clone();
            let want = assigned(plan, c.addr());
            let short = have[i].as_ref().map_or(usize::MAX, |h| lacking(&want, h));
            (short > 0 && !want.is_empty()).then(|| {
                let (version, timeout) = (plan.version, self.load_timeout);
                async move { (i, c.load(version, as_lists(&want), timeout).await) }
            })
        });
        let mut loaded = Vec::new();
        let mut failed = Vec::new();
        for (i, r) in futures::future::join_all(loads).await {
            match r {
                Ok(_) => loaded.push(i),
                Err(e) => failed.push(format!("{}: {e}", self.clients[i].addr())),
            }
        }
        if !failed.is_empty() {
            anyhow::bail!("loading experts failed on {}", failed.join("; "));
        }
        Ok(loaded)
    }

    /// One look at the workers, and whatever repair it calls for.
    async fn round(&mut self) {
        let asks = self.clients.iter().map(|c| c.info(INFO_DEADLINE));
        let answers = futures::future::join_all(asks).await;
        let now = Instant::now();
        let mut have: Vec<Option<Hosted>> = Vec::with_capacity(answers.len());
        for (i, answer) in answers.into_iter().enumerate() {
            let addr = self.clients[i].addr().to_owned();
            match answer {
                Ok(info) => match check_worker(&addr, &info, self.hidden, self.max_rows) {
                    Ok(()) => {
                        if self.silent_since[i].take().is_some() {
                            tracing::info!(worker = %addr, "worker answers again");
                        }
                        self.slots[i] = device_slots(&addr, &info);
                        have.push(Some(hosted(&info)));
                    }
                    Err(e) => {
                        if self.silent_since[i].is_none() {
                            tracing::error!(error = %e, "leaving the worker out");
                        }
                        self.silent_since[i].get_or_insert(now);
                        have.push(None);
                    }
                },
                Err(e) => {
                    if self.silent_since[i].is_none() {
                        tracing::warn!(worker = %addr, error = %e, "worker does not answer");
                    }
                    self.silent_since[i].get_or_insert(now);
                    have.push(None);
                }
            }
        }
        let current = self.backend.placement();
        // Members: those that answer, and those planned over that have been silent for
        // less than REPLACE_AFTER (a blip is not worth moving experts for).
        let members: BTreeSet<usize> = (0..self.clients.len())
            .filter(|&i| {
                have[i].is_some()
                    || (self.planned.contains(&i)
                        && self.silent_since[i]
                            .is_none_or(|t| now.duration_since(t) < REPLACE_AFTER))
            })
            .collect();
        if !members.is_empty() && members != self.planned {
            match self.replace(&current, &members, &mut have).await {
                Ok(()) => self.planned = members,
                Err(e) => tracing::warn!(error = %e, "re-placing the experts failed; trying again"),
            }
        } else {
            self.reload_drift(&current, &mut have).await;
        }
        self.publish(&have);
    }

    /// Reloads workers that answer but lack copies the placement in force assigns them.
    async fn reload_drift(&self, current: &PlacementPlan, have: &mut [Option<Hosted>]) {
        let drifted: BTreeSet<usize> = (0..self.clients.len())
            .filter(|&i| {
                have[i]
                    .as_ref()
                    .is_some_and(|h| lacking(&assigned(current, self.clients[i].addr()), h) > 0)
            })
            .collect();
        if drifted.is_empty() {
            return;
        }
        for &i in &drifted {
            let want = assigned(current, self.clients[i].addr());
            let short = have[i].as_ref().map_or(0, |h| lacking(&want, h));
            tracing::warn!(worker = %self.clients[i].addr(), lacking = short, of = want.values().map(BTreeSet::len).sum::<usize>(), "worker lacks copies the placement assigns it (restarted, or unloaded): reloading");
        }
        match self.load_all(current, &drifted, have).await {
            Ok(loaded) => {
                for i in loaded {
                    self.backend.mark_up(i);
                    have[i] = Some(assigned(current, self.clients[i].addr()));
                    tracing::info!(worker = %self.clients[i].addr(), "worker reloaded; routing to it again");
                }
            }
            Err(e) => tracing::warn!(error = %e, "reloading failed; trying again"),
        }
    }

    /// Plans over `members`, loads the new copies, switches the routes, then drops the
    /// copies no longer assigned.
    async fn replace(
        &self,
        current: &PlacementPlan,
        members: &BTreeSet<usize>,
        have: &mut [Option<Hosted>],
    ) -> anyhow::Result<()> {
        let next = self.plan_over(members, current, current.version + 1)?;
        if next.assignments == current.assignments {
            // The change moves nothing (e.g. a returning worker the planner leaves
            // empty): keep the placement and its version.
            return Ok(());
        }
        let answering: BTreeSet<usize> = members
            .iter()
            .copied()
            .filter(|&i| have[i].is_some())
            .collect();
        self.load_all(&next, &answering, have).await?;
        // What each answering worker holds now: its new copies and its old ones.
        for &i in &answering {
            let gained = assigned(&next, self.clients[i].addr());
            let held = have[i].get_or_insert_with(Hosted::new);
            for (d, set) in gained {
                held.entry(d).or_default().extend(set);
            }
        }
        let epoch = self.backend.set_routes(&next, &self.index);
        self.metrics.placements_published.inc();
        tracing::info!(
            version = next.version,
            workers = members.len(),
            "re-placed the experts over the workers that answer"
        );
        if !self
            .backend
            .drained(epoch, self.backend.dispatch_bound())
            .await
        {
            return Ok(());
        }
        // Copies no longer assigned (the old routes no longer reach them).
        for &i in &answering {
            let addr = self.clients[i].addr();
            let want = assigned(&next, addr);
            let extra: Hosted = have[i]
                .iter()
                .flatten()
                .map(|(d, set)| {
                    let keep = want.get(d);
                    let drop = set
                        .iter()
                        .copied()
                        .filter(|e| !keep.is_some_and(|k| k.contains(e)))
                        .collect();
                    (d.clone(), drop)
                })
                .filter(|(_, set): &(String, BTreeSet<_>)| !set.is_empty())
                .collect();
            if !extra.is_empty() {
                match self.clients[i]
                    .unload(next.version, as_lists(&extra), INFO_DEADLINE)
                    .await
                {
                    Ok(info) => have[i] = Some(hosted(&info)),
                    Err(e) => {
                        tracing::warn!(worker = %addr, error = %e, "dropping superseded copies failed")
                    }
                }
            }
        }
        Ok(())
    }

    /// Records what this round saw: `/v1/cluster` and `moe_live_workers`.
    fn publish(&self, have: &[Option<Hosted>]) {
        let plan = self.backend.placement();
        let workers = self
            .clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let want = assigned(&plan, c.addr());
                json!({
                    "address": c.addr(),
                    "answering": have[i].is_some(),
                    "routed": !want.is_empty() && !self.backend.is_marked_down(i),
                    "hosted": have[i].as_ref().map(|h| h.values().map(BTreeSet::len).sum::<usize>()),
                    "assigned": want.values().map(BTreeSet::len).sum::<usize>(),
                })
            })
            .collect();
        self.view.set(workers);
        let live = have.iter().filter(|h| h.is_some()).count();
        self.metrics.live_workers.set(live as i64);
    }
}
