//! moe-control: membership (etcd and in-process), the pure placement planner and leader election. Filled by the serving and control-plane issues.
