//! The supervisor: owns the device actors (spawned linked to it) and the assignment of
//! experts to each device. When a device actor fails (`SupervisionEvent::ActorFailed`,
//! e.g. a panic) it counts a restart, marks the device restarting, spawns a replacement
//! and has it reload every expert the device was assigned; callers waiting on the device
//! (see `slot`) proceed as soon as the replacement is published.
//!
//! Assignments change only through [`SupervisorMsg`], one at a time, so a restart always
//! reloads the latest assignment.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::actor::{DeviceActor, DeviceArgs};
use crate::error::WorkerError;
use crate::node::NodeCore;
use crate::slot::{ActorStatus, Hosted};

/// Messages the supervisor handles.
pub(crate) enum SupervisorMsg {
    /// Adds experts to a device's assignment (before the device loads them, so a restart
    /// during the load reloads them too). Restarts the device if it had failed.
    Assign {
        device: usize,
        experts: Vec<(usize, u32)>,
        reply: RpcReplyPort<Result<(), WorkerError>>,
    },
    /// Removes experts from a device's assignment.
    Unassign {
        device: usize,
        experts: Vec<(usize, u32)>,
        reply: RpcReplyPort<()>,
    },
}

/// The supervisor actor (its state is [`SupervisorState`]).
pub(crate) struct Supervisor;

/// The supervisor's state.
pub(crate) struct SupervisorState {
    core: Arc<NodeCore>,
    /// Experts each device must hold, by device index.
    assigned: Vec<BTreeSet<(usize, u32)>>,
    /// The live actor of each device, to map supervision events back to devices.
    actor_ids: Vec<Option<ActorId>>,
}

impl Supervisor {
    /// Spawns the actor of device `i`, linked to this supervisor, loading its assigned
    /// experts, and publishes it (or the failure) into the device's slot.
    async fn spawn_device(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        i: usize,
    ) -> Result<(), WorkerError> {
        let args = DeviceArgs {
            core: Arc::clone(&state.core),
            index: i,
            experts: state.assigned[i].iter().copied().collect(),
        };
        let slot = &state.core.slots[i];
        match Actor::spawn_linked(None, DeviceActor, args, myself.get_cell()).await {
            Ok((actor, _join)) => {
                state.actor_ids[i] = Some(actor.get_id());
                slot.set_status(ActorStatus::Ready(actor));
                Ok(())
            }
            Err(e) => {
                state.actor_ids[i] = None;
                let reason = e.to_string();
                tracing::error!(device = %slot.name, error = %reason, "device actor failed to start");
                slot.set_status(ActorStatus::Failed(reason.clone()));
                // It holds nothing now: say so, rather than list experts no actor has.
                slot.set_hosted(Hosted::default());
                let m = &state.core.metrics;
                m.hosted_experts
                    .with_label_values(&[slot.name.as_str()])
                    .set(0);
                m.expert_bytes
                    .with_label_values(&[slot.name.as_str()])
                    .set(0);
                Err(WorkerError::Unavailable {
                    device: slot.name.clone(),
                    reason: format!("could not start: {reason}"),
                })
            }
        }
    }

    fn device_of(state: &SupervisorState, id: ActorId) -> Option<usize> {
        state.actor_ids.iter().position(|a| *a == Some(id))
    }

    async fn restart(myself: &ActorRef<SupervisorMsg>, state: &mut SupervisorState, i: usize) {
        let name = state.core.slots[i].name.clone();
        state
            .core
            .metrics
            .device_restarts
            .with_label_values(&[name.as_str()])
            .inc();
        state.actor_ids[i] = None;
        state.core.slots[i].set_status(ActorStatus::Restarting);
        let n = state.assigned[i].len();
        if Self::spawn_device(myself, state, i).await.is_ok() {
            tracing::info!(device = %name, experts = n, "device actor restarted");
        }
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Arc<NodeCore>;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        core: Arc<NodeCore>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let n = core.slots.len();
        let mut state = SupervisorState {
            core,
            assigned: vec![BTreeSet::new(); n],
            actor_ids: vec![None; n],
        };
        for i in 0..n {
            Self::spawn_device(&myself, &mut state, i).await?;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Assign {
                device,
                experts,
                reply,
            } => {
                let r = match state.assigned.get_mut(device) {
                    None => Err(WorkerError::Actor(format!("no device #{device}"))),
                    Some(set) => {
                        set.extend(experts);
                        if state.actor_ids[device].is_none()
                            && !state.core.stopping.load(Ordering::Acquire)
                        {
                            // The device failed to restart earlier: try again now.
                            Self::spawn_device(&myself, state, device).await
                        } else {
                            Ok(())
                        }
                    }
                };
                let _ = reply.send(r);
            }
            SupervisorMsg::Unassign {
                device,
                experts,
                reply,
            } => {
                if let Some(set) = state.assigned.get_mut(device) {
                    for k in &experts {
                        set.remove(k);
                    }
                }
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let stopping = state.core.stopping.load(Ordering::Acquire);
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(i) = Self::device_of(state, cell.get_id()) else {
                    return Ok(());
                };
                tracing::error!(device = %state.core.slots[i].name, error = %err, "device actor failed");
                if !stopping {
                    Self::restart(&myself, state, i).await;
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let Some(i) = Self::device_of(state, cell.get_id()) else {
                    return Ok(());
                };
                if !stopping {
                    tracing::warn!(device = %state.core.slots[i].name, ?reason, "device actor stopped unexpectedly");
                    Self::restart(&myself, state, i).await;
                }
            }
            _ => {}
        }
        Ok(())
    }
}
