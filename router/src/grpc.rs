//! The client gRPC API (`moe.v1.Generation`): validates, hands the request to the engine,
//! and streams its events back. When the client goes away tonic drops the response
//! stream, which closes the request's event channel; the engine sees that and frees the
//! sequence at once.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use moe_model::{FinishReason, ModelSpec, Tokenizer};
use moe_proto::traceparent::TraceParent;
use moe_proto::v1::generation_server::Generation;
use moe_proto::v1::{
    GenerateRequest, GenerateResponse, GeneratedToken, ModelInfoRequest, ModelInfoResponse,
    TokenLogprob, TokenizeRequest, TokenizeResponse,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::limits::RequestLimits;
use crate::metrics::RouterMetrics;
use crate::request::{ClientRequest, Served};
use crate::scheduler::{EngineHandle, Event};

/// Shared by both client APIs.
#[derive(Clone)]
pub struct Api {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub spec: Arc<ModelSpec>,
    pub model_path: String,
    /// The names clients may ask for (`--served-model-name`); never empty.
    pub served_model_names: Arc<Vec<String>>,
    pub metrics: RouterMetrics,
    /// The chat template; `None`: chat requests are refused (INVALID_ARGUMENT / 400).
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// What one request may ask for (prompt tokens, stop strings, logprobs, choices).
    pub limits: Arc<RequestLimits>,
}

static REQUEST_COUNTER: AtomicU64 = AtomicU64::new(1);

/// The longest client-chosen request id kept (`request_id`, `X-Request-Id`).
const MAX_REQUEST_ID_LEN: usize = 128;

impl Api {
    /// Validates and submits; the receiver yields the request's events.
    pub fn start(
        &self,
        req: ClientRequest,
        id: String,
        trace: Option<TraceParent>,
    ) -> Result<tokio::sync::mpsc::Receiver<Event>, crate::ServeError> {
        let seq = self.served().build(req).inspect_err(|e| {
            tracing::info!(request_id = %id, error = %e, "request refused");
            self.metrics
                .requests
                .with_label_values(&[e.outcome()])
                .inc();
        })?;
        tracing::debug!(request_id = %id, prompt_tokens = seq.prompt.len(), max_tokens = seq.stop.max_tokens, "request accepted");
        self.engine.submit(id, trace, seq).inspect_err(|e| {
            self.metrics
                .requests
                .with_label_values(&[e.outcome()])
                .inc();
        })
    }

    /// What request checks need of the served model.
    pub fn served(&self) -> Served<'_> {
        Served {
            tokenizer: &self.tokenizer,
            spec: &self.spec,
            names: &self.served_model_names,
            chat_template: self.chat_template.as_deref(),
            limits: &self.limits,
        }
    }

    /// A conversation's prompt token ids (see [`ChatTemplate::prompt_ids`]).
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, crate::ServeError> {
        self.served().chat_prompt(messages)
    }

    /// The client's id when it gave a usable one (at most 128 visible ASCII characters),
    /// else a new `req-N`.
    pub fn new_request_id(given: &str) -> String {
        let usable = !given.is_empty()
            && given.len() <= MAX_REQUEST_ID_LEN
            && given.bytes().all(|b| b.is_ascii_graphic());
        if usable {
            given.to_owned()
        } else {
            format!("req-{}", REQUEST_COUNTER.fetch_add(1, Ordering::Relaxed))
        }
    }
}

fn to_proto(ev: Event, id: &str) -> Result<GenerateResponse, Status> {
    match ev {
        Event::Tokens { tokens, text } => Ok(GenerateResponse {
            tokens: tokens
                .into_iter()
                .map(|t| GeneratedToken {
                    token_id: t.token_id,
                    logprob: t.logprob,
                    top_logprobs: t
                        .top_logprobs
                        .into_iter()
                        .map(|(token_id, logprob)| TokenLogprob { token_id, logprob })
                        .collect(),
                })
                .collect(),
            text,
            finish_reason: 0,
            usage: None,
            request_id: id.to_owned(),
        }),
        Event::Done { reason, usage } => Ok(GenerateResponse {
            tokens: Vec::new(),
            text: String::new(),
            finish_reason: match reason {
                FinishReason::Length => moe_proto::v1::FinishReason::Length as i32,
                FinishReason::Stop => moe_proto::v1::FinishReason::Stop as i32,
            },
            usage: Some(moe_proto::v1::Usage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                time_to_first_token_ms: usage.time_to_first_token_ms,
                total_time_ms: usage.total_time_ms,
                queue_time_ms: usage.queue_time_ms,
            }),
            request_id: id.to_owned(),
        }),
        Event::Error(e) => Err(e.to_status()),
    }
}

type GenStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Generation for Api {
    type GenerateStream = GenStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let trace = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse);
        let req = request.into_inner();
        let id = Api::new_request_id(&req.request_id);
        let span = tracing::info_span!(
            "request",
            request_id = %id,
            api = "grpc",
            trace_id = trace.as_ref().map(|t| t.trace_id())
        );
        let _in_span = span.enter();
        let rx = ClientRequest::from_proto(req, |messages| self.chat_prompt(messages))
            .and_then(|r| self.start(r, id.clone(), trace))
            .map_err(|e| e.to_status())?;
        let stream = ReceiverStream::new(rx).map(move |ev| to_proto(ev, &id));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let r = request.into_inner();
        let token_ids = self
            .tokenizer
            .encode(&r.text, r.add_special_tokens)
            .map_err(|e| Status::invalid_argument(format!("invalid text: {e}")))?;
        Ok(Response::new(TokenizeResponse { token_ids }))
    }

    async fn model_info(
        &self,
        _: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        let s = &self.spec;
        Ok(Response::new(ModelInfoResponse {
            architecture: s.arch.hf_class().to_owned(),
            vocab_size: s.vocab_size as u32,
            hidden_size: s.hidden_size as u32,
            num_layers: s.num_layers as u32,
            num_experts: s.moe.num_experts as u32,
            top_k: s.moe.top_k as u32,
            max_context_tokens: s.max_position_embeddings as u32,
            model_path: self.model_path.clone(),
            served_model_names: self.served_model_names.to_vec(),
        }))
    }
}
