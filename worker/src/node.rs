//! [`Node`]: a worker's devices and experts behind one cheap, cloneable handle. It owns
//! the model spec and the open checkpoint (shared by every device actor), starts the
//! supervisor and its device actors, and turns the public calls (load, unload, compute)
//! into messages to them.
//!
//! `compute` splits the request among the devices that host each expert (`fanout`), runs
//! the devices concurrently and adds their partial sums. A device that fails mid-call
//! answers `ExpertError::Unavailable`; the supervisor restarts it, and later calls wait
//! (bounded) for the replacement.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moe_model::checkpoint::Checkpoint;
use moe_model::experts::MoeRequest;
use moe_model::{ExpertError, ModelSpec, WeightDtype};
use ractor::{Actor, ActorRef};
use tokio::task::JoinSet;

use crate::actor::{load_experts, DeviceMsg};
use crate::config::{parse_devices, NodeConfig};
use crate::device::{open_devices, DeviceHost};
use crate::error::WorkerError;
use crate::fanout;
use crate::metrics::WorkerMetrics;
use crate::slot::{ActorStatus, CallError, CallLimits, DeviceSlot};
use crate::supervisor::{Supervisor, SupervisorMsg};

/// How long a call waits for a restarting device before answering unavailable.
pub const READY_WAIT: Duration = Duration::from_secs(30);
/// How long a device may take to compute one request.
pub const COMPUTE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a supervisor call may take (it may restart a device, which reloads its
/// experts; large checkpoints read slowly).
pub const SUPERVISOR_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long a device may take to take in loaded experts or drop some (it may be busy
/// with computes queued before).
pub const INSTALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long stopping waits for the actors to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What the device actors share: the model, the open checkpoint, the device slots and
/// the metrics.
pub(crate) struct NodeCore {
    pub spec: ModelSpec,
    pub ckpt: Arc<Checkpoint>,
    pub dtype: WeightDtype,
    pub slots: Vec<DeviceSlot>,
    /// Each device (where its experts live, its threads, its sizes), by device index.
    pub devices: Vec<DeviceHost>,
    pub metrics: Arc<WorkerMetrics>,
    /// Set by [`Node::stop`]: the supervisor no longer restarts actors.
    pub stopping: AtomicBool,
}

/// A worker's state as reported by `Info`.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub worker_id: String,
    pub devices: Vec<DeviceState>,
    /// Placement version of the last completed load (0 before any).
    pub placement_version: u64,
}

/// One device as reported by `Info`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceState {
    pub name: String,
    /// `(layer, expert)` pairs held, sorted.
    pub experts: Vec<(usize, u32)>,
    /// Bytes of expert weights held.
    pub expert_bytes: u64,
    /// What computes them: `cpu` (the CPU kernel), `candle-cpu` or `cuda`.
    pub kind: &'static str,
    /// Their storage precision.
    pub dtype: WeightDtype,
    /// Bytes one expert takes on this device.
    pub bytes_per_expert: u64,
    /// Bytes the device may give to experts (0: unlimited).
    pub capacity_bytes: u64,
    /// Its compute threads (0 for a GPU).
    pub threads: usize,
}

/// A copy: (device index, (layer, expert)).
type DeviceExpert = (usize, (usize, u32));

struct NodeInner {
    core: Arc<NodeCore>,
    supervisor: ActorRef<SupervisorMsg>,
    worker_id: String,
    /// The checkpoint directory's name (the model label of `moe_build_info`).
    model_name: String,
    test_panic_at_compute: Option<u64>,
    /// Device computes sent so far (for the test hook).
    computes: AtomicU64,
    placement_version: AtomicU64,
    /// For each (device index, expert): the newest placement version a load asked for
    /// it. An unload for an older placement leaves such a copy alone.
    wanted_since: std::sync::Mutex<HashMap<DeviceExpert, u64>>,
    /// Loads and unloads run one at a time: an unload deciding what to drop and a load
    /// deciding what it already holds must not interleave.
    changes: tokio::sync::Mutex<()>,
}

/// A worker node: its devices, their actors and the experts they hold. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

