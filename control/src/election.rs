//! Election of the placement controller through etcd's election API (campaign, resign),
//! and fencing of the leader's writes.
//!
//! A candidate campaigns under its own lease (kept alive at TTL/2); etcd makes it leader
//! once every earlier candidate's key is gone. Its [`FencingToken`] is the leader key and
//! that key's create revision. Leadership can end without the old leader noticing in
//! time (a pause, a partition): so the leader's writes are not trusted to the lock but
//! fenced — [`fenced_put`] is a transaction that only applies while the leader key still
//! has that create revision (STYLE.md 13, after Jepsen's etcd 3.4.3 analysis).
//!
//! Locally, a candidate steps down (reports [`Leadership::Follower`]) as soon as its
//! connection fails, before etcd would expire its lease; when it reconnects with the
//! lease still alive, campaigning again returns the same key and token at once.
//!
//! [`watch_leader`] follows the current leader (or none) by mirroring the candidates'
//! keys: the leader is the one with the lowest create revision. etcd's `observe` is not
//! used for this: it never reports "no leader" and blocks until there is one.

use std::convert::Infallible;
use std::fmt;
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, EventType, LeaderKey, ResignOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};

use crate::error::ControlError;
use crate::etcd::{deadline, Backoff, EtcdClient, EtcdConfig};
use crate::etcd_mirror::{spawn_mirror, Entries, KeyRange};
use crate::keys::check_name;
use crate::lease::{KeepAlive, LeaseSlot, SessionEnd};
use crate::live_view::LiveView;

/// Proof of one leadership: the leader key and its create revision. A later
/// leadership, even of the same candidate, has a larger revision.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FencingToken {
    /// The leader's election key, `/moe/<cluster>/controller/<lease hex>`.
    pub key: String,
    /// The key's create revision.
    pub revision: i64,
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.key, self.revision)
    }
}

/// This candidate's standing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// Campaigning, disconnected, or resigned.
    Follower,
    /// Leader, with the token to fence writes by.
    Leader(FencingToken),
}

/// The current leader as seen by anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    /// The leader's candidate id (its campaign value).
    pub candidate: String,
    /// Its leadership's token.
    pub token: FencingToken,
}

/// A candidate in the controller election. Campaigns until dropped or resigned;
/// dropping stops the lease keep-alive (leadership passes on after the TTL, as after a
/// crash), [`resign`](Self::resign) hands it over at once.
#[derive(Debug)]
pub struct Election {
    candidate: String,
    leadership: watch::Receiver<Leadership>,
    resign: mpsc::Sender<oneshot::Sender<Result<(), ControlError>>>,
    _stop: DropGuard,
}

