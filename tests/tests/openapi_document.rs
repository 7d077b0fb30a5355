//! `/openapi.json` against `moe serve`: a valid OpenAPI document (openapi-spec-validator
//! from PyPI), describing every route of the OpenAI API, and real answers of the server
//! (completions, streamed chunks, chat, models, an error) validate against the schemas it
//! names (jsonschema). Runs `tests/python/openapi_check.py` with the clients' venv.

use moe_tests::python::run_client_script;
use moe_tests::{tiny_checkpoint, Proc};

#[test]
fn the_openapi_document_is_valid_and_real_answers_fit_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 13);
    let serve = Proc::serve(&model, &[]);
    run_client_script(
        "openapi_check.py",
        &[format!("http://{}", serve.http)],
        || serve.describe(),
    );
}
