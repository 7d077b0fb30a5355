//! `POST /v1/chat/completions`: the conversation is rendered with the checkpoint's chat
//! template ([`crate::chat_template`]) and tokenised without a second BOS when the
//! template already wrote one; then it runs like a completion. Answers
//! `chat.completion`, or `chat.completion.chunk` events with `"stream": true`: per
//! choice a first delta with `role: assistant`, content deltas, one with
//! `finish_reason`; then an optional usage chunk and `data: [DONE]`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::choices;
use super::errors::ApiError;
use super::params::{self, Knobs, StreamOptions};
use super::{logprobs, models, unix_now, HttpState};
use crate::chat_template::ChatMessage;
use crate::grpc::Api;
use crate::scheduler::Event;

/// Known OpenAI chat fields this server refuses rather than ignores.
const REFUSED: &[&str] = &[
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "response_format",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "store",
    "metadata",
    "service_tier",
    "best_of",
    "suffix",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    content: Value,
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
}

/// The OpenAI chat completions body (unknown fields are rejected).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatBody {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<Message>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    logprobs: bool,
    #[serde(default)]
    top_logprobs: Option<u32>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// Accepted for compatibility; never logged or stored.
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

/// The messages as the template sees them: known roles, text content only.
fn messages(list: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    if list.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "at least one message is needed",
        ));
    }
    list.into_iter()
        .enumerate()
        .map(|(i, m)| {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("role `{}` is not supported (system, user, assistant)", m.role),
                ));
            }
            let content = match m.content {
                Value::String(s) => s,
                Value::Array(parts) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        let field = format!("messages[{i}].content[{j}]");
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            (Some("text"), None) => return Err(ApiError::invalid(&field, "a text part needs `text`")),
                            (Some(other), _) => {
                                return Err(ApiError::invalid(
                                    &format!("{field}.type"),
                                    format!("content parts of type `{other}` are not supported (only `text`)"),
                                ))
                            }
                            (None, _) => return Err(ApiError::invalid(&field, "a content part needs `type`")),
                        }
                    }
                    text
                }
                _ => {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].content"),
                        "must be a string or a list of text parts",
                    ))
                }
            };
            Ok(ChatMessage { role: m.role, content })
        })
        .collect()
}

/// The route's handler: an [`ApiError`] answers in OpenAI's error shape.
pub async fn handle(
    State(s): State<HttpState>,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let bytes: &[u8] = &bytes;
    let (body, mut knobs): (ChatBody, Knobs) = params::parse(bytes, REFUSED)?;
    let model = models::resolve(&s, body.model.as_deref())?;
    if body.stream_options.is_some() && !body.stream {
        return Err(ApiError::invalid(
            "stream_options",
            "only allowed with `stream: true`",
        ));
    }
    if body.top_logprobs.is_some() && !body.logprobs {
        return Err(ApiError::invalid("top_logprobs", "needs `logprobs: true`"));
    }
    let Some(template) = s.chat_template.clone() else {
        return Err(ApiError::invalid(
            "messages",
            "this model has no chat template (none in tokenizer_config.json, no \
             chat_template.jinja); start the server with --chat-template FILE, or use \
             /v1/completions",
        ));
    };
    let rendered = template.render(&messages(body.messages)?)?;
    // The template writes BOS itself when the model wants one: never add a second.
    let add_bos = template.bos_token.is_empty() || !rendered.starts_with(&template.bos_token);
    let ids = s
        .api
        .tokenizer
        .encode(&rendered, add_bos)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let n = params::check_n(body.n, 1)?;
    knobs.logprobs = body.logprobs.then_some(body.top_logprobs.unwrap_or(0));
    let max_tokens = body.max_completion_tokens.or(body.max_tokens).unwrap_or(
        // No limit given: as much as the context allows (request::build caps it).
        s.api.spec.max_position_embeddings as u32,
    );
    let mut reqs = Vec::new();
    for i in 0..n {
        let mut r = knobs.request(max_tokens)?;
        r.prompt_token_ids = Some(ids.clone());
        r.sampling.seed = params::sample_seed(knobs.seed, i);
        reqs.push(r);
    }
    let rxs = choices::start(&s.api, reqs)?;
    let id = format!("chatcmpl-{}", Api::new_request_id(""));
    let created = unix_now();
    let with_logprobs = body.logprobs;
    let tok = s.api.tokenizer.clone();
    if !body.stream {
        let done = choices::collect(rxs).await?;
        let usage =
            choices::total_usage(&done.iter().map(|f| f.usage.clone()).collect::<Vec<_>>(), n);
        let choices: Vec<Value> = done
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                let lp = with_logprobs.then(|| json!({"content": logprobs::chat(&tok, &f.tokens)}));
                json!({"index": i, "message": {"role": "assistant", "content": f.text},
                       "logprobs": lp, "finish_reason": f.reason.map(|r| r.as_str())})
            })
            .collect();
        return Ok(Json(
            json!({"id": id, "object": "chat.completion", "created": created,
            "model": model, "choices": choices, "usage": usage}),
        )
        .into_response());
    }
    let include_usage = body.stream_options.is_some_and(|o| o.include_usage);
    let chunk = {
        let (id, model) = (id.clone(), model.clone());
        move |choices: Value| {
            json!({"id": id, "object": "chat.completion.chunk",
                                      "created": created, "model": model, "choices": choices})
        }
    };
    let head: Vec<Value> = (0..n)
        .map(|i| {
            chunk(
                json!([{"index": i, "delta": {"role": "assistant", "content": ""},
                               "logprobs": null, "finish_reason": null}]),
            )
        })
        .collect();
    let mut usages = vec![Default::default(); n];
    let mut finished = 0;
    let events = choices::merged(rxs).map(move |(i, ev)| match ev {
        Event::Tokens { tokens, text } => {
            let lp = with_logprobs.then(|| json!({"content": logprobs::chat(&tok, &tokens)}));
            vec![chunk(
                json!([{"index": i, "delta": {"content": text}, "logprobs": lp,
                               "finish_reason": null}]),
            )]
        }
        Event::Done { reason, usage } => {
            usages[i] = usage;
            finished += 1;
            let mut out = vec![chunk(json!([{"index": i, "delta": {}, "logprobs": null,
                                             "finish_reason": reason.as_str()}]))];
            if finished == n && include_usage {
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
