#![no_main]
//! A whole `model.safetensors` file: header parsed and checked, every tensor read.
//! The body is `moe_model::fuzzing::safetensors_file`; the workspace test
//! `fuzz_corpus_replay` runs it over the corpus on every CI run.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = moe_model::fuzzing::safetensors_file(data);
});
