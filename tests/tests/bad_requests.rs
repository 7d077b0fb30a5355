//! Bad requests are refused with a status that says what is wrong, and the server keeps
//! serving: each invalid gRPC request gets INVALID_ARGUMENT naming its field; more
//! concurrent requests than the running batch plus the waiting queue hold get
//! RESOURCE_EXHAUSTED; the HTTP API answers 400 for a bad value and for malformed JSON.

use moe_proto::v1::generate_request::Input;
use moe_proto::v1::{Chat, ChatMessage, GenerateRequest, SamplingParameters};
use moe_tests::{
    generate, generation_client, http, metric_value, metrics, names_field, tiny_checkpoint,
    wait_until, GreedyReq, Proc, PATIENCE,
};
use tonic::Code;

fn sampling(f: impl FnOnce(&mut SamplingParameters)) -> Option<SamplingParameters> {
    let mut s = SamplingParameters {
        temperature: Some(0.0),
        ..Default::default()
    };
    f(&mut s);
    Some(s)
}

fn chat(messages: &[(&str, &str)]) -> Chat {
    Chat {
        messages: messages
            .iter()
            .map(|(role, content)| ChatMessage {
                role: (*role).into(),
                content: (*content).into(),
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 31);
    let serve = Proc::serve(&model, &["--max-running", "1", "--max-waiting", "1"]);
    let good = || GreedyReq::ids(vec![3, 4, 5], 4).to_proto();

    let cases: Vec<(&str, &str, GenerateRequest)> = vec![
        (
            "empty prompt",
            "prompt",
            GenerateRequest {
                prompt_token_ids: vec![],
                ..good()
            },
        ),
        (
            "600-token prompt (context 512)",
            "prompt",
            GenerateRequest {
                prompt_token_ids: (0..600).map(|i| 3 + i % 500).collect(),
                ..good()
            },
        ),
        (
            "max_tokens 0",
            "max_tokens",
            GenerateRequest {
                max_tokens: 0,
                ..good()
            },
        ),
        (
            "temperature -1",
            "temperature",
            GenerateRequest {
                sampling: sampling(|s| s.temperature = Some(-1.0)),
                ..good()
            },
        ),
        (
            "top_p 1.5",
            "top_p",
            GenerateRequest {
                sampling: sampling(|s| s.top_p = Some(1.5)),
                ..good()
            },
        ),
        (
            "logprobs 50",
            "logprobs",
            GenerateRequest {
                logprobs: Some(50),
                ..good()
            },
        ),
        (
            "token id 999 (vocab 512)",
            "prompt_token_ids",
            GenerateRequest {
                prompt_token_ids: vec![3, 999, 4],
                ..good()
            },
        ),
        (
            "both prompt and prompt_token_ids",
            "prompt",
            GenerateRequest {
                input: Some(Input::Prompt("hello".into())),
                ..good()
            },
        ),
        (
            "a chat with a tool message",
            "messages[1].role",
            GenerateRequest {
                input: Some(Input::Chat(chat(&[("user", "hi"), ("tool", "42")]))),
                prompt_token_ids: vec![],
                ..good()
            },
        ),
        (
            "a chat with no message",
            "messages",
            GenerateRequest {
                input: Some(Input::Chat(chat(&[]))),
                prompt_token_ids: vec![],
                ..good()
            },
        ),
        (
            "both chat and prompt_token_ids",
            "chat",
            GenerateRequest {
                input: Some(Input::Chat(chat(&[("user", "hi")]))),
                ..good()
            },
        ),
        (
            "17 stop strings",
            "stop",
            GenerateRequest {
                stop: (0..17).map(|i| format!("stop{i}")).collect(),
                ..good()
            },
        ),
    ];
    for (what, field, req) in cases {
        match generate(serve.grpc, req).await {
            Ok(msgs) => panic!("{what}: accepted, {} messages", msgs.len()),
            Err(s) => {
                assert_eq!(s.code(), Code::InvalidArgument, "{what}: {s:?}");
                assert!(
                    names_field(s.message(), field),
                    "{what}: the message does not name `{field}`: {:?}",
                    s.message()
                );
            }
        }
    }

    // Overflow: 1 running + 1 waiting, 6 long requests at once.
    let long = GreedyReq::ids(vec![3, 4, 5], 400).to_proto();
    let mut client = generation_client(serve.grpc).await;
    let calls = (0..6).map(|_| {
        let mut c = client.clone();
        let r = long.clone();
        async move { c.generate(r).await }
    });
    let results = futures::future::join_all(calls).await;
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::ResourceExhausted))
        .count();
    for r in &results {
        if let Err(s) = r {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        }
    }
    assert!(refused >= 1, "6 requests fit in 1 running + 1 waiting");
    assert!(refused < 6, "the first request must be accepted");
    // Cancel the accepted ones; the server drains them and serves the next request.
    drop(results);
    let mut last = String::new();
    assert!(
        wait_until(PATIENCE, || {
            last = metrics(serve.http);
            metric_value(&last, "moe_num_requests_running") == Some(0.0)
                && metric_value(&last, "moe_num_requests_waiting") == Some(0.0)
        }),
        "the cancelled requests were not drained:\n{last}"
    );
    assert!(
        metric_value(&last, r#"moe_requests_total{outcome="overloaded"}"#).unwrap_or(0.0) >= 1.0,
        "{last}"
    );
    let msgs = client
        .generate(good())
        .await
        .expect("served after the overflow");
    let mut stream = msgs.into_inner();
    let mut n = 0;
    while let Some(m) = stream.message().await.expect("stream ok") {
        n += m.tokens.len();
    }
    assert_eq!(n, 4);

    // The HTTP API.
    let (code, body) = http(
        serve.http,
        "POST",
        "/v1/completions",
        Some(r#"{"prompt":"x","temperature":-1}"#),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("temperature"), "{body}");
    let (code, body) = http(serve.http, "POST", "/v1/completions", Some("{not json"));
    assert_eq!(code, 400, "{body}");
    let (code, body) = http(
        serve.http,
        "POST",
        "/v1/completions",
        Some(r#"{"prompt":"x","max_tokens":2}"#),
    );
    assert_eq!(code, 200, "{body}");
}
