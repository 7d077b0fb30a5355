//! One device as the rest of the node sees it: its name, the status of its actor (which
//! the supervisor publishes as it starts and restarts actors), and the experts the live
//! actor holds (which the actor publishes after every load, unload or restart).
//!
//! [`DeviceSlot::call`] is how the node talks to a device: it waits (bounded) for a ready
//! actor, sends the message, and reads the reply. A reply port dropped without an answer
//! means the actor died mid-call; the slot is then marked restarting at once (before the
//! supervisor has even seen the failure), so the caller's retry waits for the new actor
//! instead of racing into the dead one.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use ractor::{ActorId, ActorRef, MessagingErr, RpcReplyPort};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::actor::DeviceMsg;

/// The state of a device's actor.
#[derive(Clone)]
pub(crate) enum ActorStatus {
    /// Being spawned for the first time.
    Starting,
    /// Live; messages go to this actor.
    Ready(ActorRef<DeviceMsg>),
    /// Failed; the supervisor is spawning a replacement and reloading its experts.
    Restarting,
    /// A replacement could not be started.
    Failed(String),
    /// The node is stopping or stopped.
    Stopped,
}

/// What the live actor holds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hosted {
    pub experts: BTreeSet<(usize, u32)>,
    pub bytes: u64,
}

/// Why a call to a device got no answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CallError {
    /// No ready actor within the wait (restarting, failed or stopped).
    NotReady(String),
    /// The actor died while handling the call; it is being restarted.
    Failed,
    /// The actor did not answer in time.
    TimedOut(Duration),
}

/// Bounds of one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallLimits {
    /// How long to wait for a restarting device to be ready.
    pub ready_wait: Duration,
    /// How long the device may take to answer once the message is sent.
    pub answer: Duration,
}

/// One device of the node.
pub(crate) struct DeviceSlot {
    pub name: String,
    status: watch::Sender<ActorStatus>,
    hosted: Mutex<Hosted>,
}

impl DeviceSlot {
    pub fn new(name: String) -> DeviceSlot {
        DeviceSlot {
            name,
            status: watch::Sender::new(ActorStatus::Starting),
            hosted: Mutex::new(Hosted::default()),
        }
    }

    /// Publishes a new actor status (supervisor side).
    pub fn set_status(&self, status: ActorStatus) {
        self.status.send_replace(status);
    }

    /// Marks the slot restarting if its live actor is still `failed`: a newer actor that
    /// the supervisor already published is left alone.
    pub fn mark_failed(&self, failed: ActorId) {
        self.status.send_if_modified(|s| match s {
            ActorStatus::Ready(a) if a.get_id() == failed => {
                *s = ActorStatus::Restarting;
                true
            }
            _ => false,
        });
    }

    /// Whether compute should be routed here: live or coming back.
    pub fn is_usable(&self) -> bool {
        matches!(
            *self.status.borrow(),
            ActorStatus::Ready(_) | ActorStatus::Restarting | ActorStatus::Starting
        )
    }

    /// Publishes what the live actor holds (actor side).
    pub fn set_hosted(&self, hosted: Hosted) {
        *self.hosted.lock().unwrap_or_else(PoisonError::into_inner) = hosted;
    }

    /// A copy of what the live actor holds.
    pub fn hosted(&self) -> Hosted {
        self.hosted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the live actor holds `(layer, expert)`.
    pub fn hosts(&self, layer: usize, expert: u32) -> bool {
        self.hosted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .experts
            .contains(&(layer, expert))
    }

    /// Waits until the slot has a ready actor, at most until `deadline`.
    async fn ready_actor(&self, deadline: Instant) -> Result<ActorRef<DeviceMsg>, CallError> {
        let mut rx = self.status.subscribe();
        loop {
            let status = rx.borrow_and_update().clone();
            match status {
                ActorStatus::Ready(a) => return Ok(a),
                ActorStatus::Failed(reason) => {
                    return Err(CallError::NotReady(format!("failed to restart: {reason}")))
                }
                ActorStatus::Stopped => return Err(CallError::NotReady("is stopped".into())),
                ActorStatus::Starting | ActorStatus::Restarting => {}
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(CallError::NotReady("is stopped".into())),
                Err(_) => {
                    return Err(CallError::NotReady(
                        "is restarting and was not ready in time".into(),
                    ))
                }
            }
        }
    }

    /// Sends the message built by `build` to the live actor and waits for its answer.
    /// A message that could not be delivered (the actor died before taking it) is sent
    /// again, once, to the replacement.
    pub async fn call<R: Send + 'static>(
        &self,
        build: impl FnOnce(RpcReplyPort<R>) -> DeviceMsg,
        limits: CallLimits,
    ) -> Result<R, CallError> {
        let (tx, rx) = ractor::concurrency::oneshot();
        let mut msg = build(tx.into());
        let ready_deadline = Instant::now() + limits.ready_wait;
        let mut attempts = 0;
        let actor = loop {
            attempts += 1;
            let actor = self.ready_actor(ready_deadline).await?;
            match actor.send_message(msg) {
                Ok(()) => break actor,
                Err(MessagingErr::SendErr(back)) if attempts < 2 => {
                    self.mark_failed(actor.get_id());
                    msg = back;
                }
                Err(_) => {
                    self.mark_failed(actor.get_id());
                    return Err(CallError::Failed);
                }
            }
        };
        match tokio::time::timeout(limits.answer, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => {
                // The reply port was dropped unanswered: the actor panicked mid-call.
                self.mark_failed(actor.get_id());
                Err(CallError::Failed)
            }
            Err(_) => Err(CallError::TimedOut(limits.answer)),
        }
    }
}
