//! Test fixtures over real processes, shared by moe-control's etcd tests and the
//! end-to-end tests: [`Etcd`], a server of the test's own, and [`TcpProxy`], which cuts
//! a client off from it while it keeps running. Both panic on failure: they are for
//! tests only.

mod etcd;
mod proxy;

pub use etcd::{free_port, Etcd, EtcdEntry};
pub use proxy::TcpProxy;
