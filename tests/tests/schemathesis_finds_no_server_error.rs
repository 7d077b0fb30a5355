//! Schemathesis (PyPI, in the clients' venv) fuzzes `moe serve` from its own OpenAPI
//! document (`GET /openapi.json`): every operation, examples from the schemas, their
//! boundaries and random bodies valid and invalid, a bounded number per operation. No
//! answer may be a 5xx (`not_a_server_error`), and every answer must be one the document
//! describes: a listed status (`status_code_conformance`), its content type
//! (`content_type_conformance`) and its schema (`response_schema_conformance`).

use std::process::Command;

use moe_tests::python::clients_python;
use moe_tests::{tiny_checkpoint, Proc};

/// Test cases per operation and phase; the run stays well under a minute.
const MAX_EXAMPLES: &str = "30";

#[test]
fn schemathesis_finds_no_server_error_and_no_undocumented_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 17);
    // Small answers: fuzzed bodies may ask for the whole context of many choices.
    let serve = Proc::serve(&model, &["--max-choices", "8"]);
    let python = clients_python();
    let bin = std::path::Path::new(&python)
        .parent()
        .expect("the venv's bin folder")
        .join("schemathesis");
    let schema = format!("http://{}/openapi.json", serve.http);
    let args = [
        "run",
        &schema,
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        MAX_EXAMPLES,
        "--seed",
        "1",
        "--request-timeout",
        "60",
        "--workers",
        "2",
    ];
    // Its reports and caches go into a folder of the test's own.
    let out = Command::new(&bin)
        .args(args)
        .current_dir(dir.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "`{} {}` failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}\n{}",
        bin.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        serve.describe()
    );
    println!("{stdout}");
}
