//! The HTTP API's answers as types: the handlers build these, and `/openapi.json`
//! ([`super::openapi`]) describes the same types, so the document cannot drift from what
//! is sent. Field names and nulls follow OpenAI's API (a streamed chunk carries
//! `"finish_reason": null` until its last one, as clients expect).

use std::collections::BTreeMap;

use moe_model::FinishReason;
use serde::Serialize;
use utoipa::ToSchema;

/// Why a choice ended.
#[derive(Debug, Clone, Copy, Serialize, ToSchema, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// A stop string, a stop token or the end-of-sequence token.
    Stop,
    /// `max_tokens`, or the end of the context.
    Length,
}

impl From<FinishReason> for Finish {
    fn from(r: FinishReason) -> Finish {
        match r {
            FinishReason::Stop => Finish::Stop,
            FinishReason::Length => Finish::Length,
        }
    }
}

/// Token counts of a whole request (each prompt counted once, not once per sample).
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// Completions' `logprobs`: one entry per generated token in each list.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's log-probability under the model.
    pub token_logprobs: Vec<f32>,
    /// Each token's most likely alternatives, text → log-probability.
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Each token's character offset in the choice's text.
    pub text_offset: Vec<usize>,
}

/// One choice of a completion (or of a streamed chunk).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    /// prompt index × n + sample index.
    pub index: usize,
    pub text: String,
    /// The generated token ids (whole answers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<Finish>,
}

/// `text_completion`: a whole answer, or one server-sent event of a stream.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    /// Always `text_completion`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    /// In a whole answer; in a stream only in the last chunk, with
    /// `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One alternative token of chat `logprobs`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// One generated token of chat `logprobs`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    /// The `top_logprobs` most likely tokens at this position.
    pub top_logprobs: Vec<TopLogprob>,
}

/// Chat `logprobs`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

/// The assistant's message of a whole chat answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: String,
    pub content: String,
}

/// One choice of a whole chat answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<Finish>,
}

/// `chat.completion`: a whole chat answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// What a streamed chat chunk adds to its choice: the role first, then content.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a streamed chat chunk.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<Finish>,
}

/// `chat.completion.chunk`: one server-sent event of a streamed chat answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunk {
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Only in the last chunk, with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One served model name.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    /// The name to send as `model`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// When the server started (Unix seconds).
    pub created: u64,
    pub owned_by: String,
    pub root: String,
    /// The checkpoint's Hugging Face architecture class.
    pub architecture: String,
    /// The context length, tokens (prompt plus completion).
    pub max_model_len: usize,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// The error itself.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error`,
    /// `service_unavailable_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// `model_not_found`, `invalid_api_key`, `rate_limit_exceeded`, …
    pub code: Option<String>,
}

/// Every error answer, in OpenAI's shape.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

/// One server-sent event's data: the value as JSON text.
pub fn event_data<T: Serialize>(v: &T) -> String {
    // These types hold only strings, numbers and string-keyed maps: serialising cannot
    // fail; if it ever did, the client gets an error event rather than a broken line.
    serde_json::to_string(v).unwrap_or_else(|e| {
        format!(
            r#"{{"error":{{"message":"serialising the event failed: {}","type":"server_error","param":null,"code":null}}}}"#,
            e.to_string().replace('"', "'")
        )
    })
}