impl Node {
    /// Reads `config.json`, opens the checkpoint once, and starts the supervisor with one
    /// device actor per device. No experts are loaded yet.
    pub async fn start(cfg: NodeConfig) -> Result<Node, WorkerError> {
        let devices = parse_devices(&cfg.devices)?;
        let names: Vec<String> = devices.iter().map(ToString::to_string).collect();
        let dir = cfg.model_dir.clone();
        let (spec, ckpt) = tokio::task::spawn_blocking(move || {
            let spec = ModelSpec::from_dir(&dir)?;
            let ckpt = Checkpoint::open(&dir, spec.fp8_block)?;
            Ok::<_, WorkerError>((spec, ckpt))
        })
        .await
        .map_err(|e| WorkerError::Actor(format!("opening the checkpoint failed: {e}")))??;
        let hosts = open_devices(
            &devices,
            &spec,
            cfg.dtype,
            cfg.threads_per_device,
            cfg.capacity_bytes,
        )?;
        let metrics = WorkerMetrics::new(&names)
            .map_err(|e| WorkerError::Actor(format!("metrics registry: {e}")))?;
        let core = Arc::new(NodeCore {
            spec,
            ckpt: Arc::new(ckpt),
            dtype: cfg.dtype,
            slots: names.iter().cloned().map(DeviceSlot::new).collect(),
            devices: hosts,
            metrics: Arc::new(metrics),
            stopping: AtomicBool::new(false),
        });
        let (supervisor, _join) = Actor::spawn(None, Supervisor, Arc::clone(&core))
            .await
            .map_err(|e| WorkerError::Actor(format!("starting the supervisor: {e}")))?;
        tracing::info!(
            worker_id = %cfg.worker_id,
            devices = ?names,
            model = %cfg.model_dir.display(),
            "worker node started"
        );
        Ok(Node {
            inner: Arc::new(NodeInner {
                core,
                supervisor,
                worker_id: cfg.worker_id,
                model_name: cfg
                    .model_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".to_owned()),
                test_panic_at_compute: cfg.test_panic_at_compute,
                computes: AtomicU64::new(0),
                placement_version: AtomicU64::new(0),
                wanted_since: std::sync::Mutex::new(HashMap::new()),
                changes: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The model's shape.
    pub fn spec(&self) -> &ModelSpec {
        &self.inner.core.spec
    }

    /// The device names, in index order.
    pub fn device_names(&self) -> Vec<String> {
        self.inner
            .core
            .slots
            .iter()
            .map(|s| s.name.clone())
            .collect()
    }

    /// This worker's identifier.
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// The name of the checkpoint directory the node reads.
    pub fn model_name(&self) -> &str {
        &self.inner.model_name
    }

    /// The node's metrics (and their registry).
    pub fn metrics(&self) -> &WorkerMetrics {
        &self.inner.core.metrics
    }

    /// Resolves device names and checks every expert, so that nothing is loaded unless
    /// the whole request is valid. Merges repeated devices.
    fn resolve(
        &self,
        assignments: Vec<(String, Vec<(usize, u32)>)>,
    ) -> Result<BTreeMap<usize, Vec<(usize, u32)>>, WorkerError> {
        let spec = self.spec();
        let mut by_device: BTreeMap<usize, Vec<(usize, u32)>> = BTreeMap::new();
        for (name, experts) in assignments {
            let i = self
                .inner
                .core
                .slots
                .iter()
                .position(|s| s.name == name)
                .ok_or_else(|| WorkerError::UnknownDevice(name.clone()))?;
            for &(layer, expert) in &experts {
                let reason = if !spec.moe_layers().any(|l| l == layer) {
                    Some(format!("layer {layer} is not a MoE layer"))
                } else if expert as usize >= spec.moe.num_experts {
                    Some(format!(
                        "the model has {} experts per layer",
                        spec.moe.num_experts
                    ))
                } else {
                    None
                };
                if let Some(reason) = reason {
                    return Err(WorkerError::InvalidExpert {
                        layer,
                        expert,
                        reason,
                    });
                }
            }
            by_device.entry(i).or_default().extend(experts);
        }
        Ok(by_device)
    }

    fn unavailable(&self, device: usize, e: CallError) -> WorkerError {
        WorkerError::Unavailable {
            device: self.inner.core.slots[device].name.clone(),
            reason: describe(&e),
        }
    }

    async fn supervisor_call<R: Send + 'static>(
        &self,
        build: impl FnOnce(ractor::RpcReplyPort<R>) -> SupervisorMsg,
    ) -> Result<R, WorkerError> {
        match self
            .inner
            .supervisor
            .call(build, Some(SUPERVISOR_TIMEOUT))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(r)) => Ok(r),
            Ok(ractor::rpc::CallResult::Timeout) => Err(WorkerError::Actor(
                "the supervisor did not answer in time".into(),
            )),
            Ok(ractor::rpc::CallResult::SenderError) => Err(WorkerError::Actor(
                "the supervisor dropped the request".into(),
            )),
            Err(e) => Err(WorkerError::Actor(format!("the supervisor is gone: {e}"))),
        }
    }

    /// Loads experts onto the named devices (only their tensors are read) and returns
    /// once every device holds them; records `version` as the placement version.
    /// Experts already held are not read again.
    pub async fn load(
        &self,
        version: u64,
        assignments: Vec<(String, Vec<(usize, u32)>)>,
    ) -> Result<NodeInfo, WorkerError> {
        let _one_at_a_time = self.inner.changes.lock().await;
        let by_device = self.resolve(assignments)?;
        {
            let mut wanted = self
                .inner
                .wanted_since
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (device, experts) in &by_device {
                for e in experts {
                    let v = wanted.entry((*device, *e)).or_insert(version);
                    *v = (*v).max(version);
                }
            }
        }
        let mut tasks = JoinSet::new();
        for (device, experts) in by_device {
            let node = self.clone();
            tasks.spawn(async move {
                let e2 = experts.clone();
                node.supervisor_call(move |reply| SupervisorMsg::Assign {
                    device,
                    experts: e2,
                    reply,
                })
                .await??;
                // Read only what the device does not hold yet, off the device actor.
                let slot = &node.inner.core.slots[device];
                let held = slot.hosted().experts;
                let mut missing: Vec<_> =
                    experts.into_iter().filter(|k| !held.contains(k)).collect();
                missing.sort_unstable();
                missing.dedup();
                if missing.is_empty() {
                    return Ok(());
                }
                let loaded = load_experts(&node.inner.core, device, missing).await?;
                let limits = CallLimits {
                    ready_wait: READY_WAIT,
                    answer: INSTALL_TIMEOUT,
                };
                slot.call(
                    |reply| DeviceMsg::Install {
                        experts: loaded,
                        reply,
                    },
                    limits,
                )
                .await
                .map_err(|e| node.unavailable(device, e))?
            });
        }
        join_all(tasks).await?;
        self.inner
            .placement_version
            .store(version, Ordering::Release);
        self.metrics()
            .placement_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        tracing::info!(version, "experts loaded");
        Ok(self.info())
    }

    /// Drops experts from the named devices. `version` is the placement the unload
    /// belongs to: a copy that a load for a newer placement asked for is kept, so a late
    /// clean-up (from a deposed controller, or an abandoned round) cannot drop copies a
    /// newer placement routes to, while older leftovers still go. The reported placement
    /// version stays that of the last load.
    pub async fn unload(
        &self,
        version: u64,
        assignments: Vec<(String, Vec<(usize, u32)>)>,
    ) -> Result<NodeInfo, WorkerError> {
        let _one_at_a_time = self.inner.changes.lock().await;
        let mut by_device = self.resolve(assignments)?;
        {
            let mut wanted = self
                .inner
                .wanted_since
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (device, experts) in by_device.iter_mut() {
                let before = experts.len();
                experts.retain(|e| wanted.get(&(*device, *e)).is_none_or(|v| *v <= version));
                if experts.len() < before {
                    tracing::info!(
                        version,
                        kept = before - experts.len(),
                        "unload: keeping copies a newer placement asked for"
                    );
                }
                for e in experts.iter() {
                    wanted.remove(&(*device, *e));
                }
            }
            by_device.retain(|_, experts| !experts.is_empty());
        }
        let mut tasks = JoinSet::new();
        for (device, experts) in by_device {
            let node = self.clone();
            tasks.spawn(async move {
                let e2 = experts.clone();
                node.supervisor_call(move |reply| SupervisorMsg::Unassign {
                    device,
                    experts: e2,
                    reply,
                })
                .await?;
                let limits = CallLimits {
                    ready_wait: READY_WAIT,
                    answer: INSTALL_TIMEOUT,
                };
                node.inner.core.slots[device]
                    .call(|reply| DeviceMsg::Unload { experts, reply }, limits)
                    .await
                    .map_err(|e| node.unavailable(device, e))
            });
        }
        join_all(tasks).await?;
        tracing::info!(version, "experts unloaded");
        Ok(self.info())
    }

    /// Computes one MoE layer: `rows` `[n, hidden]`, `expert_ids`/`weights` `[n, top_k]`
    /// (slots equal to `NO_EXPERT` are skipped). Each expert's slots go to the lowest
    /// usable device hosting it; the devices run concurrently and the result is the
    /// per-row sum of their partial sums, `[n, hidden]`.
    pub async fn compute(
        &self,
        layer: usize,
        rows: Vec<f32>,
        top_k: usize,
        expert_ids: Vec<u32>,
        weights: Vec<f32>,
    ) -> Result<Vec<f32>, ExpertError> {
        let core = &self.inner.core;
        let spec = &core.spec;
        let hidden = spec.hidden_size;
        if !spec.moe_layers().any(|l| l == layer) {
            return Err(ExpertError::Invalid(format!(
                "layer {layer} is not a MoE layer"
            )));
        }
        MoeRequest {
            layer,
            hidden,
            top_k,
            rows: &rows,
            expert_ids: &expert_ids,
            weights: &weights,
        }
        .validate()?;
        let n = rows.len() / hidden;
        let parts = fanout::split(hidden, top_k, &rows, &expert_ids, &weights, |e| {
            core.slots
                .iter()
                .position(|s| s.is_usable() && s.hosts(layer, e))
        })
        .map_err(|expert| {
            if core.slots.iter().any(|s| s.hosts(layer, expert)) {
                // Held, but only by devices that failed to restart or are stopped.
                ExpertError::Unavailable(format!(
                    "expert {expert} of layer {layer} is held only by unavailable devices"
                ))
            } else {
                ExpertError::NotHosted { layer, expert }
            }
        })?;
        drop((rows, expert_ids, weights));
        let mut tasks = JoinSet::new();
        for part in parts {
            let inner = Arc::clone(&self.inner);
            let seq = inner.computes.fetch_add(1, Ordering::Relaxed) + 1;
            let inject_panic = inner.test_panic_at_compute == Some(seq);
            tasks.spawn(async move {
                let slot = &inner.core.slots[part.device];
                let limits = CallLimits {
                    ready_wait: READY_WAIT,
                    answer: COMPUTE_TIMEOUT,
                };
                let out = slot
                    .call(
                        |reply| DeviceMsg::Compute {
                            layer,
                            top_k,
                            rows: part.rows,
                            ids: part.ids,
                            weights: part.weights,
                            inject_panic,
                            reply,
                        },
                        limits,
                    )
                    .await
                    .map_err(|e| match e {
                        CallError::TimedOut(after) => ExpertError::Deadline {
                            who: format!("device {}", slot.name),
                            after,
                        },
                        e => ExpertError::Unavailable(format!(
                            "device {} {}",
                            slot.name,
                            describe(&e)
                        )),
                    })
                    .and_then(|r| r);
                (part.device, part.row_map, out)
            });
        }
        let mut partials = Vec::with_capacity(tasks.len());
        let mut first_err = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((device, row_map, Ok(values))) => partials.push((device, row_map, values)),
                Ok((_, _, Err(e))) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(ExpertError::Unavailable(format!(
                        "device call task failed: {e}"
                    )));
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        partials.sort_by_key(|(device, _, _)| *device);
        let partials: Vec<(Vec<usize>, Vec<f32>)> =
            partials.into_iter().map(|(_, m, v)| (m, v)).collect();
        Ok(fanout::merge(n, hidden, &partials))
    }

    /// Devices, the experts they hold and the placement version.
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            worker_id: self.inner.worker_id.clone(),
            devices: self
                .inner
                .core
                .slots
                .iter()
                .zip(&self.inner.core.devices)
                .map(|(s, d)| {
                    let h = s.hosted();
                    DeviceState {
                        name: s.name.clone(),
                        experts: h.experts.into_iter().collect(),
                        expert_bytes: h.bytes,
                        kind: d.kind(),
                        dtype: self.inner.core.dtype,
                        bytes_per_expert: d.bytes_per_expert,
                        capacity_bytes: d.capacity_bytes,
                        threads: d.threads(),
                    }
                })
                .collect(),
            placement_version: self.inner.placement_version.load(Ordering::Acquire),
        }
    }

