//! `Generate` streams tokens as they are produced: the first token reaches the client
//! while the request is still running (the server reports it running, nothing final has
//! arrived). Dropping the stream cancels the request: the server frees its sequence and
//! KV cache and counts it as cancelled, while the client's connection stays open.

use moe_tests::{
    generation_client, metric_value, metrics, tiny_checkpoint, wait_until, GreedyReq, Proc,
    PATIENCE,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stream_as_produced_and_dropping_the_stream_cancels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 21);
    let serve = Proc::serve(&model, &[]);

    let mut client = generation_client(serve.grpc).await;
    let mut stream = client
        .generate(GreedyReq::ids(vec![5, 6, 7], 400).to_proto())
        .await
        .expect("Generate accepted")
        .into_inner();
    let first = loop {
        let msg = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("a message in time")
            .expect("stream ok")
            .expect("stream ended before any token");
        if !msg.tokens.is_empty() {
            break msg;
        }
    };
    assert_eq!(
        first.finish_reason, 0,
        "first message is not final: {first:?}"
    );
    assert!(first.usage.is_none(), "usage only on the final message");

    // The token reached us while the request is still running on the server.
    let text = metrics(serve.http);
    assert_eq!(
        metric_value(&text, "moe_num_requests_running"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, r#"moe_requests_total{outcome="ok"}"#).unwrap_or(0.0),
        0.0,
        "nothing has finished yet:\n{text}"
    );
    assert!(
        metric_value(&text, "moe_generation_tokens_total").unwrap_or(0.0) < 400.0,
        "not all tokens are produced yet:\n{text}"
    );
    assert!(
        metric_value(&text, "moe_kv_cache_usage_ratio").unwrap_or(0.0) > 0.0,
        "a running request holds KV cache:\n{text}"
    );

    // Cancel: drop the stream, keep the connection.
    drop(stream);
    let mut last = String::new();
    let freed = wait_until(PATIENCE, || {
        last = metrics(serve.http);
        metric_value(&last, "moe_num_requests_running") == Some(0.0)
            && metric_value(&last, "moe_kv_cache_usage_ratio") == Some(0.0)
            && metric_value(&last, r#"moe_requests_total{outcome="cancelled"}"#).unwrap_or(0.0)
                >= 1.0
    });
    assert!(
        freed,
        "the cancelled request was not freed and counted within {PATIENCE:?}:\n{last}"
    );
    assert_eq!(
        metric_value(&last, r#"moe_requests_total{outcome="ok"}"#).unwrap_or(0.0),
        0.0,
        "the cancelled request must not count as finished:\n{last}"
    );

    // The same connection still serves a new request.
    let mut again = client
        .generate(GreedyReq::ids(vec![5, 6, 7], 3).to_proto())
        .await
        .expect("Generate accepted")
        .into_inner();
    let mut n = 0;
    while let Some(m) = again.message().await.expect("stream ok") {
        n += m.tokens.len();
    }
    assert_eq!(n, 3);
}
