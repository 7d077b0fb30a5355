//! A router whose engine thread dies does not hang anyone: with the engine made to panic
//! mid-stream (`--test-engine-panic-at-step`, a hidden test hook), the streaming request
//! ends with INTERNAL naming the stopped engine, gRPC health (`""`, `moe.v1.Generation`
//! and `liveness`) turns NOT_SERVING, `/health` and `/health/live` answer 503, new
//! requests are refused (gRPC INTERNAL, HTTP 500 in OpenAI's error shape), and
//! `moe_engine_stopped` is 1. The deadlines below only keep a broken build from hanging
//! CI; nothing here waits on them when the router behaves.

use moe_tests::health::wait_grpc_health as wait_health;
use moe_tests::{
    generation_client, http, metric_value, metrics, tiny_checkpoint, GreedyReq, Proc, PATIENCE,
};
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_engine_fails_its_requests_and_turns_not_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 97);
    let mut serve = Proc::serve(&model, &["--test-engine-panic-at-step", "6"]);
    wait_health(serve.grpc, "", ServingStatus::Serving).await;

    // A stream that gets some tokens, then the engine panics before its 6th step.
    let mut client = generation_client(serve.grpc).await;
    let mut stream = client
        .generate(GreedyReq::ids(vec![5, 6, 7], 200).to_proto())
        .await
        .expect("Generate accepted")
        .into_inner();
    let mut tokens = 0;
    let status = loop {
        match tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("the stream neither ended nor failed: it hangs")
        {
            Ok(Some(msg)) => {
                assert_eq!(msg.finish_reason, 0, "finished before the panic: {msg:?}");
                tokens += msg.tokens.len();
            }
            Ok(None) => panic!("the stream ended without an error after {tokens} tokens"),
            Err(status) => break status,
        }
    };
    assert!(tokens > 0, "the panic came before any token was streamed");
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert!(
        status.message().contains("engine stopped"),
        "the error does not say the engine stopped: {status:?}"
    );

    // Health: not ready, and not live either (only a restart brings the engine back).
    for service in ["", "moe.v1.Generation", "liveness"] {
        wait_health(serve.grpc, service, ServingStatus::NotServing).await;
    }
    let (code, body) = http(serve.http, "GET", "/health", None);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("engine stopped"), "{body}");
    let (code, body) = http(serve.http, "GET", "/health/live", None);
    assert_eq!(code, 503, "{body}");

    // New requests are refused at once, over both APIs.
    let refused = tokio::time::timeout(
        PATIENCE,
        client.generate(GreedyReq::ids(vec![1, 2], 4).to_proto()),
    )
    .await
    .expect("a new request hangs");
    let status = match refused {
        Err(s) => s,
        Ok(resp) => {
            let mut stream = resp.into_inner();
            match tokio::time::timeout(PATIENCE, stream.message())
                .await
                .expect("a new request's stream hangs")
            {
                Err(s) => s,
                Ok(m) => panic!("a new request was not refused: {m:?}"),
            }
        }
    };
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert!(status.message().contains("engine stopped"), "{status:?}");
    let (code, body) = http(
        serve.http,
        "POST",
        "/v1/completions",
        Some(r#"{"prompt":"x","max_tokens":2}"#),
    );
    assert_eq!(code, 500, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).expect("a JSON error body");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("engine stopped")),
        "{body}"
    );
    assert!(err["error"]["type"].is_string(), "{body}");

    assert_eq!(
        metric_value(&metrics(serve.http), "moe_engine_stopped"),
        Some(1.0)
    );
    assert!(serve.is_alive(), "the process stays up to answer");
    assert!(
        serve.log().contains("the engine thread panicked"),
        "no log line records the panic:\n{}",
        serve.log()
    );
}