impl Election {
    /// Starts campaigning as `candidate` (an id such as the router's address) under a
    /// lease of `ttl`. Returns at once; must be called inside a Tokio runtime.
    pub fn campaign(
        config: EtcdConfig,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Self, ControlError> {
        check_name("candidate", candidate)?;
        let (tx, rx) = watch::channel(Leadership::Follower);
        let campaigner = Campaigner {
            name: config.keys.controller(),
            config,
            candidate: candidate.to_owned(),
            lease: LeaseSlot::new(ttl)?,
            leader_key: None,
            leadership: tx,
        };
        let (resign_tx, resign_rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let guard = stop.clone().drop_guard();
        tokio::spawn(campaigner.run(stop, resign_rx));
        Ok(Self {
            candidate: candidate.to_owned(),
            leadership: rx,
            resign: resign_tx,
            _stop: guard,
        })
    }

    /// This candidate's id.
    pub fn candidate(&self) -> &str {
        &self.candidate
    }

    /// True while this candidate leads (as far as it knows: fence writes anyway).
    pub fn is_leader(&self) -> bool {
        matches!(*self.leadership.borrow(), Leadership::Leader(_))
    }

    /// The current leadership's token, if leading.
    pub fn token(&self) -> Option<FencingToken> {
        match &*self.leadership.borrow() {
            Leadership::Leader(t) => Some(t.clone()),
            Leadership::Follower => None,
        }
    }

    /// A receiver of this candidate's standing.
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.clone()
    }

    /// Leaves the election: steps down, resigns if leading and revokes the lease, so
    /// the next candidate takes over at once.
    pub async fn resign(self) -> Result<(), ControlError> {
        let (tx, rx) = oneshot::channel();
        self.resign
            .send(tx)
            .await
            .map_err(|_| ControlError::Stopped("election"))?;
        rx.await.map_err(|_| ControlError::Stopped("election"))?
    }
}

/// Follows the controller election of `config`'s cluster: the current leader, or
/// `None`. Keeps the last value while etcd is unreachable.
pub fn watch_leader(config: EtcdConfig) -> LiveView<Option<LeaderInfo>> {
    let prefix = config.keys.controller_candidates();
    let range = KeyRange::Prefix(prefix.clone());
    spawn_mirror(config, range, move |entries: &Entries| {
        let (rel, e) = entries.iter().min_by_key(|(_, e)| e.create_revision)?;
        Some(LeaderInfo {
            candidate: String::from_utf8_lossy(&e.value).into_owned(),
            token: FencingToken {
                key: format!("{prefix}{rel}"),
                revision: e.create_revision,
            },
        })
    })
}

/// Writes `key` = `value` only while `token`'s leadership is current; returns the
/// write's revision. A deposed leader gets [`ControlError::Fenced`].
pub async fn fenced_put(
    etcd: &EtcdClient,
    key: &str,
    value: impl Into<Vec<u8>>,
    token: &FencingToken,
) -> Result<i64, ControlError> {
    let txn = Txn::new()
        .when([leadership_holds(token)])
        .and_then([TxnOp::put(key, value, None)]);
    let resp = etcd
        .call("fenced put", |mut c| async move { c.txn(txn).await })
        .await?;
    if !resp.succeeded() {
        return Err(ControlError::Fenced {
            token: token.revision,
        });
    }
    Ok(resp.header().map_or(0, |h| h.revision()))
}

/// The comparison that holds exactly while `token`'s leadership lasts.
pub(crate) fn leadership_holds(token: &FencingToken) -> Compare {
    Compare::create_revision(token.key.as_str(), CompareOp::Equal, token.revision)
}

/// The task behind an [`Election`].
struct Campaigner {
    config: EtcdConfig,
    name: String,
    candidate: String,
    lease: LeaseSlot,
    leader_key: Option<LeaderKey>,
    leadership: watch::Sender<Leadership>,
}

enum Wake {
    Stop,
    Resign(oneshot::Sender<Result<(), ControlError>>),
    Ended(SessionEnd),
}

impl Campaigner {
    async fn run(
        mut self,
        stop: CancellationToken,
        mut resign: mpsc::Receiver<oneshot::Sender<Result<(), ControlError>>>,
    ) {
        let mut backoff = self.config.backoff();
        loop {
            let wake = tokio::select! {
                _ = stop.cancelled() => Wake::Stop,
                Some(reply) = resign.recv() => Wake::Resign(reply),
                end = self.session(&mut backoff) => Wake::Ended(end),
            };
            let end = match wake {
                Wake::Stop => return,
                Wake::Resign(reply) => return self.leave(reply).await,
                Wake::Ended(end) => end,
            };
            self.step_down(&end);
            let delay = match end {
                SessionEnd::LeaseExpired => {
                    self.lease.forget();
                    Duration::ZERO
                }
                SessionEnd::Deposed | SessionEnd::Failed(_) => backoff.next_delay(),
            };
            let wake = tokio::select! {
                _ = stop.cancelled() => Some(Wake::Stop),
                Some(reply) = resign.recv() => Some(Wake::Resign(reply)),
                _ = tokio::time::sleep(delay) => None,
            };
            match wake {
                Some(Wake::Stop) => return,
                Some(Wake::Resign(reply)) => return self.leave(reply).await,
                Some(Wake::Ended(_)) | None => {}
            }
        }
    }

