//! Model names: `/v1/models` lists every served name (`--served-model-name`, default the
//! checkpoint folder's name), and a request naming another model gets OpenAI's 404
//! `model_not_found`. A request without `model` gets the first name.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::HttpState;

pub async fn list(State(s): State<HttpState>) -> Json<Value> {
    let data: Vec<Value> = s
        .api
        .served_model_names
        .iter()
        .map(|name| {
            json!({"id": name, "object": "model", "created": s.created, "owned_by": "moe-cluster",
                   "root": name, "architecture": s.api.spec.arch.hf_class(),
                   "max_model_len": s.api.spec.max_position_embeddings})
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// The name to answer with: the requested one when served, the first when none is given.
pub fn resolve(s: &HttpState, requested: Option<&str>) -> Result<String, ApiError> {
    let names = &s.api.served_model_names;
    match requested {
        None | Some("") => Ok(names.first().cloned().unwrap_or_default()),
        Some(m) if names.iter().any(|n| n == m) => Ok(m.to_owned()),
        Some(m) => Err(ApiError::model_not_found(m, names)),
    }
}
