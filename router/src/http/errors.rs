//! Errors of the HTTP API in OpenAI's shape, `{"error": {"message", "type", "param",
//! "code"}}`, for every status the API answers with (400, 401, 404, 405, 408, 413, 429,
//! 500, 503), so client libraries raise their matching exception classes. Handlers return
//! [`ApiError`]; what axum itself answers (unknown route, wrong method, body too large,
//! a body that is not JSON) is rewritten into the same shape by [`openai_shape`].

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::responses::{ErrorDetail, ErrorResponse};

use crate::ServeError;

/// One error answer of the HTTP API.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, …).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 naming the request field.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.to_owned()),
            code: None,
        }
    }

    /// A 400 for a known OpenAI field this server does not implement.
    pub fn unsupported(param: &str) -> ApiError {
        ApiError::invalid(
            param,
            format!("`{param}` is not supported by this server; remove it from the request"),
        )
    }

    /// A 404 for a model this server does not serve.
    pub fn model_not_found(model: &str, served: &[String]) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{model}` does not exist; this server serves {}",
                served.join(", ")
            ),
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    fn bare(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// OpenAI's `type` for a status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 404 | 405 | 408 | 413 | 415 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            503 => "service_unavailable_error",
            _ => "server_error",
        }
    }
}

impl From<&ServeError> for ApiError {
    fn from(e: &ServeError) -> ApiError {
        let status =
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        match e {
            ServeError::InvalidArgument { field, .. } => ApiError {
                status,
                message: e.to_string(),
                param: Some(field.clone()),
                code: None,
            },
            ServeError::Overloaded(_) => ApiError {
                code: Some("rate_limit_exceeded"),
                ..ApiError::bare(status, e.to_string())
            },
            _ => ApiError::bare(status, e.to_string()),
        }
    }
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> ApiError {
        ApiError::from(&e)
    }
}

impl ApiError {
    /// The typed body (also sent as an SSE event when a stream fails midway).
    pub fn response(&self) -> ErrorResponse {
        ErrorResponse {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind().to_owned(),
                param: self.param.clone(),
                code: self.code.map(str::to_owned),
            },
        }
    }

    /// The body as JSON.
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(self.response()).unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.response())).into_response()
    }
}

/// Routes nobody serves.
pub async fn not_found(req: Request) -> ApiError {
    ApiError {
        code: Some("not_found"),
        ..ApiError::bare(
            StatusCode::NOT_FOUND,
            format!("no route {} {}", req.method(), req.uri().path()),
        )
    }
}

/// Middleware: any error answer that is not JSON yet (axum's own rejections: 405, 413,
/// 415, …) becomes an OpenAI-shaped one with the same status.
pub async fn openai_shape(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let allow = res.headers().get(header::ALLOW).cloned();
    // axum's rejection texts are short and safe; cap them anyway.
    let bytes = axum::body::to_bytes(res.into_body(), 4096)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).trim().to_owned();
    let message = match (status.as_u16(), text.is_empty()) {
        (405, _) => "method not allowed on this route".to_owned(),
        (413, _) => format!("the request body is too large ({text})"),
        (_, true) => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_owned(),
        _ => text,
    };
    let mut out = ApiError::bare(status, message).into_response();
    if let Some(allow) = allow {
        out.headers_mut().insert(header::ALLOW, allow);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_errors_map_to_openai_types() {
        let e = ApiError::from(ServeError::invalid("temperature", "must be >= 0"));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        assert_eq!(e.body()["error"]["param"], "temperature");
        let e = ApiError::from(ServeError::Overloaded("full".into()));
        assert_eq!(e.status.as_u16(), 429);
        assert_eq!(e.body()["error"]["type"], "rate_limit_error");
        let e = ApiError::from(ServeError::Unavailable("x".into()));
        assert_eq!(e.status.as_u16(), 503);
        let e = ApiError::model_not_found("gpt-4", &["tiny".into()]);
        assert_eq!(e.status.as_u16(), 404);
        assert_eq!(e.body()["error"]["code"], "model_not_found");
    }

    #[tokio::test]
    async fn axum_rejections_get_the_openai_shape() {
        use tower::ServiceExt;
        let app = axum::Router::new()
            .route(
                "/echo",
                axum::routing::post(|b: axum::body::Bytes| async move { b }),
            )
            .fallback(not_found)
            .layer(axum::extract::DefaultBodyLimit::max(8))
            .layer(axum::middleware::from_fn(openai_shape));
        let call = |method: &str, uri: &str, body: &'static str| {
            let req = axum::http::Request::builder()
                .method(method)
                .uri(uri)
                .body(axum::body::Body::from(body))
                .unwrap();
            let app = app.clone();
            async move {
                let res = app.oneshot(req).await.unwrap();
                let status = res.status().as_u16();
                let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
                    .await
                    .unwrap();
                (status, String::from_utf8_lossy(&bytes).into_owned())
            }
        };
        let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        let (status, body) = call("POST", "/echo", "far more than eight bytes").await;
        assert_eq!(status, 413, "{body}");
        assert_eq!(json(&body)["error"]["type"], "invalid_request_error");
        let (status, body) = call("GET", "/echo", "").await;
        assert_eq!(status, 405, "{body}");
        assert!(json(&body)["error"]["message"].is_string());
        let (status, body) = call("GET", "/nope", "").await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(json(&body)["error"]["code"], "not_found");
        // Success passes through untouched.
        assert_eq!(
            call("POST", "/echo", "tiny").await,
            (200, "tiny".to_owned())
        );
    }
}
