//! `GET /openapi.json`: the OpenAPI 3.1 document of the OpenAI-compatible API, generated
//! (utoipa) from the request and response types the handlers use, so it cannot drift
//! from what is parsed and sent. It is served without a key, like `/health`: it holds no
//! request content.
//!
//! What the types cannot say is added for the model and limits this router serves
//! ([`document_for`]): request bodies accept their listed fields only (the handlers
//! refuse any other), `model` is one of the served names, token ids are inside the
//! vocabulary, and prompts, stop strings, `logprobs` and `n` are within the limits. So
//! what the document allows is, but for rules across fields (`echo` with `logprobs`, a
//! prompt plus `max_tokens` within the context, …), what the server accepts, and a fuzzer
//! working from it (tests/tests/schemathesis_finds_no_server_error.rs) reaches the
//! handlers instead of the parser.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{chat, completions, models, params, responses};
use crate::request;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "moe-cluster OpenAI-compatible API",
        description = "Completions, chat completions and model names over a Mixture-of-Experts \
            serving cluster. With keys configured (`--api-key`, `--api-keys-file`), every \
            `/v1/*` route needs `Authorization: Bearer <key>`."
    ),
    paths(completions::handle, chat::handle, models::list),
    components(schemas(
        completions::CompletionRequest,
        completions::Prompt,
        chat::ChatCompletionRequest,
        chat::Message,
        chat::Content,
        chat::ContentPart,
        request::SamplingFields,
        request::Stop,
        params::StreamOptions,
        responses::Completion,
        responses::CompletionChoice,
        responses::CompletionLogprobs,
        responses::ChatCompletion,
        responses::ChatChoice,
        responses::ChatChunk,
        responses::ChatChunkChoice,
        responses::ChatDelta,
        responses::ChatLogprobs,
        responses::TokenLogprob,
        responses::TopLogprob,
        responses::AssistantMessage,
        responses::Usage,
        responses::Finish,
        responses::ModelList,
        responses::ModelCard,
        responses::ErrorResponse,
        responses::ErrorDetail,
    )),
    modifiers(&BearerKeys),
    security(("api_key" = [])),
    tags((name = "openai", description = "OpenAI-compatible endpoints"))
)]
pub struct ApiDoc;

/// The bearer-key scheme the `/v1/*` routes check.
struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document (its `info.version` is this build's).
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

/// What [`document_for`] needs to know of the router.
pub struct Served<'a> {
    pub names: &'a [String],
    pub vocab_size: usize,
    pub context: usize,
    pub limits: &'a crate::limits::RequestLimits,
}

/// The document for this model and these limits.
pub fn document_for(s: &Served<'_>) -> Value {
    let mut doc = serde_json::to_value(document()).unwrap_or_default();
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return doc;
    };
    let l = s.limits;
    let max_id = s.vocab_size.saturating_sub(1);
    let max_prompt = l.prompt_tokens(s.context);
    let text = json!({"type": "string", "minLength": 1});
    let ids = json!({"type": "array", "minItems": 1, "maxItems": max_prompt,
        "items": {"type": "integer", "minimum": 0, "maximum": max_id}});
    schemas.insert(
        "Prompt".into(),
        json!({"description": "One prompt or a list: text, or token ids.", "oneOf": [
            text, {"type": "array", "minItems": 1, "items": text},
            ids, {"type": "array", "minItems": 1, "items": ids}]}),
    );
    let stop = json!({"type": "string", "minLength": 1,
        "maxLength": l.max_stop_string_bytes});
    schemas.insert(
        "Stop".into(),
        json!({"description": "`stop`: one string or a list.", "oneOf": [
            stop, {"type": "array", "maxItems": l.max_stop_strings, "items": stop}]}),
    );
    let sampling = schemas
        .get("SamplingFields")
        .and_then(|v| v.get("properties"))
        .cloned()
        .unwrap_or_default();
    let mut model_names: Vec<Value> = s.names.iter().map(|n| json!(n)).collect();
    model_names.extend([json!(""), Value::Null]);
    for (name, counts) in [
        ("CompletionRequest", &["logprobs", "n"][..]),
        ("ChatCompletionRequest", &["top_logprobs", "n"][..]),
    ] {
        let Some(schema) = schemas.get_mut(name) else {
            continue;
        };
        *schema = closed(schema, &sampling);
        let props = &mut schema["properties"];
        props["model"]["enum"] = json!(model_names);
        for field in counts {
            props[field]["maximum"] = json!(match *field {
                "n" => l.max_choices as u64,
                _ => u64::from(l.max_logprobs),
            });
        }
        props["stop_token_ids"]["items"]["maximum"] = json!(max_id);
    }
    for (path, chunk) in [
        ("/v1/completions", "Completion"),
        ("/v1/chat/completions", "ChatChunk"),
    ] {
        let pointer = format!(
            "/paths/{}/post/responses/200/content/text~1event-stream",
            path.replace('/', "~1")
        );
        if let Some(media) = doc.pointer_mut(&pointer) {
            media["schema"] = sse_event(chunk);
        }
    }
    doc
}

