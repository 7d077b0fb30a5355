//! moe-proto: the wire (package `moe.v1`): client `Generation` API and router→worker `ExpertService`. Filled by the serving issue.
