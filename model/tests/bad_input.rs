//! Every bad input the engine can meet gets a clear error naming what was wrong — never
//! a panic: unknown architecture, missing or misshapen tensor, truncated or corrupt file,
//! FP8 without block size, token ids outside the vocabulary, prompts beyond the context,
//! a full KV cache, invalid sampling and stop parameters.

use std::path::Path;

use moe_model::checkpoint::Checkpoint;
use moe_model::tiny::{self, Size, StoreDtype, TinyOptions};
use moe_model::{
    Arch, KvPool, LocalExperts, Model, ModelError, ModelSpec, SamplingParams, StepSeq, WeightDtype,
};

fn write(arch: Arch, shard: Option<usize>) -> (tempfile::TempDir, ModelSpec) {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = TinyOptions {
        arch,
        size: Size::Tiny,
        dtype: StoreDtype::F32,
        seed: 4,
        max_shard_bytes: shard,
    };
    let spec = tiny::write(dir.path(), &opts).expect("write");
    (dir, spec)
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir, WeightDtype::F32) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
    f(&mut v);
    std::fs::write(&p, v.to_string()).expect("write");
}

#[test]
fn unknown_architecture_names_it() {
    let (dir, _) = write(Arch::Mixtral, None);
    edit_config(dir.path(), |v| {
        v["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
    });
    let e = load_err(dir.path());
    assert!(
        e.contains("GPT2LMHeadModel") && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn missing_config_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = load_err(dir.path());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let (dir, _) = write(Arch::Qwen3Moe, None);
    // Claim a bigger hidden size than the tensors have.
    edit_config(dir.path(), |v| v["hidden_size"] = serde_json::json!(96));
    let e = load_err(dir.path());
    assert!(
        e.contains("model.embed_tokens.weight")
            && e.contains("[512, 96]")
            && e.contains("[512, 64]"),
        "{e}"
    );
}

#[test]
fn missing_tensor_names_it() {
    let (dir, _) = write(Arch::Olmoe, None);
    // One more layer than the checkpoint holds.
    edit_config(dir.path(), |v| {
        v["num_hidden_layers"] = serde_json::json!(3)
    });
    let e = load_err(dir.path());
    assert!(
        e.contains("model.layers.2.") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn truncated_shard_names_the_file() {
    let (dir, _) = write(Arch::DeepseekV3, Some(300_000));
    let shard = dir.path().join("model-00002-of-00007.safetensors");
    let len = std::fs::metadata(&shard).expect("shard exists").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .expect("open");
    f.set_len(len / 2).expect("truncate");
    let e = load_err(dir.path());
    assert!(
        e.contains("model-00002-of-00007.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn garbage_file_is_an_error_not_a_panic() {
    let (dir, _) = write(Arch::Mixtral, None);
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header",
    )
    .expect("write");
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn fp8_weights_without_block_size_are_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = TinyOptions {
        arch: Arch::DeepseekV3,
        size: Size::Tiny,
        dtype: StoreDtype::Fp8,
        seed: 1,
        max_shard_bytes: None,
    };
    tiny::write(dir.path(), &opts).expect("write");
    edit_config(dir.path(), |v| {
        v.as_object_mut()
            .expect("object")
            .remove("quantization_config");
    });
    let e = load_err(dir.path());
    assert!(e.contains("FP8") && e.contains("weight_block_size"), "{e}");
}

#[test]
fn selective_loader_rejects_experts_that_do_not_exist() {
    let (dir, spec) = write(Arch::DeepseekV3, None);
    let ckpt = Checkpoint::open(dir.path(), None).expect("open");
    // Layer 0 is dense (first_k_dense_replace = 1).
    let e = LocalExperts::load(&ckpt, &spec, &[(0, 0)], WeightDtype::F32)
        .err()
        .expect("dense layer")
        .to_string();
    assert!(e.contains("layer 0 is not a MoE layer"), "{e}");
    let e = LocalExperts::load(&ckpt, &spec, &[(1, 99)], WeightDtype::F32)
        .err()
        .expect("no such expert")
        .to_string();
    assert!(e.contains("expert 99"), "{e}");
}

#[test]
fn bad_tokens_long_prompts_and_full_cache_are_errors() {
    let (dir, spec) = write(Arch::Mixtral, None);
    let model = Model::load(dir.path(), WeightDtype::F32).expect("load");
    let ckpt = Checkpoint::open(dir.path(), None).expect("open");
    let experts = LocalExperts::load(&ckpt, &spec, &LocalExperts::all_of(&spec), WeightDtype::F32)
        .expect("experts");
    let pool = KvPool::new(&spec, 4096);

    let mut c = pool.new_sequence();
    let e = model
        .forward(
            &mut [StepSeq {
                tokens: &[5, 512],
                cache: &mut c,
            }],
            &experts,
        )
        .expect_err("id 512");
    assert!(
        matches!(
            e,
            ModelError::InvalidInput {
                field: "prompt_token_ids",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(c.len(), 0, "a rejected step leaves the cache untouched");

    let long = vec![3u32; spec.max_position_embeddings + 1];
    let e = model
        .forward(
            &mut [StepSeq {
                tokens: &long,
                cache: &mut c,
            }],
            &experts,
        )
        .expect_err("too long");
    assert!(
        matches!(
            e,
            ModelError::InvalidInput {
                field: "prompt",
                ..
            }
        ),
        "{e}"
    );

    let small = KvPool::new(&spec, 16);
    let mut c = small.new_sequence();
    let e = model
        .forward(
            &mut [StepSeq {
                tokens: &[3; 17],
                cache: &mut c,
            }],
            &experts,
        )
        .expect_err("cache full");
    assert!(matches!(e, ModelError::KvCacheFull(_)), "{e}");
    assert_eq!(small.used_blocks(), 0);
}

#[test]
fn invalid_sampling_parameters_name_the_field() {
    for (params, field) in [
        (
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            "temperature",
        ),
        (
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            "top_p",
        ),
        (
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            "top_p",
        ),
        (
            SamplingParams {
                min_p: 2.0,
                ..Default::default()
            },
            "min_p",
        ),
        (
            SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            "repetition_penalty",
        ),
        (
            SamplingParams {
                frequency_penalty: 9.0,
                ..Default::default()
            },
            "frequency_penalty",
        ),
        (
            SamplingParams {
                logprobs: Some(50),
                ..Default::default()
            },
            "logprobs",
        ),
    ] {
        let e = params.validate().expect_err(field).to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
    let stop = moe_model::StopParams {
        max_tokens: 0,
        ..Default::default()
    };
    assert!(stop
        .validate()
        .expect_err("max_tokens 0")
        .to_string()
        .contains("max_tokens"));
}