    /// Stops the device actors and the supervisor; later calls answer unavailable.
    /// Idempotent.
    pub async fn stop(&self) {
        let core = &self.inner.core;
        if core.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        for s in &core.slots {
            s.set_status(ActorStatus::Stopped);
        }
        let sup = &self.inner.supervisor;
        sup.stop_children_and_wait(None, Some(STOP_TIMEOUT)).await;
        if let Err(e) = sup.stop_and_wait(None, Some(STOP_TIMEOUT)).await {
            tracing::warn!(error = %e, "supervisor did not stop in time");
        }
        tracing::info!(worker_id = %self.inner.worker_id, "worker node stopped");
    }
}

/// Waits for every task; the first error wins.
async fn join_all(mut tasks: JoinSet<Result<(), WorkerError>>) -> Result<(), WorkerError> {
    let mut first_err = None;
    while let Some(joined) = tasks.join_next().await {
        let r = joined.unwrap_or_else(|e| Err(WorkerError::Actor(format!("task failed: {e}"))));
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Why a device did not answer, phrased to follow "device cpu:0 ".
fn describe(e: &CallError) -> String {
    match e {
        CallError::NotReady(why) => why.clone(),
        CallError::Failed => "failed and is restarting".into(),
        CallError::TimedOut(d) => format!("did not answer within {} s", d.as_secs()),
    }
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
