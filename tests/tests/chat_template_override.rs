//! A checkpoint without a chat template answers chat requests with a 400 that says so (in
//! OpenAI's error shape), and `--chat-template FILE` gives it one.

use moe_tests::{http, path_str, tiny_checkpoint, Proc};
use serde_json::Value;

const CHAT: &str =
    r#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":2,"temperature":0}"#;

#[test]
fn chat_needs_a_template_and_the_flag_supplies_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 3);
    let cfg_path = model.join("tokenizer_config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("read")).expect("json");
    cfg.as_object_mut().expect("object").remove("chat_template");
    std::fs::write(&cfg_path, cfg.to_string()).expect("write");

    let serve = Proc::serve(&model, &[]);
    let (code, body) = http(serve.http, "POST", "/v1/chat/completions", Some(CHAT));
    assert_eq!(code, 400, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON error");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
    assert!(body.contains("chat template"), "{body}");
    drop(serve);

    let template = dir.path().join("chat.jinja");
    std::fs::write(
        &template,
        "{{ bos_token }}{% for m in messages %}{{ m.role.upper() }}: {{ m.content }}\n{% endfor %}ASSISTANT:",
    )
    .expect("write template");
    let serve = Proc::serve(&model, &["--chat-template", path_str(&template)]);
    let (code, body) = http(serve.http, "POST", "/v1/chat/completions", Some(CHAT));
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["object"], "chat.completion", "{body}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant", "{body}");
    assert_eq!(v["usage"]["completion_tokens"], 2, "{body}");
}
