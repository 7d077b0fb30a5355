//! moe-tests: end-to-end tests over the real `moe` binary live in `tests/`; this library holds their shared harness.
