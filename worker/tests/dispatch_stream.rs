//! End-to-end tests of a worker over real sockets: a tiny Mixtral checkpoint, a node with
//! two CPU devices (even experts on `cpu:0`, odd on `cpu:1`), served in-process on
//! 127.0.0.1 port 0, driven by a tonic client with deadlines, and checked against the
//! in-process `LocalExperts`. Every wait has a deadline; nothing sleeps to synchronise.

use std::net::SocketAddr;
use std::time::Duration;

use moe_model::checkpoint::Checkpoint;
use moe_model::experts::{MoeRequest, NO_EXPERT};
use moe_model::tiny::{self, Size, StoreDtype, TinyOptions};
use moe_model::{Arch, ExpertBackend, LocalExperts, ModelSpec, WeightDtype};
use moe_proto::v1::expert_service_client::ExpertServiceClient;
use moe_proto::v1::{
    DType, DeviceAssignment, DispatchRequest, DispatchResponse, ExpertRef, InfoRequest,
    InfoResponse, LoadExpertsRequest, UnloadExpertsRequest,
};
use moe_worker::wire::{decode_rows, encode_rows, RowDtype};
use moe_worker::{serve_worker_with, Node, NodeConfig, WorkerServeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Deadline of every single wait in these tests.
const DEADLINE: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// A worker serving on loopback, and a client connected to it.
struct Worker {
    dir: tempfile::TempDir,
    spec: ModelSpec,
    node: Node,
    grpc: SocketAddr,
    http: SocketAddr,
    shutdown: CancellationToken,
    server: JoinHandle<anyhow::Result<()>>,
    client: ExpertServiceClient<Channel>,
    channel: Channel,
}

fn split_even_odd(spec: &ModelSpec) -> Vec<(String, Vec<(usize, u32)>)> {
    let all = LocalExperts::all_of(spec);
    vec![
        (
            "cpu:0".into(),
            all.iter().copied().filter(|(_, e)| e % 2 == 0).collect(),
        ),
        (
            "cpu:1".into(),
            all.iter().copied().filter(|(_, e)| e % 2 == 1).collect(),
        ),
    ]
}

async fn start_worker(panic_at: Option<u64>) -> Worker {
    // The worker's logs, shown by the test harness when a test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,moe_worker=debug")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let spec = tiny::write(
        dir.path(),
        &TinyOptions {
            arch: Arch::Mixtral,
            size: Size::Tiny,
            dtype: StoreDtype::F32,
            seed: 3,
            max_shard_bytes: None,
        },
    )
    .unwrap();
    let node = Node::start(NodeConfig {
        model_dir: dir.path().to_path_buf(),
        devices: vec!["cpu:0".into(), "cpu:1".into()],
        dtype: WeightDtype::F32,
        worker_id: "worker-test".into(),
        test_panic_at_compute: panic_at,
        threads_per_device: None,
        capacity_bytes: 0,
    })
    .await
    .unwrap();
    within("loading experts", node.load(1, split_even_odd(&spec)))
        .await
        .unwrap();
    let grpc_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc, http) = (grpc_l.local_addr().unwrap(), http_l.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let cfg = WorkerServeConfig {
        drain_timeout: Duration::from_secs(5),
        ..WorkerServeConfig::default()
    };
    let server = tokio::spawn(serve_worker_with(
        node.clone(),
        grpc_l,
        http_l,
        shutdown.clone(),
        cfg,
    ));
    let channel = within(
        "connecting",
        Endpoint::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect_timeout(DEADLINE)
            .tcp_nodelay(true)
            .connect(),
    )
    .await
    .unwrap();
    Worker {
        dir,
        spec,
        node,
        grpc,
        http,
        shutdown,
        server,
        client: ExpertServiceClient::new(channel.clone()),
        channel,
    }
}

impl Worker {
    /// The whole model's experts in-process: the reference the worker must match.
    fn reference(&self, layer: usize, rows: &[f32], ids: &[u32], weights: &[f32]) -> Vec<f32> {
        let ckpt = Checkpoint::open(self.dir.path(), None).unwrap();
        let all = LocalExperts::all_of(&self.spec);
        let experts = LocalExperts::load(&ckpt, &self.spec, &all, WeightDtype::F32).unwrap();
        experts
            .forward(&MoeRequest {
                layer,
                hidden: self.spec.hidden_size,
                top_k: 2,
                rows,
                expert_ids: ids,
                weights,
            })
            .unwrap()
    }

