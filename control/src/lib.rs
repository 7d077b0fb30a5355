//! moe-control: the control plane of moe-cluster.
//!
//! - [`placement`]: the pure placement planner — which device hosts which
//!   `(layer, expert)`.
//!
//! Membership (etcd and in-process registries) and leader election join this crate with
//! the control-plane work.

pub mod placement;

pub use placement::{plan, DeviceSlot, PlacementError, PlacementPlan, PlanInput};
