//! Fuzzing entry point of the worker's network edge: the body of the `dispatch_message`
//! `cargo fuzz` target (`fuzz/fuzz_targets/`), kept here as a plain function so that the
//! workspace test `fuzz_corpus_replay` runs the same code over the committed corpus on
//! every CI run, without an instrumented build.
//!
//! The bytes are one protobuf `DispatchRequest` as it arrives in a dispatch stream; it goes
//! through what [`crate::server`] runs before any compute: its trace contexts, then
//! [`wire::decode_dispatch`] (with the default `--max-dispatch-rows`), the shape check the
//! experts run, and the split of its slots among devices.

use std::sync::OnceLock;

use moe_model::tiny::{config_json, Size, StoreDtype};
use moe_model::{Arch, ModelSpec, MoeRequest};
use moe_proto::traceparent::{TraceParent, MAX_TRACEPARENTS_PER_DISPATCH};
use moe_proto::v1::DispatchRequest;
use moe_proto::NO_EXPERT;
use prost::Message;

use crate::{fanout, wire};

/// The model the fuzzed worker serves: the tiny DeepSeek-V3 (a dense first layer, so a
/// request for a non-MoE layer is reachable).
pub fn spec() -> &'static ModelSpec {
    static SPEC: OnceLock<ModelSpec> = OnceLock::new();
    SPEC.get_or_init(|| {
        let json = config_json(Arch::DeepseekV3, Size::Tiny, StoreDtype::F32).to_string();
        match ModelSpec::from_json(&json) {
            Ok(s) => s,
            Err(e) => panic!("the tiny config does not parse: {e}"),
        }
    })
}

/// Why a dispatch message was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("not a DispatchRequest: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error(transparent)]
    Field(#[from] wire::FieldError),
    #[error("{0}")]
    Experts(#[from] moe_model::ExpertError),
    #[error("expert {0} is not hosted")]
    NotHosted(u32),
}

/// One encoded `DispatchRequest` through the worker's checks; an accepted one is split
/// among two devices (expert `e` on device `e % 2`, every expert of the model hosted).
/// Returns the number of rows accepted.
pub fn dispatch_message(bytes: &[u8]) -> Result<usize, Refused> {
    let spec = spec();
    let req = DispatchRequest::decode(bytes)?;
    // What the dispatch span logs (debug): canonical forms, which parse to themselves.
    let traces = crate::server::trace_contexts(&req.traceparents);
    assert!(traces.len() <= MAX_TRACEPARENTS_PER_DISPATCH);
    for t in &traces {
        let again = TraceParent::parse(t).map(|p| p.to_string());
        assert_eq!(again.as_deref(), Some(t.as_str()));
    }
    let d = wire::decode_dispatch(req, spec, wire::DEFAULT_MAX_DISPATCH_ROWS)?;
    let hidden = spec.hidden_size;
    assert_eq!(d.rows.len(), d.num_rows * hidden);
    MoeRequest {
        layer: d.layer,
        hidden,
        top_k: d.top_k,
        rows: &d.rows,
        expert_ids: &d.expert_ids,
        weights: &d.weights,
    }
    .validate()?;
    let experts = spec.moe.num_experts as u32;
    let parts = fanout::split(hidden, d.top_k, &d.rows, &d.expert_ids, &d.weights, |e| {
        (e < experts).then_some((e % 2) as usize)
    })
    .map_err(Refused::NotHosted)?;
    let mut slots = 0;
    for p in &parts {
        assert_eq!(p.rows.len(), p.row_map.len() * hidden);
        assert_eq!(p.ids.len(), p.row_map.len() * d.top_k);
        assert!(p.row_map.iter().all(|&r| r < d.num_rows));
        slots += p.ids.iter().filter(|&&e| e != NO_EXPERT).count();
    }
    let routed = d.expert_ids.iter().filter(|&&e| e != NO_EXPERT).count();
    assert_eq!(
        slots, routed,
        "every routed slot goes to exactly one device"
    );
    Ok(d.num_rows)
}
