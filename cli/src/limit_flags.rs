//! The limit flags of `moe serve` and `moe router` (one group, flattened into both), read
//! into `moe_router::limits::Limits` and validated once at start-up. Defaults are the
//! named constants of `moe_router::limits`; docs/operations.md ("Limits") says what a
//! client gets past each one.

use std::time::Duration;

use moe_router::limits::{
    GrpcLimits, HttpLimits, Limits, RequestLimits, DEFAULT_BODY_READ_TIMEOUT,
    DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CHOICES,
    DEFAULT_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_GRPC_MESSAGE_BYTES, DEFAULT_MAX_LOGPROBS,
    DEFAULT_MAX_STOP_STRINGS, DEFAULT_MAX_STOP_STRING_BYTES,
};

#[derive(clap::Args, Debug, Clone)]
pub struct LimitArgs {
    /// Largest HTTP request body in bytes; larger ones get 413.
    #[arg(long, env = "MOE_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Seconds a client may take to send its request headers (HTTP/1) or its first bytes
    /// (HTTP/2); the connection is closed after that.
    #[arg(long, env = "MOE_HTTP_HEADER_TIMEOUT_SECS", default_value_t = DEFAULT_HEADER_READ_TIMEOUT.as_secs())]
    pub http_header_timeout_secs: u64,
    /// Seconds a client may take to send a request body once its headers are in; 408 after.
    #[arg(long, env = "MOE_HTTP_BODY_TIMEOUT_SECS", default_value_t = DEFAULT_BODY_READ_TIMEOUT.as_secs())]
    pub http_body_timeout_secs: u64,
    /// Concurrent streams per HTTP/2 connection, on the gRPC and the HTTP port.
    #[arg(long, env = "MOE_MAX_CONCURRENT_STREAMS", default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,
    /// Largest gRPC message of the client API (moe.v1.Generation), each way, in bytes.
    #[arg(long, env = "MOE_MAX_GRPC_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_GRPC_MESSAGE_BYTES)]
    pub max_grpc_message_bytes: usize,
    /// Most prompt tokens per request (0: what the model's context allows).
    #[arg(long, env = "MOE_MAX_PROMPT_TOKENS", default_value_t = 0)]
    pub max_prompt_tokens: usize,
    /// Most stop strings per request (at most 16).
    #[arg(long, env = "MOE_MAX_STOP_STRINGS", default_value_t = DEFAULT_MAX_STOP_STRINGS)]
    pub max_stop_strings: usize,
    /// Longest stop string, in bytes.
    #[arg(long, env = "MOE_MAX_STOP_STRING_BYTES", default_value_t = DEFAULT_MAX_STOP_STRING_BYTES)]
    pub max_stop_string_bytes: usize,
    /// Most top alternatives per token (`logprobs`, `top_logprobs`; at most 20).
    #[arg(long, env = "MOE_MAX_LOGPROBS", default_value_t = DEFAULT_MAX_LOGPROBS)]
    pub max_logprobs: u32,
    /// Most choices per HTTP request (prompts × `n`).
    #[arg(long, env = "MOE_MAX_CHOICES", default_value_t = DEFAULT_MAX_CHOICES)]
    pub max_choices: usize,
}

impl LimitArgs {
    /// The typed limits, validated (the error names the flag).
    pub fn limits(&self) -> anyhow::Result<Limits> {
        // 0 is "the context" for the prompt; for the rest validate() refuses 0.
        let limits = Limits {
            request: RequestLimits {
                max_prompt_tokens: (self.max_prompt_tokens > 0).then_some(self.max_prompt_tokens),
                max_stop_strings: self.max_stop_strings,
                max_stop_string_bytes: self.max_stop_string_bytes,
                max_logprobs: self.max_logprobs,
                max_choices: self.max_choices,
            },
            http: HttpLimits {
                max_body_bytes: self.max_body_bytes,
                header_read_timeout: Duration::from_secs(self.http_header_timeout_secs),
                body_read_timeout: Duration::from_secs(self.http_body_timeout_secs),
                max_concurrent_streams: self.max_concurrent_streams,
            },
            grpc: GrpcLimits {
                max_message_bytes: self.max_grpc_message_bytes,
                max_concurrent_streams: self.max_concurrent_streams,
            },
        };
        limits.validate()?;
        Ok(limits)
    }
}

/// The limits as `--check-config` prints them.
pub fn to_json(l: &Limits) -> serde_json::Value {
    serde_json::json!({
        "max_body_bytes": l.http.max_body_bytes,
        "http_header_timeout_secs": l.http.header_read_timeout.as_secs(),
        "http_body_timeout_secs": l.http.body_read_timeout.as_secs(),
        "max_concurrent_streams": l.http.max_concurrent_streams,
        "max_grpc_message_bytes": l.grpc.max_message_bytes,
        "max_prompt_tokens": l.request.max_prompt_tokens,
        "max_stop_strings": l.request.max_stop_strings,
        "max_stop_string_bytes": l.request.max_stop_string_bytes,
        "max_logprobs": l.request.max_logprobs,
        "max_choices": l.request.max_choices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        limits: LimitArgs,
    }

    #[test]
    fn defaults_are_the_named_constants_and_bad_values_name_the_flag() {
        let l = Cli::try_parse_from(["moe"])
            .unwrap()
            .limits
            .limits()
            .unwrap();
        assert_eq!(l, Limits::default());
        let e = Cli::try_parse_from(["moe", "--max-logprobs", "50"])
            .unwrap()
            .limits
            .limits()
            .unwrap_err();
        assert!(e.to_string().contains("--max-logprobs"), "{e}");
        let l = Cli::try_parse_from(["moe", "--max-prompt-tokens", "100"])
            .unwrap()
            .limits
            .limits()
            .unwrap();
        assert_eq!(l.request.max_prompt_tokens, Some(100));
    }
}
