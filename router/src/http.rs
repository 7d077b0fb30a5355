//! The router's HTTP port: Prometheus `/metrics`, `/health`, and an OpenAI-style
//! `/v1/completions` (JSON, or server-sent events with `"stream": true`) and `/v1/models`
//! over the same engine as the gRPC API.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use moe_model::{FinishReason, SamplingParams};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::grpc::Api;
use crate::request::ClientRequest;
use crate::scheduler::Event;
use crate::ServeError;

/// State of the HTTP handlers.
#[derive(Clone)]
pub struct HttpState {
    pub api: Api,
    /// Registries of in-process workers, rendered after the router's own.
    pub extra_registries: Vec<prometheus::Registry>,
    /// False once shutdown begins.
    pub serving: Arc<AtomicBool>,
    /// Whether the router can serve now (`/health`).
    pub readiness: Arc<crate::readiness::Readiness>,
    /// The placement in force.
    pub placement: crate::cluster_status::PlacementSource,
    /// Membership, controller and routers, with `--etcd`.
    pub cluster: Option<Arc<crate::elastic::ClusterView>>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/v1/models", get(models))
        .route("/v1/cluster", get(cluster))
        .route("/v1/completions", post(completions))
        .with_state(state)
}

async fn metrics(State(s): State<HttpState>) -> Response {
    let extra: Vec<&prometheus::Registry> = s.extra_registries.iter().collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.api.metrics.render(&extra),
    )
        .into_response()
}

/// Readiness: 200 `ok` when the router can serve now, else 503 with the reason.
async fn health(State(s): State<HttpState>) -> Response {
    if !s.serving.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    match s.readiness.reason() {
        None => (StatusCode::OK, "ok").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

/// Liveness: 200 while the process serves HTTP at all.
async fn live() -> &'static str {
    "ok"
}

async fn cluster(State(s): State<HttpState>) -> Json<Value> {
    let mut v = crate::cluster_status::status(&(s.placement)(), &s.api.spec, &s.api.metrics);
    if let Some(view) = &s.cluster {
        v["membership"] = view.to_json();
    }
    Json(v)
}

async fn models(State(s): State<HttpState>) -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": s.api.model_path, "object": "model", "owned_by": "moe-cluster",
        "architecture": s.api.spec.arch.hf_class(), "max_model_len": s.api.spec.max_position_embeddings}]}),
    )
}

fn error(e: &ServeError) -> Response {
    let code = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = match e {
        ServeError::InvalidArgument { .. } => "invalid_request_error",
        ServeError::Overloaded(_) => "rate_limit_error",
        _ => "server_error",
    };
    (
        code,
        Json(json!({"error": {"message": e.to_string(), "type": kind}})),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The OpenAI completions body (the fields we serve; unknown fields are rejected).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionBody {
    #[serde(default)]
    model: Option<String>,
    prompt: Prompt,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stop_token_ids: Vec<u32>,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    logprobs: Option<u32>,
    #[serde(default)]
    stream: bool,
}

fn finish_str(r: FinishReason) -> &'static str {
    r.as_str()
}

async fn completions(State(s): State<HttpState>, body: axum::body::Bytes) -> Response {
    let body: CompletionBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return error(&ServeError::invalid("body", e.to_string())),
    };
    let _ = body.model;
    let d = SamplingParams::default();
    let (prompt, prompt_token_ids) = match body.prompt {
        Prompt::Text(t) => (Some(t), None),
        Prompt::Ids(ids) => (None, Some(ids)),
    };
    let req = ClientRequest {
        prompt,
        prompt_token_ids,
        max_tokens: body.max_tokens.unwrap_or(16),
        sampling: SamplingParams {
            temperature: body.temperature.unwrap_or(d.temperature),
            top_k: body.top_k.unwrap_or(d.top_k),
            top_p: body.top_p.unwrap_or(d.top_p),
            min_p: body.min_p.unwrap_or(d.min_p),
            repetition_penalty: body.repetition_penalty.unwrap_or(d.repetition_penalty),
            presence_penalty: body.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: body.frequency_penalty.unwrap_or(d.frequency_penalty),
            seed: body.seed,
            logprobs: body.logprobs,
        },
        stop: match body.stop {
            None => Vec::new(),
            Some(Stop::One(x)) => vec![x],
            Some(Stop::Many(v)) => v,
        },
        stop_token_ids: body.stop_token_ids,
        ignore_eos: body.ignore_eos,
    };
    let id = Api::new_request_id("");
    let rx = match s.api.start(req, id.clone()) {
        Ok(rx) => rx,
        Err(e) => return error(&e),
    };
    let model = s.api.model_path.clone();
    if body.stream {
        let stream = ReceiverStream::new(rx).map(move |ev| {
            let v = match ev {
                Event::Tokens { text, .. } => json!({"id": id, "object": "text_completion", "model": model,
                    "choices": [{"index": 0, "text": text, "finish_reason": null}]}),
                Event::Done { reason, usage } => json!({"id": id, "object": "text_completion", "model": model,
                    "choices": [{"index": 0, "text": "", "finish_reason": finish_str(reason)}],
                    "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                              "total_tokens": usage.prompt_tokens + usage.completion_tokens}}),
                Event::Error(e) => json!({"error": {"message": e.to_string()}}),
            };
            Ok::<_, Infallible>(SseEvent::default().data(v.to_string()))
        });
        let done = tokio_stream::once(Ok(SseEvent::default().data("[DONE]")));
        return Sse::new(stream.chain(done)).into_response();
    }
    let mut rx = rx;
    let mut text = String::new();
    let mut token_ids: Vec<u32> = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Tokens { tokens, text: t } => {
                text.push_str(&t);
                token_ids.extend(tokens.iter().map(|t| t.token_id));
            }
            Event::Done { reason, usage } => {
                return Json(json!({"id": id, "object": "text_completion", "model": model,
                    "choices": [{"index": 0, "text": text, "token_ids": token_ids, "finish_reason": finish_str(reason)}],
                    "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                              "total_tokens": usage.prompt_tokens + usage.completion_tokens}}))
                .into_response()
            }
            Event::Error(e) => return error(&e),
        }
    }
    error(&ServeError::Internal(
        "the request ended without a result".into(),
    ))
}
