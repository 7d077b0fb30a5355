//! `POST /v1/completions`: one prompt or a list (strings, or lists of token ids), `n`
//! samples each (choice `index` = prompt × n + sample), `echo`, `logprobs` in the
//! completions shape, and server-sent events with `"stream": true` (a final usage chunk
//! with `stream_options.include_usage`, then `data: [DONE]`).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use moe_model::Tokenizer;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::choices::{self, Finished};
use super::errors::ApiError;
use super::params::{self, StreamOptions};
use super::responses::{event_data, Completion, CompletionChoice, ErrorResponse, Finish};
use super::{logprobs, models, unix_now, HttpState};
use crate::request::{reject_unknown, ClientRequest, SamplingFields, Served};
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

/// One prompt or a list: text, or token ids.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// The OpenAI completions body: these fields and the sampling fields; any other field is
/// refused by name (400), never ignored.
#[derive(Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// A served model name (`GET /v1/models`); default the first.
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Prompt,
    /// Most tokens to generate per choice; default 16 (capped by the context).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    /// Return log-probabilities with this many top alternatives per token (at most
    /// `--max-logprobs`, default 20).
    #[serde(default)]
    #[schema(maximum = 20)]
    pub logprobs: Option<u32>,
    /// Samples per prompt (choice index = prompt × n + sample); with `seed`, sample i
    /// uses seed + i. Prompts × n is at most `--max-choices` (default 128).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 128)]
    pub n: Option<u32>,
    /// Put the prompt before the completion in `text`.
    #[serde(default)]
    pub echo: bool,
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

/// One prompt: its text for `echo`, and the request's prompt form.
struct OnePrompt {
    echo_text: String,
    text: Option<String>,
    ids: Option<Vec<u32>>,
}

fn prompts(tok: &Tokenizer, p: Prompt) -> Result<Vec<OnePrompt>, ApiError> {
    let decode = |ids: &[u32]| tok.decode(ids, false).unwrap_or_default();
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

/// A completions body, checked: its requests (one per prompt × sample, in choice
/// order, not yet tokenised: [`crate::request::build`] does that) and what the answer
/// needs.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub model: String,
    pub reqs: Vec<ClientRequest>,
    /// Per choice: the text `echo` puts first ("" without `echo`).
    pub echoes: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub with_logprobs: bool,
}

/// Parses and checks a completions body: everything but tokenising the prompts.
pub(crate) fn prepare(m: Served<'_>, bytes: &[u8]) -> Result<Prepared, ApiError> {
    let body: CompletionRequest = params::parse(bytes)?;
    reject_unknown(&body.rest, REFUSED)?;
    let model = models::resolve(m.names, body.model.as_deref())?;
    params::check_stream_options(body.stream, &body.stream_options)?;
    if body.echo && body.logprobs.is_some() {
        return Err(ApiError::invalid(
            "echo",
            "`echo` with `logprobs` (prompt logprobs) is not supported",
        ));
    }
    let prompts = prompts(m.tokenizer, body.prompt)?;
    let n = params::check_n(body.n, prompts.len(), m.limits.max_choices)?;
    let mut reqs = Vec::new();
    let mut echoes = Vec::new();
    for p in &prompts {
        for i in 0..n {
            let mut r = body
                .sampling
                .request(body.max_tokens.unwrap_or(16), body.logprobs)?;
            r.prompt = p.text.clone();
            r.prompt_token_ids = p.ids.clone();
            r.sampling.seed = params::sample_seed(body.sampling.seed, i);
            reqs.push(r);
            echoes.push(if body.echo {
                p.echo_text.clone()
            } else {
                String::new()
            });
        }
    }
    Ok(Prepared {
        model,
        reqs,
        echoes,
        n,
        stream: body.stream,
        include_usage: body.stream_options.is_some_and(|o| o.include_usage),
        with_logprobs: body.logprobs.is_some(),
    })
}

/// Completes prompts; an [`ApiError`] answers in OpenAI's error shape.
#[utoipa::path(post, path = "/v1/completions", tag = "openai", operation_id = "createCompletion",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "A completion; with `stream: true`, `text/event-stream` \
            of `Completion` chunks ended by `data: [DONE]`",
            content((Completion = "application/json"), (String = "text/event-stream"))),
        (status = 408, description = "the body did not arrive in time", body = ErrorResponse),
        (status = 400, body = ErrorResponse), (status = 401, body = ErrorResponse),
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
        echoes,
        n,
        stream,
        include_usage,
        with_logprobs,
    } = prepare(s.api.served(), &bytes)?;
    let (base, rxs) = choices::start(&s.api, reqs, &headers)?;
    let id = format!("cmpl-{base}");
    let created = unix_now();
    if !stream {
        let done = choices::collect(rxs).await?;
        let usage =
            choices::total_usage(&done.iter().map(|f| f.usage.clone()).collect::<Vec<_>>(), n);
        let choices = done
            .into_iter()
            .zip(echoes)
            .enumerate()
            .map(|(i, (f, echo))| choice(&s, i, f, echo, with_logprobs))
            .collect();
        return Ok(Json(Completion {
            id,
            object: "text_completion".into(),
            created,
            model,
            choices,
            usage: Some(usage),
        })
        .into_response());
    }
    let chunk = move |choices: Vec<CompletionChoice>, usage| {
        event_data(&Completion {
            id: id.clone(),
            object: "text_completion".into(),
            created,
            model: model.clone(),
            choices,
            usage,
        })
    };
    let piece = |index: usize, text: String| CompletionChoice {
        index,
        text,
        token_ids: None,
        logprobs: None,
        finish_reason: None,
    };
    let tok = s.api.tokenizer.clone();
    let mut offsets: Vec<usize> = echoes.iter().map(|e| e.chars().count()).collect();
    let mut usages = vec![Default::default(); echoes.len()];
    let head: Vec<String> = echoes
        .iter()
        .enumerate()
        .filter(|(_, e)| !e.is_empty())
        .map(|(i, e)| chunk(vec![piece(i, e.clone())], None))
        .collect();
    let total = echoes.len();
    let mut finished = 0;
    let events = choices::merged(rxs).map(move |(i, ev)| match ev {
        Event::Tokens { tokens, text } => {
            let lp = with_logprobs.then(|| logprobs::completion(&tok, &tokens, &mut offsets[i]));
            vec![chunk(
                vec![CompletionChoice {
                    logprobs: lp,
                    ..piece(i, text)
                }],
                None,
            )]
        }
        Event::Done { reason, usage } => {
            usages[i] = usage;
            finished += 1;
            let mut out = vec![chunk(
                vec![CompletionChoice {
                    finish_reason: Some(reason.into()),
                    ..piece(i, String::new())
                }],
                None,
            )];
            if finished == total && include_usage {
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

fn choice(
    s: &HttpState,
    i: usize,
    f: Finished,
    echo: String,
    with_logprobs: bool,
) -> CompletionChoice {
    let mut offset = echo.chars().count();
    let lp = with_logprobs.then(|| logprobs::completion(&s.api.tokenizer, &f.tokens, &mut offset));
    CompletionChoice {
        index: i,
        text: echo + &f.text,
        token_ids: Some(f.tokens.iter().map(|t| t.token_id).collect()),
        logprobs: lp,
        finish_reason: f.reason.map(Finish::from),
    }
}
