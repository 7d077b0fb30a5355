//! API keys: with `--api-keys-file`, `/v1/*` answers 401 in OpenAI's shape without the
//! right `Authorization: Bearer` key and gRPC Generation answers UNAUTHENTICATED without
//! `authorization` metadata, while `/health`, `/metrics` and gRPC health stay open; a
//! rewritten file takes effect on SIGHUP, without a restart.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use moe_tests::{generate, http, tiny_checkpoint, wait_until, GreedyReq, Proc, PATIENCE};
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// GET `path` with an optional bearer key: the status and body. (The harness's `http`
/// sends no custom headers.)
fn get_with_key(addr: SocketAddr, path: &str, key: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, PATIENCE).expect("connect");
    s.set_read_timeout(Some(PATIENCE)).expect("read timeout");
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\r\n"
    )
    .expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("http head");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

async fn grpc_generate(addr: SocketAddr, key: Option<&str>) -> Result<(), tonic::Status> {
    let mut req = tonic::Request::new(GreedyReq::ids(vec![3, 4, 5], 2).to_proto());
    if let Some(k) = key {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    let mut client = moe_tests::generation_client(addr).await;
    let mut stream = client.generate(req).await?.into_inner();
    let mut n = 0;
    while let Some(m) = stream.message().await? {
        n += m.tokens.len();
    }
    assert_eq!(n, 2, "tokens streamed with the right key");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_apis_and_reload_on_sighup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 41);
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "# test keys\nsk-old\n\n").unwrap();
    let serve = Proc::serve(&model, &["--api-keys-file", keys.to_str().unwrap()]);
    assert!(
        !serve.log().contains("sk-old"),
        "a key appears in the log:\n{}",
        serve.log()
    );

    // HTTP: no key, wrong key, right key.
    let (code, body) = get_with_key(serve.http, "/v1/models", None);
    assert_eq!(code, 401, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON error");
    assert_eq!(v["error"]["code"], "invalid_api_key", "{body}");
    assert_eq!(v["error"]["type"], "authentication_error", "{body}");
    assert!(v["error"]["param"].is_null() && v["error"]["message"].is_string());
    assert_eq!(
        get_with_key(serve.http, "/v1/models", Some("sk-wrong")).0,
        401
    );
    let (code, body) = get_with_key(serve.http, "/v1/models", Some("sk-old"));
    assert_eq!(code, 200, "{body}");
    // POST without a key is refused before the body is looked at.
    let (code, _) = http(serve.http, "POST", "/v1/completions", Some("{}"));
    assert_eq!(code, 401);
    // Probes and the scrape are open.
    assert_eq!(http(serve.http, "GET", "/health/live", None).0, 200);
    assert!(wait_until(PATIENCE, || http(
        serve.http, "GET", "/health", None
    )
    .0 == 200));
    assert_eq!(http(serve.http, "GET", "/metrics", None).0, 200);

    // gRPC: Generate needs the metadata; health does not.
    let e = grpc_generate(serve.grpc, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let e = grpc_generate(serve.grpc, Some("sk-wrong"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    grpc_generate(serve.grpc, Some("sk-old"))
        .await
        .expect("with key");
    let e = generate(serve.grpc, GreedyReq::ids(vec![3], 1).to_proto())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", serve.grpc))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("gRPC health is open");

    // Rotate: a new file and SIGHUP.
    std::fs::write(&keys, "sk-new\n").unwrap();
    serve.signal("HUP");
    assert!(
        wait_until(PATIENCE, || {
            get_with_key(serve.http, "/v1/models", Some("sk-new")).0 == 200
        }),
        "the new key never worked after SIGHUP:\n{}",
        serve.log()
    );
    assert_eq!(
        get_with_key(serve.http, "/v1/models", Some("sk-old")).0,
        401
    );
    grpc_generate(serve.grpc, Some("sk-new"))
        .await
        .expect("new key on gRPC");

    // A file that cannot be read keeps the keys in force.
    std::fs::remove_file(&keys).unwrap();
    serve.signal("HUP");
    assert!(wait_until(PATIENCE, || serve
        .log()
        .contains("keeping the previous API keys")));
    assert_eq!(
        get_with_key(serve.http, "/v1/models", Some("sk-new")).0,
        200
    );
    assert!(!serve.log().contains("sk-new"), "a key appears in the log");
}
