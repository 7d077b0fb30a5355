//! Log-probabilities in OpenAI's two shapes, from the engine's sampled tokens (each
//! carries its logprob under the raw model distribution and, when asked, the top-n
//! alternatives): completions (`tokens`, `token_logprobs`, `top_logprobs` as a list of
//! `{token: logprob}`, `text_offset`) and chat (`content[]` with `token`, `logprob`,
//! `bytes`, `top_logprobs`). A token's text is its own decoding (byte-level pieces of a
//! multi-byte character decode to U+FFFD); `text_offset` counts characters of those texts.

use moe_model::{Sampled, Tokenizer};
use serde_json::{json, Map, Value};

fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// Completions shape for `tokens`; `offset` is the character offset of the first one in
/// the choice's text, advanced past them.
pub fn completion(tok: &Tokenizer, tokens: &[Sampled], offset: &mut usize) -> Value {
    let mut texts = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    for t in tokens {
        let text = token_text(tok, t.token_id);
        offsets.push(*offset);
        *offset += text.chars().count();
        texts.push(text);
        lps.push(t.logprob);
        let mut top = Map::new();
        for (id, lp) in &t.top_logprobs {
            top.entry(token_text(tok, *id)).or_insert(json!(lp));
        }
        tops.push(Value::Object(top));
    }
    json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// Chat shape: the `content` entries for `tokens`.
pub fn chat(tok: &Tokenizer, tokens: &[Sampled]) -> Vec<Value> {
    let entry = |id: u32, lp: f32| {
        let text = token_text(tok, id);
        json!({"token": text, "logprob": lp, "bytes": text.as_bytes()})
    };
    tokens
        .iter()
        .map(|t| {
            let mut e = entry(t.token_id, t.logprob);
            e["top_logprobs"] = t
                .top_logprobs
                .iter()
                .map(|(id, lp)| entry(*id, *lp))
                .collect();
            e
        })
        .collect()
}
