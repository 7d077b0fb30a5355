#![no_main]
//! The placement value a router reads from etcd: decoded, checked, turned into routes.
//! The body is `moe_router::fuzzing::placement_document`; the workspace test
//! `fuzz_corpus_replay` runs it over the corpus on every CI run.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = moe_router::fuzzing::placement_document(data);
});
