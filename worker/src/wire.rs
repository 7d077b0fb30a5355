//! The wire format of `ExpertService`: packed little-endian rows (f32 or bf16) to and
//! from `f32`, checking a `DispatchRequest` against the model before any work is done
//! (every violation names its field), and conversions between [`NodeInfo`] and the
//! protobuf messages. Nothing here panics on network input, and nothing is allocated
//! for a request before its sizes are known to be within the worker's limits.

use moe_model::experts::NO_EXPERT;
use moe_model::ModelSpec;
use moe_proto::v1::{DeviceAssignment, DeviceInfo, DispatchRequest, ExpertRef, InfoResponse};

use crate::node::NodeInfo;

/// A request field that failed validation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct FieldError {
    /// The protobuf field name.
    pub field: &'static str,
    pub reason: String,
}

fn field_err(field: &'static str, reason: String) -> FieldError {
    FieldError { field, reason }
}

pub use moe_proto::rows::{decode_rows, encode_rows, RowDtype};

/// Default of `--max-dispatch-rows`: the most rows one dispatch may carry. A router sends
/// a worker at most one engine step's tokens per dispatch (its `--max-batch-tokens`,
/// default 512), so this leaves room for routers with 16× larger steps.
pub const DEFAULT_MAX_DISPATCH_ROWS: usize = 8192;

/// The largest protobuf encoding of a dispatch (request or response) of `rows` rows: f32
/// rows, and per row `top_k` expert ids (varints, at most 5 bytes, +1 for good measure)
/// and f32 weights, plus 4 KiB for the fixed fields. Both ends size their gRPC message
/// limits from it: workers from `--max-dispatch-rows`, routers from `--max-batch-tokens`.
pub fn max_dispatch_message_bytes(rows: usize, hidden: usize, top_k: usize) -> usize {
    let per_row = hidden
        .saturating_mul(4)
        .saturating_add(top_k.saturating_mul(6 + 4));
    rows.saturating_mul(per_row).saturating_add(4 << 10)
}

/// A validated dispatch request, rows decoded to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatch {
    pub layer: usize,
    pub num_rows: usize,
    pub top_k: usize,
    pub dtype: RowDtype,
    pub rows: Vec<f32>,
    pub expert_ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Checks a request against the model and `max_rows`: hidden size, dtype, MoE layer, the
/// row count, the byte length of `rows`, the lengths of `expert_ids` and
/// `expert_weights`, expert ids within the model, and finite weights and rows.
pub fn decode_dispatch(
    req: DispatchRequest,
    spec: &ModelSpec,
    max_rows: usize,
) -> Result<Dispatch, FieldError> {
    let hidden = spec.hidden_size;
    if req.hidden_size as usize != hidden {
        return Err(field_err(
            "hidden_size",
            format!(
                "is {}, the model's hidden size is {hidden}",
                req.hidden_size
            ),
        ));
    }
    let dtype = RowDtype::from_wire(req.dtype).ok_or_else(|| {
        field_err(
            "dtype",
            format!("{} is not DTYPE_F32 or DTYPE_BF16", req.dtype),
        )
    })?;
    let layer = req.layer as usize;
    if !spec.moe_layers().any(|l| l == layer) {
        return Err(field_err(
            "layer",
            format!("layer {layer} is not a MoE layer of this model"),
        ));
    }
    let num_rows = req.num_rows as usize;
    if num_rows > max_rows {
        return Err(field_err(
            "num_rows",
            format!("is {num_rows}; this worker accepts at most {max_rows} rows per dispatch"),
        ));
    }
    let top_k = req.top_k as usize;
    let want_bytes = num_rows
        .checked_mul(hidden)
        .and_then(|x| x.checked_mul(dtype.size()));
    if want_bytes != Some(req.rows.len()) {
        return Err(field_err(
            "rows",
            format!(
                "holds {} bytes; {num_rows} rows × {hidden} × {} bytes are needed",
                req.rows.len(),
                dtype.size()
            ),
        ));
    }
    let want_slots = num_rows.checked_mul(top_k);
    if want_slots != Some(req.expert_ids.len()) {
        return Err(field_err(
            "expert_ids",
            format!(
                "holds {} ids; {num_rows} rows × top_k {top_k} are needed",
                req.expert_ids.len()
            ),
        ));
    }
    if want_slots != Some(req.expert_weights.len()) {
        return Err(field_err(
            "expert_weights",
            format!(
                "holds {} weights; {num_rows} rows × top_k {top_k} are needed",
                req.expert_weights.len()
            ),
        ));
    }
    let experts = spec.moe.num_experts;
    if let Some(bad) = req
        .expert_ids
        .iter()
        .find(|&&e| e != NO_EXPERT && e as usize >= experts)
    {
        return Err(field_err(
            "expert_ids",
            format!("expert {bad} does not exist (the model has {experts} per layer)"),
        ));
    }
    if let Some(i) = req.expert_weights.iter().position(|w| !w.is_finite()) {
        return Err(field_err(
            "expert_weights",
            format!("weight {i} is not a finite number"),
        ));
    }
    let rows = decode_rows(&req.rows, dtype);
    if let Some(i) = rows.iter().position(|v| !v.is_finite()) {
        return Err(field_err(
            "rows",
            format!("value {i} (row {}) is not a finite number", i / hidden),
        ));
    }
    Ok(Dispatch {
        layer,
        num_rows,
        top_k,
        dtype,
        rows,
        expert_ids: req.expert_ids,
        weights: req.expert_weights,
    })
}