    fn step_down(&mut self, why: &SessionEnd) {
        self.leader_key = None;
        if let Leadership::Leader(token) = self.leadership.send_replace(Leadership::Follower) {
            warn!(candidate = %self.candidate, %token, reason = ?why, "stepped down as placement controller");
        } else {
            debug!(candidate = %self.candidate, reason = ?why, "campaign interrupted");
        }
    }

    async fn leave(mut self, reply: oneshot::Sender<Result<(), ControlError>>) {
        self.leadership.send_replace(Leadership::Follower);
        if let Some(leader) = self.leader_key.take() {
            let timeout = self.config.request_timeout;
            let resigned = async {
                let mut client = self.config.connect().await?;
                let options = ResignOptions::new().with_leader(leader);
                deadline(timeout, "resign", client.resign(Some(options))).await
            };
            // Revoking the lease below removes the key anyway; resign is the polite form.
            if let Err(e) = resigned.await {
                debug!(error = %e, "resign failed; revoking the lease instead");
            }
        }
        let result = self.lease.revoke(&self.config).await;
        info!(candidate = %self.candidate, ok = result.is_ok(), "left the controller election");
        let _ = reply.send(result);
    }

    async fn session(&mut self, backoff: &mut Backoff) -> SessionEnd {
        match self.try_session(backoff).await {
            Ok(never) => match never {},
            Err(end) => end,
        }
    }

    /// One connection's worth of candidacy: campaign while keeping the lease alive, then
    /// lead until the lease or the leader key is lost.
    async fn try_session(&mut self, backoff: &mut Backoff) -> Result<Infallible, SessionEnd> {
        let timeout = self.config.request_timeout;
        let mut client = self.config.connect().await?;
        let lease = self.lease.acquire(&mut client, timeout).await?;
        let keep_alive = KeepAlive::start(&mut client, lease, self.lease.period(), timeout)
            .await?
            .run();
        tokio::pin!(keep_alive);
        backoff.reset();
        // Campaign blocks until elected: no deadline, the keep-alive and the
        // connection's pings notice trouble instead.
        let campaign = client.campaign(self.name.as_str(), self.candidate.as_str(), lease);
        let elected = tokio::select! {
            end = &mut keep_alive => return Err(end),
            r = campaign => r.map_err(|source| ControlError::Etcd { op: "campaign", source })?,
        };
        let leader = elected.leader().cloned().ok_or(ControlError::Etcd {
            op: "campaign",
            source: etcd_client::Error::ElectError("no leader key in the reply".into()),
        })?;
        let token = FencingToken {
            key: String::from_utf8_lossy(leader.key()).into_owned(),
            revision: leader.rev(),
        };
        // Deposition by deletion of the key (by hand) while the lease lives.
        let options = WatchOptions::new().with_start_revision(leader.rev());
        let mut watch =
            deadline(timeout, "watch", client.watch(leader.key(), Some(options))).await?;
        self.leader_key = Some(leader);
        info!(candidate = %self.candidate, %token, "elected placement controller");
        self.leadership.send_replace(Leadership::Leader(token));
        let deposed = async {
            loop {
                let resp = watch
                    .message()
                    .await
                    .map_err(|source| ControlError::Etcd {
                        op: "watch",
                        source,
                    })?
                    .ok_or(ControlError::Etcd {
                        op: "watch",
                        source: etcd_client::Error::WatchError("stream ended".into()),
                    })?;
                if resp.canceled()
                    || resp
                        .events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete)
                {
                    return Ok::<_, ControlError>(());
                }
            }
        };
        tokio::select! {
            end = &mut keep_alive => Err(end),
            r = deposed => Err(match r {
                Ok(()) => SessionEnd::Deposed,
                Err(e) => SessionEnd::Failed(e),
            }),
        }
    }
}
