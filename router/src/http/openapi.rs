//! `GET /openapi.json`: the OpenAPI 3.1 document of the OpenAI-compatible API, generated
//! (utoipa) from the request and response types the handlers use, so it cannot drift
//! from what is parsed and sent. It is served without a key, like `/health`: it holds no
//! request content.

use axum::Json;
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

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(document())
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
}
