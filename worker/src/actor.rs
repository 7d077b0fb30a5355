//! The device actor: one per device, holding that device's experts (an
//! [`ExpertStore`]: the CPU kernel or a candle device) in its state. Messages are
//! handled one at a time, so a load never races a compute on the same device; the math
//! runs in `spawn_blocking`, on the device's own threads, so the async runtime is never
//! starved and two devices do not share one pool.
//!
//! Loading reads the checkpoint outside the actor (the node does it, then sends the
//! experts in), so a long read never stalls this device's computes. After every change
//! to what it holds, the actor publishes it into its `DeviceSlot`
//! (which the node routes by) and into the hosted-experts and expert-bytes gauges. A
//! panic in a handler fails the actor; the supervisor restarts it with the experts it
//! was assigned.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use moe_model::experts::MoeRequest;
use moe_model::{ExpertError, ExpertStore};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::error::WorkerError;
use crate::node::NodeCore;
use crate::slot::Hosted;

/// Messages a device actor handles.
pub(crate) enum DeviceMsg {
    /// Computes one MoE layer over `rows` (`[n, hidden]`), with `ids`/`weights`
    /// `[n, top_k]`; replies with `[n, hidden]` partial sums.
    Compute {
        layer: usize,
        top_k: usize,
        rows: Vec<f32>,
        ids: Vec<u32>,
        weights: Vec<f32>,
        /// Test hook: panic in the handler instead of computing.
        inject_panic: bool,
        reply: RpcReplyPort<Result<Vec<f32>, ExpertError>>,
    },
    /// Adds experts already read from the checkpoint (by the caller, off this actor, so
    /// that a long read never stalls the device's computes).
    Install {
        experts: Box<dyn ExpertStore>,
        reply: RpcReplyPort<Result<(), WorkerError>>,
    },
    /// Drops experts.
    Unload {
        experts: Vec<(usize, u32)>,
        reply: RpcReplyPort<()>,
    },
}

/// The device actor (stateless; its state is [`DeviceState`]).
pub(crate) struct DeviceActor;

/// What a device actor starts with: which device it is and what it must hold.
pub(crate) struct DeviceArgs {
    pub core: Arc<NodeCore>,
    pub index: usize,
    pub experts: Vec<(usize, u32)>,
}

/// A device actor's state.
pub(crate) struct DeviceState {
    core: Arc<NodeCore>,
    index: usize,
    /// Shared with the blocking compute task; unique whenever a message is being handled
    /// that changes it (computes finish inside their own handler).
    experts: Arc<dyn ExpertStore>,
}

impl DeviceState {
    fn name(&self) -> &str {
        &self.core.slots[self.index].name
    }

    /// Publishes what this actor holds to the node and to the gauges.
    fn publish(&self) {
        let hosted = Hosted {
            experts: self.experts.hosted().into_iter().collect::<BTreeSet<_>>(),
            bytes: self.experts.weight_bytes() as u64,
        };
        let m = &self.core.metrics;
        let name = self.name();
        m.hosted_experts
            .with_label_values(&[name])
            .set(hosted.experts.len() as i64);
        m.expert_bytes
            .with_label_values(&[name])
            .set(i64::try_from(hosted.bytes).unwrap_or(i64::MAX));
        self.core.slots[self.index].set_hosted(hosted);
    }

    fn install(&mut self, experts: Box<dyn ExpertStore>) -> Result<(), WorkerError> {
        let Some(mine) = Arc::get_mut(&mut self.experts) else {
            return Err(WorkerError::Actor(format!(
                "device {}: experts are still in use by a compute",
                self.name()
            )));
        };
        let absorbed = mine.absorb(experts).map_err(|e| WorkerError::Unavailable {
            device: self.name().to_owned(),
            reason: e.to_string(),
        });
        self.publish();
        absorbed
    }

    fn unload(&mut self, experts: &[(usize, u32)]) {
        match Arc::get_mut(&mut self.experts) {
            Some(mine) => mine.remove(experts),
            None => {
                tracing::error!(device = self.name(), "experts still in use; unload skipped");
                return;
            }
        }
        self.publish();
    }

    async fn compute(
        &self,
        layer: usize,
        top_k: usize,
        rows: Vec<f32>,
        ids: Vec<u32>,
        weights: Vec<f32>,
    ) -> Result<Vec<f32>, ExpertError> {
        let experts = Arc::clone(&self.experts);
        let hidden = self.core.spec.hidden_size;
        let slots = ids.iter().filter(|e| **e != moe_proto::NO_EXPERT).count();
        self.core
            .metrics
            .expert_tokens
            .with_label_values(&[layer.to_string().as_str(), self.name()])
            .inc_by(slots as u64);
        let start = Instant::now();
        let core = Arc::clone(&self.core);
        let index = self.index;
        let result = tokio::task::spawn_blocking(move || {
            let req = MoeRequest {
                layer,
                hidden,
                top_k,
                rows: &rows,
                expert_ids: &ids,
                weights: &weights,
            };
            core.devices[index].run(|| experts.forward(&req))
        })
        .await
        .unwrap_or_else(|e| {
            Err(ExpertError::Unavailable(format!(
                "compute task failed: {e}"
            )))
        });
        self.core
            .metrics
            .compute_seconds
            .with_label_values(&[self.name()])
            .observe(start.elapsed().as_secs_f64());
        result
    }
}

/// Reads `which` from the node's checkpoint onto device `index` on a blocking thread
/// (only their tensors).
pub(crate) async fn load_experts(
    core: &Arc<NodeCore>,
    index: usize,
    which: Vec<(usize, u32)>,
) -> Result<Box<dyn ExpertStore>, WorkerError> {
    let core = Arc::clone(core);
    tokio::task::spawn_blocking(move || {
        let host = &core.devices[index];
        host.run(|| {
            host.store.load(
                &core.ckpt,
                &core.spec,
                &which,
                core.dtype,
                &moe_model::progress::quiet,
            )
        })
    })
    .await
    .map_err(|e| WorkerError::Actor(format!("expert loading task failed: {e}")))?
    .map_err(WorkerError::from)
}

impl Actor for DeviceActor {
    type Msg = DeviceMsg;
    type State = DeviceState;
    type Arguments = DeviceArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<DeviceMsg>,
        args: DeviceArgs,
    ) -> Result<DeviceState, ActorProcessingErr> {
        let experts = load_experts(&args.core, args.index, args.experts).await?;
        let state = DeviceState {
            core: args.core,
            index: args.index,
            experts: Arc::from(experts),
        };
        state.publish();
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<DeviceMsg>,
        msg: DeviceMsg,
        state: &mut DeviceState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DeviceMsg::Compute {
                layer,
                top_k,
                rows,
                ids,
                weights,
                inject_panic,
                reply,
            } => {
                if inject_panic {
                    // The test hook: fail the actor the way a real bug would, with the
                    // caller's reply port dropped unanswered.
                    panic!("test hook: device {} panics on this compute", state.name());
                }
                let out = state.compute(layer, top_k, rows, ids, weights).await;
                // A closed port means the caller gave up (deadline); nothing to do.
                let _ = reply.send(out);
            }
            DeviceMsg::Install { experts, reply } => {
                let _ = reply.send(state.install(experts));
            }
            DeviceMsg::Unload { experts, reply } => {
                state.unload(&experts);
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}
