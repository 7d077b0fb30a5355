//! Turns a client request (gRPC or HTTP) into a validated `SequenceRequest`: exactly one
//! prompt form, non-empty, tokenised, inside the vocabulary and the context, with valid
//! sampling and stop parameters. Every rejection names the request field.

use moe_model::{ModelSpec, SamplingParams, SequenceRequest, StopParams, Tokenizer};

use crate::error::ServeError;

/// A client request in the router's own terms (both APIs map onto it).
#[derive(Debug, Clone, Default)]
pub struct ClientRequest {
    pub prompt: Option<String>,
    pub prompt_token_ids: Option<Vec<u32>>,
    pub max_tokens: u32,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
}

/// Validates and tokenises.
pub fn build(
    req: ClientRequest,
    tok: &Tokenizer,
    spec: &ModelSpec,
) -> Result<SequenceRequest, ServeError> {
    let prompt = match (req.prompt, req.prompt_token_ids) {
        (Some(p), Some(ids)) if !p.is_empty() && !ids.is_empty() => {
            return Err(ServeError::invalid(
                "prompt",
                "give `prompt` or `prompt_token_ids`, not both",
            ))
        }
        (Some(p), _) if !p.is_empty() => tok
            .encode(&p, true)
            .map_err(|e| ServeError::invalid("prompt", e.to_string()))?,
        (_, Some(ids)) if !ids.is_empty() => ids,
        _ => return Err(ServeError::invalid("prompt", "the prompt is empty")),
    };
    if let Some(bad) = prompt.iter().find(|t| **t as usize >= spec.vocab_size) {
        return Err(ServeError::invalid(
            "prompt_token_ids",
            format!(
                "token id {bad} is outside the vocabulary (size {})",
                spec.vocab_size
            ),
        ));
    }
    if prompt.len() >= spec.max_position_embeddings {
        return Err(ServeError::invalid(
            "prompt",
            format!(
                "the prompt has {} tokens; the context is {} tokens",
                prompt.len(),
                spec.max_position_embeddings
            ),
        ));
    }
    if req.max_tokens == 0 {
        return Err(ServeError::invalid("max_tokens", "must be at least 1"));
    }
    // Never reserve more than the context allows.
    let room = (spec.max_position_embeddings - prompt.len()) as u32;
    let stop = StopParams {
        max_tokens: req.max_tokens.min(room),
        stop_token_ids: req.stop_token_ids,
        stop: req.stop,
        ignore_eos: req.ignore_eos,
    };
    stop.validate().map_err(sampling_err)?;
    req.sampling.validate().map_err(sampling_err)?;
    Ok(SequenceRequest {
        prompt,
        sampling: req.sampling,
        stop,
    })
}

fn sampling_err(e: moe_model::sampling::SamplingError) -> ServeError {
    match e {
        moe_model::sampling::SamplingError::Invalid { field, reason } => {
            ServeError::invalid(field, reason)
        }
        other => ServeError::Internal(other.to_string()),
    }
}

/// From the gRPC message.
impl From<moe_proto::v1::GenerateRequest> for ClientRequest {
    fn from(r: moe_proto::v1::GenerateRequest) -> ClientRequest {
        let d = SamplingParams::default();
        let s = r.sampling.unwrap_or_default();
        ClientRequest {
            prompt: Some(r.prompt),
            prompt_token_ids: Some(r.prompt_token_ids),
            max_tokens: r.max_tokens,
            sampling: SamplingParams {
                temperature: s.temperature.unwrap_or(d.temperature),
                top_k: s.top_k.unwrap_or(d.top_k),
                top_p: s.top_p.unwrap_or(d.top_p),
                min_p: s.min_p.unwrap_or(d.min_p),
                repetition_penalty: s.repetition_penalty.unwrap_or(d.repetition_penalty),
                presence_penalty: s.presence_penalty.unwrap_or(d.presence_penalty),
                frequency_penalty: s.frequency_penalty.unwrap_or(d.frequency_penalty),
                seed: s.seed,
                logprobs: r.logprobs,
            },
            stop: r.stop,
            stop_token_ids: r.stop_token_ids,
            ignore_eos: r.ignore_eos,
        }
    }
}
