//! moe-control: the control plane of moe-cluster.
//!
//! - [`placement`]: the pure placement planner — which device hosts which
//!   `(layer, expert)`, optionally replicating the hottest experts by observed load.
//! - [`membership`]: worker records, registrations and the [`Registry`] trait, with two
//!   implementations: [`EtcdRegistry`] (records under leases, a resilient prefix watch)
//!   and [`InProcessRegistry`] (standalone and static membership).
//! - [`election`]: election of the placement controller and fenced leader writes.
//! - [`placement_store`]: the versioned placement in etcd (fenced put, get, watch).
//! - [`expert_load`]: routed-token counts per expert that routers report under leases
//!   ([`LoadReporter`]), summed over the cluster ([`watch_load`]).
//!
//! Everything that follows etcd keeps its last value while etcd is unreachable and
//! reconnects with backoff ([`LiveView`]); every remote call has a deadline.

mod etcd_mirror;
mod lease;

pub mod election;
pub mod error;
pub mod etcd;
pub mod etcd_registry;
pub mod expert_load;
pub mod in_process_registry;
pub mod keys;
pub mod live_view;
pub mod membership;
pub mod placement;
pub mod placement_store;

pub use election::{fenced_put, watch_leader, Election, FencingToken, LeaderInfo, Leadership};
pub use error::ControlError;
pub use etcd::{EtcdAuth, EtcdClient, EtcdConfig, EtcdTls};
pub use etcd_registry::{EtcdRegistry, RouterPresence, RouterRecord};
pub use expert_load::{
    sum_reports, watch_load, watch_load_reports, ExpertLoadReport, LoadReporter,
};
pub use in_process_registry::InProcessRegistry;
pub use keys::{advertise_address, id_from_address, ClusterKeys};
pub use live_view::{ConnectionState, LiveView};
pub use membership::{
    DeviceRecord, Membership, Registration, RegistrationState, Registry, WorkerRecord,
};
pub use placement::{
    device_loads, max_over_mean, plan, plan_what_fits, DeviceSlot, ExpertKey, PlacementError,
    PlacementPlan, PlanInput,
};
pub use placement_store::{PlacementStore, StoredPlacement};
