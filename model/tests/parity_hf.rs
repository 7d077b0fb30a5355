//! Parity with Hugging Face `transformers`: for each architecture with a reference file in
//! `tests/data/hf/`, write the tiny f32 checkpoint (seed 1) exactly as `moe checkpoint new`
//! does, run greedy decoding with the KV cache on the file's prompts, and require the same
//! tokens and, at every step, last-position logits within 1e-4 relative L2 of the
//! reference.
//!
//! The reference files come from `scripts/hf_reference.sh` (transformers' own model class,
//! float32, eager attention); regenerate them with it whenever `tiny::write` changes what it
//! writes. DeepSeek-V3 and OLMoE are required (candle-transformers has neither, so this is
//! their only outside check); the other four are a second opinion next to the candle tests.

use std::path::{Path, PathBuf};

use moe_model::checkpoint::Checkpoint;
use moe_model::tiny::{self, Size, StoreDtype, TinyOptions};
use moe_model::{Arch, KvPool, LocalExperts, Model, StepSeq, WeightDtype};
use serde_json::Value;

/// ||ours - ref|| / ||ref|| allowed at every step.
const REL_L2_TOL: f64 = 1e-4;
/// Architectures that must have a reference file.
const REQUIRED: [Arch; 2] = [Arch::DeepseekV3, Arch::Olmoe];

fn ref_path(arch: Arch) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf")
        .join(format!("{}.json", arch.model_type()))
}

/// FNV-1a 64 of a file, as `hf_reference.py` computes it.
fn fnv1a64(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}")
}

fn rel_l2(ours: &[f32], reference: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in ours.iter().zip(reference) {
        let d = *a as f64 - *b as f64;
        num += d * d;
        den += *b as f64 * *b as f64;
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Index of the largest value; ties go to the lower index (as torch.argmax on CPU).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

fn top5(v: &[f32]) -> String {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|a, b| v[*b].total_cmp(&v[*a]).then(a.cmp(b)));
    idx.iter()
        .take(5)
        .map(|i| format!("{i}:{:.5}", v[*i]))
        .collect::<Vec<_>>()
        .join(" ")
}

fn as_u32s(v: &Value, what: &str) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what} is not an array"))
        .iter()
        .map(|x| x.as_u64().unwrap_or_else(|| panic!("{what}: not an id")) as u32)
        .collect()
}

fn as_f32s(v: &Value, what: &str) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what} is not an array"))
        .iter()
        .map(|x| x.as_f64().unwrap_or_else(|| panic!("{what}: not a number")) as f32)
        .collect()
}

/// Runs one architecture against its reference file; returns the largest relative error
/// seen, or `None` when there is no file.
fn check(arch: Arch) -> Option<f64> {
    let path = ref_path(arch);
    if !path.exists() {
        assert!(
            !REQUIRED.contains(&arch),
            "{}: missing reference file {}; run scripts/hf_reference.sh",
            arch.model_type(),
            path.display()
        );
        eprintln!("{}: no reference file, skipped", arch.model_type());
        return None;
    }
    let text = std::fs::read_to_string(&path).expect("reading the reference file");
    let r: Value = serde_json::from_str(&text).expect("parsing the reference file");
    let name = arch.model_type();
    assert_eq!(
        r["arch"],
        name,
        "{}: wrong arch in the file",
        path.display()
    );
    let seed = r["seed"].as_u64().expect("seed");

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    tiny::write(
        dir,
        &TinyOptions {
            arch,
            size: Size::Tiny,
            dtype: StoreDtype::F32,
            seed,
            max_shard_bytes: None,
        },
    )
    .expect("writing the tiny checkpoint");

    // The reference must describe this very checkpoint; otherwise a mismatch below would
    // be about a stale file, not about the engine.
    let stale = format!(
        "{name}: {} was generated from a different checkpoint than tiny::write now produces; \
         regenerate it with scripts/hf_reference.sh (transformers {})",
        path.display(),
        r["transformers_version"].as_str().unwrap_or("?")
    );
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config, r["config"], "{stale} (config.json differs)");
    assert_eq!(
        fnv1a64(&dir.join("model.safetensors")),
        r["weights_fnv1a64"].as_str().expect("weights_fnv1a64"),
        "{stale} (weights differ)"
    );

    let model = Model::load(dir, WeightDtype::F32).expect("loading the model");
    let spec = model.spec().clone();
    let ckpt = Checkpoint::open(dir, spec.fp8_block).expect("opening the checkpoint");
    let experts = LocalExperts::load(&ckpt, &spec, &LocalExperts::all_of(&spec), WeightDtype::F32)
        .expect("loading the experts");
    let pool = KvPool::new(&spec, 4096);

    let mut worst = 0f64;
    let mut failures = Vec::new();
    let cases = r["cases"].as_array().expect("cases");
    assert!(!cases.is_empty(), "{name}: no cases");
    for (ci, case) in cases.iter().enumerate() {
        let prompt = as_u32s(&case["prompt"], "prompt");
        let want_tokens = as_u32s(&case["tokens"], "tokens");
        let want_logits: Vec<Vec<f32>> = case["logits"]
            .as_array()
            .expect("logits")
            .iter()
            .map(|l| as_f32s(l, "logits row"))
            .collect();
        assert_eq!(
            want_tokens.len(),
            want_logits.len(),
            "{name} case {ci}: file shape"
        );
        let mut cache = pool.new_sequence();
        let mut input = prompt;
        for (step, (want_tok, want)) in want_tokens.iter().zip(&want_logits).enumerate() {
            let got = model
                .forward(
                    &mut [StepSeq {
                        tokens: &input,
                        cache: &mut cache,
                    }],
                    &experts,
                )
                .expect("forward")
                .remove(0);
            assert_eq!(got.len(), want.len(), "{name}: vocab size");
            let err = rel_l2(&got, want);
            worst = worst.max(err);
            let tok = argmax(&got) as u32;
            let what = if step == 0 { "prefill" } else { "decode" };
            if tok != *want_tok || err.is_nan() || err > REL_L2_TOL {
                failures.push(format!(
                    "{name} case {ci} step {step} ({what}, position {}): token ours {tok} vs hf \
                     {want_tok}, rel L2 {err:.3e} (tol {REL_L2_TOL:.0e})\n  top-5 ours: {}\n  \
                     top-5 hf:   {}",
                    cache.len() - 1,
                    top5(&got),
                    top5(want)
                ));
                break; // later steps would follow a different path
            }
            input = vec![tok];
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!(
        "{name}: {} cases match transformers {}; max rel L2 {worst:.2e}",
        cases.len(),
        r["transformers_version"].as_str().unwrap_or("?")
    );
    Some(worst)
}

#[test]
fn deepseek_v3_matches_transformers() {
    check(Arch::DeepseekV3);
}

#[test]
fn olmoe_matches_transformers() {
    check(Arch::Olmoe);
}

#[test]
fn mixtral_matches_transformers() {
    check(Arch::Mixtral);
}

#[test]
fn qwen2_moe_matches_transformers() {
    check(Arch::Qwen2Moe);
}

#[test]
fn qwen3_moe_matches_transformers() {
    check(Arch::Qwen3Moe);
}

#[test]
fn deepseek_v2_matches_transformers() {
    check(Arch::DeepseekV2);
}