/// The protobuf form of a node's state.
pub fn info_to_wire(info: &NodeInfo, spec: &ModelSpec) -> InfoResponse {
    InfoResponse {
        worker_id: info.worker_id.clone(),
        devices: info
            .devices
            .iter()
            .map(|d| DeviceInfo {
                name: d.name.clone(),
                experts: d
                    .experts
                    .iter()
                    .map(|&(layer, expert)| ExpertRef {
                        layer: u32::try_from(layer).unwrap_or(u32::MAX),
                        expert,
                    })
                    .collect(),
                expert_bytes: d.expert_bytes,
                capacity_bytes: d.capacity_bytes,
                kind: d.kind.to_owned(),
                dtype: d.dtype.as_str().to_owned(),
                bytes_per_expert: d.bytes_per_expert,
            })
            .collect(),
        placement_version: info.placement_version,
        architecture: spec.arch.hf_class().to_owned(),
        hidden_size: u32::try_from(spec.hidden_size).unwrap_or(u32::MAX),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        // Set by the server, which owns the limit.
        max_dispatch_rows: 0,
    }
}

/// Per-device expert lists from the protobuf form.
pub fn assignments_from_wire(a: Vec<DeviceAssignment>) -> Vec<(String, Vec<(usize, u32)>)> {
    a.into_iter()
        .map(|d| {
            let experts = d
                .experts
                .iter()
                .map(|e| (e.layer as usize, e.expert))
                .collect();
            (d.device, experts)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_model::tiny::{config_json, Size, StoreDtype};
    use moe_model::Arch;
    use moe_proto::v1::DType;

    fn spec() -> ModelSpec {
        ModelSpec::from_json(&config_json(Arch::Mixtral, Size::Tiny, StoreDtype::F32).to_string())
            .unwrap()
    }

    fn request(spec: &ModelSpec, rows: usize, top_k: usize) -> DispatchRequest {
        let h = spec.hidden_size;
        let values: Vec<f32> = (0..rows * h).map(|i| i as f32 * 0.01).collect();
        DispatchRequest {
            request_id: 9,
            step_id: 1,
            layer: spec.moe_layers().next().unwrap() as u32,
            num_rows: rows as u32,
            hidden_size: h as u32,
            dtype: DType::DtypeF32 as i32,
            rows: encode_rows(&values, RowDtype::F32),
            top_k: top_k as u32,
            expert_ids: vec![0; rows * top_k],
            expert_weights: vec![0.5; rows * top_k],
            traceparents: Vec::new(),
        }
    }

    #[test]
    fn valid_request_decodes() {
        let s = spec();
        let d = decode_dispatch(request(&s, 3, 2), &s, 8).unwrap();
        assert_eq!(d.num_rows, 3);
        assert_eq!(d.rows.len(), 3 * s.hidden_size);
        assert_eq!(d.rows[1], 0.01);
    }

    #[test]
    fn each_violation_names_its_field() {
        let s = spec();
        type Mutation = fn(&mut DispatchRequest);
        let cases: [(&str, Mutation); 15] = [
            ("hidden_size", |r| r.hidden_size += 1),
            ("dtype", |r| r.dtype = 0),
            ("dtype", |r| r.dtype = 77),
            ("layer", |r| r.layer = 1000),
            ("rows", |r| r.rows.truncate(1)),
            ("num_rows", |r| r.num_rows = u32::MAX),
            ("num_rows", |r| r.num_rows = 9),
            ("rows", |r| r.num_rows = 3),
            ("expert_ids", |r| r.expert_ids[1] = 1000),
            ("expert_weights", |r| r.expert_weights[2] = f32::NAN),
            ("rows", |r| {
                r.rows[4..8].copy_from_slice(&f32::NAN.to_le_bytes())
            }),
            ("rows", |r| {
                r.rows[0..4].copy_from_slice(&f32::NEG_INFINITY.to_le_bytes())
            }),
            ("expert_ids", |r| r.expert_ids.push(1)),
            ("expert_weights", |r| r.expert_weights.truncate(1)),
            ("expert_ids", |r| r.top_k = 3),
        ];
        for (field, mutate) in cases {
            let mut r = request(&s, 2, 2);
            mutate(&mut r);
            let e = decode_dispatch(r, &s, 8).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains(field));
        }
    }

    #[test]
    fn skipped_slots_pass_and_the_size_bound_holds_a_full_message() {
        let s = spec();
        let mut r = request(&s, 4, 2);
        r.expert_ids[3] = NO_EXPERT;
        decode_dispatch(r.clone(), &s, 4).unwrap();
        // The encoded request of `max_rows` rows fits the bound it is sized by.
        use prost::Message;
        let bound = max_dispatch_message_bytes(4, s.hidden_size, 2);
        r.expert_ids = vec![u32::MAX - 1; 8];
        assert!(r.encoded_len() <= bound, "{} > {bound}", r.encoded_len());
    }

    #[test]
    fn bf16_round_trips_within_its_precision() {
        let v = vec![1.0f32, -2.5, 0.1234, 3.0e-3];
        let back = decode_rows(&encode_rows(&v, RowDtype::Bf16), RowDtype::Bf16);
        for (a, b) in v.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() * 1e-2, "{a} vs {b}");
        }
        let exact = decode_rows(&encode_rows(&v, RowDtype::F32), RowDtype::F32);
        assert_eq!(exact, v);
    }
}
