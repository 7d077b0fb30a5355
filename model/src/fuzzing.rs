//! Fuzzing entry points: the body of each `cargo fuzz` target that reads what a
//! checkpoint holds (`fuzz/fuzz_targets/`), kept here as plain functions so that the
//! workspace test `fuzz_corpus_replay` runs the very same code over the committed corpus
//! and regression inputs on every CI run, without an instrumented build.
//!
//! Each function takes arbitrary bytes, runs the real loading or validation path and
//! checks what must hold of whatever it accepted; it returns the path's own error for
//! input it refuses. Any panic, in the code under test or in a check here, is a finding.

use std::sync::OnceLock;

use crate::checkpoint::{shard_names, Checkpoint};
use crate::rope::Rope;
use crate::tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError, MAX_WINDOW_IDS};
use crate::{demo_tokenizer, ModelError, ModelSpec};

/// FP8 block size given to hostile shards: DeepSeek-V3's.
const FP8_BLOCK: (usize, usize) = (128, 128);

/// `config.json` bytes into a model spec, as [`ModelSpec::from_dir`] reads them, then
/// what loading derives from a spec (layer kinds, tensor names, sizes, RoPE tables).
pub fn config_json(bytes: &[u8]) -> Result<ModelSpec, ModelError> {
    let text = std::str::from_utf8(bytes).map_err(|e| ModelError::Config {
        path: "config.json".into(),
        reason: e.to_string(),
    })?;
    let spec = ModelSpec::from_json(text)?;
    assert_eq!(spec.layers.len(), spec.num_layers);
    assert!(spec.moe.top_k >= 1 && spec.moe.top_k <= spec.moe.num_experts);
    let moe_layers: Vec<usize> = spec.moe_layers().collect();
    for layer in [moe_layers.first(), moe_layers.last()]
        .into_iter()
        .flatten()
    {
        for e in [0, spec.moe.num_experts - 1] {
            for name in spec.expert_tensor_names(*layer, e) {
                assert!(name.starts_with("model.layers."), "{name}");
            }
        }
    }
    let _ = (spec.expert_bytes_f32(), spec.kv_floats_per_token());
    let rope = Rope::new(&spec.rope);
    let _ = rope.angles(spec.max_position_embeddings - 1);
    Ok(spec)
}

/// A whole `model.safetensors` file: its header parsed and checked, then every tensor
/// it lists read and converted to f32 (FP8 ones dequantised) with its own shape.
/// Returns how many tensors were read.
pub fn safetensors_file(bytes: &[u8]) -> Result<usize, ModelError> {
    let ckpt = Checkpoint::from_memory(
        vec![("model.safetensors".into(), bytes.to_vec())],
        Some(FP8_BLOCK),
    )?;
    let tensors = ckpt.tensor_shapes();
    let mut read = 0;
    for (name, shape) in &tensors {
        assert!(ckpt.contains(name));
        let stored = ckpt.stored_bytes(std::slice::from_ref(name));
        assert!(stored <= bytes.len() as u64, "{name}: {stored} bytes");
        match ckpt.tensor_f32(name, shape) {
            Ok(values) => {
                assert_eq!(values.len(), shape.iter().product::<usize>(), "{name}");
                read += 1;
            }
            // Unsupported dtypes, FP8 without (valid) scales: named errors.
            Err(ModelError::Dtype { .. } | ModelError::MissingTensor { .. }) => {}
            Err(ModelError::Checkpoint { .. } | ModelError::Shape { .. }) => {}
            Err(other) => panic!("unexpected error reading `{name}`: {other}"),
        }
    }
    Ok(read)
}

/// `model.safetensors.index.json` bytes into the list of shard files to open.
pub fn checkpoint_index(bytes: &[u8]) -> Result<Vec<String>, ModelError> {
    let path = std::path::Path::new("model.safetensors.index.json");
    let text = std::str::from_utf8(bytes).map_err(|e| ModelError::Checkpoint {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let names = shard_names(path, text)?;
    for n in &names {
        let joined = std::path::Path::new("/ckpt").join(n);
        assert_eq!(joined.parent(), Some(std::path::Path::new("/ckpt")), "{n}");
    }
    Ok(names)
}

/// The demo checkpoints' tokenizer (byte-level BPE, 512 ids), built once.
pub fn demo_tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("moe-fuzz-tokenizer-{}", std::process::id()));
        let built = demo_tokenizer::write(&dir, 512).map_err(|e| e.to_string());
        let tok = built.and_then(|_| Tokenizer::from_dir(&dir).map_err(|e| e.to_string()));
        let _ = std::fs::remove_dir_all(&dir);
        match tok {
            Ok(t) => t,
            Err(e) => panic!("the demo tokenizer does not build: {e}"),
        }
    })
}

/// Arbitrary bytes through the tokenizer: as text (lossily UTF-8) through `encode`,
/// which must round-trip exactly; and as a stream of ids (two bytes each, some beyond
/// the vocabulary) through [`IncrementalDecoder`], whose pieces must add up to the
/// one-shot decode whenever that is well-formed text, holding back only a few ids.
/// Returns the number of ids encoded.
pub fn tokenizer_input(bytes: &[u8]) -> Result<usize, TokenizerError> {
    let tok = demo_tokenizer();
    let text = String::from_utf8_lossy(bytes);
    let ids = tok.encode(&text, false)?;
    assert_eq!(tok.decode(&ids, false)?, text, "byte-level BPE is lossless");
    let with_bos = tok.encode(&text, true)?;
    assert_eq!(with_bos.first().copied(), tok.bos_token_id());

    let vocab = tok.vocab_size() as u32;
    let stream: Vec<u32> = bytes
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .map(|x| x % (vocab + 16))
        .collect();
    for (skip, context) in [(true, &[][..]), (false, &ids[..ids.len().min(3)])] {
        let mut dec = IncrementalDecoder::with_context(skip, context);
        let mut streamed = String::new();
        for &id in &stream {
            streamed += &dec.push(tok, id)?;
            assert!(
                dec.held_ids() <= MAX_WINDOW_IDS,
                "{} ids held",
                dec.held_ids()
            );
        }
        streamed += &dec.flush(tok)?;
        let known: Vec<u32> = stream.iter().copied().filter(|&i| i < vocab).collect();
        let mut whole = tok.decode(&known, skip)?;
        if !context.is_empty() {
            let mut all = context.to_vec();
            all.extend(&known);
            let before = tok.decode(context, skip)?;
            whole = match tok.decode(&all, skip)?.strip_prefix(&before) {
                Some(rest) => rest.to_owned(),
                None => continue,
            };
        }
        if !whole.contains(char::REPLACEMENT_CHARACTER) {
            assert_eq!(
                streamed, whole,
                "streamed text differs from the one-shot decode"
            );
        }
    }
    Ok(ids.len())
}