    async fn open_stream(&self) -> Stream {
        let (tx, rx) = mpsc::channel(4);
        let mut client = self.client.clone();
        let responses = within(
            "opening a dispatch stream",
            client.dispatch(ReceiverStream::new(rx)),
        )
        .await
        .unwrap()
        .into_inner();
        Stream { tx, responses }
    }

    async fn info(&self) -> InfoResponse {
        let mut client = self.client.clone();
        within("Info", client.info(InfoRequest {}))
            .await
            .unwrap()
            .into_inner()
    }

    async fn finish(self) {
        self.shutdown.cancel();
        within("the server to drain", self.server)
            .await
            .unwrap()
            .unwrap();
        self.node.stop().await;
        drop(self.dir);
    }
}

/// One open dispatch stream.
struct Stream {
    tx: mpsc::Sender<DispatchRequest>,
    responses: Streaming<DispatchResponse>,
}

impl Stream {
    async fn call(&mut self, req: DispatchRequest) -> DispatchResponse {
        let id = req.request_id;
        within("sending a request", self.tx.send(req))
            .await
            .unwrap();
        let resp = within("a dispatch response", self.responses.message())
            .await
            .unwrap()
            .expect("stream ended early");
        assert_eq!(resp.request_id, id);
        resp
    }
}

/// Deterministic rows and top-2 routing over every expert, with one skipped slot.
fn sample(spec: &ModelSpec, n: usize, seed: usize) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
    let h = spec.hidden_size;
    let e = spec.moe.num_experts as u32;
    let rows = (0..n * h)
        .map(|i| (((i + seed) * 7919 % 1009) as f32 / 504.5) - 1.0)
        .collect();
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    for r in 0..n {
        let a = ((r + seed) as u32) % e;
        ids.extend([a, (a + 1 + (r as u32 % (e - 1))) % e]);
        weights.extend([0.6, 0.4]);
    }
    ids[3] = NO_EXPERT;
    (rows, ids, weights)
}

fn request(
    id: u64,
    spec: &ModelSpec,
    layer: usize,
    (rows, ids, weights): &(Vec<f32>, Vec<u32>, Vec<f32>),
    dtype: RowDtype,
) -> DispatchRequest {
    DispatchRequest {
        request_id: id,
        step_id: 1,
        layer: layer as u32,
        num_rows: (rows.len() / spec.hidden_size) as u32,
        hidden_size: spec.hidden_size as u32,
        dtype: dtype.to_wire() as i32,
        rows: encode_rows(rows, dtype),
        top_k: 2,
        expert_ids: ids.clone(),
        expert_weights: weights.clone(),
        traceparents: Vec::new(),
    }
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        err / scale <= tol,
        "max error {err} vs scale {scale} (tolerance {tol})"
    );
}

