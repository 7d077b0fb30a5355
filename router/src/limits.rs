//! Every bound the router puts on what clients send and hold, in one place: named
//! defaults, one typed [`Limits`] built once from the flags and checked at start-up
//! ([`Limits::validate`], [`Limits::check_model`]), then handed to the parts that enforce
//! it: [`RequestLimits`] to [`crate::request::build`] and the HTTP handlers (both APIs),
//! [`HttpLimits`] to the HTTP server and its body middleware ([`crate::http::server`],
//! [`crate::http::body`]), [`GrpcLimits`] to the gRPC server ([`grpc_server`],
//! [`generation_service`]). The queue bounds (`--max-waiting`, `--max-running`) live in
//! [`crate::scheduler::EngineConfig`]. docs/operations.md ("Limits") lists them all with
//! what a client gets when it goes past one.

use std::time::Duration;

use moe_model::sampling::MAX_LOGPROBS;
use moe_model::stop::MAX_STOP_STRINGS;
use moe_proto::v1::generation_server::GenerationServer;
use tonic::service::interceptor::InterceptedService;

use crate::api_keys::ApiKeys;
use crate::grpc::Api;

/// Largest HTTP request body (long prompts of token ids need more than axum's 2 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 << 20;
/// How long a client may take from connecting to the end of its request headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request body once its headers are in.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent streams one HTTP/2 connection (gRPC or HTTP) may open.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Largest gRPC message of the client API, each way (tonic's own default: requests are a
/// prompt and a few numbers, responses a few tokens).
pub const DEFAULT_MAX_GRPC_MESSAGE_BYTES: usize = 4 << 20;
/// Most choices one HTTP request may ask for (prompts × `n`): each is a sequence in the
/// engine, counted against `--max-waiting` like any request.
pub const DEFAULT_MAX_CHOICES: usize = 128;
/// Most stop strings per request: the engine's own ceiling ([`MAX_STOP_STRINGS`]).
pub const DEFAULT_MAX_STOP_STRINGS: usize = MAX_STOP_STRINGS;
/// Longest stop string, in bytes: the text held back while it may still match.
pub const DEFAULT_MAX_STOP_STRING_BYTES: usize = 256;
/// Most top alternatives per token: OpenAI's limit and the engine's ceiling.
pub const DEFAULT_MAX_LOGPROBS: u32 = MAX_LOGPROBS;
/// HTTP/2 keep-alive pings on client connections (gRPC and HTTP): a peer that vanished
/// without closing (its streams hold sequences in the batch) is found within
/// interval + timeout. Not a flag: it bounds nothing a client sends.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// What one request may ask for, on every API.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestLimits {
    /// Most prompt tokens; `None`: what the model's context allows (context − 1, so one
    /// token can be generated).
    pub max_prompt_tokens: Option<usize>,
    pub max_stop_strings: usize,
    pub max_stop_string_bytes: usize,
    pub max_logprobs: u32,
    /// Prompts × `n` of one HTTP request.
    pub max_choices: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_prompt_tokens: None,
            max_stop_strings: DEFAULT_MAX_STOP_STRINGS,
            max_stop_string_bytes: DEFAULT_MAX_STOP_STRING_BYTES,
            max_logprobs: DEFAULT_MAX_LOGPROBS,
            max_choices: DEFAULT_MAX_CHOICES,
        }
    }
}

impl RequestLimits {
    /// The most prompt tokens a model with `context` positions accepts under these limits.
    pub fn prompt_tokens(&self, context: usize) -> usize {
        let room = context.saturating_sub(1);
        self.max_prompt_tokens.map_or(room, |m| m.min(room))
    }
}

/// Bounds of the HTTP server against large and slow clients.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpLimits {
    pub max_body_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_concurrent_streams: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
        }
    }
}

/// Bounds of the client gRPC server.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpcLimits {
    pub max_message_bytes: usize,
    pub max_concurrent_streams: u32,
}

impl Default for GrpcLimits {
    fn default() -> Self {
        GrpcLimits {
            max_message_bytes: DEFAULT_MAX_GRPC_MESSAGE_BYTES,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
        }
    }
}

/// All of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    pub request: RequestLimits,
    pub http: HttpLimits,
    pub grpc: GrpcLimits,
}

/// A limit flag with a value that cannot work; names the flag.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{flag}: {reason}")]
pub struct LimitError {
    pub flag: &'static str,
    pub reason: String,
}

fn bad(flag: &'static str, reason: impl Into<String>) -> LimitError {
    LimitError {
        flag,
        reason: reason.into(),
    }
}

