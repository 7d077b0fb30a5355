//! `moe checkpoint new` and `moe generate` as a user runs them: a JSONL file of mixed
//! good and bad requests in, one result line per input line out, in order; bad lines get
//! an error naming what was wrong while the rest still run; the same greedy request gives
//! the same tokens alone or in a batch; the same seed gives the same sample.

use std::path::Path;

use moe_tests::run_moe;
use serde_json::{json, Value};

fn generate(model: &Path, lines: &[String], extra: &[&str]) -> Vec<Value> {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").expect("write input");
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().expect("utf-8 path"),
        "--input",
        input.to_str().expect("utf-8 path"),
        "--output",
        output.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    run_moe(&args, true);
    std::fs::read_to_string(&output)
        .expect("read output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("output line is JSON"))
        .collect()
}

#[test]
fn generate_runs_a_mixed_file_in_order_and_reports_bad_lines() {
    let ck = tempfile::tempdir().expect("tempdir");
    let model = ck.path().join("dsv3");
    let out = run_moe(
        &[
            "checkpoint",
            "new",
            "--arch",
            "deepseek_v3",
            "--out",
            model.to_str().expect("path"),
            "--seed",
            "5",
        ],
        true,
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("random weights"));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(model.join(f).exists(), "{f} missing");
    }

    let greedy = json!({"prompt": "The café opens at nine", "max_tokens": 8, "temperature": 0, "logprobs": 3}).to_string();
    let ids =
        json!({"prompt_token_ids": [7, 8, 9, 10], "max_tokens": 5, "temperature": 0}).to_string();
    let seeded = json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 42}).to_string();
    let lines = vec![
        greedy.clone(),
        "{not json".to_owned(),
        ids.clone(),
        json!({"prompt": "x", "tempreature": 0.5}).to_string(),
        json!({"prompt": "x", "temperature": -1}).to_string(),
        json!({"prompt": ""}).to_string(),
        seeded.clone(),
        json!({"prompt_token_ids": [4, 99999]}).to_string(),
        seeded.clone(),
        json!({"prompt": "stop me", "max_tokens": 0}).to_string(),
    ];
    let out = generate(&model, &lines, &[]);
    assert_eq!(out.len(), lines.len());
    for (i, v) in out.iter().enumerate() {
        assert_eq!(v["index"], json!(i));
    }
    let err = |i: usize| {
        out[i]["error"]
            .as_str()
            .unwrap_or_else(|| panic!("line {i} should be an error: {}", out[i]))
            .to_owned()
    };
    assert!(err(1).contains("line 2"), "{}", err(1));
    assert!(err(3).contains("tempreature"), "{}", err(3));
    assert!(err(4).contains("temperature"), "{}", err(4));
    assert!(err(5).contains("prompt"), "{}", err(5));
    assert!(err(7).contains("prompt_token_ids"), "{}", err(7));
    assert!(err(9).contains("max_tokens"), "{}", err(9));

    // Good lines: token counts, finish reasons, logprobs shape.
    assert_eq!(out[0]["token_ids"].as_array().map(Vec::len), Some(8));
    assert_eq!(out[0]["finish_reason"], json!("length"));
    let lp = out[0]["logprobs"].as_array().expect("logprobs asked for");
    assert_eq!(lp.len(), 8);
    for (t, entry) in lp.iter().enumerate() {
        assert_eq!(entry["token_id"], out[0]["token_ids"][t]);
        let top = entry["top_logprobs"].as_array().expect("top list");
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token_id"], entry["token_id"]);
        assert!(entry["logprob"].as_f64().expect("number") <= 0.0);
    }
    assert!(out[2].get("logprobs").is_none(), "logprobs only when asked");
    assert_eq!(out[2]["token_ids"].as_array().map(Vec::len), Some(5));
    assert_eq!(
        out[6]["token_ids"], out[8]["token_ids"],
        "same seed, same sample"
    );
    assert_eq!(out[6]["text"], out[8]["text"]);

    // The same greedy requests alone give the same tokens as inside the batch.
    let alone = generate(&model, &[greedy, ids], &[]);
    assert_eq!(alone[0]["token_ids"], out[0]["token_ids"]);
    assert_eq!(alone[1]["token_ids"], out[2]["token_ids"]);
    // And with a tiny step budget (chunked prefill, one sequence at a time).
    let chunked = generate(
        &model,
        &lines,
        &["--max-batch-tokens", "3", "--max-running", "1"],
    );
    assert_eq!(chunked[0]["token_ids"], out[0]["token_ids"]);
    assert_eq!(chunked[2]["token_ids"], out[2]["token_ids"]);
    assert_eq!(chunked[6]["token_ids"], out[6]["token_ids"]);
}

#[test]
fn stop_strings_and_bf16_compute() {
    let ck = tempfile::tempdir().expect("tempdir");
    let model = ck.path().join("mixtral");
    run_moe(
        &[
            "checkpoint",
            "new",
            "--arch",
            "mixtral",
            "--out",
            model.to_str().expect("path"),
            "--seed",
            "9",
        ],
        true,
    );
    let base = json!({"prompt": "Hello", "max_tokens": 12, "temperature": 0}).to_string();
    let full = generate(&model, std::slice::from_ref(&base), &[]);
    let text = full[0]["text"].as_str().expect("text").to_owned();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 4, "need some text to cut: {text:?}");
    // Stop on a piece from the middle of the greedy text: output ends right before it.
    let cut: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let stopped = generate(
        &model,
        &[
            json!({"prompt": "Hello", "max_tokens": 12, "temperature": 0, "stop": [cut.clone()]})
                .to_string(),
        ],
        &[],
    );
    assert_eq!(stopped[0]["finish_reason"], json!("stop"));
    let want = &text[..text.find(&cut).expect("cut is in text")];
    assert_eq!(stopped[0]["text"].as_str(), Some(want));

    let bf16 = generate(&model, &[base], &["--dtype", "bf16"]);
    assert_eq!(bf16[0]["token_ids"].as_array().map(Vec::len), Some(12));
    assert!(run_moe(
        &[
            "generate",
            "--model",
            "/nonexistent",
            "--input",
            "x",
            "--output",
            "y"
        ],
        false
    )
    .stderr
    .windows(11)
    .any(|w| w == b"config.json"));
}
