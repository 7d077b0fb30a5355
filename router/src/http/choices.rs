//! One HTTP request, many engine requests: every prompt × `n` sample is its own sequence
//! in the engine (batched with everything else), and its events come back tagged with
//! the choice's index. Dropping the receivers (a client that left, or one choice that
//! failed) frees every sequence of the request at once.

use axum::http::HeaderMap;
use futures::stream::{self, Stream, StreamExt};
use moe_model::{FinishReason, Sampled};
use moe_proto::traceparent::TraceParent;
use tokio::sync::mpsc::Receiver;
use tokio_stream::wrappers::ReceiverStream;

use super::errors::ApiError;
use crate::grpc::Api;
use crate::request::ClientRequest;
use crate::scheduler::{Event, Usage};
use crate::ServeError;

/// Submits every request (in choice order); the first refusal fails them all. Returns
/// the request's id (the client's `X-Request-Id` when it sent a usable one) and the
/// choices' receivers; choice `i` is `{id}-{i}` in the logs. A W3C `traceparent` header
/// goes with every choice.
pub fn start(
    api: &Api,
    reqs: Vec<ClientRequest>,
    headers: &HeaderMap,
) -> Result<(String, Vec<Receiver<Event>>), ApiError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let base = Api::new_request_id(header("x-request-id").unwrap_or(""));
    let trace = header("traceparent").and_then(TraceParent::parse);
    let span = tracing::info_span!(
        "request",
        request_id = %base,
        api = "http",
        trace_id = trace.as_ref().map(|t| t.trace_id())
    );
    let _in_span = span.enter();
    let rxs = reqs
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            api.start(r, format!("{base}-{i}"), trace.clone())
                .map_err(ApiError::from)
        })
        .collect::<Result<_, _>>()?;
    Ok((base, rxs))
}

/// A finished choice.
#[derive(Debug, Default)]
pub struct Finished {
    pub tokens: Vec<Sampled>,
    pub text: String,
    pub reason: Option<FinishReason>,
    pub usage: Usage,
}

/// Waits for every choice; the first failure fails the request.
pub async fn collect(rxs: Vec<Receiver<Event>>) -> Result<Vec<Finished>, ApiError> {
    let all = futures::future::join_all(rxs.into_iter().map(|mut rx| async move {
        let mut f = Finished::default();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Tokens { tokens, text } => {
                    f.tokens.extend(tokens);
                    f.text.push_str(&text);
                }
                Event::Done { reason, usage } => {
                    f.reason = Some(reason);
                    f.usage = usage;
                    return Ok(f);
                }
                Event::Error(e) => return Err(ApiError::from(e)),
            }
        }
        Err(ApiError::from(ServeError::Internal(
            "the request ended without a result".into(),
        )))
    }))
    .await;
    all.into_iter().collect()
}

/// Every choice's events as they come, tagged with the choice index.
pub fn merged(rxs: Vec<Receiver<Event>>) -> impl Stream<Item = (usize, Event)> + Send {
    stream::select_all(
        rxs.into_iter()
            .enumerate()
            .map(|(i, rx)| ReceiverStream::new(rx).map(move |ev| (i, ev)).boxed()),
    )
}

/// Sums usage over choices where choice `i` belongs to prompt `i / n` (prompts counted
/// once each, not once per sample).
pub fn total_usage(usages: &[Usage], n: usize) -> super::responses::Usage {
    let prompt: u32 = usages
        .iter()
        .step_by(n.max(1))
        .map(|u| u.prompt_tokens)
        .sum();
    let completion: u32 = usages.iter().map(|u| u.completion_tokens).sum();
    super::responses::Usage::new(prompt, completion)
}
