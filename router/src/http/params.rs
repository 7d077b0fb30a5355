//! Request fields both OpenAI endpoints share: the sampling knobs (with vLLM's
//! extensions `top_k` (-1 = off), `min_p`, `repetition_penalty`, `stop_token_ids`,
//! `ignore_eos`), `stop`, `n`, `stream_options`, and the refusal of known OpenAI fields
//! this server does not implement (a 400 naming the field, never silently ignored).

use moe_model::SamplingParams;
use serde::Deserialize;
use serde_json::Value;

use super::errors::ApiError;
use crate::request::ClientRequest;

/// Most choices one request may ask for (prompts × `n`).
pub const MAX_CHOICES: usize = 128;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and stopping, as both bodies carry them: [`parse`] takes these fields
/// ([`KNOB_FIELDS`]) out of the body and reads them here, so each is declared once.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Knobs {
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    #[serde(default)]
    pub ignore_eos: bool,
    /// Top logprobs per token: completions' `logprobs`, chat's `top_logprobs` (each body
    /// spells it its own way, so the handler sets it).
    #[serde(skip)]
    pub logprobs: Option<u32>,
}

/// The body fields [`Knobs`] reads.
const KNOB_FIELDS: &[&str] = &[
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
];

impl Knobs {
    /// The request for one prompt; samples of `n` get their seeds from [`sample_seed`].
    pub fn request(&self, max_tokens: u32) -> Result<ClientRequest, ApiError> {
        let d = SamplingParams::default();
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => u32::try_from(k).unwrap_or(u32::MAX),
            Some(_) => return Err(ApiError::invalid("top_k", "must be -1 (off) or positive")),
        };
        Ok(ClientRequest {
            prompt: None,
            prompt_token_ids: None,
            max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature.unwrap_or(d.temperature),
                top_k,
                top_p: self.top_p.unwrap_or(d.top_p),
                min_p: self.min_p.unwrap_or(d.min_p),
                repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
                presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
                frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
                seed: self.seed,
                logprobs: self.logprobs,
            },
            stop: match &self.stop {
                None => Vec::new(),
                Some(Stop::One(x)) => vec![x.clone()],
                Some(Stop::Many(v)) => v.clone(),
            },
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
        })
    }
}

/// The seed of sample `i` of `n`: the request's seed plus `i` (wrapping), so sample 0
/// is what the same request with `n: 1` gives and every sample repeats run after run.
pub fn sample_seed(seed: Option<u64>, i: usize) -> Option<u64> {
    seed.map(|s| s.wrapping_add(i as u64))
}

/// Checks `n` against the number of prompts.
pub fn check_n(n: Option<u32>, prompts: usize) -> Result<usize, ApiError> {
    let n = n.unwrap_or(1) as usize;
    if n == 0 {
        return Err(ApiError::invalid("n", "must be at least 1"));
    }
    if n * prompts > MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!(
                "prompts × n is {}; at most {MAX_CHOICES} choices per request",
                n * prompts
            ),
        ));
    }
    Ok(n)
}

/// Refuses any of `fields` present (and not null) in the body, then removes the nulls
/// so the typed body stays strict about everything else.
pub fn refuse(body: &mut Value, fields: &[&str]) -> Result<(), ApiError> {
    let Some(map) = body.as_object_mut() else {
        return Err(ApiError::invalid("body", "the body must be a JSON object"));
    };
    for f in fields {
        match map.get(*f) {
            None => {}
            Some(Value::Null) => {
                map.remove(*f);
            }
            Some(_) if *f == "best_of" => {
                return Err(ApiError::invalid(
                    "best_of",
                    "`best_of` is not supported by this server (ask for `n` samples and pick \
                     one yourself); remove it from the request",
                ))
            }
            Some(_) => return Err(ApiError::unsupported(f)),
        }
    }
    Ok(())
}

/// Parses the body: JSON, then the refused fields, then the sampling [`Knobs`] and the
/// typed struct for the rest (both strict about unknown fields).
pub fn parse<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    refused: &[&str],
) -> Result<(T, Knobs), ApiError> {
    let mut v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid("body", format!("the body is not valid JSON: {e}")))?;
    refuse(&mut v, refused)?;
    let mut knobs = serde_json::Map::new();
    if let Some(map) = v.as_object_mut() {
        for f in KNOB_FIELDS {
            if let Some(x) = map.remove(*f) {
                knobs.insert((*f).to_owned(), x);
            }
        }
    }
    let invalid = |e: serde_json::Error| ApiError::invalid("body", format!("invalid body: {e}"));
    let knobs: Knobs = serde_json::from_value(Value::Object(knobs)).map_err(invalid)?;
    Ok((serde_json::from_value(v).map_err(invalid)?, knobs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refused_fields_are_named_and_nulls_dropped() {
        let mut v = json!({"prompt": "x", "suffix": "y"});
        let e = refuse(&mut v, &["suffix"]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("suffix"));
        let mut v = json!({"prompt": "x", "suffix": null});
        refuse(&mut v, &["suffix"]).unwrap();
        assert!(v.get("suffix").is_none());
        let e = refuse(&mut json!({"best_of": 2}), &["best_of"]).unwrap_err();
        assert!(e.message.contains("best_of"));
    }

    #[test]
    fn top_k_minus_one_is_off_and_seeds_derive() {
        let k = Knobs {
            top_k: Some(-1),
            ..Default::default()
        };
        assert_eq!(k.request(4).unwrap().sampling.top_k, 0);
        let k = Knobs {
            top_k: Some(-2),
            ..Default::default()
        };
        assert!(k.request(4).is_err());
        assert_eq!(sample_seed(Some(7), 0), Some(7));
        assert_eq!(sample_seed(Some(u64::MAX), 1), Some(0));
        assert_eq!(sample_seed(None, 3), None);
        assert!(check_n(Some(0), 1).is_err());
        assert!(check_n(Some(200), 1).is_err());
        assert_eq!(check_n(None, 3).unwrap(), 1);
    }
}