/// One server-sent event of a stream (Open API 3.1 describes a stream by its events):
/// `data` is a chunk as JSON (an `ErrorResponse` when the request fails midway), and
/// `[DONE]` last.
fn sse_event(chunk: &str) -> Value {
    let refs = |names: &[&str]| -> Vec<Value> {
        names
            .iter()
            .map(|n| json!({"$ref": format!("#/components/schemas/{n}")}))
            .collect()
    };
    json!({"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"oneOf": refs(&[chunk, "ErrorResponse"])},
                 "description": "the chunk as JSON; `[DONE]` in the last event"},
        "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}})
}

/// A body schema rendered as `allOf` (its own fields and the flattened sampling fields)
/// as one object of all those fields and no other.
fn closed(schema: &Value, sampling: &Value) -> Value {
    let mut properties = sampling.as_object().cloned().unwrap_or_default();
    let mut required = Vec::new();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        if let Some(p) = part["properties"].as_object() {
            properties.extend(p.clone());
        }
        if let Some(r) = part["required"].as_array() {
            required.extend(r.iter().cloned());
        }
    }
    json!({"type": "object", "description": schema["description"], "required": required,
        "properties": properties, "additionalProperties": false})
}

pub async fn serve(State(s): State<super::HttpState>) -> Json<Value> {
    Json(document_for(&Served {
        names: &s.api.served_model_names,
        vocab_size: s.api.spec.vocab_size,
        context: s.api.spec.max_position_embeddings,
        limits: &s.api.limits,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_has_every_route_and_the_flattened_sampling_fields() {
        let doc = serde_json::to_value(document()).unwrap();
        for path in ["/v1/completions", "/v1/chat/completions", "/v1/models"] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        let text = doc["components"]["schemas"]["CompletionRequest"].to_string();
        // Sampling fields come in through `#[serde(flatten)]`; the catch-all does not.
        assert!(text.contains("SamplingFields"), "{text}");
        assert!(!text.contains("\"rest\""), "{text}");
        let sampling = doc["components"]["schemas"]["SamplingFields"].to_string();
        assert!(sampling.contains("top_k") && sampling.contains("temperature"));
        assert_eq!(
            doc["components"]["securitySchemes"]["api_key"]["scheme"],
            "bearer"
        );
    }

    #[test]
    fn the_served_document_closes_bodies_and_states_the_limits() {
        let limits = crate::limits::RequestLimits {
            max_prompt_tokens: Some(100),
            max_logprobs: 5,
            ..Default::default()
        };
        let doc = document_for(&Served {
            names: &["tiny".to_owned()],
            vocab_size: 512,
            context: 512,
            limits: &limits,
        });
        let s = &doc["components"]["schemas"];
        for body in ["CompletionRequest", "ChatCompletionRequest"] {
            assert_eq!(s[body]["additionalProperties"], false, "{body}");
            let p = &s[body]["properties"];
            assert!(
                p["top_k"].is_object() && p["stream"].is_object(),
                "{body}: {p}"
            );
            assert_eq!(p["model"]["enum"], json!(["tiny", "", null]), "{body}");
            assert_eq!(p["n"]["maximum"], 128, "{body}");
        }
        assert_eq!(s["CompletionRequest"]["required"], json!(["prompt"]));
        assert_eq!(
            s["CompletionRequest"]["properties"]["logprobs"]["maximum"],
            5
        );
        assert_eq!(s["Prompt"]["oneOf"][2]["maxItems"], 100);
        assert_eq!(s["Prompt"]["oneOf"][2]["items"]["maximum"], 511);
        assert_eq!(s["Stop"]["oneOf"][1]["maxItems"], 16);
    }
}
