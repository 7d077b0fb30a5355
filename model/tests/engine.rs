//! The engine's own promises, over real tiny checkpoints of every architecture:
//! a sequence gets the same numbers alone or in a mixed batch, chunked prefill equals
//! one-shot prefill, and bf16 / FP8 weights stay close to their f32 source.

use moe_model::checkpoint::Checkpoint;
use moe_model::tiny::{self, Size, StoreDtype, TinyOptions};
use moe_model::{Arch, KvPool, LocalExperts, Model, ModelSpec, StepSeq, WeightDtype};

struct Loaded {
    model: Model,
    experts: LocalExperts,
    spec: ModelSpec,
    _dir: tempfile::TempDir,
}

fn load(arch: Arch, store: StoreDtype, compute: WeightDtype, seed: u64) -> Loaded {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = TinyOptions {
        arch,
        size: Size::Tiny,
        dtype: store,
        seed,
        max_shard_bytes: None,
    };
    let spec = tiny::write(dir.path(), &opts).expect("write checkpoint");
    let ckpt = Checkpoint::open(dir.path(), spec.fp8_block).expect("open");
    let model = Model::load_from(&ckpt, spec.clone(), compute).expect("load model");
    let experts = LocalExperts::load(&ckpt, &spec, &LocalExperts::all_of(&spec), compute)
        .expect("load experts");
    Loaded {
        model,
        experts,
        spec,
        _dir: dir,
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn prompt(len: usize, salt: usize) -> Vec<u32> {
    (0..len)
        .map(|i| (3 + (i * 37 + salt * 101) % 500) as u32)
        .collect()
}

/// Greedy decoding of one sequence alone; returns (tokens, logits per step).
fn alone(l: &Loaded, p: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let pool = KvPool::new(&l.spec, 4096);
    let mut cache = pool.new_sequence();
    let mut logits = l
        .model
        .forward(
            &mut [StepSeq {
                tokens: p,
                cache: &mut cache,
            }],
            &l.experts,
        )
        .expect("prefill");
    let (mut toks, mut all) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let t = argmax(&logits[0]);
        toks.push(t);
        all.push(logits[0].clone());
        logits = l
            .model
            .forward(
                &mut [StepSeq {
                    tokens: &[t],
                    cache: &mut cache,
                }],
                &l.experts,
            )
            .expect("decode");
    }
    (toks, all)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

#[test]
fn mixed_batch_gives_each_sequence_its_solo_numbers() {
    for arch in Arch::ALL {
        let l = load(arch, StoreDtype::F32, WeightDtype::F32, 7);
        let prompts = [prompt(5, 1), prompt(17, 2), prompt(1, 3), prompt(33, 4)];
        let steps = 10;
        let solo: Vec<_> = prompts.iter().map(|p| alone(&l, p, steps)).collect();

        // Staggered: sequence i joins at step i, so prefills and decodes share steps.
        let pool = KvPool::new(&l.spec, 8192);
        let mut caches: Vec<_> = prompts.iter().map(|_| pool.new_sequence()).collect();
        let mut toks: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        let mut logits_seen: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
        for step in 0..steps + prompts.len() {
            let mut feed: Vec<(usize, Vec<u32>)> = Vec::new();
            for i in 0..prompts.len() {
                if step == i {
                    feed.push((i, prompts[i].clone()));
                } else if step > i && toks[i].len() < steps {
                    feed.push((i, vec![*toks[i].last().expect("decoding has a token")]));
                }
            }
            if feed.is_empty() {
                continue;
            }
            let mut batch: Vec<StepSeq<'_>> = Vec::new();
            let mut order = Vec::new();
            for (c, (i, t)) in caches.iter_mut().enumerate().filter_map(|(c, cache)| {
                feed.iter()
                    .find(|(i, _)| *i == c)
                    .map(|(i, t)| (cache, (*i, t)))
            }) {
                order.push(i);
                batch.push(StepSeq {
                    tokens: t,
                    cache: c,
                });
            }
            let out = l
                .model
                .forward(&mut batch, &l.experts)
                .expect("batched step");
            for (i, lg) in order.into_iter().zip(out) {
                toks[i].push(argmax(&lg));
                logits_seen[i].push(lg);
            }
        }
        for i in 0..prompts.len() {
            assert_eq!(
                toks[i], solo[i].0,
                "{arch:?}: sequence {i} tokens differ in the batch"
            );
            for (s, (a, b)) in logits_seen[i].iter().zip(&solo[i].1).enumerate() {
                assert_eq!(
                    a, b,
                    "{arch:?}: sequence {i} step {s}: logits not bit-identical"
                );
            }
        }
    }
}

#[test]
fn chunked_prefill_matches_one_shot_prefill() {
    for arch in Arch::ALL {
        let l = load(arch, StoreDtype::F32, WeightDtype::F32, 3);
        let p = prompt(40, 9);
        let pool = KvPool::new(&l.spec, 4096);
        let mut one = pool.new_sequence();
        let a = l
            .model
            .forward(
                &mut [StepSeq {
                    tokens: &p,
                    cache: &mut one,
                }],
                &l.experts,
            )
            .expect("one shot");
        let mut chunked = pool.new_sequence();
        let mut b = Vec::new();
        for c in p.chunks(7) {
            b = l
                .model
                .forward(
                    &mut [StepSeq {
                        tokens: c,
                        cache: &mut chunked,
                    }],
                    &l.experts,
                )
                .expect("chunk");
        }
        assert_eq!(chunked.len(), 40);
        let e = rel_l2(&b[0], &a[0]);
        assert!(e < 1e-5, "{arch:?}: chunked prefill differs by {e}");
        assert_eq!(argmax(&a[0]), argmax(&b[0]));
    }
}

#[test]
fn bf16_and_fp8_checkpoints_stay_close_to_f32() {
    for arch in [Arch::DeepseekV3, Arch::Mixtral, Arch::Qwen3Moe] {
        let p = prompt(12, 5);
        let reference = alone(&load(arch, StoreDtype::F32, WeightDtype::F32, 21), &p, 6);
        for (store, compute, tol) in [
            (StoreDtype::Bf16, WeightDtype::F32, 0.03),
            (StoreDtype::Fp8, WeightDtype::F32, 0.15),
            (StoreDtype::F32, WeightDtype::Bf16, 0.03),
        ] {
            let got = alone(&load(arch, store, compute, 21), &p, 6);
            let e = rel_l2(&got.1[0], &reference.1[0]);
            assert!(
                e < tol,
                "{arch:?} {store:?}/{compute:?}: prefill logits off by {e}"
            );
            assert!(
                e > 0.0,
                "{arch:?} {store:?}/{compute:?}: no rounding happened at all"
            );
            assert_eq!(
                argmax(&got.1[0]),
                argmax(&reference.1[0]),
                "{arch:?} {store:?}/{compute:?}: first greedy token differs"
            );
        }
    }
}

#[test]
fn fp8_checkpoint_really_stores_fp8_with_block_scales() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = TinyOptions {
        arch: Arch::DeepseekV3,
        size: Size::Tiny,
        dtype: StoreDtype::Fp8,
        seed: 1,
        max_shard_bytes: None,
    };
    let spec = tiny::write(dir.path(), &opts).expect("write");
    assert_eq!(spec.fp8_block, Some((128, 128)));
    let bytes = std::fs::read(dir.path().join("model.safetensors")).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let w = st
        .tensor("model.layers.1.mlp.experts.0.gate_proj.weight")
        .expect("expert weight");
    assert_eq!(w.dtype(), safetensors::Dtype::F8_E4M3);
    let s = st
        .tensor("model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv")
        .expect("scale");
    assert_eq!(s.shape(), &[1, 1]);
    assert_eq!(
        st.tensor("model.embed_tokens.weight")
            .expect("embed")
            .dtype(),
        safetensors::Dtype::BF16
    );
}

#[test]
fn a_worker_reads_only_its_experts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = TinyOptions {
        arch: Arch::Mixtral,
        size: Size::Tiny,
        dtype: StoreDtype::F32,
        seed: 2,
        max_shard_bytes: None,
    };
    let spec = tiny::write(dir.path(), &opts).expect("write");
    let ckpt = Checkpoint::open(dir.path(), None).expect("open");
    let mine = [(0usize, 1u32), (1, 7)];
    let experts = LocalExperts::load(&ckpt, &spec, &mine, WeightDtype::F32).expect("load");
    assert_eq!(experts.hosted(), mine.to_vec());
    let want = 2 * 3 * spec.hidden_size * spec.moe.intermediate_size * 4;
    assert_eq!(experts.weight_bytes(), want);
    // An expert that is not hosted is an error, not a zero.
    let rows = vec![0.5f32; spec.hidden_size];
    let req = moe_model::MoeRequest {
        layer: 0,
        hidden: spec.hidden_size,
        top_k: 1,
        rows: &rows,
        expert_ids: &[2],
        weights: &[1.0],
    };
    let err =
        moe_model::ExpertBackend::forward(&experts, &req).expect_err("expert 2 is not hosted");
    assert_eq!(
        err,
        moe_model::ExpertError::NotHosted {
            layer: 0,
            expert: 2
        }
    );
}