impl Limits {
    /// Checks what needs no model: every bound positive, and no bound above the engine's
    /// own ceiling (which the flag can only tighten).
    pub fn validate(&self) -> Result<(), LimitError> {
        let r = &self.request;
        if r.max_prompt_tokens == Some(0) {
            return Err(bad(
                "--max-prompt-tokens",
                "must be at least 1 (0: the context)",
            ));
        }
        if r.max_stop_strings > MAX_STOP_STRINGS {
            return Err(bad(
                "--max-stop-strings",
                format!("at most {MAX_STOP_STRINGS} (the engine's limit)"),
            ));
        }
        if r.max_stop_string_bytes == 0 {
            return Err(bad("--max-stop-string-bytes", "must be at least 1"));
        }
        if r.max_logprobs > MAX_LOGPROBS {
            return Err(bad(
                "--max-logprobs",
                format!("at most {MAX_LOGPROBS} (the engine's limit)"),
            ));
        }
        if r.max_choices == 0 {
            return Err(bad("--max-choices", "must be at least 1"));
        }
        let h = &self.http;
        if h.max_body_bytes == 0 {
            return Err(bad("--max-body-bytes", "must be at least 1"));
        }
        if h.header_read_timeout.is_zero() {
            return Err(bad("--http-header-timeout-secs", "must be at least 1"));
        }
        if h.body_read_timeout.is_zero() {
            return Err(bad("--http-body-timeout-secs", "must be at least 1"));
        }
        if h.max_concurrent_streams == 0 || self.grpc.max_concurrent_streams == 0 {
            return Err(bad("--max-concurrent-streams", "must be at least 1"));
        }
        // A message must at least hold a request with a short prompt.
        if self.grpc.max_message_bytes < 1024 {
            return Err(bad("--max-grpc-message-bytes", "must be at least 1024"));
        }
        Ok(())
    }

    /// Checks the limits against the model: a prompt limit must leave room in the context.
    pub fn check_model(&self, context: usize) -> Result<(), LimitError> {
        match self.request.max_prompt_tokens {
            Some(m) if m >= context => Err(bad(
                "--max-prompt-tokens",
                format!(
                    "{m} does not fit the model's context of {context} tokens (at most {})",
                    context.saturating_sub(1)
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// The client gRPC server's builder: concurrent streams per connection and keep-alive.
/// (No handler timeout: `Generate` answers at once and then streams for as long as the
/// generation takes; clients bound their own calls with `grpc-timeout`.)
pub fn grpc_server(l: &GrpcLimits) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(l.max_concurrent_streams)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// `moe.v1.Generation` behind the API-key check, with its message size limits.
pub fn generation_service(
    api: Api,
    keys: ApiKeys,
    l: &GrpcLimits,
) -> InterceptedService<GenerationServer<Api>, impl tonic::service::Interceptor + Clone> {
    let svc = GenerationServer::new(api)
        .max_decoding_message_size(l.max_message_bytes)
        .max_encoding_message_size(l.max_message_bytes);
    InterceptedService::new(svc, crate::api_keys::grpc_interceptor(keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_each_bad_value_names_its_flag() {
        Limits::default().validate().unwrap();
        Limits::default().check_model(512).unwrap();
        type Mutation = fn(&mut Limits);
        let cases: [(&str, Mutation); 10] = [
            ("--max-prompt-tokens", |l| {
                l.request.max_prompt_tokens = Some(0)
            }),
            ("--max-stop-strings", |l| l.request.max_stop_strings = 17),
            ("--max-stop-string-bytes", |l| {
                l.request.max_stop_string_bytes = 0
            }),
            ("--max-logprobs", |l| l.request.max_logprobs = 21),
            ("--max-choices", |l| l.request.max_choices = 0),
            ("--max-body-bytes", |l| l.http.max_body_bytes = 0),
            ("--http-header-timeout-secs", |l| {
                l.http.header_read_timeout = Duration::ZERO
            }),
            ("--http-body-timeout-secs", |l| {
                l.http.body_read_timeout = Duration::ZERO
            }),
            ("--max-concurrent-streams", |l| {
                l.grpc.max_concurrent_streams = 0
            }),
            ("--max-grpc-message-bytes", |l| {
                l.grpc.max_message_bytes = 10
            }),
        ];
        for (flag, mutate) in cases {
            let mut l = Limits::default();
            mutate(&mut l);
            assert_eq!(l.validate().unwrap_err().flag, flag);
        }
    }

    #[test]
    fn the_prompt_limit_must_fit_the_context() {
        let mut l = Limits::default();
        assert_eq!(l.request.prompt_tokens(512), 511);
        l.request.max_prompt_tokens = Some(100);
        assert_eq!(l.request.prompt_tokens(512), 100);
        l.check_model(512).unwrap();
        l.request.max_prompt_tokens = Some(512);
        let e = l.check_model(512).unwrap_err();
        assert!(e.to_string().contains("context of 512"), "{e}");
    }
}
