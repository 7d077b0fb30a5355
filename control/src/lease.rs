//! The etcd lease a process holds (a worker's registration, a controller candidate):
//! granted once, reused after a reconnect while etcd still has it, granted anew when it
//! expired meanwhile, kept alive at TTL/2 with a deadline on every beat, revoked on a
//! graceful leave.
//!
//! A lost lease is an event the owner handles ([`SessionEnd::LeaseExpired`]), never a
//! crash (STYLE.md 13, after Dynamo's `lease.rs`).

use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveResponse, LeaseKeepAliveStream, LeaseKeeper};
use tokio::time::{interval_at, Instant, MissedTickBehavior};
use tracing::info;

use crate::error::ControlError;
use crate::etcd::{deadline, EtcdConfig};

/// Why a session (one connection's worth of keep-alive) ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// etcd no longer has the lease: register (or campaign) again under a new one.
    LeaseExpired,
    /// The election key disappeared while the lease lives (deleted by hand).
    Deposed,
    /// The connection or a request failed: reconnect after a backoff.
    Failed(ControlError),
}

impl From<ControlError> for SessionEnd {
    fn from(e: ControlError) -> Self {
        Self::Failed(e)
    }
}

/// The lease of one owner, across reconnections.
#[derive(Debug)]
pub(crate) struct LeaseSlot {
    ttl_secs: i64,
    id: Option<i64>,
}

impl LeaseSlot {
    /// A slot for leases of `ttl` (rounded up to whole seconds, at least 1 s; etcd may
    /// grant more, its minimum is about 2 s with default settings).
    pub(crate) fn new(ttl: Duration) -> Result<Self, ControlError> {
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        if secs == 0 || secs > 86_400 {
            return Err(ControlError::invalid(
                "lease ttl",
                format!("{ttl:?} is outside 1 s ..= 1 day"),
            ));
        }
        Ok(Self {
            ttl_secs: secs as i64,
            id: None,
        })
    }

    /// The keep-alive period: half the TTL.
    pub(crate) fn period(&self) -> Duration {
        Duration::from_secs(self.ttl_secs as u64) / 2
    }

    /// Forgets the lease (etcd said it expired).
    pub(crate) fn forget(&mut self) {
        self.id = None;
    }

    /// On a fresh connection: the lease held before if etcd still has it, else a new
    /// one. Returns its id.
    pub(crate) async fn acquire(
        &mut self,
        client: &mut Client,
        timeout: Duration,
    ) -> Result<i64, ControlError> {
        if let Some(id) = self.id {
            let left = deadline(
                timeout,
                "lease time-to-live",
                client.lease_time_to_live(id, None),
            )
            .await?;
            if left.ttl() > 0 {
                return Ok(id);
            }
            info!(lease = id, "lease expired while etcd was unreachable");
            self.id = None;
        }
        let granted = deadline(
            timeout,
            "lease grant",
            client.lease_grant(self.ttl_secs, None),
        )
        .await?
        .id();
        self.id = Some(granted);
        Ok(granted)
    }

    /// Revokes the lease (its keys go at once). A lease etcd no longer has is fine.
    pub(crate) async fn revoke(&mut self, config: &EtcdConfig) -> Result<(), ControlError> {
        let Some(id) = self.id.take() else {
            return Ok(());
        };
        let timeout = config.request_timeout;
        let mut client = config.connect().await?;
        match deadline(timeout, "lease revoke", client.lease_revoke(id)).await {
            Ok(_) => Ok(()),
            // "Not found" comes back as an error status; ask rather than parse it.
            Err(e) => {
                let left = deadline(
                    timeout,
                    "lease time-to-live",
                    client.lease_time_to_live(id, None),
                )
                .await?;
                if left.ttl() > 0 {
                    Err(e)
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// An open keep-alive stream for one lease.
pub(crate) struct KeepAlive {
    keeper: LeaseKeeper,
    responses: LeaseKeepAliveStream,
    period: Duration,
    timeout: Duration,
}

impl KeepAlive {
    /// Opens the stream (this is also the first beat).
    pub(crate) async fn start(
        client: &mut Client,
        id: i64,
        period: Duration,
        timeout: Duration,
    ) -> Result<Self, ControlError> {
        // A beat that takes longer than the period is as good as lost.
        let timeout = timeout.min(period);
        let (keeper, responses) =
            deadline(timeout, "lease keep-alive", client.lease_keep_alive(id)).await?;
        Ok(Self {
            keeper,
            responses,
            period,
            timeout,
        })
    }

    /// Beats every period until something goes wrong; never returns otherwise. Between
    /// beats it listens on the stream, so a broken connection is noticed at once rather
    /// than at the next beat.
    pub(crate) async fn run(mut self) -> SessionEnd {
        let mut tick = interval_at(Instant::now() + self.period, self.period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let between = tokio::select! {
                _ = tick.tick() => None,
                msg = self.responses.message() => Some(msg),
            };
            let alive = match between {
                None => self.beat().await,
                Some(msg) => Self::check(msg),
            };
            match alive {
                Ok(true) => {}
                Ok(false) => return SessionEnd::LeaseExpired,
                Err(e) => return SessionEnd::Failed(e),
            }
        }
    }

    /// Reads one keep-alive reply: `Ok(false)` when etcd says the lease is gone.
    fn check(
        msg: Result<Option<LeaseKeepAliveResponse>, etcd_client::Error>,
    ) -> Result<bool, ControlError> {
        let resp = msg
            .map_err(|source| ControlError::Etcd {
                op: "lease keep-alive",
                source,
            })?
            .ok_or(ControlError::Etcd {
                op: "lease keep-alive",
                source: etcd_client::Error::LeaseKeepAliveError("stream ended".into()),
            })?;
        Ok(resp.ttl() > 0)
    }

    /// One keep-alive beat under the deadline.
    async fn beat(&mut self) -> Result<bool, ControlError> {
        deadline(self.timeout, "lease keep-alive", self.keeper.keep_alive()).await?;
        match tokio::time::timeout(self.timeout, self.responses.message()).await {
            Ok(msg) => Self::check(msg),
            Err(_) => Err(ControlError::DeadlineExceeded {
                op: "lease keep-alive",
                after: self.timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_rounded_up_and_bounded() {
        let s = LeaseSlot::new(Duration::from_millis(2500)).unwrap();
        assert_eq!(s.ttl_secs, 3);
        assert_eq!(s.period(), Duration::from_millis(1500));
        assert!(LeaseSlot::new(Duration::ZERO).is_err());
        assert!(LeaseSlot::new(Duration::from_secs(86_401)).is_err());
    }
}
