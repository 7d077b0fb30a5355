//! The official `openai` Python client (sync and async, `max_retries=0`) against
//! `moe serve`: models list, completions (text, list, token ids, `n`, `echo`, `logprobs`,
//! stop, streaming with usage), chat (plain, streaming, logprobs, multi-turn) and the
//! error classes (`NotFoundError`, `BadRequestError`); and against a router with a
//! worker process and an API key: completion and chat, `AuthenticationError` with a
//! wrong key, `RateLimitError` past its one running and one waiting request. Greedy outputs
//! through the client must equal `moe generate` for the same requests: this test runs
//! `moe generate` first and hands the expected texts and logprobs to
//! `tests/python/openai_client.py`.
//!
//! The Python comes from `$MOE_CLIENTS_PYTHON`, else from `scripts/python-clients.sh`
//! (a cached venv with pinned packages from PyPI).

use std::path::Path;

use moe_tests::python::run_client_script;
use moe_tests::{generate_json, tiny_checkpoint, Proc};
use serde_json::{json, Value};

const MAX_TOKENS: u32 = 8;

/// `moe generate` over `prompts` (greedy, `ignore_eos`, top-2 logprobs): text and
/// chosen-token logprobs of each.
fn offline(model: &Path, prompts: &[Value]) -> Vec<Value> {
    let reqs: Vec<Value> = prompts
        .iter()
        .map(|p| {
            let mut v = json!({"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": true, "logprobs": 2});
            match p {
                Value::String(s) => v["prompt"] = json!(s),
                ids => v["prompt_token_ids"] = ids.clone(),
            }
            v
        })
        .collect();
    generate_json(model, &reqs)
        .iter()
        .map(|v| {
            let lps: Vec<Value> = v["logprobs"]
                .as_array()
                .expect("logprobs")
                .iter()
                .map(|t| t["logprob"].clone())
                .collect();
            json!({"text": v["text"], "logprobs": lps})
        })
        .collect()
}

#[test]
fn openai_python_client_matches_moe_generate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 9);
    // The chat template `moe checkpoint new` writes for DeepSeek-V3, rendered by hand:
    // BOS once (the template writes it; the server must not add a second).
    let chat = "<|bos|><｜User｜>Hello there<｜Assistant｜>";
    let multi =
        "<|bos|>Be brief.<｜User｜>Hi<｜Assistant｜>Hello!<|eos|><｜User｜>And now?<｜Assistant｜>";
    let prompts = [
        json!("The café opens at"),
        json!("Once upon"),
        json!([5, 6, 7, 8]),
        json!(chat),
        json!(multi),
    ];
    let want = offline(&model, &prompts);
    let key = "sk-openai-test";
    let expected = json!({
        "max_tokens": MAX_TOKENS,
        "api_key": key,
        "models": ["tiny-dsv3", "alias"],
        "text": {"prompt": prompts[0], "want": want[0]},
        "text2": {"prompt": prompts[1], "want": want[1]},
        "ids": {"prompt": prompts[2], "want": want[2]},
        "chat": {"messages": [{"role": "user", "content": "Hello there"}], "want": want[3]},
        "multi": {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And now?"}], "want": want[4]},
    });
    let exp_file = dir.path().join("expected.json");
    std::fs::write(&exp_file, expected.to_string()).expect("write expectations");

    let serve = Proc::serve(&model, &["--served-model-name", "tiny-dsv3,alias"]);
    // A router with its experts on a worker process, an API key, and room for one running
    // and one waiting request (for RateLimitError).
    let worker = Proc::worker(&model, "cpu:0", &[]);
    let router = Proc::router(
        &model,
        &[&worker],
        &["--max-running", "1", "--max-waiting", "1", "--api-key", key],
    );
    run_client_script(
        "openai_client.py",
        &[
            format!("http://{}", serve.http),
            format!("http://{}", router.http),
            exp_file.display().to_string(),
        ],
        || serve.describe() + &router.describe() + &worker.describe(),
    );
}
