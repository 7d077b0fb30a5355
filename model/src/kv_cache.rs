//! The KV cache: per sequence, per layer, a list of fixed-size blocks of tokens. A
//! sequence grows by adding blocks, never by copying its history; a shared [`KvPool`]
//! counts blocks against a capacity so that the scheduler can refuse work before memory
//! runs out, and frees a sequence's blocks the moment it is dropped.
//!
//! What a token stores depends on the attention kind: key and value for every KV head
//! (standard attention) or, for MLA, only the compressed latent plus the shared RoPE key —
//! DeepSeek's memory saving, kept here rather than decompressed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::ModelSpec;
use crate::error::ModelError;

/// Tokens per block.
pub const BLOCK_TOKENS: usize = 16;

#[derive(Debug)]
struct PoolInner {
    capacity_blocks: usize,
    used_blocks: AtomicUsize,
    /// Floats per token per layer.
    floats_per_token: usize,
    num_layers: usize,
}

/// Capacity accounting shared by every sequence of one model. Cheap to clone.
#[derive(Debug, Clone)]
pub struct KvPool {
    inner: Arc<PoolInner>,
}

impl KvPool {
    /// A pool with room for `capacity_tokens` tokens in total (rounded up to blocks).
    pub fn new(spec: &ModelSpec, capacity_tokens: usize) -> KvPool {
        KvPool {
            inner: Arc::new(PoolInner {
                capacity_blocks: capacity_tokens.div_ceil(BLOCK_TOKENS),
                used_blocks: AtomicUsize::new(0),
                floats_per_token: spec.kv_floats_per_token(),
                num_layers: spec.num_layers,
            }),
        }
    }

    pub fn capacity_blocks(&self) -> usize {
        self.inner.capacity_blocks
    }

    pub fn used_blocks(&self) -> usize {
        self.inner.used_blocks.load(Ordering::Relaxed)
    }

    /// Fraction of the capacity in use, in [0, 1].
    pub fn usage(&self) -> f64 {
        if self.inner.capacity_blocks == 0 {
            return 1.0;
        }
        self.used_blocks() as f64 / self.inner.capacity_blocks as f64
    }

    /// Bytes one block takes over all layers.
    pub fn block_bytes(&self) -> usize {
        BLOCK_TOKENS * self.inner.floats_per_token * self.inner.num_layers * 4
    }

    fn try_take(&self, n: usize) -> bool {
        self.inner
            .used_blocks
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.inner.capacity_blocks).then_some(u + n)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.inner.used_blocks.fetch_sub(n, Ordering::AcqRel);
    }

    /// A new, empty sequence cache drawing on this pool.
    pub fn new_sequence(&self) -> SeqCache {
        SeqCache {
            pool: self.clone(),
            len: 0,
            blocks: 0,
            layers: (0..self.inner.num_layers).map(|_| Vec::new()).collect(),
        }
    }
}

/// One sequence's cache. Dropping it returns its blocks to the pool.
#[derive(Debug)]
pub struct SeqCache {
    pool: KvPool,
    /// Tokens whose entries are complete in every layer.
    len: usize,
    /// Blocks reserved (per layer).
    blocks: usize,
    layers: Vec<Vec<Box<[f32]>>>,
}

impl SeqCache {
    /// Tokens cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes room for `n` more tokens in every layer, taking blocks from the pool.
    pub fn reserve(&mut self, n: usize) -> Result<(), ModelError> {
        let need = (self.len + n).div_ceil(BLOCK_TOKENS);
        if need <= self.blocks {
            return Ok(());
        }
        let extra = need - self.blocks;
        if !self.pool.try_take(extra) {
            return Err(ModelError::KvCacheFull(format!(
                "{} more blocks of {BLOCK_TOKENS} tokens needed, {} of {} in use",
                extra,
                self.pool.used_blocks(),
                self.pool.capacity_blocks()
            )));
        }
        let fpt = self.pool.inner.floats_per_token;
        for layer in &mut self.layers {
            for _ in 0..extra {
                layer.push(vec![0f32; BLOCK_TOKENS * fpt].into_boxed_slice());
            }
        }
        self.blocks = need;
        Ok(())
    }

    /// The entry of token `pos` in `layer` (writable; `pos` must be reserved).
    pub fn entry_mut(&mut self, layer: usize, pos: usize) -> &mut [f32] {
        let fpt = self.pool.inner.floats_per_token;
        let off = (pos % BLOCK_TOKENS) * fpt;
        &mut self.layers[layer][pos / BLOCK_TOKENS][off..off + fpt]
    }

    /// The entry of token `pos` in `layer`.
    #[inline]
    pub fn entry(&self, layer: usize, pos: usize) -> &[f32] {
        let fpt = self.pool.inner.floats_per_token;
        let off = (pos % BLOCK_TOKENS) * fpt;
        &self.layers[layer][pos / BLOCK_TOKENS][off..off + fpt]
    }

    /// Marks `n` more tokens as complete (after every layer has written them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

impl Drop for SeqCache {
    fn drop(&mut self) {
        self.pool.give_back(self.blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        ModelSpec::from_json(
            &serde_json::json!({
                "architectures": ["MixtralForCausalLM"], "vocab_size": 512, "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 256,
                "num_local_experts": 4, "num_experts_per_tok": 2
            })
            .to_string(),
        )
        .unwrap()
    }

    #[test]
    fn blocks_are_counted_and_returned_on_drop() {
        let pool = KvPool::new(&spec(), 64); // 4 blocks
        let mut a = pool.new_sequence();
        a.reserve(17).unwrap();
        assert_eq!(pool.used_blocks(), 2);
        let mut b = pool.new_sequence();
        b.reserve(32).unwrap();
        assert_eq!(pool.used_blocks(), 4);
        let err = b.reserve(33).unwrap_err();
        assert!(matches!(err, ModelError::KvCacheFull(_)));
        assert_eq!(pool.used_blocks(), 4, "a failed reservation takes nothing");
        drop(a);
        assert_eq!(pool.used_blocks(), 2);
        b.reserve(33).unwrap();
        assert_eq!(pool.used_blocks(), 3);
    }

    #[test]
    fn entries_keep_their_values_across_growth() {
        let pool = KvPool::new(&spec(), 1024);
        let mut s = pool.new_sequence();
        for pos in 0..40 {
            s.reserve(1).unwrap();
            s.entry_mut(1, pos).fill(pos as f32);
            s.advance(1);
        }
        for pos in 0..40 {
            assert!(s.entry(1, pos).iter().all(|v| *v == pos as f32));
            assert!(s.entry(0, pos).iter().all(|v| *v == 0.0));
        }
        assert_eq!(s.len(), 40);
    }
}
