//! The router's HTTP port: Prometheus `/metrics`, `/health`, `/v1/cluster`, and the
//! OpenAI-compatible API over the same engine as the gRPC API: `/v1/completions`,
//! `/v1/chat/completions` (JSON, or server-sent events with `"stream": true`) and
//! `/v1/models`, described by `/openapi.json` ([`openapi`], from the same types).
//! Every error of the API is in OpenAI's shape ([`errors`]). Bodies are read within
//! bounds ([`body`]); [`server`] serves it all with timeouts against slow clients.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::Value;

use crate::grpc::Api;

mod body;
mod chat;
mod choices;
mod completions;
pub mod errors;
mod logprobs;
mod models;
pub mod openapi;
mod params;
pub mod responses;
pub mod server;
mod status_page;

pub(crate) use chat::prepare as prepare_chat;
pub(crate) use completions::prepare as prepare_completion;

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
    /// Without etcd: what the router's own healer saw of the `--workers`.
    pub static_workers: Option<Arc<crate::static_control::StaticView>>,
    /// When the router started (Unix seconds): the models' `created`.
    pub created: u64,
    /// Keys `/v1/*` requires (empty: open).
    pub api_keys: crate::api_keys::ApiKeys,
    /// Body size and read deadline of `/v1/*` requests.
    pub limits: crate::limits::HttpLimits,
}

pub fn router(state: HttpState) -> Router {
    let api = Router::new()
        .route("/v1/models", get(models::list))
        .route("/v1/completions", post(completions::handle))
        .route("/v1/chat/completions", post(chat::handle))
        .fallback(errors::not_found)
        // The body is read (within its limits) by `body::bounded`, before the handlers.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            state.limits.clone(),
            body::bounded,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.api_keys.clone(),
            require_key,
        ))
        .layer(axum::middleware::from_fn(errors::openai_shape));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/v1/cluster", get(cluster))
        .route("/openapi.json", get(openapi::serve))
        .route("/", get(status_page::page))
        .route("/v1/status", get(status_page::status))
        .merge(api)
        .with_state(state)
}

/// Middleware on the OpenAI API: `Authorization: Bearer <key>` or a 401 in OpenAI's
/// shape (`invalid_api_key`, which the openai client raises as `AuthenticationError`).
/// `/health`, `/health/live`, `/metrics`, `/v1/cluster` and `/openapi.json` are outside it: probes and
/// Prometheus scrape without secrets, and none of them carries request content.
async fn require_key(
    State(keys): State<crate::api_keys::ApiKeys>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let h = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if keys.authorizes(h) {
        return next.run(req).await;
    }
    errors::ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "Incorrect or missing API key: send `Authorization: Bearer <key>`".into(),
        param: None,
        code: Some("invalid_api_key"),
    }
    .into_response()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Server-sent events: one `data:` line per JSON text, then `data: [DONE]`.
fn sse(s: impl futures::Stream<Item = String> + Send + 'static) -> Response {
    let events = s.map(|v| Ok::<_, Infallible>(SseEvent::default().data(v)));
    let done = futures::stream::once(async { Ok(SseEvent::default().data("[DONE]")) });
    Sse::new(events.chain(done)).into_response()
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

/// Liveness: 200 while the process serves HTTP and its engine runs; 503 once the engine
/// thread died (the router never recovers from that: restart it).
async fn live(State(s): State<HttpState>) -> Response {
    match s.readiness.engine_stopped() {
        None => (StatusCode::OK, "ok").into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the engine stopped: {why}"),
        )
            .into_response(),
    }
}

async fn cluster(State(s): State<HttpState>) -> Json<Value> {
    let mut v = crate::cluster_status::status(&(s.placement)(), &s.api.spec, &s.api.metrics);
    if let Some(view) = &s.cluster {
        v["membership"] = view.to_json();
    }
    if let Some(view) = &s.static_workers {
        v["static_workers"] = view.to_json();
    }
    Json(v)
}
