//! The route table of [`RemoteBackend`]: `(layer, expert)` → the workers hosting a
//! ready copy, built from a placement; its epochs, so that a placement change can wait
//! for the dispatches split by older routes to drain; the placement it follows.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use moe_control::PlacementPlan;

use super::partition::Routes;
use super::RemoteBackend;

/// The routes of a placement: `(layer, expert)` → the indices of the workers (through
/// `worker_index`, by name; workers it lacks are left out) hosting a copy, each once.
pub(crate) fn routes_of(plan: &PlacementPlan, worker_index: &HashMap<String, usize>) -> Routes {
    let mut routes: Routes = HashMap::new();
    for (slot, experts) in &plan.assignments {
        let Some(&w) = worker_index.get(&slot.worker) else {
            continue;
        };
        for e in experts {
            let hosts = routes.entry(*e).or_default();
            if !hosts.contains(&w) {
                hosts.push(w);
            }
        }
    }
    routes
}

/// A dispatch in flight, counted under the route epoch it started in.
pub(super) struct InFlight<'a> {
    backend: &'a RemoteBackend,
    epoch: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.backend.in_flight.lock() {
            if let Some(n) = m.get_mut(&self.epoch) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.epoch);
                }
            }
        }
    }
}

impl RemoteBackend {
    /// Indices of the workers the routes use.
    pub fn routed_workers(&self) -> BTreeSet<usize> {
        self.routes
            .read()
            .map(|r| r.values().flatten().copied().collect())
            .unwrap_or_default()
    }

    /// Routes by a placement whose copies are loaded. `worker_index` maps a device slot's
    /// worker name to the index of its client.
    /// Returns the new route epoch: once [`drained`](Self::drained) of it, no dispatch
    /// split by older routes is in flight.
    pub fn set_routes(&self, plan: &PlacementPlan, worker_index: &HashMap<String, usize>) -> u64 {
        let routes = routes_of(plan, worker_index);
        if let Ok(old) = self.routes.read() {
            // A worker the routes take (back) in has just loaded its copies for this
            // placement: forget an old mark-down, or it would get no traffic (and look
            // dead to readiness) until the mark-down expires.
            let before: BTreeSet<usize> = old.values().flatten().copied().collect();
            let joined: BTreeSet<usize> = routes
                .values()
                .flatten()
                .copied()
                .filter(|w| !before.contains(w))
                .collect();
            for w in joined {
                self.mark_up(w);
            }
            // An expert that lost every copy shows 0, not a vanished series.
            for (layer, expert) in old.keys().filter(|k| !routes.contains_key(k)) {
                self.metrics
                    .expert_copies
                    .with_label_values(&[layer.to_string().as_str(), expert.to_string().as_str()])
                    .set(0);
            }
        }
        for ((layer, expert), hosts) in &routes {
            self.metrics
                .expert_copies
                .with_label_values(&[layer.to_string().as_str(), expert.to_string().as_str()])
                .set(hosts.len() as i64);
        }
        let live: BTreeSet<usize> = worker_index.values().copied().collect();
        self.metrics.live_workers.set(live.len() as i64);
        if let Ok(mut r) = self.routes.write() {
            *r = routes;
        }
        if let Ok(mut p) = self.placement.write() {
            *p = plan.clone();
        }
        self.metrics.placement_version.set(plan.version as i64);
        // After the routes are written: a dispatch that sees this epoch sees them.
        self.routes_epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1
    }

    /// Waits (at most `bound`) until no dispatch that started under a route epoch older
    /// than `epoch` is in flight; false if some still are.
    pub async fn drained(&self, epoch: u64, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            let busy = self
                .in_flight
                .lock()
                .map(|m| m.range(..epoch).any(|(_, n)| *n > 0))
                .unwrap_or(false);
            if !busy {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The longest one dispatch may take, retries included.
    pub fn dispatch_bound(&self) -> Duration {
        self.cfg.deadline * (self.cfg.max_retries + 1)
    }

    /// Counts a dispatch in flight under the current route epoch (read before the
    /// routes, so a dispatch never uses routes older than its epoch).
    pub(super) fn track(&self) -> InFlight<'_> {
        let epoch = self.routes_epoch.load(std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut m) = self.in_flight.lock() {
            *m.entry(epoch).or_default() += 1;
        }
        InFlight {
            backend: self,
            epoch,
        }
    }

    /// The placement the routes follow.
    pub fn placement(&self) -> PlacementPlan {
        self.placement.read().map(|p| p.clone()).unwrap_or_default()
    }
}
