#![no_main]
//! One protobuf `DispatchRequest` through the worker's decode, validation and device split.
//! The body is `moe_worker::fuzzing::dispatch_message`; the workspace test
//! `fuzz_corpus_replay` runs it over the corpus on every CI run.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = moe_worker::fuzzing::dispatch_message(data);
});
