//! What both OpenAI endpoints share beyond the sampling fields
//! ([`crate::request::SamplingFields`]): `n` and its per-sample seeds, `stream_options`,
//! and parsing a body.

use serde::Deserialize;
use utoipa::ToSchema;

use super::errors::ApiError;

/// `stream_options`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the whole request's `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// `stream_options` only makes sense with `stream: true`.
pub fn check_stream_options(stream: bool, options: &Option<StreamOptions>) -> Result<(), ApiError> {
    if options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "only allowed with `stream: true`",
        ));
    }
    Ok(())
}

/// The seed of sample `i` of `n`: the request's seed plus `i` (wrapping), so sample 0
/// is what the same request with `n: 1` gives and every sample repeats run after run.
pub fn sample_seed(seed: Option<u64>, i: usize) -> Option<u64> {
    seed.map(|s| s.wrapping_add(i as u64))
}

/// Checks `n` against the number of prompts: at most `max_choices` (`--max-choices`)
/// choices in all.
pub fn check_n(n: Option<u32>, prompts: usize, max_choices: usize) -> Result<usize, ApiError> {
    let n = n.unwrap_or(1) as usize;
    if n == 0 {
        return Err(ApiError::invalid("n", "must be at least 1"));
    }
    let choices = n.saturating_mul(prompts);
    if choices > max_choices {
        return Err(ApiError::invalid(
            "n",
            format!("prompts × n is {choices}; at most {max_choices} choices per request"),
        ));
    }
    Ok(n)
}

/// Parses a JSON body into its typed request; a body that is not JSON, or does not fit
/// the type, is a 400 naming `body`. (Unknown fields land in the type's catch-all and are
/// refused by [`crate::request::reject_unknown`].)
pub fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::invalid("body", format!("invalid body: {e}"))
        }
        _ => ApiError::invalid("body", format!("the body is not valid JSON: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_derive_and_n_is_bounded() {
        assert_eq!(sample_seed(Some(7), 0), Some(7));
        assert_eq!(sample_seed(Some(u64::MAX), 1), Some(0));
        assert_eq!(sample_seed(None, 3), None);
        assert!(check_n(Some(0), 1, 128).is_err());
        assert!(check_n(Some(200), 1, 128).is_err());
        assert!(check_n(Some(2), 3, 5).is_err());
        assert!(check_n(Some(u32::MAX), usize::MAX, 128).is_err());
        assert_eq!(check_n(None, 3, 128).unwrap(), 1);
    }

    #[test]
    fn a_body_that_is_not_json_names_the_body() {
        let e = parse::<StreamOptions>(b"{not json").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("body"));
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
    }
}
