#![no_main]
//! A `model.safetensors.index.json` into the list of shard files.
//! The body is `moe_model::fuzzing::checkpoint_index`; the workspace test
//! `fuzz_corpus_replay` runs it over the corpus on every CI run.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = moe_model::fuzzing::checkpoint_index(data);
});
