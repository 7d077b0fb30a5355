//! The placement planner: a pure, deterministic function from (experts, devices,
//! replication, observed load, previous plan) to which device hosts which
//! `(layer, expert)`.
//!
//! Rules, in order: every expert is hosted at least once if capacity allows; devices are
//! balanced by weight bytes; an expert stays where the previous plan had it when that
//! keeps the balance (least movement); extra copies (`replicas` > 1) go to the least
//! loaded devices that do not hold the expert yet. Ties are broken by device order, so the
//! same input always gives the same plan.
//!
//! Load-aware replication (DeepSeek's EPLB idea) is on when [`PlanInput::load`] is given
//! and [`PlanInput::extra_copies`] > 0; otherwise the plan is exactly the load-blind one.
//! A device's load is the sum, over the experts it hosts, of each expert's routed tokens
//! split evenly over its copies ([`device_loads`]). Then:
//! - an expert may stay on any device the previous plan had it on (experts with fewer
//!   choices first); experts that must move are spread hottest first over the devices
//!   with the fewest experts, the least loaded of those first;
//! - the previous plan's extra copies are put back where there is room; those over the
//!   allowance and those whose removal makes no device most loaded (the expert cooled
//!   down) are dropped, coldest first;
//! - copies are added one at a time, up to `extra_copies` extra copies in all. Each
//!   relieves a most-loaded device: it goes to the hottest expert (tokens per copy) on
//!   such a device that has a useful target, a device without it, with room, that stays
//!   below the maximum after taking its share; a device the previous plan had that
//!   expert on is preferred, else the least loaded one. Copies that in the end did not
//!   lower the maximum device load are taken back, as are those later ones made
//!   redundant, so no memory is spent for nothing;
//! - if all that moves the previous plan's copies but lowers the maximum device load by
//!   2 % or less, the previous copies stay as they were: re-planning with the same or a
//!   slightly noisy load moves nothing.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

/// An expert: `(layer, expert index)`.
pub type ExpertKey = (usize, u32);

/// A device that can host experts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceSlot {
    /// The worker (its address or id).
    pub worker: String,
    /// The device name on that worker, e.g. `cpu:0`.
    pub device: String,
    /// Bytes available for expert weights; 0 means unlimited.
    pub capacity_bytes: u64,
    /// Bytes one expert takes on this device, at the device's own precision (an int8
    /// device holds about a quarter of what an f32 one does in the same memory); 0 means
    /// [`PlanInput::expert_bytes`].
    pub expert_bytes: u64,
}

/// What the planner needs.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    /// Every routed expert of the model.
    pub experts: &'a [ExpertKey],
    /// Bytes of one expert's weights on a device that does not say its own
    /// ([`DeviceSlot::expert_bytes`] 0; all experts of a model are the same size).
    pub expert_bytes: u64,
    /// Devices to place on, in a stable order.
    pub devices: &'a [DeviceSlot],
    /// Copies of each expert wanted (≥ 1).
    pub replicas: usize,
    /// The plan in force, to move as little as possible.
    pub previous: Option<&'a PlacementPlan>,
    /// Routed tokens per expert over the last window (a missing expert counts 0). With
    /// `extra_copies` > 0 the plan balances device load and replicates hot experts.
    pub load: Option<&'a BTreeMap<ExpertKey, u64>>,
    /// Copies the planner may add in total, beyond `replicas` each, for the hottest
    /// experts (only with `load`). Device capacity still bounds them.
    pub extra_copies: usize,
}

/// A placement: for each device (index into the input's device list), its experts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlacementPlan {
    /// Monotonic version (the caller sets it).
    pub version: u64,
    /// Device → experts it hosts, sorted.
    pub assignments: BTreeMap<DeviceSlot, BTreeSet<ExpertKey>>,
}

impl PlacementPlan {
    /// Devices hosting `e`, in device order.
    pub fn hosts(&self, e: ExpertKey) -> Vec<&DeviceSlot> {
        self.assignments
            .iter()
            .filter(|(_, set)| set.contains(&e))
            .map(|(d, _)| d)
            .collect()
    }

    /// Experts of the model that no device hosts.
    pub fn missing(&self, experts: &[ExpertKey]) -> Vec<ExpertKey> {
        experts
            .iter()
            .copied()
            .filter(|e| self.hosts(*e).is_empty())
            .collect()
    }
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no devices to place experts on")]
    NoDevices,
    #[error("not enough device memory: {} experts cannot be hosted (first: layer {} expert {})", .0.len(), .0[0].0, .0[0].1)]
    InsufficientCapacity(Vec<ExpertKey>),
}

/// [`plan`]; when the devices cannot hold every expert, a plan of those that fit rather
/// than none (requests needing the others fail UNAVAILABLE naming them). Returns the
/// experts left out too.
pub fn plan_what_fits(
    input: &PlanInput<'_>,
) -> Result<(PlacementPlan, Vec<ExpertKey>), PlacementError> {
    match plan(input) {
        Err(PlacementError::InsufficientCapacity(missing)) => {
            let fits: Vec<ExpertKey> = input
                .experts
                .iter()
                .copied()
                .filter(|e| !missing.contains(e))
                .collect();
            let placed = plan(&PlanInput {
                experts: &fits,
                ..input.clone()
            })?;
            Ok((placed, missing))
        }
        other => other.map(|p| (p, Vec::new())),
    }
}

