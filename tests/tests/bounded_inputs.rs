//! Every client-facing limit of `moe serve`, over the real binary with small values:
//! bodies over `--max-body-bytes` get 413 in OpenAI's error shape (declared or chunked);
//! a client silent after connecting, or stalled inside its headers, is disconnected after
//! `--http-header-timeout-secs`; a body that stalls gets 408; prompts over
//! `--max-prompt-tokens`, too many or too long stop strings, `logprobs` over
//! `--max-logprobs` and more choices than `--max-choices` get 400 / INVALID_ARGUMENT
//! naming the field; a gRPC message over `--max-grpc-message-bytes` gets OUT_OF_RANGE.
//! The server serves normally throughout. Bad limit values stop `--check-config` with
//! the flag named, and a router refuses to start on a worker whose
//! `--max-dispatch-rows` is below its `--max-batch-tokens`. (The slow clients write raw
//! bytes on a TCP socket on purpose: no HTTP client can be told to stall mid-header.)

use std::io::{Read, Write};
use std::net::TcpStream;

use moe_proto::v1::GenerateRequest;
use moe_tests::http_client::HttpClient;
use moe_tests::{
    generate, names_field, path_str, run_moe, tiny_checkpoint, GreedyReq, Proc, PATIENCE,
};
use serde_json::{json, Value};
use tonic::Code;

const LIMITS: &[&str] = &[
    "--max-body-bytes",
    "4096",
    "--http-header-timeout-secs",
    "1",
    "--http-body-timeout-secs",
    "1",
    "--max-grpc-message-bytes",
    "65536",
    "--max-prompt-tokens",
    "64",
    "--max-stop-strings",
    "2",
    "--max-stop-string-bytes",
    "8",
    "--max-logprobs",
    "3",
    "--max-choices",
    "4",
];

/// Everything the server sends on `s` until it closes the connection (or PATIENCE).
fn until_closed(mut s: TcpStream) -> String {
    s.set_read_timeout(Some(PATIENCE)).expect("read timeout");
    let mut out = Vec::new();
    let r = s.read_to_end(&mut out);
    assert!(
        !matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            || e.kind() == std::io::ErrorKind::TimedOut),
        "the server kept a slow connection open for {PATIENCE:?}"
    );
    String::from_utf8_lossy(&out).into_owned()
}

