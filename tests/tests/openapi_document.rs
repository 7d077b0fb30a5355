//! `/openapi.json` against `moe serve`: a valid OpenAPI document (openapi-spec-validator
//! from PyPI), describing every route of the OpenAI API, and real answers of the server
//! (completions, streamed chunks, chat, models, an error) validate against the schemas it
//! names (jsonschema). Runs `tests/python/openapi_check.py` with the clients' venv.

use std::process::Command;

use moe_tests::python::{clients_python, repo_root};
use moe_tests::{tiny_checkpoint, Proc};

#[test]
fn the_openapi_document_is_valid_and_real_answers_fit_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 13);
    let serve = Proc::serve(&model, &[]);
    let python = clients_python();
    let script = repo_root().join("tests/python/openapi_check.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(format!("http://{}", serve.http))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "`{python} {} …` failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}\n--- server ---\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        serve.describe()
    );
}
