//! Where the placement lives: `/moe/<cluster>/placement`, one JSON document
//! `{"version": N, "placement": ...}`, written only by the elected controller.
//!
//! A write is one transaction that holds only while the writer's leadership holds
//! ([`FencingToken`]) and nobody wrote the key since the writer read it; versions must
//! advance. So a deposed controller cannot overwrite a newer placement, and two writers
//! never interleave. The placement's own shape (which device hosts what) belongs to the
//! caller: it is stored as a JSON value.

use etcd_client::{Compare, CompareOp, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::election::{leadership_holds, FencingToken};
use crate::error::ControlError;
use crate::etcd::EtcdClient;
use crate::etcd_mirror::{spawn_mirror, Entries, KeyRange};
use crate::live_view::LiveView;

/// A stored placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPlacement {
    /// Monotonic version.
    pub version: u64,
    /// The placement document.
    pub placement: serde_json::Value,
}

/// Reads, fenced writes and watches of the placement. Cheap to clone.
#[derive(Clone)]
pub struct PlacementStore {
    etcd: EtcdClient,
    key: String,
}

impl PlacementStore {
    /// The store of `etcd`'s cluster.
    pub fn new(etcd: EtcdClient) -> Self {
        let key = etcd.config().keys.placement();
        Self { etcd, key }
    }

    /// Publishes `placement` as `version`, fenced by `token`; returns the write's
    /// revision. Fails with [`ControlError::Fenced`] if the leadership is gone,
    /// [`ControlError::StaleVersion`] if `version` does not advance the stored one,
    /// [`ControlError::Conflict`] if the key changed during the call.
    pub async fn put_placement(
        &self,
        version: u64,
        placement: &impl Serialize,
        token: &FencingToken,
    ) -> Result<i64, ControlError> {
        let doc = StoredPlacement {
            version,
            placement: serde_json::to_value(placement)
                .map_err(|e| ControlError::invalid("placement", e.to_string()))?,
        };
        let value = serde_json::to_vec(&doc)
            .map_err(|e| ControlError::invalid("placement", e.to_string()))?;
        let (current, mod_revision) = self.read().await?;
        if let Some(cur) = current {
            if version <= cur.version {
                return Err(ControlError::StaleVersion {
                    current: cur.version,
                    proposed: version,
                });
            }
        }
        let txn = etcd_client::Txn::new()
            .when([
                leadership_holds(token),
                // 0 when absent: the key must still be absent.
                Compare::mod_revision(self.key.as_str(), CompareOp::Equal, mod_revision),
            ])
            .and_then([TxnOp::put(self.key.as_str(), value, None)])
            .or_else([TxnOp::get(token.key.as_str(), None)]);
        let resp = self
            .etcd
            .call("placement put", |mut c| async move { c.txn(txn).await })
            .await?;
        if resp.succeeded() {
            return Ok(resp.header().map_or(0, |h| h.revision()));
        }
        // Which comparison failed: is the leader key still ours?
        let still_leading = resp.op_responses().iter().any(|op| match op {
            TxnOpResponse::Get(g) => g
                .kvs()
                .iter()
                .any(|kv| kv.create_revision() == token.revision),
            _ => false,
        });
        if still_leading {
            Err(ControlError::Conflict {
                key: self.key.clone(),
            })
        } else {
            Err(ControlError::Fenced {
                token: token.revision,
            })
        }
    }

    /// The stored placement, if any.
    pub async fn get_placement(&self) -> Result<Option<StoredPlacement>, ControlError> {
        Ok(self.read().await?.0)
    }

    /// Follows the placement: `None` until one is published. Keeps the last value while
    /// etcd is unreachable.
    pub fn watch_placement(&self) -> LiveView<Option<StoredPlacement>> {
        let key = self.key.clone();
        spawn_mirror(
            self.etcd.config().clone(),
            KeyRange::Exact(key.clone()),
            move |entries: &Entries| {
                let e = entries.get("")?;
                match serde_json::from_slice(&e.value) {
                    Ok(p) => Some(p),
                    Err(err) => {
                        warn!(%key, error = %err, "undecodable placement");
                        None
                    }
                }
            },
        )
    }

    /// The placement and the key's mod revision (0 when absent).
    async fn read(&self) -> Result<(Option<StoredPlacement>, i64), ControlError> {
        let key = self.key.clone();
        let resp = self
            .etcd
            .call(
                "placement get",
                |mut c| async move { c.get(key, None).await },
            )
            .await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok((None, 0));
        };
        let placement =
            serde_json::from_slice(kv.value()).map_err(|source| ControlError::Decode {
                key: self.key.clone(),
                source,
            })?;
        Ok((Some(placement), kv.mod_revision()))
    }
}