/// Plans a placement (version 0; the caller numbers it).
pub fn plan(input: &PlanInput<'_>) -> Result<PlacementPlan, PlacementError> {
    let n = input.devices.len();
    if n == 0 {
        return Err(PlacementError::NoDevices);
    }
    // The plan counts experts per device (`used`, the shares); bytes only decide what
    // fits, each device at its own precision.
    let eb = 1;
    let fits = |d: usize, used: u64| {
        let slot = &input.devices[d];
        let bytes = match slot.expert_bytes {
            0 => input.expert_bytes.max(1),
            b => b,
        };
        slot.capacity_bytes == 0 || (used + 1).saturating_mul(bytes) <= slot.capacity_bytes
    };
    // Load-aware only when there is both a load and room for extra copies: otherwise the
    // plan is exactly the load-blind one.
    let load = input.load.filter(|_| input.extra_copies > 0);
    let mut used = vec![0u64; n];
    let mut hosted: Vec<BTreeSet<ExpertKey>> = vec![BTreeSet::new(); n];
    // The balanced share of one copy of everything, rounded up to whole experts.
    let per_device = (input.experts.len() as u64).div_ceil(n as u64) * eb;

    // Pass 1: keep experts where they were, within the balanced share. Load-blind, an
    // expert stays on its first previous host or moves. Load-aware plans replicate hot
    // experts: any previous host will do, so experts with fewer choices go first and
    // take the emptiest of theirs.
    let mut order: Vec<(usize, ExpertKey, Vec<usize>)> = input
        .experts
        .iter()
        .enumerate()
        .map(|(i, &e)| {
            let mut prev = previous_hosts(input, e);
            if load.is_none() {
                prev.truncate(1);
            }
            (i, e, prev)
        })
        .collect();
    if load.is_some() {
        order.sort_by_key(|(i, _, prev)| (prev.len(), *i));
    }
    let mut unplaced = Vec::new();
    let replicas = input.replicas.max(1);
    // The balanced share of all `replicas` copies of everything.
    let share = (input.experts.len() as u64 * replicas as u64).div_ceil(n as u64) * eb;
    for (i, e, prev) in order {
        if load.is_none() && replicas > 1 {
            // Load-blind with replicas: one previous copy of each expert first (first
            // copies of every expert come before second copies of some); the others are
            // restored after pass 2.
            let keep = previous_hosts(input, e)
                .into_iter()
                .filter(|&d| used[d] + eb <= share && fits(d, used[d]))
                .min_by_key(|&d| (used[d], d));
            match keep {
                Some(d) => {
                    used[d] += eb;
                    hosted[d].insert(e);
                }
                None => unplaced.push((i, e)),
            }
            continue;
        }
        let keep = prev
            .into_iter()
            .filter(|&d| used[d] + eb <= per_device && fits(d, used[d]))
            .min_by_key(|&d| (used[d], d));
        match keep {
            Some(d) => {
                used[d] += eb;
                hosted[d].insert(e);
            }
            None => unplaced.push((i, e)),
        }
    }
    // Pass 2: the rest go to the least loaded device with room. Load-aware: hottest
    // first, and among the devices with the fewest bytes the one with the fewest tokens.
    let mut tokens_on = vec![0u64; n];
    if let Some(load) = load {
        for (d, set) in hosted.iter().enumerate() {
            tokens_on[d] = set
                .iter()
                .fold(0u64, |sum, e| sum.saturating_add(tokens(load, *e)));
        }
        unplaced.sort_by_key(|&(_, e)| (Reverse(tokens(load, e)), e));
    }
    let mut missing = Vec::new();
    for (i, e) in unplaced {
        let pick = (0..n)
            .filter(|d| fits(*d, used[*d]))
            .min_by_key(|d| (used[*d], tokens_on[*d], *d));
        match pick {
            Some(d) => {
                used[d] += eb;
                hosted[d].insert(e);
                if let Some(load) = load {
                    tokens_on[d] = tokens_on[d].saturating_add(tokens(load, e));
                }
            }
            None => missing.push((i, e)),
        }
    }
    if !missing.is_empty() {
        missing.sort_unstable();
        return Err(PlacementError::InsufficientCapacity(
            missing.into_iter().map(|(_, e)| e).collect(),
        ));
    }
    // Pass 2b (load-blind, replicas): the other previous copies stay while their device
    // is within its share of all copies, so an unchanged cluster re-plans to the same
    // plan and a survivor keeps the copies it had.
    if load.is_none() && replicas > 1 {
        for &e in input.experts {
            for d in previous_hosts(input, e) {
                let copies = hosted.iter().filter(|h| h.contains(&e)).count();
                if copies < replicas
                    && !hosted[d].contains(&e)
                    && used[d] + eb <= share
                    && fits(d, used[d])
                {
                    used[d] += eb;
                    hosted[d].insert(e);
                }
            }
        }
    }
    // Pass 3: extra copies, one round per replica, while capacity allows; an expert
    // that kept several copies in pass 1 needs fewer. A copy goes to another worker
    // than the expert's other copies where one has room (a worker dies whole), then to
    // the least loaded device.
    for round in 1..replicas {
        for &e in input.experts {
            if hosted.iter().filter(|h| h.contains(&e)).count() > round {
                continue;
            }
            let on_worker_with_copy = |d: usize| {
                input.devices.iter().enumerate().any(|(d2, slot)| {
                    slot.worker == input.devices[d].worker && hosted[d2].contains(&e)
                })
            };
            let prev = previous_hosts(input, e);
            let target = (0..n)
                .filter(|&d| !hosted[d].contains(&e) && fits(d, used[d]))
                .min_by_key(|&d| (on_worker_with_copy(d), !prev.contains(&d), used[d], d));
            if let Some(d) = target {
                used[d] += eb;
                hosted[d].insert(e);
            }
        }
    }
    // Pass 4: extra copies of the hottest experts.
    if let Some(load) = load {
        add_hot_copies(input, load, &mut hosted, &mut used, fits);
    }
    Ok(PlacementPlan {
        version: 0,
        assignments: input.devices.iter().cloned().zip(hosted).collect(),
    })
}

