//! The one request model of every client path: HTTP (OpenAI bodies), gRPC and
//! `moe generate` lines all end in a [`ClientRequest`] and go through [`build`], which
//! turns it into a validated `SequenceRequest`: exactly one prompt form, non-empty,
//! tokenised, inside the vocabulary and the context, with valid sampling and stop
//! parameters. The JSON paths share [`SamplingFields`] (read with `#[serde(flatten)]`)
//! and [`reject_unknown`]. Every rejection names the request field.

use moe_model::{ModelSpec, SamplingParams, SequenceRequest, StopParams, Tokenizer};
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::chat_template::{ChatMessage, ChatTemplate, NO_TEMPLATE};
use crate::error::ServeError;
use crate::limits::RequestLimits;

/// What checking a request needs of the served model (borrowed from
/// [`crate::grpc::Api`]; the fuzz targets build one without an engine).
#[derive(Debug, Clone, Copy)]
pub struct Served<'a> {
    pub tokenizer: &'a Tokenizer,
    pub spec: &'a ModelSpec,
    /// The names clients may ask for (`--served-model-name`); never empty.
    pub names: &'a [String],
    /// `None`: chat requests are refused.
    pub chat_template: Option<&'a ChatTemplate>,
    /// What one request may ask for.
    pub limits: &'a RequestLimits,
}

impl Served<'_> {
    /// A conversation's prompt token ids (see [`ChatTemplate::prompt_ids`]).
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ServeError> {
        let Some(t) = self.chat_template else {
            return Err(ServeError::invalid("messages", NO_TEMPLATE));
        };
        t.prompt_ids(self.tokenizer, messages)
    }

    /// Validates and tokenises (see [`build`]).
    pub fn build(&self, req: ClientRequest) -> Result<SequenceRequest, ServeError> {
        build(req, self.tokenizer, self.spec, self.limits)
    }
}

/// A client request in the router's own terms (every API maps onto it).
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

/// `stop`: one string or a list (at most `--max-stop-strings`, default 16, of at most
/// `--max-stop-string-bytes`, default 256, each non-empty).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Sampling and stopping as JSON bodies carry them: OpenAI's names plus vLLM's
/// extensions (`top_k` with -1 = off, `min_p`, `repetition_penalty`, `stop_token_ids`,
/// `ignore_eos`). Every field may be left out; the defaults are the engine's.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SamplingFields {
    /// Softmax temperature; 0 is greedy. Default 1.
    #[serde(default)]
    #[schema(minimum = 0.0)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1]. Default 1 (off).
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f32>,
    /// Sample among the k most likely tokens; -1 or 0 is off (the default).
    #[serde(default)]
    #[schema(minimum = -1)]
    pub top_k: Option<i64>,
    /// Drop tokens less likely than `min_p` × the most likely one. Default 0 (off).
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub min_p: Option<f32>,
    /// Divides the logits of tokens already seen (> 1 discourages repeats). Default 1.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0)]
    pub repetition_penalty: Option<f32>,
    /// Subtracted from the logits of tokens already generated. Default 0.
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f32>,
    /// Subtracted per occurrence from the logits of generated tokens. Default 0.
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f32>,
    /// Seed of the sampler: the same request with the same seed gives the same tokens.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop before any of these strings (not included in the output).
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Stop after any of these token ids.
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the end-of-sequence token.
    #[serde(default)]
    pub ignore_eos: bool,
}

