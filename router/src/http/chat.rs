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
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::choices;
use super::errors::ApiError;
use super::params::{self, StreamOptions};
use super::responses::{
    event_data, AssistantMessage, ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion,
    ChatDelta, ErrorResponse, Finish,
};
use super::{logprobs, models, unix_now, HttpState};
use crate::chat_template::ChatMessage;
use crate::request::{reject_unknown, ClientRequest, SamplingFields, Served};
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

/// A message's content: a string, or a list of parts (only `text` parts).
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    /// `text` (other types are refused).
    #[serde(rename = "type")]
    #[schema(pattern = "^text$")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// One message of the conversation.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    #[schema(pattern = "^(system|user|assistant)$")]
    pub role: String,
    pub content: Content,
    /// Accepted; templates do not use it.
    #[serde(default)]
    #[allow(dead_code)]
    pub name: Option<String>,
}

/// The OpenAI chat completions body: these fields and the sampling fields; any other
/// field is refused by name (400), never ignored.
#[derive(Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// A served model name (`GET /v1/models`); default the first.
    #[serde(default)]
    pub model: Option<String>,
    #[schema(min_items = 1)]
    pub messages: Vec<Message>,
    /// Most tokens to generate; default: what the context leaves.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    /// The same as `max_tokens` (wins when both are given).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<u32>,
    /// Return the log-probability of each generated token.
    #[serde(default)]
    pub logprobs: bool,
    /// With `logprobs`: this many top alternatives per token (at most `--max-logprobs`,
    /// default 20).
    #[serde(default)]
    #[schema(maximum = 20)]
    pub top_logprobs: Option<u32>,
    /// Independent samples; with `seed`, sample i uses seed + i. At most `--max-choices`
    /// (default 128).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 128)]
    pub n: Option<u32>,
    /// Answer with server-sent events.
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Accepted for compatibility; never logged or stored.
    #[serde(default)]
    #[allow(dead_code)]
    pub user: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(flatten)]
    #[schema(ignore)]
    rest: Map<String, Value>,
}

/// The messages as the template sees them: text content only (roles are checked with
/// the rest of the conversation by [`crate::chat_template::ChatTemplate::prompt_ids`]).
fn messages(list: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    list.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match m.content {
                Content::Text(s) => s,
                Content::Parts(parts) => {
                    let mut text = String::new();
                    for (j, p) in parts.into_iter().enumerate() {
                        let field = format!("messages[{i}].content[{j}]");
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            ("text", None) => {
                                return Err(ApiError::invalid(&field, "a text part needs `text`"))
                            }
                            (other, _) => {
                                return Err(ApiError::invalid(
                                    &format!("{field}.type"),
                                    format!(
                                        "content parts of type `{other}` are not supported \
                                         (only `text`)"
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage {
                role: m.role,
                content,
            })
        })
        .collect()
}

/// A chat body, checked: the conversation rendered and tokenised, one request per
/// sample, and what the answer needs.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub model: String,
    pub reqs: Vec<ClientRequest>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub with_logprobs: bool,
}

/// Parses and checks a chat body, rendering the conversation with the chat template.
pub(crate) fn prepare(m: Served<'_>, bytes: &[u8]) -> Result<Prepared, ApiError> {
    let body: ChatCompletionRequest = params::parse(bytes)?;
    reject_unknown(&body.rest, REFUSED)?;
    let model = models::resolve(m.names, body.model.as_deref())?;
    params::check_stream_options(body.stream, &body.stream_options)?;
    if body.top_logprobs.is_some() && !body.logprobs {
        return Err(ApiError::invalid("top_logprobs", "needs `logprobs: true`"));
    }
    let ids = m.chat_prompt(&messages(body.messages)?)?;
    let n = params::check_n(body.n, 1, m.limits.max_choices)?;
    let logprobs = body.logprobs.then_some(body.top_logprobs.unwrap_or(0));
    let max_tokens = body.max_completion_tokens.or(body.max_tokens).unwrap_or(
        // No limit given: as much as the context allows (request::build caps it).
        m.spec.max_position_embeddings as u32,
    );
    let mut reqs = Vec::new();
    for i in 0..n {
        let mut r = body.sampling.request(max_tokens, logprobs)?;
        r.prompt_token_ids = Some(ids.clone());
        r.sampling.seed = params::sample_seed(body.sampling.seed, i);
        reqs.push(r);
    }
    Ok(Prepared {
        model,
        reqs,
        n,
        stream: body.stream,
        include_usage: body.stream_options.is_some_and(|o| o.include_usage),
        with_logprobs: body.logprobs,
    })
}

/// Answers a conversation; an [`ApiError`] answers in OpenAI's error shape.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", operation_id = "createChatCompletion",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The answer; with `stream: true`, `text/event-stream` \
            of `ChatChunk` events ended by `data: [DONE]`",
            content((ChatCompletion = "application/json"), (String = "text/event-stream"))),
        (status = 408, description = "the body did not arrive in time", body = ErrorResponse),
        (status = 400, description = "invalid request, or the model has no chat template",
            body = ErrorResponse),
        (status = 401, body = ErrorResponse),
        (status = 404, description = "model not served", body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 429, body = ErrorResponse),
        (status = 503, body = ErrorResponse)))]