/// Pass 4 (see the module doc).
fn add_hot_copies(
    input: &PlanInput<'_>,
    load: &BTreeMap<ExpertKey, u64>,
    hosted: &mut [BTreeSet<ExpertKey>],
    used: &mut [u64],
    fits: impl Fn(usize, u64) -> bool,
) {
    let mut lay = Layout::new(hosted, used, load);
    let n = lay.hosted.len();
    let fits = |lay: &Layout<'_>, d: usize| fits(d, lay.used[d]);
    // The previous plan's copies of experts with tokens, where there is room, within
    // the allowance: the plan that moves nothing.
    let mut extra: Vec<(ExpertKey, usize)> = Vec::new();
    for &e in input.experts {
        if tokens(load, e) == 0 {
            continue;
        }
        for d in previous_hosts(input, e) {
            if !lay.hosted[d].contains(&e) && fits(&lay, d) {
                lay.add(e, d);
                extra.push((e, d));
            }
        }
    }
    lay.prune(&mut extra, input.extra_copies, false);
    let unmoved = (!extra.is_empty()).then(|| lay.snapshot());

    // Drop what no longer pays off, then add copies one by one.
    lay.prune(&mut extra, input.extra_copies, true);
    let kept = extra.len();
    // The maximum device load before the first new copy and after each one.
    let mut maxima: Vec<f64> = Vec::new();
    loop {
        let top = lay.top();
        maxima.push(top);
        if extra.len() >= input.extra_copies || top <= 0.0 {
            break;
        }
        let below_top = lay.below_top();
        // Experts with tokens on a most-loaded device, hottest per copy first.
        let mut candidates: Vec<(f64, ExpertKey)> = (0..n)
            .filter(|d| lay.loads[*d] > below_top)
            .flat_map(|d| lay.hosted[d].iter().copied())
            .filter(|e| tokens(load, *e) > 0)
            .map(|e| (lay.per_copy(e, 0), e))
            .collect();
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        candidates.dedup_by_key(|c| c.1);
        let pick = candidates.iter().find_map(|&(_, e)| {
            let share = lay.per_copy(e, 1);
            // A target stays below the maximum after taking its share, so the
            // most-loaded hosts of `e` are relieved without making a new one.
            let useful = |d: &usize| {
                !lay.hosted[*d].contains(&e) && fits(&lay, *d) && lay.loads[*d] + share < below_top
            };
            let by_load =
                |a: &usize, b: &usize| lay.loads[*a].total_cmp(&lay.loads[*b]).then(a.cmp(b));
            previous_hosts(input, e)
                .into_iter()
                .filter(useful)
                .min_by(by_load)
                .or_else(|| (0..n).filter(useful).min_by(by_load))
                .map(|d| (e, d))
        });
        let Some((e, d)) = pick else { break };
        lay.add(e, d);
        extra.push((e, d));
    }
    // Keep the shortest prefix of new copies that reaches the final maximum.
    let last = maxima.last().copied().unwrap_or(0.0);
    let keep = maxima
        .iter()
        .position(|m| *m <= last * (1.0 + TOLERANCE))
        .map_or(extra.len(), |k| kept + k)
        .min(extra.len());
    for (e, d) in extra.split_off(keep) {
        lay.remove(e, d);
    }
    // Copies that later ones made redundant.
    lay.prune(&mut extra, input.extra_copies, true);

    // Moving copies must pay: keep the previous ones unless the peak drops enough.
    if let Some(before) = unmoved {
        if lay.top() >= before.top() * (1.0 - KEEP_MARGIN) {
            lay.restore(before);
        }
    }
}

/// Re-planning keeps the previous plan's extra copies unless moving them lowers the
/// maximum device load by more than this fraction.
const KEEP_MARGIN: f64 = 0.02;

/// Relative tolerance when comparing device loads: sums of fractions that are equal in
/// theory may differ in the last bits.
const TOLERANCE: f64 = 1e-9;

