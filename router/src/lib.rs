//! moe-router: client APIs, continuous-batching scheduler, the engine loop and expert dispatch to workers. Filled by the serving issue.
