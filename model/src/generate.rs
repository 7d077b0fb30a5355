//! Offline batch generation: many requests through the model at once with continuous
//! batching (every running sequence decodes each step; waiting prompts are prefilled in
//! chunks while the step's token budget allows). `moe generate` and the tests use it;
//! the router's online scheduler drives [`Sequence`]s the same way.
//!
//! Admission reserves a sequence's whole KV need (prompt + max_tokens) up front, so a
//! sequence that starts always finishes; requests wait while the pool is full.

use std::collections::VecDeque;

use crate::error::ModelError;
use crate::experts::ExpertBackend;
use crate::kv_cache::KvPool;
use crate::model::{Model, StepSeq};
use crate::sampling::Sampled;
use crate::sequence::{Sequence, SequenceRequest};
use crate::stop::FinishReason;
use crate::tokenizer::Tokenizer;

/// Scheduler limits.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Tokens per forward step (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences in flight at once.
    pub max_running: usize,
    /// KV cache capacity in tokens, over all sequences.
    pub kv_capacity_tokens: usize,
    /// Seeds requests that carry no seed (request i gets `seed + i`).
    pub seed: u64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_batch_tokens: 512,
            max_running: 64,
            kv_capacity_tokens: 1 << 16,
            seed: 0,
        }
    }
}

/// One finished request.
#[derive(Debug, Clone)]
pub struct Generated {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// One entry per generated token; empty unless logprobs were asked for.
    pub logprobs: Vec<Sampled>,
    pub prompt_tokens: usize,
}

struct Running {
    index: usize,
    seq: Sequence,
    text: String,
    logprobs: Vec<Sampled>,
    want_logprobs: bool,
}

/// Runs every request to completion; results are in request order.
pub fn generate(
    model: &Model,
    experts: &dyn ExpertBackend,
    tokenizer: &Tokenizer,
    requests: Vec<SequenceRequest>,
    opts: &GenerateOptions,
) -> Vec<Result<Generated, ModelError>> {
    let spec = model.spec();
    let pool = KvPool::new(spec, opts.kv_capacity_tokens);
    let mut results: Vec<Option<Result<Generated, ModelError>>> =
        (0..requests.len()).map(|_| None).collect();
    let mut waiting: VecDeque<Running> = VecDeque::new();
    for (index, req) in requests.into_iter().enumerate() {
        let want_logprobs = req.sampling.logprobs.is_some();
        let need = req.prompt.len() + req.stop.max_tokens as usize;
        match Sequence::new(
            req,
            &pool,
            tokenizer,
            spec,
            opts.seed.wrapping_add(index as u64),
        ) {
            Ok(seq) if need.min(spec.max_position_embeddings) > opts.kv_capacity_tokens => {
                drop(seq);
                results[index] = Some(Err(ModelError::KvCacheFull(format!(
                    "request {index} needs {need} tokens of cache; the capacity is {}",
                    opts.kv_capacity_tokens
                ))));
            }
            Ok(seq) => waiting.push_back(Running {
                index,
                seq,
                text: String::new(),
                logprobs: Vec::new(),
                want_logprobs,
            }),
            Err(e) => results[index] = Some(Err(e)),
        }
    }
    let mut running: Vec<Running> = Vec::new();
    while !waiting.is_empty() || !running.is_empty() {
        // Admit while there is room in the batch and in the cache.
        while running.len() < opts.max_running {
            let Some(mut r) = waiting.pop_front() else {
                break;
            };
            let need = r.seq.prompt_len() + r.seq.max_tokens() as usize;
            if r.seq
                .reserve_total(need.min(spec.max_position_embeddings))
                .is_err()
            {
                waiting.push_front(r);
                break;
            }
            running.push(r);
        }
        if running.is_empty() {
            // Nothing fits even alone: impossible given the check above, but never spin.
            for r in waiting.drain(..) {
                results[r.index] = Some(Err(ModelError::KvCacheFull(
                    "no room for any waiting request".into(),
                )));
            }
            break;
        }
        let mut budget = opts.max_batch_tokens.max(1);
        let mut step: Vec<StepSeq<'_>> = Vec::new();
        let mut sampled: Vec<(usize, bool)> = Vec::new();
        // Decoding sequences first (one token each), then prefill chunks.
        running.sort_by_key(|r| (r.seq.prompt_remaining() > 0, r.index));
        for (i, r) in running.iter_mut().enumerate() {
            if budget == 0 {
                break;
            }
            let (tokens, cache, sample) = r.seq.next_chunk(budget);
            budget -= tokens.len().min(budget);
            step.push(StepSeq { tokens, cache });
            sampled.push((i, sample));
        }
        let out = model.forward(&mut step, experts);
        drop(step);
        let logits = match out {
            Ok(l) => l,
            Err(e) => {
                // A failed step fails the sequences in it; others go on.
                let msg = e.to_string();
                let failed: Vec<usize> = sampled.iter().map(|(i, _)| *i).collect();
                for i in failed.into_iter().rev() {
                    let r = running.remove(i);
                    results[r.index] = Some(Err(ModelError::StepFailed(msg.clone())));
                }
                continue;
            }
        };
        let mut done = Vec::new();
        for ((i, sample), l) in sampled.iter().zip(&logits) {
            if !sample {
                continue;
            }
            let r = &mut running[*i];
            match r.seq.on_logits(l, tokenizer) {
                Ok(ev) => {
                    r.text.push_str(&ev.text);
                    if r.want_logprobs {
                        r.logprobs.push(ev.token);
                    }
                    if ev.finish.is_some() {
                        done.push(*i);
                    }
                }
                Err(e) => {
                    results[r.index] = Some(Err(e));
                    done.push(*i);
                }
            }
        }
        done.sort_unstable();
        for i in done.into_iter().rev() {
            let r = running.remove(i);
            if results[r.index].is_none() {
                results[r.index] = Some(Ok(Generated {
                    finish_reason: r.seq.finished().unwrap_or(FinishReason::Length),
                    token_ids: r.seq.generated().to_vec(),
                    prompt_tokens: r.seq.prompt_len(),
                    text: r.text,
                    logprobs: r.logprobs,
                }));
            }
        }
    }
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(ModelError::StepFailed(
                    "the request was never scheduled".into(),
                ))
            })
        })
        .collect()
}