/// A plan in the making with its device loads, kept current copy by copy. A device's
/// load is always summed afresh from its experts, so it does not depend on the order in
/// which copies came and went.
struct Layout<'h> {
    hosted: &'h mut [BTreeSet<ExpertKey>],
    /// Experts per device.
    used: &'h mut [u64],
    load: &'h BTreeMap<ExpertKey, u64>,
    copies: BTreeMap<ExpertKey, usize>,
    loads: Vec<f64>,
}

/// What [`Layout::restore`] puts back.
struct Snapshot {
    hosted: Vec<BTreeSet<ExpertKey>>,
    used: Vec<u64>,
    copies: BTreeMap<ExpertKey, usize>,
    loads: Vec<f64>,
}

impl Snapshot {
    fn top(&self) -> f64 {
        self.loads.iter().copied().fold(0.0, f64::max)
    }
}

impl<'h> Layout<'h> {
    fn new(
        hosted: &'h mut [BTreeSet<ExpertKey>],
        used: &'h mut [u64],
        load: &'h BTreeMap<ExpertKey, u64>,
    ) -> Self {
        let copies = copy_counts(&*hosted);
        let loads = hosted
            .iter()
            .map(|set| set_load(set, &copies, load))
            .collect();
        Self {
            hosted,
            used,
            load,
            copies,
            loads,
        }
    }

    /// The maximum device load.
    fn top(&self) -> f64 {
        self.loads.iter().copied().fold(0.0, f64::max)
    }

    /// Loads above this count as the maximum.
    fn below_top(&self) -> f64 {
        self.top() * (1.0 - TOLERANCE)
    }

    /// Tokens per copy of `e` with `delta` more copies than now (at least one copy).
    fn per_copy(&self, e: ExpertKey, delta: isize) -> f64 {
        let c = self.copies.get(&e).copied().unwrap_or(0);
        tokens(self.load, e) as f64 / c.saturating_add_signed(delta).max(1) as f64
    }

    /// Devices hosting `e`.
    fn hosts(&self, e: ExpertKey) -> Vec<usize> {
        (0..self.hosted.len())
            .filter(|d| self.hosted[*d].contains(&e))
            .collect()
    }

    fn add(&mut self, e: ExpertKey, d: usize) {
        if self.hosted[d].insert(e) {
            self.used[d] += 1;
            *self.copies.entry(e).or_insert(0) += 1;
            self.refresh(self.hosts(e));
        }
    }

    fn remove(&mut self, e: ExpertKey, d: usize) {
        if self.hosted[d].remove(&e) {
            self.used[d] -= 1;
            if let Some(c) = self.copies.get_mut(&e) {
                *c = c.saturating_sub(1);
            }
            let mut touched = self.hosts(e);
            touched.push(d);
            self.refresh(touched);
        }
    }

    fn refresh(&mut self, devices: Vec<usize>) {
        for d in devices {
            self.loads[d] = set_load(&self.hosted[d], &self.copies, self.load);
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            hosted: self.hosted.to_vec(),
            used: self.used.to_vec(),
            copies: self.copies.clone(),
            loads: self.loads.clone(),
        }
    }

    fn restore(&mut self, s: Snapshot) {
        self.hosted.clone_from_slice(&s.hosted);
        self.used.copy_from_slice(&s.used);
        self.copies = s.copies;
        self.loads = s.loads;
    }

    /// Drops copies of `extra`, coldest per copy first: those over `allowance`, then
    /// (with `redundant`) those whose removal makes no device most loaded (an expert
    /// that cooled down, a copy that later ones made redundant).
    fn prune(&mut self, extra: &mut Vec<(ExpertKey, usize)>, allowance: usize, redundant: bool) {
        loop {
            // Coldest per copy first; ties by expert, then device.
            extra.sort_by(|a, b| {
                self.per_copy(a.0, 0)
                    .total_cmp(&self.per_copy(b.0, 0))
                    .then(a.cmp(b))
            });
            let over = extra.len() > allowance;
            let below_top = self.below_top();
            let drop = extra.iter().position(|&(e, d)| {
                // Each other host takes a share of the copy's tokens.
                let more = self.per_copy(e, -1) - self.per_copy(e, 0);
                over || redundant
                    && self
                        .hosts(e)
                        .into_iter()
                        .filter(|h| *h != d)
                        .all(|h| self.loads[h] + more < below_top)
            });
            let Some(i) = drop else { return };
            let (e, d) = extra.remove(i);
            self.remove(e, d);
        }
    }
}

/// Routed tokens of `e` (0 when not reported).
fn tokens(load: &BTreeMap<ExpertKey, u64>, e: ExpertKey) -> u64 {
    load.get(&e).copied().unwrap_or(0)
}

/// Devices (indices into the input's list) the previous plan had `e` on.
fn previous_hosts(input: &PlanInput<'_>, e: ExpertKey) -> Vec<usize> {
    input.previous.map_or_else(Vec::new, |p| {
        p.hosts(e)
            .into_iter()
            .filter_map(|slot| input.devices.iter().position(|d| d == slot))
            .collect()
    })
}

