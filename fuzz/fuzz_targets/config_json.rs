#![no_main]
//! A checkpoint's `config.json` into a model spec (and what loading derives from it).
//! The body is `moe_model::fuzzing::config_json`; the workspace test
//! `fuzz_corpus_replay` runs it over the corpus on every CI run.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = moe_model::fuzzing::config_json(data);
});
