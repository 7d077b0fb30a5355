#![no_main]
//! A `POST /v1/completions` body through the router's checks and request building.
//! The body is `moe_router::fuzzing::completion_body`; the workspace test
//! `fuzz_corpus_replay` runs it over the corpus on every CI run.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = moe_router::fuzzing::completion_body(data);
});
