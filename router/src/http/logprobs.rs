//! Log-probabilities in OpenAI's two shapes, from the engine's sampled tokens (each
//! carries its logprob under the raw model distribution and, when asked, the top-n
//! alternatives): completions (`tokens`, `token_logprobs`, `top_logprobs` as a list of
//! `{token: logprob}`, `text_offset`) and chat (`content[]` with `token`, `logprob`,
//! `bytes`, `top_logprobs`). A token's text is its own decoding (byte-level pieces of a
//! multi-byte character decode to U+FFFD); `text_offset` counts characters of those texts.

use std::collections::BTreeMap;

use moe_model::{Sampled, Tokenizer};

use super::responses::{ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob};

fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// Completions shape for `tokens`; `offset` is the character offset of the first one in
/// the choice's text, advanced past them.
pub fn completion(tok: &Tokenizer, tokens: &[Sampled], offset: &mut usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs {
        tokens: Vec::new(),
        token_logprobs: Vec::new(),
        top_logprobs: Vec::new(),
        text_offset: Vec::new(),
    };
    for t in tokens {
        let text = token_text(tok, t.token_id);
        out.text_offset.push(*offset);
        *offset += text.chars().count();
        out.tokens.push(text);
        out.token_logprobs.push(t.logprob);
        let mut top = BTreeMap::new();
        for (id, lp) in &t.top_logprobs {
            top.entry(token_text(tok, *id)).or_insert(*lp);
        }
        out.top_logprobs.push(top);
    }
    out
}

/// Chat shape for `tokens`.
pub fn chat(tok: &Tokenizer, tokens: &[Sampled]) -> ChatLogprobs {
    let top = |id: u32, logprob: f32| {
        let token = token_text(tok, id);
        TopLogprob {
            bytes: token.as_bytes().to_vec(),
            token,
            logprob,
        }
    };
    let content = tokens
        .iter()
        .map(|t| {
            let TopLogprob {
                token,
                logprob,
                bytes,
            } = top(t.token_id, t.logprob);
            TokenLogprob {
                token,
                logprob,
                bytes,
                top_logprobs: t
                    .top_logprobs
                    .iter()
                    .map(|(id, lp)| top(*id, *lp))
                    .collect(),
            }
        })
        .collect();
    ChatLogprobs { content }
}