/// How many devices host each expert.
fn copy_counts<'s>(
    sets: impl IntoIterator<Item = &'s BTreeSet<ExpertKey>>,
) -> BTreeMap<ExpertKey, usize> {
    let mut copies = BTreeMap::new();
    for e in sets.into_iter().flatten() {
        *copies.entry(*e).or_insert(0) += 1;
    }
    copies
}

/// One device's load: its experts' tokens, each split evenly over the expert's copies.
fn set_load(
    set: &BTreeSet<ExpertKey>,
    copies: &BTreeMap<ExpertKey, usize>,
    load: &BTreeMap<ExpertKey, u64>,
) -> f64 {
    set.iter()
        .map(|e| tokens(load, *e) as f64 / copies.get(e).copied().unwrap_or(1).max(1) as f64)
        .sum()
}

/// Each device's share of the routed tokens under `plan`: every expert's tokens split
/// evenly over the devices hosting it. Devices without experts count 0; experts the plan
/// does not host are left out.
pub fn device_loads(
    plan: &PlacementPlan,
    load: &BTreeMap<ExpertKey, u64>,
) -> BTreeMap<DeviceSlot, f64> {
    let copies = copy_counts(plan.assignments.values());
    plan.assignments
        .iter()
        .map(|(slot, set)| (slot.clone(), set_load(set, &copies, load)))
        .collect()
}

