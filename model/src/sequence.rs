//! One request's life as a sequence: its prompt, KV cache, sampler, stop rules and
//! incremental detokeniser. The router's engine loop (which `moe generate` also runs)
//! drives sequences this way: feed the next chunk (prompt pieces, then one token per step),
//! and hand the last position's logits back to [`Sequence::on_logits`].

use crate::config::ModelSpec;
use crate::error::ModelError;
use crate::kv_cache::{KvPool, SeqCache};
use crate::sampling::{Sampled, Sampler, SamplingError, SamplingParams};
use crate::stop::{FinishReason, StopChecker, StopParams};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

/// What a request asks for, after tokenisation.
#[derive(Debug, Clone)]
pub struct SequenceRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopParams,
}

impl From<SamplingError> for ModelError {
    fn from(e: SamplingError) -> ModelError {
        match e {
            SamplingError::Invalid { field, reason } => ModelError::InvalidInput { field, reason },
            SamplingError::BadLogits(r) => ModelError::InvalidInput {
                field: "logits",
                reason: r.to_owned(),
            },
        }
    }
}

/// What one step produced for a sequence.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub token: Sampled,
    /// Newly completed text safe to show (may be empty).
    pub text: String,
    pub finish: Option<FinishReason>,
}

/// A sequence in flight.
pub struct Sequence {
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    cache: SeqCache,
    sampler: Sampler,
    stop: StopChecker,
    decoder: IncrementalDecoder,
    generated: Vec<u32>,
    /// Context length of the model; reaching it ends the sequence.
    max_len: usize,
    max_tokens: u32,
    finished: Option<FinishReason>,
}

impl Sequence {
    /// Validates the request against the model (vocabulary, context) and sets up its
    /// state, so a bad request fails alone instead of failing the step it would join. `fallback_seed` seeds the sampler
    /// when the request has no seed.
    pub fn new(
        req: SequenceRequest,
        pool: &KvPool,
        tokenizer: &Tokenizer,
        spec: &ModelSpec,
        fallback_seed: u64,
    ) -> Result<Sequence, ModelError> {
        let max_len = spec.max_position_embeddings;
        if req.prompt.is_empty() {
            return Err(ModelError::InvalidInput {
                field: "prompt",
                reason: "the prompt is empty".into(),
            });
        }
        if req.prompt.len() >= max_len {
            return Err(ModelError::InvalidInput {
                field: "prompt",
                reason: format!(
                    "the prompt has {} tokens; the model's context is {max_len}, leaving no room to generate",
                    req.prompt.len()
                ),
            });
        }
        if let Some(bad) = req.prompt.iter().find(|t| **t as usize >= spec.vocab_size) {
            return Err(ModelError::InvalidInput {
                field: "prompt_token_ids",
                reason: format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    spec.vocab_size
                ),
            });
        }
        req.stop.validate()?;
        let max_tokens = req.stop.max_tokens;
        let mut sampler = Sampler::new(req.sampling, fallback_seed)?;
        sampler.observe_prompt(&req.prompt);
        let stop = StopChecker::new(req.stop, tokenizer.eos_token_ids().to_vec());
        let decoder = IncrementalDecoder::with_context(true, &req.prompt);
        Ok(Sequence {
            prompt: req.prompt,
            prefilled: 0,
            cache: pool.new_sequence(),
            sampler,
            stop,
            decoder,
            generated: Vec::new(),
            max_len,
            max_tokens,
            finished: None,
        })
    }

    /// Prompt tokens not yet in the cache.
    pub fn prompt_remaining(&self) -> usize {
        self.prompt.len() - self.prefilled
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt.len()
    }

    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    pub fn max_tokens(&self) -> u32 {
        self.max_tokens
    }

    /// Reserves cache for `tokens` tokens in total (prompt and generated), so that the
    /// sequence cannot run out of cache midway.
    pub fn reserve_total(&mut self, tokens: usize) -> Result<(), ModelError> {
        self.cache.reserve(tokens.saturating_sub(self.cache.len()))
    }

    pub fn finished(&self) -> Option<FinishReason> {
        self.finished
    }

    /// The tokens this sequence feeds in the next step (up to `budget` prompt tokens while
    /// prefilling, else its last generated token) and its cache. The second value says
    /// whether the step's logits will be sampled (the chunk ends the prompt, or decoding).
    pub fn next_chunk(&mut self, budget: usize) -> (&[u32], &mut SeqCache, bool) {
        if self.prefilled < self.prompt.len() {
            let end = (self.prefilled + budget.max(1)).min(self.prompt.len());
            let last = end == self.prompt.len();
            let start = self.prefilled;
            self.prefilled = end;
            (&self.prompt[start..end], &mut self.cache, last)
        } else {
            let n = self.generated.len();
            (&self.generated[n - 1..n], &mut self.cache, true)
        }
    }

    /// Undoes the bookkeeping of `next_chunk` after a failed step so it can be retried.
    pub fn rewind_to_cache(&mut self) {
        self.prefilled = self.prefilled.min(self.cache.len());
    }

    /// Samples from the step's logits, updates stop state and text.
    pub fn on_logits(
        &mut self,
        logits: &[f32],
        tokenizer: &Tokenizer,
    ) -> Result<TokenEvent, ModelError> {
        let token = self.sampler.sample(logits)?;
        self.generated.push(token.token_id);
        let mut finish = self.stop.on_token(token.token_id);
        let mut text = String::new();
        let mut stopped_by_string = false;
        let stop_token = finish == Some(FinishReason::Stop);
        if !stop_token {
            let piece = self.decoder.push(tokenizer, token.token_id).map_err(|e| {
                ModelError::InvalidInput {
                    field: "tokens",
                    reason: e.to_string(),
                }
            })?;
            let (emit, hit) = self.stop.on_text(&piece);
            text = emit;
            if hit.is_some() {
                finish = hit;
                stopped_by_string = true;
            }
        }
        if finish.is_none() && self.prompt.len() + self.generated.len() >= self.max_len {
            finish = Some(FinishReason::Length);
        }
        // Ended by a token or by length: release text held back for a possible stop
        // string (a stop-string match itself ends the text where the match began).
        if finish.is_some() && !stopped_by_string {
            if finish == Some(FinishReason::Length) {
                if let Ok(rest) = self.decoder.flush(tokenizer) {
                    let (emit, _) = self.stop.on_text(&rest);
                    text.push_str(&emit);
                }
            }
            text.push_str(&self.stop.flush());
        }
        self.finished = finish;
        Ok(TokenEvent {
            token,
            text,
            finish,
        })
    }
}
