//! Model names: `/v1/models` lists every served name (`--served-model-name`, default the
//! checkpoint folder's name), and a request naming another model gets OpenAI's 404
//! `model_not_found`. A request without `model` gets the first name.

use axum::extract::State;
use axum::Json;

use super::errors::ApiError;
use super::responses::{ModelCard, ModelList};
use super::HttpState;

/// The served model names.
#[utoipa::path(get, path = "/v1/models", tag = "openai", operation_id = "listModels",
    responses((status = 200, body = ModelList), (status = 401, body = super::responses::ErrorResponse)))]
pub async fn list(State(s): State<HttpState>) -> Json<ModelList> {
    let data = s
        .api
        .served_model_names
        .iter()
        .map(|name| ModelCard {
            id: name.clone(),
            object: "model".into(),
            created: s.created,
            owned_by: "moe-cluster".into(),
            root: name.clone(),
            architecture: s.api.spec.arch.hf_class().to_owned(),
            max_model_len: s.api.spec.max_position_embeddings,
        })
        .collect();
    Json(ModelList {
        object: "list".into(),
        data,
    })
}

/// The name to answer with: the requested one when served, the first when none is given.
pub fn resolve(names: &[String], requested: Option<&str>) -> Result<String, ApiError> {
    match requested {
        None | Some("") => Ok(names.first().cloned().unwrap_or_default()),
        Some(m) if names.iter().any(|n| n == m) => Ok(m.to_owned()),
        Some(m) => Err(ApiError::model_not_found(m, names)),
    }
}
