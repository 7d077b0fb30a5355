//! A local mirror of an etcd key range that survives etcd going away.
//!
//! One task per mirror: connect, `get` the range, watch it from the next revision, apply
//! every put and delete (deletes by lease expiry included). When the connection fails or
//! the watch is cancelled (compaction), the mirror keeps its last contents, reports
//! [`ConnectionState::Disconnected`], waits a backoff and resynchronises with a fresh
//! `get` + watch, so changes missed while away (keys that expired meanwhile) are applied
//! on return. Consumers see a projection `T` of the mirror, published only when it
//! changes.

use std::collections::BTreeMap;

use etcd_client::{EventType, GetOptions, KeyValue, WatchOptions};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::error::ControlError;
use crate::etcd::{deadline, Backoff, EtcdConfig};
use crate::live_view::{ConnectionState, LiveView};

/// One key of the mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawEntry {
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
}

impl From<&KeyValue> for RawEntry {
    fn from(kv: &KeyValue) -> Self {
        Self {
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
        }
    }
}

/// Mirror contents: key relative to the range's start (`""` for an exact key) → entry.
pub(crate) type Entries = BTreeMap<String, RawEntry>;

/// Which keys to mirror.
#[derive(Debug, Clone)]
pub(crate) enum KeyRange {
    /// Every key starting with this prefix.
    Prefix(String),
    /// This one key.
    Exact(String),
}

impl KeyRange {
    fn key(&self) -> &str {
        match self {
            Self::Prefix(k) | Self::Exact(k) => k,
        }
    }

    fn get_options(&self) -> Option<GetOptions> {
        match self {
            Self::Prefix(_) => Some(GetOptions::new().with_prefix()),
            Self::Exact(_) => None,
        }
    }

    fn watch_options(&self, start_revision: i64) -> WatchOptions {
        let o = WatchOptions::new().with_start_revision(start_revision);
        match self {
            Self::Prefix(_) => o.with_prefix(),
            Self::Exact(_) => o,
        }
    }

    /// The key relative to the range, or `None` for a key outside it or not UTF-8.
    fn relative(&self, key: &[u8]) -> Option<String> {
        let key = std::str::from_utf8(key).ok()?;
        key.strip_prefix(self.key()).map(str::to_owned)
    }
}

/// Starts mirroring `range`; the view publishes `project(entries)` whenever it changes.
/// Must be called inside a Tokio runtime.
pub(crate) fn spawn_mirror<T, P>(config: EtcdConfig, range: KeyRange, project: P) -> LiveView<T>
where
    T: Clone + PartialEq + Send + Sync + 'static,
    P: Fn(&Entries) -> T + Send + Sync + 'static,
{
    let (value_tx, value_rx) = watch::channel(project(&Entries::new()));
    let (conn_tx, conn_rx) = watch::channel(ConnectionState::Connecting);
    let mirror = Mirror {
        config,
        range,
        project,
        value_tx,
        conn_tx,
    };
    tokio::spawn(async move {
        // Runs until nobody looks: every receiver of the value and of the state is gone.
        let unobserved = async {
            tokio::join!(mirror.value_tx.closed(), mirror.conn_tx.closed());
        };
        tokio::select! {
            _ = unobserved => {}
            _ = mirror.run() => {}
        }
    });
    LiveView::new(value_rx, conn_rx)
}

struct Mirror<T, P> {
    config: EtcdConfig,
    range: KeyRange,
    project: P,
    value_tx: watch::Sender<T>,
    conn_tx: watch::Sender<ConnectionState>,
}

impl<T, P> Mirror<T, P>
where
    T: Clone + PartialEq + Send + Sync + 'static,
    P: Fn(&Entries) -> T + Send + Sync + 'static,
{
    async fn run(&self) {
        let mut backoff = self.config.backoff();
        loop {
            let err = self.sync_and_follow(&mut backoff).await.err();
            let was = self.conn_tx.send_replace(ConnectionState::Disconnected);
            match (&err, was) {
                (Some(e), ConnectionState::Connected) => warn!(
                    range = self.range.key(),
                    error = %e,
                    "etcd watch lost; keeping the last value seen and reconnecting"
                ),
                (Some(e), _) => {
                    debug!(range = self.range.key(), error = %e, "etcd still unreachable")
                }
                (None, _) => info!(
                    range = self.range.key(),
                    "etcd watch cancelled; resynchronising"
                ),
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// Synchronises once and follows changes until the watch ends: `Ok` when etcd
    /// cancelled it (resynchronise), `Err` when the connection failed.
    async fn sync_and_follow(&self, backoff: &mut Backoff) -> Result<(), ControlError> {
        let timeout = self.config.request_timeout;
        let mut client = self.config.connect().await?;
        let key = self.range.key().to_owned();
        let resp = deadline(
            timeout,
            "get",
            client.get(key.clone(), self.range.get_options()),
        )
        .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut entries: Entries = resp
            .kvs()
            .iter()
            .filter_map(|kv| Some((self.range.relative(kv.key())?, RawEntry::from(kv))))
            .collect();
        let mut stream = deadline(
            timeout,
            "watch",
            client.watch(key, Some(self.range.watch_options(revision + 1))),
        )
        .await?;
        self.publish(&entries);
        if self.conn_tx.send_replace(ConnectionState::Connected) == ConnectionState::Disconnected {
            info!(
                range = self.range.key(),
                revision, "etcd watch re-established"
            );
        }
        backoff.reset();
        loop {
            let resp = stream
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
            if resp.canceled() {
                debug!(
                    compact_revision = resp.compact_revision(),
                    reason = resp.cancel_reason(),
                    "watch cancelled by etcd"
                );
                return Ok(());
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(rel) = self.range.relative(kv.key()) else {
                    continue;
                };
                match event.event_type() {
                    EventType::Put => {
                        entries.insert(rel, RawEntry::from(kv));
                    }
                    EventType::Delete => {
                        entries.remove(&rel);
                    }
                }
            }
            self.publish(&entries);
        }
    }

    fn publish(&self, entries: &Entries) {
        let next = (self.project)(entries);
        self.value_tx.send_if_modified(|cur| {
            if *cur == next {
                false
            } else {
                *cur = next;
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_made_relative_to_the_range() {
        let p = KeyRange::Prefix("/moe/c/workers/".into());
        assert_eq!(p.relative(b"/moe/c/workers/w1").as_deref(), Some("w1"));
        assert_eq!(p.relative(b"/moe/c/other"), None);
        assert_eq!(p.relative(&[0xff]), None);
        let e = KeyRange::Exact("/moe/c/placement".into());
        assert_eq!(e.relative(b"/moe/c/placement").as_deref(), Some(""));
    }
}
