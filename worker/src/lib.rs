//! moe-worker: the `ExpertService` server and its device actors, one per device, each hosting a shard of experts. Filled by the serving issue.
