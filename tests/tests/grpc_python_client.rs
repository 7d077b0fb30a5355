//! A grpcio client nobody here wrote, with stubs generated from `proto/` at test time by
//! grpcio-tools, against `moe serve` with an API key: streaming Generate for a prompt,
//! token ids and a chat (greedy tokens and text equal to `moe generate`'s for the same
//! prompt; the chat's is the template rendered here by hand), INVALID_ARGUMENT,
//! UNAUTHENTICATED without the key, Tokenize, ModelInfo (served names), `grpc.health.v1`
//! through grpcio-health-checking and the service list through grpcio-reflection, which
//! asks reflection `v1alpha`. Runs `tests/python/grpc_client.py`
//! with `$MOE_CLIENTS_PYTHON`, else the venv of `scripts/python-clients.sh`.

use std::path::Path;

use moe_tests::python::{repo_root, run_client_script};
use moe_tests::{generate_json, tiny_checkpoint, Proc};
use serde_json::{json, Value};

const MAX_TOKENS: u32 = 6;

#[test]
fn grpcio_client_generates_checks_health_and_reflects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 5);
    // The DeepSeek-V3 template `moe checkpoint new` writes, rendered by hand (BOS once).
    let chat_prompt = "<|bos|>Be brief.<｜User｜>Hi there<｜Assistant｜>";
    let prompts = [
        json!("The café opens at"),
        json!([5, 6, 7, 8]),
        json!(chat_prompt),
    ];
    let reqs: Vec<Value> = prompts
        .iter()
        .map(|p| {
            let mut v = json!({"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": true});
            match p {
                Value::String(s) => v["prompt"] = json!(s),
                ids => v["prompt_token_ids"] = ids.clone(),
            }
            v
        })
        .collect();
    let mut cases: Vec<Value> = generate_json(&model, &reqs)
        .iter()
        .zip(&prompts)
        .map(|(v, p)| json!({"prompt": p, "token_ids": v["token_ids"], "text": v["text"]}))
        .collect();
    cases[2]["chat"] = json!([{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Hi there"}]);
    let key = "sk-grpc-test";
    let serve = Proc::serve(
        &model,
        &["--served-model-name", "tiny,alias", "--api-key", key],
    );
    // Tokenize must agree with the checkpoint's tokenizer loaded here.
    let tok_text = "Hello world";
    let expected = json!({
        "max_tokens": MAX_TOKENS,
        "api_key": key,
        "cases": cases,
        "served_model_names": ["tiny", "alias"],
        "tokenize": {"text": tok_text, "ids": tokenize_offline(&model, tok_text)},
    });
    let exp_file = dir.path().join("expected.json");
    std::fs::write(&exp_file, expected.to_string()).expect("write expectations");
    let proto_dir = repo_root().join("proto/proto");
    run_client_script(
        "grpc_client.py",
        &[
            serve.grpc.to_string(),
            proto_dir.display().to_string(),
            exp_file.display().to_string(),
        ],
        || serve.describe(),
    );
}

/// `text` through the tokenizer the checkpoint ships, with special tokens (BOS).
fn tokenize_offline(model: &Path, text: &str) -> Vec<u32> {
    let tok = moe_model::Tokenizer::from_dir(model).expect("tokenizer");
    tok.encode(text, true).expect("encode")
}
