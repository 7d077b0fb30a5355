//! Request logs over real processes (a router and a worker, `--log-format json`): every
//! line is one JSON object; every line of a request carries its id (the client's
//! `X-Request-Id` or gRPC `request_id` when it sent one, echoed in the response); a W3C
//! `traceparent` sent over HTTP or gRPC metadata is kept in the router's lines (its trace
//! id) and reaches the worker with the dispatches it caused; a malformed one is dropped
//! and the request is still served.

use std::time::Duration;

use moe_tests::{
    generation_client, http_with_headers, tiny_checkpoint, wait_until, GreedyReq, Proc,
};
use serde_json::Value;

const TRACE_HTTP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const TRACE_GRPC: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
const DEBUG_JSON: [&str; 4] = [
    "--log",
    "info,moe_router=debug,moe_worker=debug",
    "--log-format",
    "json",
];

/// The process's log lines, each parsed (panics on a line that is not JSON).
fn json_lines(p: &Proc) -> Vec<Value> {
    p.log()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"))
        })
        .collect()
}

/// `line.span.KEY` or `line.fields.KEY` as a string.
fn field<'a>(line: &'a Value, key: &str) -> Option<&'a str> {
    line["span"][key]
        .as_str()
        .or_else(|| line["fields"][key].as_str())
}

/// Lines whose request id (in the span or the event) starts with `id`.
fn lines_of<'a>(lines: &'a [Value], id: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| field(l, "request_id").is_some_and(|r| r.starts_with(id)))
        .collect()
}

fn trace_id(traceparent: &str) -> &str {
    &traceparent[3..35]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_and_trace_context_reach_router_and_worker_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 43);
    let worker = Proc::worker(&model, "cpu:0", &DEBUG_JSON);
    let router = Proc::router(&model, &[&worker], &DEBUG_JSON);

    // HTTP, traced, with the client's request id.
    let body = r#"{"prompt": "Trace this request", "max_tokens": 3, "temperature": 0}"#;
    let (status, resp) = http_with_headers(
        router.http,
        "POST",
        "/v1/completions",
        &[("traceparent", TRACE_HTTP), ("X-Request-Id", "traced-http")],
        Some(body),
    );
    assert_eq!(status, 200, "{resp}");
    let resp: Value = serde_json::from_str(&resp).expect("JSON response");
    assert_eq!(
        resp["id"], "cmpl-traced-http",
        "the client's id names the response"
    );

    // HTTP with a malformed traceparent: dropped, and the request is served.
    let (status, resp) = http_with_headers(
        router.http,
        "POST",
        "/v1/completions",
        &[("traceparent", "not-a-trace"), ("X-Request-Id", "untraced")],
        Some(body),
    );
    assert_eq!(status, 200, "{resp}");

    // gRPC, traced through metadata.
    let mut req = GreedyReq::text("Trace over gRPC", 3).to_proto();
    req.request_id = "traced-grpc".into();
    let mut req = tonic::Request::new(req);
    req.metadata_mut()
        .insert("traceparent", TRACE_GRPC.parse().expect("metadata value"));
    let mut stream = generation_client(router.grpc)
        .await
        .generate(req)
        .await
        .expect("Generate accepted")
        .into_inner();
    let mut ids = Vec::new();
    while let Some(m) = stream.message().await.expect("stream") {
        ids.push(m.request_id);
    }
    assert!(ids.iter().all(|i| i == "traced-grpc"), "{ids:?}");

    // The router's lines: the request's id on each, the trace id on each traced one.
    let finished = |lines: &[Value], id: &str| {
        lines_of(lines, id)
            .into_iter()
            .any(|l| l["fields"]["message"] == "request finished")
    };
    assert!(
        wait_until(Duration::from_secs(20), || {
            let lines = json_lines(&router);
            ["traced-http", "untraced", "traced-grpc"]
                .iter()
                .all(|id| finished(&lines, id))
        }),
        "the router never logged every request as finished:\n{}",
        router.log()
    );
    let lines = json_lines(&router);
    for (id, trace) in [("traced-http", TRACE_HTTP), ("traced-grpc", TRACE_GRPC)] {
        let mine = lines_of(&lines, id);
        assert!(
            mine.len() >= 2,
            "{id}: accepted and finished lines expected"
        );
        for l in &mine {
            assert_eq!(
                field(l, "trace_id"),
                Some(trace_id(trace)),
                "{id}: a line without its trace id: {l}"
            );
        }
    }
    let untraced = lines_of(&lines, "untraced");
    assert!(!untraced.is_empty());
    assert!(
        untraced.iter().all(|l| field(l, "trace_id").is_none()),
        "a malformed traceparent must not be kept: {untraced:?}"
    );

    // The worker's dispatch lines carry the trace contexts of the rows they computed.
    let worker_saw = |trace: &str| {
        json_lines(&worker).iter().any(|l| {
            l["span"]["name"] == "dispatch"
                && l["span"]["traceparents"]
                    .as_str()
                    .is_some_and(|t| t.contains(trace))
        })
    };
    assert!(
        wait_until(Duration::from_secs(20), || worker_saw(TRACE_HTTP)
            && worker_saw(TRACE_GRPC)),
        "the worker's logs lack a client's traceparent:\n{}",
        worker.log()
    );
    assert!(
        !worker.log().contains("not-a-trace"),
        "a malformed traceparent reached the worker"
    );
}
