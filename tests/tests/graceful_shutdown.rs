//! SIGTERM drains `moe serve`: once shutdown has begun (`/health` answers 503) a request
//! that was already streaming still runs to its last token, a new request is refused
//! with UNAVAILABLE (or cannot connect), and the process then exits 0 by itself.

use moe_proto::v1::generation_client::GenerationClient;
use moe_proto::v1::FinishReason;
use moe_tests::{
    generation_client, http, metric_value, metrics, tiny_checkpoint, wait_until, GreedyReq, Proc,
    PATIENCE,
};
use tonic::Code;

// The tiny model makes a token in well under a millisecond, so the in-flight request is
// long (the context is 512) to still be running when the signal has been handled.
const MAX_TOKENS: u32 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 51);
    let mut serve = Proc::serve(&model, &[]);

    let mut client = generation_client(serve.grpc).await;
    let mut stream = client
        .generate(GreedyReq::ids(vec![9, 8, 7], MAX_TOKENS).to_proto())
        .await
        .expect("Generate accepted")
        .into_inner();
    let mut tokens = 0;
    while tokens == 0 {
        let msg = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .expect("a message in time")
            .expect("stream ok")
            .expect("stream ended before any token");
        tokens += msg.tokens.len();
    }

    serve.sigterm();
    assert!(
        wait_until(PATIENCE, || http(serve.http, "GET", "/health", None).0
            == 503),
        "/health never reported shutting down"
    );
    // The scenario only means something if the request was still running then.
    let text = metrics(serve.http);
    assert_eq!(
        metric_value(&text, "moe_num_requests_running"),
        Some(1.0),
        "the request should still be running when shutdown begins:\n{text}"
    );

    // A new request is refused.
    let new = GreedyReq::ids(vec![1, 2, 3], 4).to_proto();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", serve.grpc))
        .expect("endpoint")
        .connect_timeout(PATIENCE);
    if let Ok(channel) = endpoint.connect().await {
        match GenerationClient::new(channel).generate(new).await {
            Ok(_) => panic!("a request after SIGTERM was accepted"),
            Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
        }
    }

    // The in-flight request runs to the end.
    let mut last = None;
    while let Some(msg) = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("a message in time")
        .expect("the in-flight request must not fail during the drain")
    {
        tokens += msg.tokens.len();
        last = Some(msg);
    }
    let last = last.expect("a final message");
    assert_eq!(tokens, MAX_TOKENS as usize);
    assert_eq!(last.finish_reason, FinishReason::Length as i32);
    assert_eq!(last.usage.map(|u| u.completion_tokens), Some(MAX_TOKENS));

    drop(client);
    let status = serve.wait_exit(PATIENCE);
    assert!(
        status.success(),
        "exit status {status}\n{}",
        serve.describe()
    );
}
