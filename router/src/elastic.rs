//! Elastic membership for a router started with `--etcd` (one router; no election
//! yet): the workers come from the cluster's membership in etcd instead of a static
//! list, and the placement follows it.
//!
//! At start the router waits for `--min-workers` registered workers, plans over their
//! devices, loads and routes (placement version 1). Then, on every membership change:
//! a departed worker (lease expired or revoked, or re-registered at a new address) is
//! dropped from the routes at once; a new plan is made over the workers left and any
//! that joined, with the plan in force as `previous` (least movement); every worker is
//! told what to host and, once all have loaded, the routes switch to the new plan and
//! the placement version goes up. A failed load, or a registered worker that does not
//! answer `Info` yet, is tried again a second later (one serving a model of another
//! hidden size is left out). While an
//! expert has no copy, dispatch waits for one (see
//! [`RemoteBackend::with_wait_for_copies`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use moe_control::{
    plan, DeviceSlot, EtcdConfig, EtcdRegistry, Membership, PlacementPlan, PlanInput, Registry,
};
use moe_model::{LocalExperts, ModelSpec};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backend::RemoteBackend;
use crate::remote::WorkerClient;

/// Where the membership lives and how many workers to wait for.
#[derive(Debug, Clone)]
pub struct EtcdMembership {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// Cluster name (key prefix `/moe/<cluster>/`).
    pub cluster: String,
    /// Registered workers to wait for before the first placement.
    pub min_workers: usize,
}

/// How long to wait before planning again after a failed change.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Follows the membership: the workers known, the plan in force.
struct Controller {
    backend: Arc<RemoteBackend>,
    experts: Vec<(usize, u32)>,
    expert_bytes: u64,
    /// The model's hidden size, which every worker must share.
    hidden: usize,
    replicas: usize,
    load_timeout: Duration,
    /// Worker id → (advertised address, index in the backend).
    workers: BTreeMap<String, (String, usize)>,
    plan: PlacementPlan,
    /// The plan in force does not match the workers known (a change failed midway).
    dirty: bool,
    /// A registered worker did not answer `Info`: it is asked again a second later.
    unanswered: bool,
}

impl Controller {
    /// Worker id → backend index, of the workers known.
    fn index(&self) -> HashMap<String, usize> {
        self.workers
            .iter()
            .map(|(id, (_, i))| (id.clone(), *i))
            .collect()
    }

