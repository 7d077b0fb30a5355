//! A malformed `Dispatch` message costs a worker nothing but an error reply: a message
//! whose `rows` byte length disagrees with num_rows × hidden × 4 gets error_code 3
//! (INVALID_ARGUMENT) naming `rows`, the same stream then computes a valid message (the
//! same numbers as the experts computed in-process), and the worker process is still
//! alive and answering `Info`.

use moe_model::checkpoint::Checkpoint;
use moe_model::{ExpertBackend, LocalExperts, ModelSpec, MoeRequest, WeightDtype};
use moe_proto::v1::{
    DType, DeviceAssignment, DispatchRequest, DispatchResponse, ExpertRef, InfoRequest,
    LoadExpertsRequest,
};
use moe_tests::{
    expert_client, metric_value, metrics, names_field, tiny_checkpoint, Proc, PATIENCE,
};
use tokio_stream::wrappers::ReceiverStream;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_dispatch_gets_an_error_and_the_stream_and_worker_live_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 61);
    let spec = ModelSpec::from_dir(&model).expect("spec");
    let (hidden, n_exp, top_k) = (
        spec.hidden_size,
        spec.moe.num_experts as u32,
        spec.moe.top_k,
    );
    let layer = spec.moe_layers().next().expect("a MoE layer");
    let mut worker = Proc::worker(&model, "cpu:0,cpu:1", &[]);
    let mut client = expert_client(worker.grpc).await;

    // Every expert of `layer`, half on each device.
    let refs = |r: std::ops::Range<u32>| -> Vec<ExpertRef> {
        r.map(|expert| ExpertRef {
            layer: layer as u32,
            expert,
        })
        .collect()
    };
    let loaded = client
        .load_experts(LoadExpertsRequest {
            placement_version: 1,
            assignments: vec![
                DeviceAssignment {
                    device: "cpu:0".into(),
                    experts: refs(0..n_exp / 2),
                },
                DeviceAssignment {
                    device: "cpu:1".into(),
                    experts: refs(n_exp / 2..n_exp),
                },
            ],
        })
        .await
        .expect("LoadExperts");
    assert_eq!(
        loaded.into_inner().info.map(|i| i.placement_version),
        Some(1)
    );

    // Three rows; slot s of row r picks expert (r + 3s) mod n, with weights summing to 1.
    let rows = 3usize;
    let x: Vec<f32> = (0..rows * hidden)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let ids: Vec<u32> = (0..rows * top_k)
        .map(|i| ((i / top_k + 3 * (i % top_k)) as u32) % n_exp)
        .collect();
    let weights = vec![1.0 / top_k as f32; rows * top_k];
    let valid = |request_id: u64| DispatchRequest {
        request_id,
        step_id: request_id,
        layer: layer as u32,
        num_rows: rows as u32,
        hidden_size: hidden as u32,
        dtype: DType::DtypeF32 as i32,
        rows: f32_bytes(&x),
        top_k: top_k as u32,
        expert_ids: ids.clone(),
        expert_weights: weights.clone(),
        traceparents: Vec::new(),
    };

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut bad = valid(1);
    bad.rows.truncate(bad.rows.len() - 4);
    tx.send(bad).await.expect("send");
    let mut replies = client
        .dispatch(ReceiverStream::new(rx))
        .await
        .expect("Dispatch stream")
        .into_inner();
    let mut next = async || -> DispatchResponse {
        tokio::time::timeout(PATIENCE, replies.message())
            .await
            .expect("a reply in time")
            .expect("the stream stays open")
            .expect("a reply")
    };
    let r = next().await;
    assert_eq!(r.request_id, 1);
    assert_eq!(r.error_code, 3, "{r:?}");
    assert!(names_field(&r.error_message, "rows"), "{r:?}");
    assert!(r.output.is_empty());

    // The same stream computes a valid message.
    tx.send(valid(2)).await.expect("send");
    let r = next().await;
    assert_eq!((r.request_id, r.error_code), (2, 0), "{r:?}");
    assert_eq!(r.num_rows, rows as u32);
    assert_eq!(r.output.len(), rows * hidden * 4);
    let got: Vec<f32> = r
        .output
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let ckpt = Checkpoint::open(&model, spec.fp8_block).expect("checkpoint");
    let all: Vec<(usize, u32)> = (0..n_exp).map(|e| (layer, e)).collect();
    let local = LocalExperts::load(&ckpt, &spec, &all, WeightDtype::F32).expect("experts");
    let want = local
        .forward(&MoeRequest {
            layer,
            hidden,
            top_k,
            rows: &x,
            expert_ids: &ids,
            weights: &weights,
        })
        .expect("reference");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "reference output is all zeros");
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert!(
            (w - g).abs() <= 1e-5 * scale.max(1.0),
            "element {i}: worker {g}, in-process {w}"
        );
    }
    drop(tx);

    // The process lives on and answers.
    assert!(worker.is_alive(), "{}", worker.describe());
    let info = client
        .info(InfoRequest {})
        .await
        .expect("Info after the bad message")
        .into_inner();
    assert_eq!(info.hidden_size as usize, hidden);
    assert_eq!(info.placement_version, 1);
    assert_eq!(info.devices.len(), 2);
    let text = metrics(worker.http);
    let outcome = |o: &str| {
        metric_value(
            &text,
            &format!(r#"moe_worker_dispatch_requests_total{{outcome="{o}"}}"#),
        )
    };
    assert_eq!(outcome("invalid"), Some(1.0), "{text}");
    assert_eq!(outcome("ok"), Some(1.0), "{text}");
}