pub async fn handle(
    State(s): State<HttpState>,
    headers: axum::http::HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let Prepared {
        model,
        reqs,
        n,
        stream,
        include_usage,
        with_logprobs,
    } = prepare(s.api.served(), &bytes)?;
    let (base, rxs) = choices::start(&s.api, reqs, &headers)?;
    let id = format!("chatcmpl-{base}");
    let created = unix_now();
    let tok = s.api.tokenizer.clone();
    if !stream {
        let done = choices::collect(rxs).await?;
        let usage =
            choices::total_usage(&done.iter().map(|f| f.usage.clone()).collect::<Vec<_>>(), n);
        let choices = done
            .into_iter()
            .enumerate()
            .map(|(i, f)| ChatChoice {
                index: i,
                message: AssistantMessage {
                    role: "assistant".into(),
                    content: f.text,
                },
                logprobs: with_logprobs.then(|| logprobs::chat(&tok, &f.tokens)),
                finish_reason: f.reason.map(Finish::from),
            })
            .collect();
        return Ok(Json(ChatCompletion {
            id,
            object: "chat.completion".into(),
            created,
            model,
            choices,
            usage,
        })
        .into_response());
    }
    let chunk = move |choices: Vec<ChatChunkChoice>, usage| {
        event_data(&ChatChunk {
            id: id.clone(),
            object: "chat.completion.chunk".into(),
            created,
            model: model.clone(),
            choices,
            usage,
        })
    };
    let piece = |index: usize, delta: ChatDelta| ChatChunkChoice {
        index,
        delta,
        logprobs: None,
        finish_reason: None,
    };
    let head: Vec<String> = (0..n)
        .map(|i| {
            let delta = ChatDelta {
                role: Some("assistant".into()),
                content: Some(String::new()),
            };
            chunk(vec![piece(i, delta)], None)
        })
        .collect();
    let mut usages = vec![Default::default(); n];
    let mut finished = 0;
    let events = choices::merged(rxs).map(move |(i, ev)| match ev {
        Event::Tokens { tokens, text } => {
            let delta = ChatDelta {
                role: None,
                content: Some(text),
            };
            let c = ChatChunkChoice {
                logprobs: with_logprobs.then(|| logprobs::chat(&tok, &tokens)),
                ..piece(i, delta)
            };
            vec![chunk(vec![c], None)]
        }
        Event::Done { reason, usage } => {
            usages[i] = usage;
            finished += 1;
            let c = ChatChunkChoice {
                finish_reason: Some(reason.into()),
                ..piece(i, ChatDelta::default())
            };
            let mut out = vec![chunk(vec![c], None)];
            if finished == n && include_usage {
                out.push(chunk(Vec::new(), Some(choices::total_usage(&usages, n))));
            }
            out
        }
        Event::Error(e) => vec![event_data(&ApiError::from(e).response())],
    });
    Ok(super::sse(
        futures::stream::iter(head).chain(events.flat_map(futures::stream::iter)),
    ))
}