    /// Brings workers, plan and routes in line with `members`.
    async fn apply(&mut self, members: &Membership) -> anyhow::Result<()> {
        let departed: Vec<String> = self
            .workers
            .iter()
            .filter(|(id, (addr, _))| members.get(*id).is_none_or(|r| &r.address != addr))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &departed {
            self.workers.remove(id);
        }
        if !departed.is_empty() {
            tracing::warn!(workers = ?departed, "workers left the membership: routing around them");
            self.backend.set_routes(&self.plan, &self.index());
            self.dirty = true;
        }
        self.unanswered = false;
        for (id, rec) in members {
            if self.workers.contains_key(id) {
                continue;
            }
            let client = WorkerClient::new(&rec.address, Duration::from_secs(2))
                .with_context(|| format!("worker {id}"))?;
            // Only a worker that answers and serves this model takes part.
            match client.info(Duration::from_secs(2)).await {
                Ok(info) if info.hidden_size as usize == self.hidden => {}
                Ok(info) => {
                    tracing::error!(worker = %id, hidden = info.hidden_size, want = self.hidden, "worker serves another model; leaving it out");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(worker = %id, error = %e, "registered worker does not answer yet");
                    self.unanswered = true;
                    continue;
                }
            }
            let i = self.backend.add_worker(Arc::new(client));
            tracing::info!(worker = %id, address = %rec.address, "worker joined the membership");
            self.workers.insert(id.clone(), (rec.address.clone(), i));
            self.dirty = true;
        }
        if !self.dirty {
            return Ok(());
        }
        let slots: Vec<DeviceSlot> = members
            .iter()
            .filter(|(id, _)| self.workers.contains_key(*id))
            .flat_map(|(id, r)| {
                r.devices.iter().map(move |d| DeviceSlot {
                    worker: id.clone(),
                    device: d.name.clone(),
                    capacity_bytes: d.capacity_bytes,
                })
            })
            .collect();
        let mut previous = self.plan.clone();
        previous
            .assignments
            .retain(|slot, _| self.workers.contains_key(&slot.worker));
        let mut next = plan(&PlanInput {
            experts: &self.experts,
            expert_bytes: self.expert_bytes,
            devices: &slots,
            replicas: self.replicas,
            previous: Some(&previous),
        })
        .context("planning over the live workers")?;
        next.version = self.plan.version + 1;
        let loads = self.workers.iter().filter_map(|(id, (_, i))| {
            let client = self.backend.worker(*i)?;
            let assignments: Vec<(String, Vec<(usize, u32)>)> = next
                .assignments
                .iter()
                .filter(|(slot, _)| &slot.worker == id)
                .map(|(slot, set)| (slot.device.clone(), set.iter().copied().collect()))
                .collect();
            let (version, timeout) = (next.version, self.load_timeout);
            Some(async move { client.load(version, assignments, timeout).await })
        });
        for r in futures::future::join_all(loads).await {
            r.context("loading experts on a worker")?;
        }
        self.backend.set_routes(&next, &self.index());
        for (slot, experts) in &next.assignments {
            tracing::info!(worker = %slot.worker, device = %slot.device, experts = experts.len(), version = next.version, "placement");
        }
        self.plan = next;
        self.dirty = false;
        Ok(())
    }
}

/// Waits for the membership, places and loads the first plan, and spawns the task that
/// follows the membership until `shutdown`.
pub async fn start(
    source: &EtcdMembership,
    backend: Arc<RemoteBackend>,
    spec: &ModelSpec,
    replicas: usize,
    startup_timeout: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config =
        EtcdConfig::new(source.endpoints.clone(), &source.cluster).context("--etcd/--cluster")?;
    let view = EtcdRegistry::new(config).watch_workers();
    let mut rx: watch::Receiver<Membership> = view.subscribe();
    let min = source.min_workers.max(1);
    tracing::info!(cluster = %source.cluster, min_workers = min, "waiting for workers to register");
    let deadline = tokio::time::Instant::now() + startup_timeout;
    tokio::time::timeout_at(deadline, rx.wait_for(|m| m.len() >= min))
        .await
        .map_err(|_| {
            anyhow::anyhow!("fewer than {min} workers registered within {startup_timeout:?}")
        })?
        .map_err(|_| anyhow::anyhow!("the membership watch stopped"))?;
    let mut ctl = Controller {
        backend,
        experts: LocalExperts::all_of(spec),
        expert_bytes: spec.expert_bytes_f32() as u64,
        hidden: spec.hidden_size,
        replicas,
        load_timeout: startup_timeout,
        workers: BTreeMap::new(),
        plan: PlacementPlan::default(),
        dirty: true,
        unanswered: false,
    };
    loop {
        let members = rx.borrow_and_update().clone();
        match ctl.apply(&members).await {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() + RETRY_AFTER < deadline => {
                tracing::warn!(error = format!("{e:#}"), "first placement failed; retrying");
                tokio::time::sleep(RETRY_AFTER).await;
            }
            Err(e) => return Err(e.context("placing experts on the registered workers")),
        }
    }
    tokio::spawn(async move {
        let _view = view;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RETRY_AFTER), if ctl.dirty || ctl.unanswered => {}
            }
            let members = rx.borrow_and_update().clone();
            if let Err(e) = ctl.apply(&members).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    version = ctl.plan.version,
                    "placement change failed; retrying"
                );
            }
        }
    });
    Ok(())
}