impl SamplingFields {
    /// The request without its prompt (the caller sets the prompt form); `logprobs`:
    /// how many top alternatives to return per token, `None` for no logprobs.
    pub fn request(
        &self,
        max_tokens: u32,
        logprobs: Option<u32>,
    ) -> Result<ClientRequest, ServeError> {
        let d = SamplingParams::default();
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => u32::try_from(k).unwrap_or(u32::MAX),
            Some(_) => return Err(ServeError::invalid("top_k", "must be -1 (off) or positive")),
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
                logprobs,
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

/// What a JSON body held beyond its known fields (its `#[serde(flatten)]` catch-all):
/// a field of `refused` (known to OpenAI, not implemented here) is refused by name unless
/// it is null; any other is an unknown field. Nothing is ever ignored silently.
pub fn reject_unknown(rest: &Map<String, Value>, refused: &[&str]) -> Result<(), ServeError> {
    for (k, v) in rest {
        if refused.contains(&k.as_str()) {
            if v.is_null() {
                continue;
            }
            if k == "best_of" {
                return Err(ServeError::invalid(
                    "best_of",
                    "`best_of` is not supported by this server (ask for `n` samples and \
                     pick one yourself); remove it from the request",
                ));
            }
            return Err(ServeError::invalid(
                k,
                format!("`{k}` is not supported by this server; remove it from the request"),
            ));
        }
        return Err(ServeError::invalid(k, format!("unknown field `{k}`")));
    }
    Ok(())
}

/// Validates against the model and `limits`, and tokenises.
pub fn build(
    req: ClientRequest,
    tok: &Tokenizer,
    spec: &ModelSpec,
    limits: &RequestLimits,
) -> Result<SequenceRequest, ServeError> {
    // The cheap checks first: nothing is tokenised for a request refused anyway.
    check_limits(&req, limits)?;
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
    let most = limits.prompt_tokens(spec.max_position_embeddings);
    if prompt.len() > most {
        let why = if most + 1 >= spec.max_position_embeddings {
            format!("the context is {} tokens", spec.max_position_embeddings)
        } else {
            format!("this server accepts at most {most}")
        };
        return Err(ServeError::invalid(
            "prompt",
            format!("the prompt has {} tokens; {why}", prompt.len()),
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

/// The request's stop strings and logprobs against the server's limits.
fn check_limits(req: &ClientRequest, limits: &RequestLimits) -> Result<(), ServeError> {
    if req.stop.len() > limits.max_stop_strings {
        return Err(ServeError::invalid(
            "stop",
            format!(
                "at most {} stop strings, got {}",
                limits.max_stop_strings,
                req.stop.len()
            ),
        ));
    }
    if let Some(long) = req
        .stop
        .iter()
        .find(|s| s.len() > limits.max_stop_string_bytes)
    {
        return Err(ServeError::invalid(
            "stop",
            format!(
                "a stop string has {} bytes; at most {} are allowed",
                long.len(),
                limits.max_stop_string_bytes
            ),
        ));
    }
    match req.sampling.logprobs {
        Some(n) if n > limits.max_logprobs => Err(ServeError::invalid(
            "logprobs",
            format!("must be <= {}, got {n}", limits.max_logprobs),
        )),
        _ => Ok(()),
    }
}

fn sampling_err(e: moe_model::sampling::SamplingError) -> ServeError {
    match e {
        moe_model::sampling::SamplingError::Invalid { field, reason } => {
            ServeError::invalid(field, reason)
        }
        other => ServeError::Internal(other.to_string()),
    }
}

impl ClientRequest {
    /// From the gRPC message; `chat` renders a conversation into prompt token ids.
    pub fn from_proto(
        r: moe_proto::v1::GenerateRequest,
        chat: impl FnOnce(&[ChatMessage]) -> Result<Vec<u32>, ServeError>,
    ) -> Result<ClientRequest, ServeError> {
        use moe_proto::v1::generate_request::Input;
        let (prompt, prompt_token_ids) = match r.input {
            None => (None, Some(r.prompt_token_ids)),
            Some(Input::Prompt(p)) => (Some(p), Some(r.prompt_token_ids)),
            Some(Input::Chat(c)) => {
                if !r.prompt_token_ids.is_empty() {
                    return Err(ServeError::invalid(
                        "chat",
                        "give `chat` or `prompt_token_ids`, not both",
                    ));
                }
                let messages: Vec<ChatMessage> = c
                    .messages
                    .into_iter()
                    .map(|m| ChatMessage {
                        role: m.role,
                        content: m.content,
                    })
                    .collect();
                (None, Some(chat(&messages)?))
            }
        };
        let d = SamplingParams::default();
        let s = r.sampling.unwrap_or_default();
        Ok(ClientRequest {
            prompt,
            prompt_token_ids,
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Deserialize)]
    struct Body {
        #[allow(dead_code)]
        prompt: String,
        #[serde(flatten)]
        sampling: SamplingFields,
        #[serde(flatten)]
        rest: Map<String, Value>,
    }

    fn body(v: Value) -> Body {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn flattened_fields_are_read_and_the_rest_is_caught() {
        let b = body(
            json!({"prompt": "x", "temperature": 0, "top_k": 5, "stop": "\n",
                            "seed": 3, "ignore_eos": true}),
        );
        assert!(b.rest.is_empty(), "{:?}", b.rest);
        let r = b.sampling.request(4, Some(2)).unwrap();
        assert_eq!(r.sampling.temperature, 0.0);
        assert_eq!(r.sampling.top_k, 5);
        assert_eq!(r.sampling.seed, Some(3));
        assert_eq!(r.sampling.logprobs, Some(2));
        assert_eq!(r.stop, ["\n"]);
        assert!(r.ignore_eos);
        let b = body(json!({"prompt": "x", "temprature": 0.5}));
        let e = reject_unknown(&b.rest, &[]).unwrap_err();
        assert_eq!(
            e,
            ServeError::invalid("temprature", "unknown field `temprature`")
        );
    }

    #[test]
    fn refused_fields_are_named_unless_null() {
        let b = body(json!({"prompt": "x", "suffix": null}));
        reject_unknown(&b.rest, &["suffix"]).unwrap();
        let b = body(json!({"prompt": "x", "suffix": "y"}));
        let e = reject_unknown(&b.rest, &["suffix"]).unwrap_err();
        assert!(matches!(&e, ServeError::InvalidArgument { field, .. } if field == "suffix"));
        let b = body(json!({"prompt": "x", "best_of": 2}));
        let e = reject_unknown(&b.rest, &["best_of"]).unwrap_err();
        assert!(e.to_string().contains("ask for `n`"), "{e}");
    }

    #[test]
    fn top_k_minus_one_is_off() {
        let k = |top_k| SamplingFields {
            top_k: Some(top_k),
            ..Default::default()
        };
        assert_eq!(k(-1).request(4, None).unwrap().sampling.top_k, 0);
        assert!(k(-2).request(4, None).is_err());
    }

    #[test]
    fn limits_refuse_by_field_before_any_work() {
        use moe_model::tiny::{self, Size, StoreDtype, TinyOptions};
        let dir = tempfile::tempdir().unwrap();
        let opts = TinyOptions {
            arch: moe_model::Arch::Mixtral,
            size: Size::Tiny,
            dtype: StoreDtype::F32,
            seed: 0,
            max_shard_bytes: None,
        };
        tiny::write(dir.path(), &opts).unwrap();
        let spec = ModelSpec::from_dir(dir.path()).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        let limits = RequestLimits {
            max_prompt_tokens: Some(4),
            max_stop_strings: 1,
            max_stop_string_bytes: 3,
            max_logprobs: 2,
            ..RequestLimits::default()
        };
        let req = |f: fn(&mut ClientRequest)| {
            let mut r = ClientRequest {
                prompt_token_ids: Some(vec![3, 4, 5, 6]),
                max_tokens: 2,
                ..ClientRequest::default()
            };
            f(&mut r);
            build(r, &tok, &spec, &limits).map(|_| ())
        };
        req(|_| {}).unwrap();
        let field = |e: ServeError| match e {
            ServeError::InvalidArgument { field, .. } => field,
            other => panic!("{other}"),
        };
        type Mutation = fn(&mut ClientRequest);
        let cases: [(&str, Mutation); 4] = [
            ("prompt", |r| r.prompt_token_ids = Some(vec![3; 5])),
            ("stop", |r| r.stop = vec!["a".into(), "b".into()]),
            ("stop", |r| r.stop = vec!["abcd".into()]),
            ("logprobs", |r| r.sampling.logprobs = Some(3)),
        ];
        for (want, mutate) in cases {
            assert_eq!(field(req(mutate).unwrap_err()), want);
        }
        // Without a prompt limit the context decides, and says so.
        let e = build(
            ClientRequest {
                prompt_token_ids: Some(vec![3; spec.max_position_embeddings]),
                max_tokens: 1,
                ..ClientRequest::default()
            },
            &tok,
            &spec,
            &RequestLimits::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("the context is"), "{e}");
    }
}
