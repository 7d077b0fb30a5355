//! Worker health as dispatch sees it: a worker whose dispatch failed is marked down and
//! skipped by later calls for a while (while another copy exists), and the copies of
//! each expert on live workers.

use std::collections::HashSet;
use std::time::Instant;

use super::RemoteBackend;

impl RemoteBackend {
    /// Skips `worker` in later calls for [`DispatchConfig::mark_down_for`] while other
    /// copies exist; counts the event when it was not down already.
    pub(super) fn mark_down(&self, worker: usize) {
        let now = Instant::now();
        let until = now + self.cfg.mark_down_for;
        let newly = match self.down_until.lock() {
            Ok(mut d) => {
                let was_up = d.get(&worker).is_none_or(|t| *t <= now);
                d.insert(worker, until);
                was_up
            }
            Err(_) => false,
        };
        if newly {
            let addr = self.addr_of(worker);
            tracing::warn!(worker = %addr, for_ms = self.cfg.mark_down_for.as_millis() as u64, "worker marked down");
            self.metrics
                .worker_marked_down
                .with_label_values(&[addr.as_str()])
                .inc();
        }
    }

    /// Forgets that `worker` failed (it answered again).
    pub(crate) fn mark_up(&self, worker: usize) {
        if let Ok(mut d) = self.down_until.lock() {
            d.remove(&worker);
        }
    }

    /// Whether worker `i` is marked down now (a dispatch to it failed recently).
    pub fn is_marked_down(&self, i: usize) -> bool {
        self.down_now().contains(&i)
    }

    /// Workers marked down now.
    pub(super) fn down_now(&self) -> Vec<usize> {
        let now = Instant::now();
        match self.down_until.lock() {
            Ok(mut d) => {
                d.retain(|_, t| *t > now);
                d.keys().copied().collect()
            }
            Err(_) => Vec::new(),
        }
    }

    /// The experts among `experts` that have no copy on a live worker: one the routes
    /// use, not marked down after a failed dispatch, and not in `unreachable`.
    pub fn experts_without_live_copy(
        &self,
        experts: &[(usize, u32)],
        unreachable: &HashSet<usize>,
    ) -> Vec<(usize, u32)> {
        experts
            .iter()
            .zip(self.live_copies(experts, unreachable))
            .filter(|(_, n)| *n == 0)
            .map(|(e, _)| *e)
            .collect()
    }

    /// For each of `experts`, its copies on live workers (routed, not marked down, and
    /// not in `unreachable`).
    pub fn live_copies(
        &self,
        experts: &[(usize, u32)],
        unreachable: &HashSet<usize>,
    ) -> Vec<usize> {
        let down = self.down_now();
        let Ok(routes) = self.routes.read() else {
            return vec![0; experts.len()];
        };
        experts
            .iter()
            .map(|e| {
                routes.get(e).map_or(0, |hosts| {
                    hosts
                        .iter()
                        .filter(|w| !down.contains(w) && !unreachable.contains(w))
                        .count()
                })
            })
            .collect()
    }
}
