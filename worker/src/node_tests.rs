//! Unit tests of [`Node`] over a tiny checkpoint: start, load/unload, compute against
//! the in-process reference, and the restart of a device that panics.

use super::*;
use moe_model::experts::NO_EXPERT as MODEL_NO_EXPERT;
use moe_model::tiny::{self, Size, StoreDtype, TinyOptions};
use moe_model::{Arch, ExpertBackend, LocalExperts};

fn checkpoint() -> (tempfile::TempDir, ModelSpec) {
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
    (dir, spec)
}

fn config(dir: &std::path::Path, devices: &[&str], panic_at: Option<u64>) -> NodeConfig {
    NodeConfig {
        model_dir: dir.to_path_buf(),
        devices: devices.iter().map(|s| s.to_string()).collect(),
        dtype: WeightDtype::F32,
        worker_id: "w-test".into(),
        test_panic_at_compute: panic_at,
        threads_per_device: None,
        capacity_bytes: 0,
    }
}

/// Deterministic rows and routing: `n` rows, top-2, one skipped slot.
fn sample(spec: &ModelSpec, n: usize) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
    let h = spec.hidden_size;
    let e = spec.moe.num_experts as u32;
    let rows = (0..n * h)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    for r in 0..n as u32 {
        ids.extend([r % e, (r * 3 + 1) % e]);
        weights.extend([0.7, 0.3]);
    }
    ids[1] = MODEL_NO_EXPERT;
    (rows, ids, weights)
}

fn reference(
    dir: &std::path::Path,
    spec: &ModelSpec,
    layer: usize,
    s: &(Vec<f32>, Vec<u32>, Vec<f32>),
) -> Vec<f32> {
    let ckpt = Checkpoint::open(dir, None).unwrap();
    let all =
        LocalExperts::load(&ckpt, spec, &LocalExperts::all_of(spec), WeightDtype::F32).unwrap();
    all.forward(&MoeRequest {
        layer,
        hidden: spec.hidden_size,
        top_k: 2,
        rows: &s.0,
        expert_ids: &s.1,
        weights: &s.2,
    })
    .unwrap()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err / scale <= tol, "max error {err} vs scale {scale}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_over_two_devices_matches_local_experts() {
    let (dir, spec) = checkpoint();
    let node = Node::start(config(dir.path(), &["cpu:0", "cpu:1"], None))
        .await
        .unwrap();
    assert_eq!(node.device_names(), vec!["cpu:0", "cpu:1"]);
    let info = node.load(4, split_even_odd(&spec)).await.unwrap();
    assert_eq!(info.placement_version, 4);
    let per_device = spec.moe_layers().count() * spec.moe.num_experts / 2;
    for d in &info.devices {
        assert_eq!(d.experts.len(), per_device);
        assert_eq!(
            d.expert_bytes,
            (per_device * spec.expert_bytes_f32()) as u64
        );
    }
    let layer = spec.moe_layers().last().unwrap();
    let s = sample(&spec, 6);
    let got = node
        .compute(layer, s.0.clone(), 2, s.1.clone(), s.2.clone())
        .await
        .unwrap();
    assert_close(&got, &reference(dir.path(), &spec, layer, &s), 1e-5);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_rejected_without_loading() {
    let (dir, spec) = checkpoint();
    let node = Node::start(config(dir.path(), &["cpu:0"], None))
        .await
        .unwrap();
    let err = node
        .load(1, vec![("cpu:7".into(), vec![(0, 0)])])
        .await
        .unwrap_err();
    assert!(matches!(err, WorkerError::UnknownDevice(_)), "{err}");
    let err = node
        .load(1, vec![("cpu:0".into(), vec![(0, 999)])])
        .await
        .unwrap_err();
    assert!(matches!(err, WorkerError::InvalidExpert { .. }), "{err}");
    assert!(node.info().devices[0].experts.is_empty());
    assert_eq!(node.info().placement_version, 0);

    let layer = spec.moe_layers().next().unwrap();
    let s = sample(&spec, 2);
    let err = node
        .compute(layer, s.0.clone(), 2, s.1.clone(), s.2.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, ExpertError::NotHosted { .. }), "{err}");
    let err = node
        .compute(layer, vec![0.0; 3], 2, s.1.clone(), s.2.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, ExpertError::Invalid(_)), "{err}");
    let err = node.compute(999, s.0, 2, s.1, s.2).await.unwrap_err();
    assert!(matches!(err, ExpertError::Invalid(_)), "{err}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_fails_cleanly_on_bad_input() {
    let (dir, _spec) = checkpoint();
    let r = Node::start(config(dir.path(), &["gpu:0"], None)).await;
    assert!(matches!(r, Err(WorkerError::InvalidDevice { .. })));
    let missing = dir.path().join("nope");
    let r = Node::start(config(&missing, &["cpu:0"], None)).await;
    assert!(matches!(r, Err(WorkerError::Model(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_device_restarts_with_its_experts() {
    let (dir, spec) = checkpoint();
    let node = Node::start(config(dir.path(), &["cpu:0", "cpu:1"], Some(1)))
        .await
        .unwrap();
    node.load(1, split_even_odd(&spec)).await.unwrap();
    let before = node.info();
    let layer = spec.moe_layers().next().unwrap();
    let s = sample(&spec, 4);
    let err = node
        .compute(layer, s.0.clone(), 2, s.1.clone(), s.2.clone())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ExpertError::Unavailable("device cpu:0 failed and is restarting".into())
    );
    // The retry waits for the replacement actor, which reloaded the same experts.
    let got = node
        .compute(layer, s.0.clone(), 2, s.1.clone(), s.2.clone())
        .await
        .unwrap();
    assert_close(&got, &reference(dir.path(), &spec, layer, &s), 1e-5);
    assert_eq!(node.info(), before);
    let restarts = node
        .metrics()
        .device_restarts
        .with_label_values(&["cpu:0"])
        .get();
    assert_eq!(restarts, 1);
    node.stop().await;
    let err = node.compute(layer, s.0, 2, s.1, s.2).await.unwrap_err();
    assert!(matches!(err, ExpertError::Unavailable(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_drops_experts_and_replicas_serve() {
    let (dir, spec) = checkpoint();
    let node = Node::start(config(dir.path(), &["cpu:0", "cpu:1"], None))
        .await
        .unwrap();
    let all = LocalExperts::all_of(&spec);
    // Every expert on both devices: compute picks one copy, numbers are the same.
    node.load(
        2,
        vec![("cpu:0".into(), all.clone()), ("cpu:1".into(), all.clone())],
    )
    .await
    .unwrap();
    let layer = spec.moe_layers().next().unwrap();
    let s = sample(&spec, 3);
    let want = reference(dir.path(), &spec, layer, &s);
    // A clean-up for an older placement than the load that asked for these copies
    // leaves them: it could otherwise drop copies the newer placement routes to.
    node.unload(1, vec![("cpu:1".into(), all.clone())])
        .await
        .unwrap();
    assert_eq!(node.info().devices[1].experts.len(), all.len());
    node.unload(3, vec![("cpu:0".into(), all.clone())])
        .await
        .unwrap();
    let info = node.info();
    assert!(info.devices[0].experts.is_empty());
    assert_eq!(info.devices[0].expert_bytes, 0);
    assert_eq!(info.devices[1].experts.len(), all.len());
    assert_eq!(info.placement_version, 2);
    let got = node.compute(layer, s.0, 2, s.1, s.2).await.unwrap();
    assert_close(&got, &want, 1e-5);
    node.stop().await;
}

#[test]
fn node_is_a_cheap_shareable_handle() {
    fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync_clone::<Node>();
}
