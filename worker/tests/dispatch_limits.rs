//! A worker's bounds on dispatches, over a real socket: `Info` reports its
//! `max_dispatch_rows`; a dispatch of more rows is answered INVALID_ARGUMENT naming
//! `num_rows` (before its rows are decoded) and the stream keeps serving; a message
//! larger than the gRPC limit sized from the row bound ends the stream with OUT_OF_RANGE
//! before tonic buffers it, and a new stream then serves again.

use std::time::Duration;

use moe_model::tiny::{self, Size, StoreDtype, TinyOptions};
use moe_model::{Arch, LocalExperts, WeightDtype};
use moe_proto::v1::expert_service_client::ExpertServiceClient;
use moe_proto::v1::{DType, DispatchRequest, DispatchResponse, InfoRequest};
use moe_worker::wire::{encode_rows, RowDtype};
use moe_worker::{serve_worker_with, Node, NodeConfig, WorkerServeConfig};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};

const DEADLINE: Duration = Duration::from_secs(30);
const MAX_ROWS: usize = 4;

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {DEADLINE:?} waiting for {what}"))
}

struct Stream {
    tx: mpsc::Sender<DispatchRequest>,
    responses: Streaming<DispatchResponse>,
}

async fn open(client: &ExpertServiceClient<Channel>) -> Stream {
    let (tx, rx) = mpsc::channel(4);
    let responses = within(
        "a dispatch stream",
        client.clone().dispatch(ReceiverStream::new(rx)),
    )
    .await
    .expect("Dispatch accepted")
    .into_inner();
    Stream { tx, responses }
}

impl Stream {
    async fn call(&mut self, req: DispatchRequest) -> Result<DispatchResponse, tonic::Status> {
        within("sending", self.tx.send(req)).await.expect("send");
        within("a response", self.responses.message())
            .await
            .and_then(|m| m.ok_or_else(|| tonic::Status::unknown("stream ended")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatches_over_the_row_limit_are_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let spec = tiny::write(
        dir.path(),
        &TinyOptions {
            arch: Arch::Mixtral,
            size: Size::Tiny,
            dtype: StoreDtype::F32,
            seed: 5,
            max_shard_bytes: None,
        },
    )
    .unwrap();
    let node = Node::start(NodeConfig {
        model_dir: dir.path().to_path_buf(),
        devices: vec!["cpu:0".into()],
        dtype: WeightDtype::F32,
        worker_id: "limits-test".into(),
        test_panic_at_compute: None,
        threads_per_device: None,
        capacity_bytes: 0,
    })
    .await
    .unwrap();
    let all = LocalExperts::all_of(&spec);
    within("loading", node.load(1, vec![("cpu:0".into(), all)]))
        .await
        .unwrap();
    let grpc_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = grpc_l.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve_worker_with(
        node.clone(),
        grpc_l,
        http_l,
        shutdown.clone(),
        WorkerServeConfig {
            max_dispatch_rows: MAX_ROWS,
            ..WorkerServeConfig::default()
        },
    ));
    let channel = within(
        "connecting",
        Endpoint::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect_timeout(DEADLINE)
            .connect(),
    )
    .await
    .unwrap();
    // The client's own limits are far above the worker's: the worker must refuse.
    let client = ExpertServiceClient::new(channel)
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);

    let info = within("Info", client.clone().info(InfoRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.max_dispatch_rows as usize, MAX_ROWS);

    let (hidden, top_k) = (spec.hidden_size, spec.moe.top_k);
    let layer = spec.moe_layers().next().unwrap() as u32;
    let request = |id: u64, rows: usize| DispatchRequest {
        request_id: id,
        step_id: id,
        layer,
        num_rows: rows as u32,
        hidden_size: hidden as u32,
        dtype: DType::DtypeF32 as i32,
        rows: encode_rows(&vec![0.25; rows * hidden], RowDtype::F32),
        top_k: top_k as u32,
        expert_ids: (0..rows * top_k).map(|i| (i % top_k) as u32).collect(),
        expert_weights: vec![1.0 / top_k as f32; rows * top_k],
        traceparents: Vec::new(),
    };

    let mut stream = open(&client).await;
    let ok = stream.call(request(1, MAX_ROWS)).await.expect("served");
    assert_eq!(
        (ok.error_code, ok.num_rows as usize),
        (0, MAX_ROWS),
        "{ok:?}"
    );
    // One row too many: refused by field, the stream lives on.
    let refused = stream
        .call(request(2, MAX_ROWS + 1))
        .await
        .expect("answered");
    assert_eq!(
        refused.error_code,
        Code::InvalidArgument as i32,
        "{refused:?}"
    );
    assert!(refused.error_message.contains("num_rows"), "{refused:?}");
    assert_eq!(refused.request_id, 2);
    // A huge num_rows with no rows behind it: refused the same way, nothing allocated.
    let mut lying = request(3, 1);
    lying.num_rows = u32::MAX;
    let refused = stream.call(lying).await.expect("answered");
    assert!(refused.error_message.contains("num_rows"), "{refused:?}");
    let ok = stream.call(request(4, 1)).await.expect("still served");
    assert_eq!(ok.error_code, 0, "{ok:?}");

    // A message far beyond the limit sized from MAX_ROWS: the gRPC layer refuses it.
    let mut stream2 = open(&client).await;
    let err = stream2
        .call(request(5, 64 * MAX_ROWS))
        .await
        .expect_err("an oversized message must end the stream");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    let mut stream3 = open(&client).await;
    let ok = stream3.call(request(6, 2)).await.expect("served again");
    assert_eq!(ok.error_code, 0, "{ok:?}");

    drop((stream, stream2, stream3));
    shutdown.cancel();
    within("the server to stop", server).await.unwrap().unwrap();
    node.stop().await;
}