fn ok_output(resp: &DispatchResponse, dtype: RowDtype) -> Vec<f32> {
    assert_eq!(resp.error_code, 0, "{}", resp.error_message);
    assert_eq!(resp.dtype, dtype.to_wire() as i32);
    decode_rows(&resp.output, dtype)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_matches_local_experts_in_f32_and_bf16() {
    let w = start_worker(None).await;
    let mut stream = w.open_stream().await;
    let layer = w.spec.moe_layers().last().unwrap();
    let s = sample(&w.spec, 7, 1);

    let resp = stream
        .call(request(1, &w.spec, layer, &s, RowDtype::F32))
        .await;
    assert_eq!(resp.num_rows, 7);
    let want = w.reference(layer, &s.0, &s.1, &s.2);
    assert_close(&ok_output(&resp, RowDtype::F32), &want, 1e-5);

    // bf16 on the wire: the worker computes on the rows as the router rounded them and
    // rounds the result once more.
    let resp = stream
        .call(request(2, &w.spec, layer, &s, RowDtype::Bf16))
        .await;
    let rounded = decode_rows(&encode_rows(&s.0, RowDtype::Bf16), RowDtype::Bf16);
    let want = w.reference(layer, &rounded, &s.1, &s.2);
    assert_close(&ok_output(&resp, RowDtype::Bf16), &want, 1e-2);
    drop(stream);
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_error_codes_and_the_stream_goes_on() {
    let w = start_worker(None).await;
    let mut stream = w.open_stream().await;
    let layer = w.spec.moe_layers().next().unwrap();
    let s = sample(&w.spec, 3, 2);
    let want = w.reference(layer, &s.0, &s.1, &s.2);
    let good = |id| request(id, &w.spec, layer, &s, RowDtype::F32);

    let mut short = good(10);
    short.rows.truncate(short.rows.len() - 3);
    let mut wide = good(11);
    wide.hidden_size += 1;
    let mut wrong_dtype = good(12);
    wrong_dtype.dtype = DType::DtypeUnspecified as i32;
    let mut missing_ids = good(13);
    missing_ids.expert_ids.pop();
    let cases = [
        (short, 3, "rows"),
        (wide, 3, "hidden_size"),
        (wrong_dtype, 3, "dtype"),
        (missing_ids, 3, "expert_ids"),
    ];
    for (i, (bad, code, field)) in cases.into_iter().enumerate() {
        let resp = stream.call(bad).await;
        assert_eq!(resp.error_code, code, "{}", resp.error_message);
        assert!(resp.error_message.contains(field), "{}", resp.error_message);
        assert!(resp.output.is_empty());
        // The next valid request on the same stream still succeeds.
        let resp = stream.call(good(100 + i as u64)).await;
        assert_close(&ok_output(&resp, RowDtype::F32), &want, 1e-5);
    }

    // An expert this worker does not host: NOT_FOUND.
    w.node
        .unload(2, vec![("cpu:1".into(), vec![(layer, 1)])])
        .await
        .unwrap();
    let mut ids = s.1.clone();
    ids[0] = 1;
    let resp = stream
        .call(request(
            20,
            &w.spec,
            layer,
            &(s.0.clone(), ids, s.2.clone()),
            RowDtype::F32,
        ))
        .await;
    assert_eq!(resp.error_code, 5, "{}", resp.error_message);
    let resp = stream.call(good(21)).await;
    assert_close(&ok_output(&resp, RowDtype::F32), &want, 1e-5);

    let metrics = w.node.metrics();
    assert_eq!(
        metrics
            .dispatch_requests
            .with_label_values(&["invalid"])
            .get(),
        4
    );
    assert_eq!(
        metrics
            .dispatch_requests
            .with_label_values(&["not_hosted"])
            .get(),
        1
    );
    assert_eq!(
        metrics.dispatch_requests.with_label_values(&["ok"]).get(),
        5
    );
    drop(stream);
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_panic_is_unavailable_then_the_retry_succeeds() {
    let w = start_worker(Some(1)).await;
    let before = w.info().await;
    let mut stream = w.open_stream().await;
    let layer = w.spec.moe_layers().next().unwrap();
    let s = sample(&w.spec, 5, 3);

    let resp = stream
        .call(request(1, &w.spec, layer, &s, RowDtype::F32))
        .await;
    assert_eq!(resp.error_code, 14, "{}", resp.error_message);
    assert!(
        resp.error_message.contains("restarting"),
        "{}",
        resp.error_message
    );

    // The retry waits for the restarted device, which reloaded its experts.
    let resp = stream
        .call(request(2, &w.spec, layer, &s, RowDtype::F32))
        .await;
    let want = w.reference(layer, &s.0, &s.1, &s.2);
    assert_close(&ok_output(&resp, RowDtype::F32), &want, 1e-5);
    let after = w.info().await;
    assert_eq!(after.devices, before.devices);
    let restarts: u64 = ["cpu:0", "cpu:1"]
        .iter()
        .map(|d| {
            w.node
                .metrics()
                .device_restarts
                .with_label_values(&[d])
                .get()
        })
        .sum();
    assert_eq!(restarts, 1);
    drop(stream);
    w.finish().await;
}

fn refs(experts: &[(usize, u32)]) -> Vec<ExpertRef> {
    experts
        .iter()
        .map(|&(layer, expert)| ExpertRef {
            layer: layer as u32,
            expert,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_load_and_unload_round_trip() {
    let w = start_worker(None).await;
    let info = w.info().await;
    assert_eq!(info.worker_id, "worker-test");
    assert_eq!(info.architecture, "MixtralForCausalLM");
    assert_eq!(info.hidden_size as usize, w.spec.hidden_size);
    assert_eq!(info.placement_version, 1);
    let names: Vec<_> = info.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["cpu:0", "cpu:1"]);
    let half = LocalExperts::all_of(&w.spec).len() / 2;
    for d in &info.devices {
        assert_eq!(d.experts.len(), half);
        assert_eq!(d.expert_bytes, (half * w.spec.expert_bytes_f32()) as u64);
    }
    assert!(info.devices[0].experts.iter().all(|e| e.expert % 2 == 0));

    let layer = w.spec.moe_layers().next().unwrap();
    let moved = vec![(layer, 2u32), (layer, 4)];
    let mut client = w.client.clone();
    let resp = within(
        "LoadExperts",
        client.load_experts(LoadExpertsRequest {
            placement_version: 2,
            assignments: vec![DeviceAssignment {
                device: "cpu:1".into(),
                experts: refs(&moved),
            }],
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let info = resp.info.unwrap();
    assert_eq!(info.placement_version, 2);
    assert_eq!(info.devices[1].experts.len(), half + 2);

    let resp = within(
        "UnloadExperts",
        client.unload_experts(UnloadExpertsRequest {
            placement_version: 2,
            assignments: vec![DeviceAssignment {
                device: "cpu:0".into(),
                experts: refs(&moved),
            }],
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let info = resp.info.unwrap();
    assert_eq!(info.devices[0].experts.len(), half - 2);
    assert!(!info.devices[0].experts.contains(&ExpertRef {
        layer: layer as u32,
        expert: 2
    }));
    assert_eq!(w.info().await, info);

    // The moved experts are now computed on cpu:1; numbers do not change.
    let mut stream = w.open_stream().await;
    let s = sample(&w.spec, 4, 5);
    let resp = stream
        .call(request(1, &w.spec, layer, &s, RowDtype::F32))
        .await;
    assert_close(
        &ok_output(&resp, RowDtype::F32),
        &w.reference(layer, &s.0, &s.1, &s.2),
        1e-5,
    );

    // Bad loads are rejected as a whole.
    for (device, experts) in [("cpu:9", vec![(layer, 0u32)]), ("cpu:0", vec![(layer, 99)])] {
        let err = within(
            "a bad LoadExperts",
            client.load_experts(LoadExpertsRequest {
                placement_version: 3,
                assignments: vec![DeviceAssignment {
                    device: device.into(),
                    experts: refs(&experts),
                }],
            }),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    }
    assert_eq!(w.info().await.placement_version, 2);
    drop(stream);
    w.finish().await;
}

/// A plain HTTP/1.1 GET; returns the status code and body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = within("HTTP connect", TcpStream::connect(addr))
        .await
        .unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    within("HTTP write", s.write_all(req.as_bytes()))
        .await
        .unwrap();
    let mut buf = Vec::new();
    within("HTTP read", s.read_to_end(&mut buf)).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_prometheus_text() {
    let w = start_worker(None).await;
    let mut stream = w.open_stream().await;
    let layer = w.spec.moe_layers().next().unwrap();
    let s = sample(&w.spec, 2, 0);
    let resp = stream
        .call(request(1, &w.spec, layer, &s, RowDtype::F32))
        .await;
    assert_eq!(resp.error_code, 0);

    let (status, body) = http_get(w.http, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains(r#"moe_worker_dispatch_requests_total{outcome="ok"} 1"#),
        "{body}"
    );
    assert!(body.contains("moe_worker_dispatch_rows_total 2"), "{body}");
    assert!(body.contains("moe_worker_placement_version 1"), "{body}");
    assert!(
        body.contains(r#"moe_worker_hosted_experts{device="cpu:1"}"#),
        "{body}"
    );
    assert!(body.contains("moe_worker_compute_seconds_bucket"), "{body}");
    for line in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
        let name = series.split('{').next().unwrap();
        // The worker's own series, and the build identity every moe process exports.
        assert!(
            name.starts_with("moe_worker_") || name == "moe_build_info",
            "bad name in {line}"
        );
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name in {line}"
        );
    }
    let (status, body) = http_get(w.http, "/health").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    drop(stream);
    w.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_then_not_serving_on_shutdown() {
    let w = start_worker(None).await;
    let mut health = HealthClient::new(w.channel.clone());
    for service in ["", "moe.v1.ExpertService"] {
        let r = within(
            "health check",
            health.check(HealthCheckRequest {
                service: service.into(),
            }),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(
            r.status,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
    let mut watch = within(
        "health watch",
        health.watch(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let first = within("watch", watch.message()).await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let mut stream = w.open_stream().await;

    w.shutdown.cancel();
    let next = within("watch", watch.message()).await.unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // An open dispatch stream is closed with UNAVAILABLE, so the router moves on.
    let err = within("dispatch stream end", stream.responses.message())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    // The watch keeps the gRPC server draining: HTTP health already says 503.
    let (status, _) = http_get(w.http, "/health").await;
    assert_eq!(status, 503);
    // Liveness stays up while draining (the kubelet must not restart a draining pod).
    let (status, body) = http_get(w.http, "/health/live").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    drop(watch);
    drop(stream);
    let grpc = w.grpc;
    w.finish().await;
    // Once drained, the port no longer accepts connections.
    assert!(TcpStream::connect(grpc).await.is_err());
}
