//! `moe cluster status` and `GET /v1/cluster` show an operator the truth: with a router
//! and two workers, every expert of the model is hosted exactly once across the two
//! workers' devices, the placement version is 1, and after traffic the per-expert token
//! counts add up to (tokens × top-k × MoE layers) and are reported per device.

use moe_tests::{generate, http, run_moe, tiny_checkpoint, GreedyReq, Proc};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_placement_and_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_checkpoint(dir.path(), 23);
    let w1 = Proc::worker(&model, "cpu:0,cpu:1", &[]);
    let w2 = Proc::worker(&model, "cpu:0", &[]);
    let router = Proc::router(&model, &[&w1, &w2], &[]);

    let prompt: Vec<u32> = (10..20).collect();
    let msgs = generate(router.grpc, GreedyReq::ids(prompt.clone(), 6).to_proto())
        .await
        .expect("request succeeds");
    assert!(!msgs.is_empty());

    let (code, body) = http(router.http, "GET", "/v1/cluster", None);
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["placement_version"], 1);
    assert_eq!(v["missing_experts"].as_array().map(Vec::len), Some(0));
    let devices = v["devices"].as_array().expect("devices");
    assert_eq!(
        devices.len(),
        3,
        "cpu:0 + cpu:1 on one worker, cpu:0 on the other"
    );
    let mut hosted: Vec<(u64, u64)> = devices
        .iter()
        .flat_map(|d| d["experts"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| Some((e[0].as_u64()?, e[1].as_u64()?)))
        .collect();
    let n = hosted.len();
    hosted.sort_unstable();
    hosted.dedup();
    assert_eq!(
        hosted.len(),
        n,
        "an expert is hosted twice with replicas = 1"
    );
    let experts = v["experts"].as_array().expect("experts");
    assert_eq!(hosted.len(), experts.len(), "every expert is hosted");
    assert!(experts.iter().all(|e| e["copies"] == 1));

    // Tiny DeepSeek-V3: 2 MoE layers, top-4. The prompt's 10 tokens and 5 decode steps
    // (the 6th token is sampled from the last step's logits) each pass every MoE layer.
    let moe_layers = experts
        .iter()
        .filter_map(|e| e["layer"].as_u64())
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    let routed: u64 = experts.iter().filter_map(|e| e["tokens"].as_u64()).sum();
    assert_eq!(routed, (prompt.len() as u64 + 5) * 4 * moe_layers);
    let per_device: u64 = devices.iter().filter_map(|d| d["tokens"].as_u64()).sum();
    assert_eq!(
        per_device, routed,
        "with one copy each, device loads add up to the total"
    );

    let out = run_moe(
        &["cluster", "status", "--router", &router.http.to_string()],
        true,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("placement version 1"), "{text}");
    assert!(
        text.contains(&w1.grpc.to_string()) && text.contains(&w2.grpc.to_string()),
        "{text}"
    );
    assert!(text.contains("hottest experts"), "{text}");
}