fn error_of(status: u16, body: &str, want_status: u16) -> Value {
    assert_eq!(status, want_status, "{body}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    for key in ["message", "type", "param", "code"] {
        assert!(v["error"].get(key).is_some(), "no error.{key}: {body}");
    }
    v["error"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_refuses_with_its_status_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 41);
    let serve = Proc::serve(&model, LIMITS);
    let h1 = HttpClient::http1(serve.http);
    let ok = json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0});

    // Body size: declared, and chunked with no length.
    let big = json!({"prompt": "x".repeat(5000), "max_tokens": 2}).to_string();
    let (status, body) = h1
        .send("POST", "/v1/completions", big.clone())
        .await
        .unwrap();
    let e = error_of(status, &body, 413);
    assert_eq!(e["type"], "invalid_request_error", "{body}");
    assert_eq!(e["code"], "body_too_large", "{body}");
    let chunks = big
        .as_bytes()
        .chunks(1000)
        .map(|c| c.to_vec().into())
        .collect();
    let (status, body) = h1.send_chunks("/v1/completions", chunks).await.unwrap();
    error_of(status, &body, 413);
    let (status, body) = h1.post_json("/v1/completions", &ok).await.unwrap();
    assert_eq!(status, 200, "{body}");

    // Slow clients: silent, stalled in the headers, stalled in the body.
    let silent = TcpStream::connect(serve.http).expect("connect");
    assert_eq!(until_closed(silent), "");
    let mut partial = TcpStream::connect(serve.http).expect("connect");
    partial
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConte")
        .unwrap();
    assert!(!until_closed(partial).contains(" 200 "));
    let mut stalled = TcpStream::connect(serve.http).expect("connect");
    write!(
        stalled,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Connection: close\r\nContent-Length: 100\r\n\r\n{{\"prompt\""
    )
    .unwrap();
    let answer = until_closed(stalled);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");

    // Request fields, over HTTP: each a 400 naming its field.
    let prompt_65: Vec<u32> = (0..65).map(|i| 3 + i).collect();
    let chat = |extra: Value| {
        let mut v = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    let cases: Vec<(&str, &str, Value)> = vec![
        ("/v1/completions", "prompt", json!({"prompt": prompt_65})),
        (
            "/v1/completions",
            "stop",
            json!({"prompt": "x", "stop": ["a", "b", "c"]}),
        ),
        (
            "/v1/completions",
            "stop",
            json!({"prompt": "x", "stop": "123456789"}),
        ),
        (
            "/v1/completions",
            "logprobs",
            json!({"prompt": "x", "logprobs": 4}),
        ),
        ("/v1/completions", "n", json!({"prompt": "x", "n": 5})),
        (
            "/v1/completions",
            "n",
            json!({"prompt": ["a", "b", "c"], "n": 2}),
        ),
        (
            "/v1/chat/completions",
            "logprobs",
            chat(json!({"logprobs": true, "top_logprobs": 4})),
        ),
        ("/v1/chat/completions", "n", chat(json!({"n": 5}))),
    ];
    for (path, field, body) in cases {
        let (status, text) = h1.post_json(path, &body).await.unwrap();
        let e = error_of(status, &text, 400);
        assert_eq!(e["param"], field, "{path} {body}: {text}");
    }
    // Exactly at the limits is fine.
    let at_limits = json!({"prompt": (0..64).map(|i| 3 + i).collect::<Vec<u32>>(),
        "max_tokens": 2, "stop": ["12345678", "b"], "logprobs": 3, "n": 4});
    let (status, text) = h1.post_json("/v1/completions", &at_limits).await.unwrap();
    assert_eq!(status, 200, "{text}");

    // The same over gRPC: INVALID_ARGUMENT naming the field; a message over the size
    // limit: OUT_OF_RANGE (tonic's code for it).
    let good = || GreedyReq::ids(vec![3, 4, 5], 2).to_proto();
    let grpc_cases: Vec<(&str, GenerateRequest)> = vec![
        (
            "prompt",
            GenerateRequest {
                prompt_token_ids: (0..65).map(|i| 3 + i).collect(),
                ..good()
            },
        ),
        (
            "stop",
            GenerateRequest {
                stop: vec!["a".into(), "b".into(), "c".into()],
                ..good()
            },
        ),
        (
            "logprobs",
            GenerateRequest {
                logprobs: Some(4),
                ..good()
            },
        ),
    ];
    for (field, req) in grpc_cases {
        let s = generate(serve.grpc, req).await.expect_err(field);
        assert_eq!(s.code(), Code::InvalidArgument, "{field}: {s:?}");
        assert!(names_field(s.message(), field), "{field}: {s:?}");
    }
    let huge = GenerateRequest {
        prompt_token_ids: vec![300; 40_000],
        ..good()
    };
    let s = generate(serve.grpc, huge).await.expect_err("over 64 KiB");
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
    let msgs = generate(serve.grpc, good())
        .await
        .expect("served after all that");
    assert_eq!(msgs.iter().map(|m| m.tokens.len()).sum::<usize>(), 2);
}

#[test]
fn bad_limit_values_stop_the_start_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 42);
    let m = path_str(&model);
    for (flag, value, says) in [
        ("--max-logprobs", "50", "--max-logprobs"),
        ("--max-prompt-tokens", "512", "context of 512"),
        ("--max-concurrent-streams", "0", "--max-concurrent-streams"),
        (
            "--http-header-timeout-secs",
            "0",
            "--http-header-timeout-secs",
        ),
    ] {
        let out = run_moe(
            &["serve", "--model", m, flag, value, "--check-config"],
            false,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{flag} {value}: {err}");
    }
    let out = run_moe(
        &[
            "worker",
            "--model",
            m,
            "--max-dispatch-rows",
            "0",
            "--insecure",
            "--check-config",
        ],
        false,
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-dispatch-rows"));

    // A worker that takes fewer rows than the router's steps can hold: the router says so.
    let worker = Proc::worker(&model, "cpu:0", &["--max-dispatch-rows", "64"]);
    let w = worker.grpc.to_string();
    let out = run_moe(
        &[
            "router",
            "--model",
            m,
            "--workers",
            &w,
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--max-batch-tokens",
            "512",
            "--startup-timeout-secs",
            "30",
            "--insecure",
        ],
        false,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--max-dispatch-rows") && err.contains("--max-batch-tokens"),
        "{err}\n{}",
        worker.describe()
    );
}
