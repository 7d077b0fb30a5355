//! `POST /v1/completions`: one prompt or a list (strings, or lists of token ids), `n`
//! samples each (choice `index` = prompt × n + sample), `echo`, `logprobs` in the
//! completions shape, and server-sent events with `"stream": true` (a final usage chunk
//! with `stream_options.include_usage`, then `data: [DONE]`).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::choices::{self, Finished};
use super::errors::ApiError;
use super::params::{self, Knobs, StreamOptions};
use super::{logprobs, models, unix_now, HttpState};
use crate::grpc::Api;
use crate::scheduler::Event;

/// Known OpenAI completions fields this server refuses rather than ignores.
const REFUSED: &[&str] = &[
    "suffix",
    "logit_bias",
    "best_of",
    "tools",
    "tool_choice",
    "response_format",
    "functions",
    "function_call",
];

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// The OpenAI completions body (unknown fields are rejected).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionBody {
    #[serde(default)]
    model: Option<String>,
    prompt: Prompt,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    logprobs: Option<u32>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    echo: bool,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// Accepted for compatibility; never logged or stored.
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

/// One prompt: its text for `echo`, and the request's prompt form.
struct OnePrompt {
    echo_text: String,
    text: Option<String>,
    ids: Option<Vec<u32>>,
}

fn prompts(s: &HttpState, p: Prompt) -> Result<Vec<OnePrompt>, ApiError> {
    let decode = |ids: &[u32]| s.api.tokenizer.decode(ids, false).unwrap_or_default();
    let list: Vec<OnePrompt> = match p {
        Prompt::Text(t) => vec![OnePrompt {
            echo_text: t.clone(),
            text: Some(t),
            ids: None,
        }],
        Prompt::Texts(v) => v
            .into_iter()
            .map(|t| OnePrompt {
                echo_text: t.clone(),
                text: Some(t),
                ids: None,
            })
            .collect(),
        Prompt::Ids(ids) => vec![OnePrompt {
            echo_text: decode(&ids),
            text: None,
            ids: Some(ids),
        }],
        Prompt::IdLists(v) => v
            .into_iter()
            .map(|ids| OnePrompt {
                echo_text: decode(&ids),
                text: None,
                ids: Some(ids),
            })
            .collect(),
    };
    if list.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt list is empty"));
    }
    Ok(list)
}

/// The route's handler: an [`ApiError`] answers in OpenAI's error shape.
pub async fn handle(
    State(s): State<HttpState>,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let bytes: &[u8] = &bytes;
    let (body, mut knobs): (CompletionBody, Knobs) = params::parse(bytes, REFUSED)?;
    let model = models::resolve(&s, body.model.as_deref())?;
    if body.stream_options.is_some() && !body.stream {
        return Err(ApiError::invalid(
            "stream_options",
            "only allowed with `stream: true`",
        ));
    }
    if body.echo && body.logprobs.is_some() {
        return Err(ApiError::invalid(
            "echo",
            "`echo` with `logprobs` (prompt logprobs) is not supported",
        ));
    }
    let prompts = prompts(&s, body.prompt)?;
    let n = params::check_n(body.n, prompts.len())?;
    knobs.logprobs = body.logprobs;
    let mut reqs = Vec::new();
    let mut echoes = Vec::new();
    for p in &prompts {
        for i in 0..n {
            let mut r = knobs.request(body.max_tokens.unwrap_or(16))?;
            r.prompt = p.text.clone();
            r.prompt_token_ids = p.ids.clone();
            r.sampling.seed = params::sample_seed(knobs.seed, i);
            reqs.push(r);
            echoes.push(if body.echo {
                p.echo_text.clone()
            } else {
                String::new()
            });
        }
    }
    let rxs = choices::start(&s.api, reqs)?;
    let id = format!("cmpl-{}", Api::new_request_id(""));
    let created = unix_now();
    let with_logprobs = body.logprobs.is_some();
    if !body.stream {
        let done = choices::collect(rxs).await?;
        let usage =
            choices::total_usage(&done.iter().map(|f| f.usage.clone()).collect::<Vec<_>>(), n);
        let choices: Vec<Value> = done
            .into_iter()
            .zip(echoes)
            .enumerate()
            .map(|(i, (f, echo))| choice(&s, i, f, echo, with_logprobs))
            .collect();
        return Ok(Json(
            json!({"id": id, "object": "text_completion", "created": created,
            "model": model, "choices": choices, "usage": usage}),
        )
        .into_response());
    }
    let include_usage = body.stream_options.is_some_and(|o| o.include_usage);
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |choices: Value| {
            json!({"id": id, "object": "text_completion", "created": created,
                                      "model": model, "choices": choices})
        }
    };
    let tok = s.api.tokenizer.clone();
    let mut offsets: Vec<usize> = echoes.iter().map(|e| e.chars().count()).collect();
    let mut usages = vec![Default::default(); echoes.len()];
    let head: Vec<Value> = echoes
        .iter()
        .enumerate()
        .filter(|(_, e)| !e.is_empty())
        .map(|(i, e)| {
            chunk(json!([{"index": i, "text": e, "logprobs": null, "finish_reason": null}]))
        })
        .collect();
    let total = echoes.len();
    let mut finished = 0;
    let events = choices::merged(rxs).map(move |(i, ev)| match ev {
        Event::Tokens { tokens, text } => {
            let lp = with_logprobs.then(|| logprobs::completion(&tok, &tokens, &mut offsets[i]));
            vec![chunk(
                json!([{"index": i, "text": text, "logprobs": lp, "finish_reason": null}]),
            )]
        }
        Event::Done { reason, usage } => {
            usages[i] = usage;
            finished += 1;
            let mut out = vec![chunk(json!([{"index": i, "text": "", "logprobs": null,
                                             "finish_reason": reason.as_str()}]))];
            if finished == total && include_usage {
                let mut last = chunk(json!([]));
                last["usage"] = choices::total_usage(&usages, n);
                out.push(last);
            }
            out
        }
        Event::Error(e) => vec![ApiError::from(e).body()],
    });
    Ok(super::sse(
        futures::stream::iter(head).chain(events.flat_map(futures::stream::iter)),
    ))
}

fn choice(s: &HttpState, i: usize, f: Finished, echo: String, with_logprobs: bool) -> Value {
    let mut offset = echo.chars().count();
    let lp = with_logprobs.then(|| logprobs::completion(&s.api.tokenizer, &f.tokens, &mut offset));
    let ids: Vec<u32> = f.tokens.iter().map(|t| t.token_id).collect();
    json!({"index": i, "text": echo + &f.text, "token_ids": ids, "logprobs": lp,
           "finish_reason": f.reason.map(|r| r.as_str())})
}
