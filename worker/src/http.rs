//! The worker's plain-HTTP endpoints, for Prometheus and Kubernetes probes:
//! `GET /metrics` (the node's registry in the Prometheus text format), `GET /health`
//! (200 `ok` while serving, 503 once shutdown has begun: readiness) and
//! `GET /health/live` (200 while the process runs: startup and liveness). With mutual
//! TLS on the gRPC port, the kubelet's gRPC probes (plain text) cannot reach it, so
//! probes use these.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::node::Node;

/// What the handlers read.
#[derive(Clone)]
struct HttpState {
    node: Node,
    serving: Arc<AtomicBool>,
}

/// The HTTP routes over `node`; `serving` turns false when shutdown begins.
pub(crate) fn router(node: Node, serving: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/health/live", get(|| async { "ok" }))
        .with_state(HttpState { node, serving })
}

async fn metrics(State(s): State<HttpState>) -> Response {
    match s.node.metrics().encode_text() {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable\n").into_response()
        }
    }
}

async fn health(State(s): State<HttpState>) -> Response {
    if s.serving.load(Ordering::Acquire) {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    }
}
