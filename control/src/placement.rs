//! The placement planner: a pure, deterministic function from (experts, devices,
//! replication, previous plan) to which device hosts which `(layer, expert)`.
//!
//! Rules, in order: every expert is hosted at least once if capacity allows; devices are
//! balanced by weight bytes; an expert stays where the previous plan had it when that
//! keeps the balance (least movement); extra copies (`replicas` > 1) go to the least
//! loaded devices that do not hold the expert yet. Ties are broken by device order, so the
//! same input always gives the same plan.

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
}

/// What the planner needs.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    /// Every routed expert of the model.
    pub experts: &'a [ExpertKey],
    /// Bytes of one expert's weights (all experts of a model are the same size).
    pub expert_bytes: u64,
    /// Devices to place on, in a stable order.
    pub devices: &'a [DeviceSlot],
    /// Copies of each expert wanted (≥ 1).
    pub replicas: usize,
    /// The plan in force, to move as little as possible.
    pub previous: Option<&'a PlacementPlan>,
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

/// Plans a placement (version 0; the caller numbers it).
pub fn plan(input: &PlanInput<'_>) -> Result<PlacementPlan, PlacementError> {
    let n = input.devices.len();
    if n == 0 {
        return Err(PlacementError::NoDevices);
    }
    let eb = input.expert_bytes.max(1);
    let fits = |d: usize, used: u64| {
        let cap = input.devices[d].capacity_bytes;
        cap == 0 || used + eb <= cap
    };
    let mut used = vec![0u64; n];
    let mut hosted: Vec<BTreeSet<ExpertKey>> = vec![BTreeSet::new(); n];
    // The balanced share of one copy of everything, rounded up to whole experts.
    let per_device = (input.experts.len() as u64).div_ceil(n as u64) * eb;

    // Pass 1: keep experts where they were, within the balanced share.
    let mut unplaced = Vec::new();
    for &e in input.experts {
        let prev = input.previous.and_then(|p| {
            p.hosts(e)
                .into_iter()
                .find_map(|slot| input.devices.iter().position(|d| d == slot))
        });
        match prev {
            Some(d) if used[d] + eb <= per_device && fits(d, used[d]) => {
                used[d] += eb;
                hosted[d].insert(e);
            }
            _ => unplaced.push(e),
        }
    }
    // Pass 2: the rest go to the least loaded device with room.
    let mut missing = Vec::new();
    for e in unplaced {
        match least_loaded(&used, |d| fits(d, used[d])) {
            Some(d) => {
                used[d] += eb;
                hosted[d].insert(e);
            }
            None => missing.push(e),
        }
    }
    if !missing.is_empty() {
        return Err(PlacementError::InsufficientCapacity(missing));
    }
    // Pass 3: extra copies, one round per replica, while capacity allows.
    for _ in 1..input.replicas.max(1) {
        for &e in input.experts {
            if let Some(d) = least_loaded(&used, |d| !hosted[d].contains(&e) && fits(d, used[d])) {
                used[d] += eb;
                hosted[d].insert(e);
            }
        }
    }
    Ok(PlacementPlan {
        version: 0,
        assignments: input.devices.iter().cloned().zip(hosted).collect(),
    })
}

fn least_loaded(used: &[u64], ok: impl Fn(usize) -> bool) -> Option<usize> {
    (0..used.len())
        .filter(|d| ok(*d))
        .min_by_key(|d| (used[*d], *d))
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
        })
        .unwrap_err();
        assert_eq!(
            err,
            PlacementError::InsufficientCapacity(vec![(0, 6), (0, 7)])
        );
        assert!(err.to_string().contains("2 experts"));
        assert_eq!(
            plan(&PlanInput {
                experts: &ex,
                expert_bytes: 1,
                devices: &[],
                replicas: 1,
                previous: None
            })
            .unwrap_err(),
            PlacementError::NoDevices
        );
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
        })
        .unwrap();
        let survivors = &devs[..2];
        let after = plan(&PlanInput {
            experts: &ex,
            expert_bytes: 1,
            devices: survivors,
            replicas: 1,
            previous: Some(&before),
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
}
