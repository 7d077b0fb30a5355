#![no_main]
//! Arbitrary bytes through the tokenizer's encode and incremental decode.
//! The body is `moe_model::fuzzing::tokenizer_input`; the workspace test
//! `fuzz_corpus_replay` runs it over the corpus on every CI run.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = moe_model::fuzzing::tokenizer_input(data);
});