/// The imbalance of device loads: the largest over the mean (1.0 is perfect balance;
/// also 1.0 when there are no devices or no load).
pub fn max_over_mean(loads: &BTreeMap<DeviceSlot, f64>) -> f64 {
    let total: f64 = loads.values().sum();
    if loads.is_empty() || total <= 0.0 {
        return 1.0;
    }
    let max = loads.values().copied().fold(0.0, f64::max);
    max / (total / loads.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(n: usize, cap: u64) -> Vec<DeviceSlot> {
        (0..n)
            .map(|i| DeviceSlot {
                worker: format!("w{}", i / 2),
                device: format!("cpu:{}", i % 2),
                capacity_bytes: cap,
                expert_bytes: 0,
            })
            .collect()
    }

    fn experts(layers: usize, per: u32) -> Vec<ExpertKey> {
        (0..layers)
            .flat_map(|l| (0..per).map(move |e| (l, e)))
            .collect()
    }

    fn counts(p: &PlacementPlan) -> Vec<usize> {
        p.assignments.values().map(BTreeSet::len).collect()
    }

    #[test]
    fn every_expert_once_and_devices_balanced() {
        let ex = experts(3, 8);
        let devs = devices(5, 0);
        let p = plan(&PlanInput {
            experts: &ex,
            expert_bytes: 10,
            devices: &devs,
            replicas: 1,
            previous: None,
            load: None,
            extra_copies: 0,
        })
        .unwrap();
        assert!(p.missing(&ex).is_empty());
        let c = counts(&p);
        assert_eq!(c.iter().sum::<usize>(), 24);
        assert!(
            c.iter().max().unwrap() - c.iter().min().unwrap() <= 1,
            "{c:?}"
        );
        // Deterministic.
        let q = plan(&PlanInput {
            experts: &ex,
            expert_bytes: 10,
            devices: &devs,
            replicas: 1,
            previous: None,
            load: None,
            extra_copies: 0,
        })
        .unwrap();
        assert_eq!(p, q);
    }

    #[test]
    fn replicas_go_to_distinct_devices() {
        let ex = experts(2, 4);
        let devs = devices(3, 0);
        let p = plan(&PlanInput {
            experts: &ex,
            expert_bytes: 1,
            devices: &devs,
            replicas: 2,
            previous: None,
            load: None,
            extra_copies: 0,
        })
        .unwrap();
        for e in &ex {
            assert_eq!(p.hosts(*e).len(), 2, "{e:?}");
        }
        // More replicas than devices: capped at one copy per device.
        let p = plan(&PlanInput {
            experts: &ex,
            expert_bytes: 1,
            devices: &devs,
            replicas: 5,
            previous: None,
            load: None,
            extra_copies: 0,
        })
        .unwrap();
        assert!(ex.iter().all(|e| p.hosts(*e).len() == 3));
    }

    #[test]
    fn capacity_is_respected_and_shortfall_named() {
        let ex = experts(1, 8);
        let devs = devices(2, 30); // 3 experts each
        let err = plan(&PlanInput {
            experts: &ex,
            expert_bytes: 10,
            devices: &devs,
            replicas: 1,
            previous: None,
            load: None,
            extra_copies: 0,
        })
        .unwrap_err();
        assert_eq!(
            err,
            PlacementError::InsufficientCapacity(vec![(0, 6), (0, 7)])
        );
        assert!(err.to_string().contains("2 experts"));
        // Placing what fits instead: the others are named, every device is full.
        let (placed, missing) = plan_what_fits(&PlanInput {
            experts: &ex,
            expert_bytes: 10,
            devices: &devs,
            replicas: 1,
            previous: None,
            load: None,
            extra_copies: 0,
        })
        .unwrap();
        assert_eq!(missing, vec![(0, 6), (0, 7)]);
        assert_eq!(placed.missing(&ex), vec![(0, 6), (0, 7)]);
        assert!(placed.assignments.values().all(|s| s.len() == 3));
        assert_eq!(
            plan(&PlanInput {
                experts: &ex,
                expert_bytes: 1,
                devices: &[],
                replicas: 1,
                previous: None,
                load: None,
                extra_copies: 0,
            })
            .unwrap_err(),
            PlacementError::NoDevices
        );
    }

    #[test]
    fn copies_of_an_expert_go_to_different_workers() {
        // Two workers with two devices each: a second copy never shares a worker.
        let ex = experts(2, 8);
        let devs = devices(4, 0);
        let p = plan(&PlanInput {
            experts: &ex,
            expert_bytes: 1,
            devices: &devs,
            replicas: 2,
            previous: None,
            load: None,
            extra_copies: 0,
        })
        .unwrap();
        for e in &ex {
            let workers: BTreeSet<&str> = p.hosts(*e).iter().map(|s| s.worker.as_str()).collect();
            assert_eq!(
                workers.len(),
                2,
                "{e:?} has both copies on one worker: {p:?}"
            );
        }
    }

    #[test]
    fn a_lost_worker_with_replicas_leaves_room_for_every_expert() {
        // 3 workers with room for 10 experts each, 16 experts × 2 copies: after losing
        // one worker, 20 slots still hold every expert once (second copies where room).
        let ex = experts(1, 16);
        let devs: Vec<DeviceSlot> = (0..3)
            .map(|w| DeviceSlot {
                worker: format!("w{w}"),
                device: "cpu:0".into(),
                capacity_bytes: 10,
                expert_bytes: 0,
            })
            .collect();
        let input = |devices, previous| PlanInput {
            experts: &ex,
            expert_bytes: 1,
            devices,
            replicas: 2,
            previous,
            load: None,
            extra_copies: 0,
        };
        let first = plan(&input(&devs, None)).unwrap();
        let after = plan(&input(&devs[1..], Some(&first))).unwrap();
        assert!(after.missing(&ex).is_empty(), "{after:?}");
        assert_eq!(after, plan(&input(&devs[1..], Some(&after))).unwrap());
    }

    #[test]
    fn replanning_an_unchanged_cluster_moves_nothing() {
        let ex = experts(3, 8);
        let devs = devices(5, 0);
        for replicas in 1..=3 {
            let input = |previous| PlanInput {
                experts: &ex,
                expert_bytes: 1,
                devices: &devs,
                replicas,
                previous,
                load: None,
                extra_copies: 0,
            };
            let first = plan(&input(None)).unwrap();
            let again = plan(&input(Some(&first))).unwrap();
            assert_eq!(first, again, "replicas {replicas}");
            // Losing a device keeps every survivor's copies, replicas included.
            let survivors = &devs[..4];
            let after = plan(&PlanInput {
                devices: survivors,
                ..input(Some(&first))
            })
            .unwrap();
            for d in survivors {
                assert!(
                    first.assignments[d].is_subset(&after.assignments[d]),
                    "replicas {replicas}: {d:?} lost copies"
                );
            }
            assert!(ex.iter().all(|e| after.hosts(*e).len() == replicas.min(4)));
        }
    }

    #[test]
    fn a_lost_device_moves_only_its_experts() {
        let ex = experts(2, 6);
        let devs = devices(3, 0);
        let before = plan(&PlanInput {
            experts: &ex,
            expert_bytes: 1,
            devices: &devs,
            replicas: 1,
            previous: None,
            load: None,
            extra_copies: 0,
        })
        .unwrap();
        let survivors = &devs[..2];
        let after = plan(&PlanInput {
            experts: &ex,
            expert_bytes: 1,
            devices: survivors,
            replicas: 1,
            previous: Some(&before),
            load: None,
            extra_copies: 0,
        })
        .unwrap();
        assert!(after.missing(&ex).is_empty());
        for d in survivors {
            // Everything a survivor had, it keeps.
            assert!(
                before.assignments[d].is_subset(&after.assignments[d]),
                "{d:?} lost experts"
            );
        }
        assert_eq!(counts(&after), vec![6, 6]);
    }

    /// 8 experts on 4 devices; expert 0 gets half of the 1400 tokens, the others 100.
    fn skewed() -> (Vec<ExpertKey>, BTreeMap<ExpertKey, u64>) {
        let ex = experts(1, 8);
        let load = ex
            .iter()
            .map(|&e| (e, if e == (0, 0) { 700 } else { 100 }))
            .collect();
        (ex, load)
    }

    fn input<'a>(
        ex: &'a [ExpertKey],
        devs: &'a [DeviceSlot],
        load: Option<&'a BTreeMap<ExpertKey, u64>>,
        extra_copies: usize,
        previous: Option<&'a PlacementPlan>,
    ) -> PlanInput<'a> {
        PlanInput {
            experts: ex,
            expert_bytes: 10,
            devices: devs,
            replicas: 1,
            previous,
            load,
            extra_copies,
        }
    }

    fn loads(p: &PlacementPlan, load: &BTreeMap<ExpertKey, u64>) -> Vec<f64> {
        device_loads(p, load).into_values().collect()
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    fn extra_copies_of(p: &PlacementPlan) -> usize {
        p.assignments.values().map(BTreeSet::len).sum::<usize>() - 8
    }

    #[test]
    fn a_hot_expert_gets_extra_copies_and_the_peak_drops() {
        let (ex, load) = skewed();
        let devs = devices(4, 0);
        let blind = plan(&input(&ex, &devs, None, 0, None)).unwrap();
        assert_close(&loads(&blind, &load), &[800.0, 200.0, 200.0, 200.0]);
        let before = max_over_mean(&device_loads(&blind, &load));
        assert!((before - 800.0 / 350.0).abs() < 1e-9, "{before}");

        let aware = plan(&input(&ex, &devs, Some(&load), 3, None)).unwrap();
        assert!(aware.missing(&ex).is_empty());
        assert_eq!(aware.hosts((0, 0)).len(), 4, "{aware:?}");
        assert_eq!(extra_copies_of(&aware), 3);
        // 700 / 4 = 175 per copy: d0 hosts it with one cold expert, the rest with two.
        assert_close(&loads(&aware, &load), &[275.0, 375.0, 375.0, 375.0]);
        let after = max_over_mean(&device_loads(&aware, &load));
        assert!((after - 375.0 / 350.0).abs() < 1e-9, "{after}");
        // Every device still holds its two experts of the balanced share.
        assert!(aware.assignments.values().all(|s| s.len() >= 2));

        // More allowance than useful: the copies that could not lower the peak
        // (cold experts shuffled between devices) are not added.
        let generous = plan(&input(&ex, &devs, Some(&load), 100, None)).unwrap();
        assert_eq!(generous, aware);
    }

    #[test]
    fn without_load_or_allowance_the_plan_is_the_load_blind_one() {
        let (ex, load) = skewed();
        let devs = devices(4, 0);
        let blind = plan(&input(&ex, &devs, None, 0, None)).unwrap();
        assert_eq!(
            plan(&input(&ex, &devs, Some(&load), 0, None)).unwrap(),
            blind
        );
        assert_eq!(plan(&input(&ex, &devs, None, 5, None)).unwrap(), blind);
        // Likewise from a previous plan.
        let mut prev = blind.clone();
        prev.assignments.values_mut().next().unwrap().clear();
        let from_prev = plan(&input(&ex, &devs, None, 0, Some(&prev))).unwrap();
        assert_eq!(
            plan(&input(&ex, &devs, Some(&load), 0, Some(&prev))).unwrap(),
            from_prev
        );
        // A uniform load gives nothing to relieve.
        let flat: BTreeMap<ExpertKey, u64> = ex.iter().map(|&e| (e, 100)).collect();
        assert_eq!(
            extra_copies_of(&plan(&input(&ex, &devs, Some(&flat), 4, None)).unwrap()),
            0
        );
        // All-zero and empty loads too.
        let empty = BTreeMap::new();
        assert_eq!(
            plan(&input(&ex, &devs, Some(&empty), 4, None)).unwrap(),
            blind
        );
    }

    #[test]
    fn extra_copies_respect_capacity() {
        let (ex, load) = skewed();
        // Room for three experts each, but device 1 only for its two.
        let mut devs = devices(4, 30);
        devs[1].capacity_bytes = 20;
        let p = plan(&input(&ex, &devs, Some(&load), 10, None)).unwrap();
        for (slot, set) in &p.assignments {
            assert!(
                set.len() as u64 * 10 <= slot.capacity_bytes,
                "{slot:?} {set:?}"
            );
        }
        assert_eq!(p.assignments[&devs[1]].len(), 2);
        // The hot expert on 0, 2 and 3; a third cold copy could not lower the peak.
        let hosts: Vec<_> = p.hosts((0, 0)).into_iter().cloned().collect();
        assert_eq!(hosts, [devs[0].clone(), devs[2].clone(), devs[3].clone()]);
        assert_eq!(extra_copies_of(&p), 2);
        let l = loads(&p, &load);
        let peak = l.iter().copied().fold(0.0, f64::max);
        assert!((peak - (700.0 / 3.0 + 200.0)).abs() < 1e-6, "{l:?}");
    }

    #[test]
    fn load_aware_planning_is_deterministic() {
        let ex = experts(4, 16);
        // A Zipf-like skew over all 64 experts.
        let load: BTreeMap<ExpertKey, u64> = ex
            .iter()
            .enumerate()
            .map(|(i, &e)| (e, 64_000 / (1 + ((i * 37) % 64) as u64)))
            .collect();
        let devs = devices(6, 0);
        let a = plan(&input(&ex, &devs, Some(&load), 12, None)).unwrap();
        let b = plan(&input(&ex, &devs, Some(&load), 12, None)).unwrap();
        assert_eq!(a, b);
        assert!(a.missing(&ex).is_empty());
        let blind = plan(&input(&ex, &devs, None, 0, None)).unwrap();
        let before = max_over_mean(&device_loads(&blind, &load));
        let after = max_over_mean(&device_loads(&a, &load));
        assert!(after < before, "{after} !< {before}");
        // Re-planning from its own result with the same load moves nothing, and
        // neither does a little noise in the load.
        let again = plan(&input(&ex, &devs, Some(&load), 12, Some(&a))).unwrap();
        assert_eq!(again, a);
        let noisy: BTreeMap<ExpertKey, u64> = load
            .iter()
            .enumerate()
            .map(|(i, (e, t))| (*e, t * (99 + (i as u64 % 3)) / 100))
            .collect();
        let again = plan(&input(&ex, &devs, Some(&noisy), 12, Some(&a))).unwrap();
        assert_eq!(again, a);
    }

    #[test]
    fn previous_extra_copies_stay_where_still_hot() {
        let (ex, load) = skewed();
        let devs = devices(4, 0);
        let blind = plan(&input(&ex, &devs, None, 0, None)).unwrap();
        // Fresh: the one extra copy of the hot expert goes to the least loaded device.
        let fresh = plan(&input(&ex, &devs, Some(&load), 1, None)).unwrap();
        assert_eq!(fresh.hosts((0, 0)), [&devs[0], &devs[1]]);
        // The previous plan had that copy on device 3: it stays there.
        let mut prev = blind.clone();
        prev.assignments.get_mut(&devs[3]).unwrap().insert((0, 0));
        let kept = plan(&input(&ex, &devs, Some(&load), 1, Some(&prev))).unwrap();
        assert_eq!(kept, prev);
        // Once expert 0 cools down and expert 5 is hot, the old copy goes and the
        // new hot expert gets one.
        let mut shifted = load.clone();
        shifted.insert((0, 0), 100);
        shifted.insert((0, 5), 700);
        let moved = plan(&input(&ex, &devs, Some(&shifted), 1, Some(&prev))).unwrap();
        assert_eq!(moved.hosts((0, 0)), [&devs[0]]);
        assert_eq!(moved.hosts((0, 5)).len(), 2);
        assert_eq!(extra_copies_of(&moved), 1);
    }

    #[test]
    fn device_loads_split_each_expert_over_its_copies() {
        let devs = devices(2, 0);
        let mut p = PlacementPlan::default();
        p.assignments
            .insert(devs[0].clone(), [(0, 0), (0, 1)].into_iter().collect());
        p.assignments
            .insert(devs[1].clone(), [(0, 0)].into_iter().collect());
        let load = [((0, 0), 100), ((0, 1), 30), ((9, 9), 1000)]
            .into_iter()
            .collect();
        let l = device_loads(&p, &load);
        assert_eq!(l[&devs[0]], 80.0);
        assert_eq!(l[&devs[1]], 50.0);
        assert!((max_over_mean(&l) - 80.0 / 65.0).abs() < 1e-12);
        assert_eq!(max_over_mean(&BTreeMap::new()), 1.0);
        assert_eq!(max_over_mean(&device_loads(&p, &BTreeMap::new())), 1.0);
    }

    #[test]
    fn a_lost_device_keeps_the_survivors_and_their_hot_copies() {
        let (ex, load) = skewed();
        let devs = devices(4, 0);
        let before = plan(&input(&ex, &devs, Some(&load), 3, None)).unwrap();
        assert_eq!(before.hosts((0, 0)).len(), 4);
        let survivors = &devs[..3];
        let after = plan(&input(&ex, survivors, Some(&load), 3, Some(&before))).unwrap();
        assert!(after.missing(&ex).is_empty());
        for d in survivors {
            assert!(
                before.assignments[d].is_subset(&after.assignments[d]),
                "{d:?} lost experts"
            );
        }
        assert_eq!(after.hosts((0, 0)).len(), 3);
    }

    #[test]
    fn each_device_is_sized_at_its_own_precision() {
        // Two devices with 100 bytes each: one holds experts at 10 bytes (f32), the
        // other at 3 (int8). Sized at f32 everywhere only 20 of the 30 experts would fit.
        let ex = experts(1, 30);
        let mut devs = devices(2, 100);
        devs[0].expert_bytes = 10;
        devs[1].expert_bytes = 3;
        let p = plan(&PlanInput {
            experts: &ex,
            expert_bytes: 10,
            devices: &devs,
            replicas: 1,
            previous: None,
            load: None,
            extra_copies: 0,
        })
        .unwrap();
        assert!(p.missing(&ex).is_empty(), "{p:?}");
        let on = |d: usize| p.assignments.get(&devs[d]).map_or(0, BTreeSet::len) as u64;
        assert!(on(0) * 10 <= 100, "{p:?}");
        assert!(on(1) * 3 <= 100, "{p:?}");
        assert_eq!(on(0) + on(1), 30);

        // The same devices sized at the plan's f32 default cannot hold them all.
        devs[1].expert_bytes = 0;
        let err = plan(&PlanInput {
            experts: &ex,
            expert_bytes: 10,
            devices: &devs,
            replicas: 1,
            previous: None,
            load: None,
            extra_copies: 0,
        })
        .unwrap_err();
        assert!(
            matches!(err, PlacementError::InsufficientCapacity(ref m) if m.len() == 10),
            "{err}"
        );
    }
}
