//! The CI smoke of the fuzz targets (`fuzz/`, run for real by `scripts/fuzz.sh`): every
//! committed seed in `fuzz/corpus/<target>/` and every regression input in
//! `fuzz/regressions/<target>/` goes through the same function its libFuzzer target
//! calls, then thousands of mutations of them from a fixed seed. Nothing may panic (the
//! functions also assert what must hold of what they accept: bounded request counts,
//! values no more than the bytes, streamed text equal to one-shot text).
//!
//! Naming: a file `valid-*` must be accepted, `invalid-*` refused with an error; other
//! names (inputs a fuzzer found) only must not panic. A panicking input is written to
//! `target/fuzz-replay-failures/<target>/` (an aborting one is its `last-input` when
//! `MOE_FUZZ_REPLAY_TRACE` is set) so that `fuzz/target/<triple>/release/<target> FILE`
//! or this test reproduces it. Each regression input's fixed behaviour is pinned in
//! [`REGRESSIONS`], and known inputs check that the entry points answer right.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// One fuzz target: its name (as in `fuzz/fuzz_targets/`) and its body, reduced to
/// accepted (`Ok`) or refused (`Err` with the reason).
struct Target {
    name: &'static str,
    run: fn(&[u8]) -> Result<(), String>,
    /// Whether some input is refused (the tokenizer takes any bytes).
    refuses: bool,
}

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<(), String> {
    r.map(|_| ()).map_err(|e| e.to_string())
}

const TARGETS: &[Target] = &[
    Target {
        name: "completion_body",
        run: |b| ok(moe_router::fuzzing::completion_body(b).map_err(|e| e.message)),
        refuses: true,
    },
    Target {
        name: "chat_body",
        run: |b| ok(moe_router::fuzzing::chat_body(b).map_err(|e| e.message)),
        refuses: true,
    },
    Target {
        name: "placement_document",
        run: |b| ok(moe_router::fuzzing::placement_document(b)),
        refuses: true,
    },
    Target {
        name: "dispatch_message",
        run: |b| ok(moe_worker::fuzzing::dispatch_message(b)),
        refuses: true,
    },
    Target {
        name: "config_json",
        run: |b| ok(moe_model::fuzzing::config_json(b)),
        refuses: true,
    },
    Target {
        name: "safetensors_file",
        run: |b| ok(moe_model::fuzzing::safetensors_file(b)),
        refuses: true,
    },
    Target {
        name: "checkpoint_index",
        run: |b| ok(moe_model::fuzzing::checkpoint_index(b)),
        refuses: true,
    },
    Target {
        name: "tokenizer_input",
        run: |b| ok(moe_model::fuzzing::tokenizer_input(b)),
        refuses: false,
    },
];

/// Mutations per target, spread over its seeds (a fixed number, so that the test's time
/// does not grow with the corpus; well under a second for all targets).
const MUTATIONS_PER_TARGET: usize = 5000;

/// Set (to anything) to write every mutated input to
/// `target/fuzz-replay-failures/<target>/last-input` before running it: the way to
/// catch an input that aborts the process (off by default: it costs a file write each).
const TRACE_VAR: &str = "MOE_FUZZ_REPLAY_TRACE";

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted (none if it does not exist).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    };
    out.retain(|p| p.is_file());
    out.sort();
    out
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs one input; `Err` with the panic message if it panicked.
fn run(t: &Target, input: &[u8]) -> Result<Result<(), String>, String> {
    catch_unwind(AssertUnwindSafe(|| (t.run)(input))).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())
    })
}

/// `target/fuzz-replay-failures/<target>/`, created.
fn failures_dir(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/fuzz-replay-failures")
        .join(target);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Keeps a panicking input for reproduction; returns where.
fn keep(target: &str, n: usize, input: &[u8]) -> PathBuf {
    let path = failures_dir(target).join(format!("panic-{n}"));
    let _ = std::fs::write(&path, input);
    path
}

/// xorshift64*: a fixed, dependency-free stream of pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values that break length and range checks when put where a number was.
const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1e309",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "1000000000000",
    "0.0000001",
    "null",
    "[]",
    "{}",
    "\"\"",
];

/// Bytes that matter to JSON, protobuf varints and safetensors headers.
const BYTES: &[u8] = b"\x00\x01\x7f\x80\xff\"{}[],:0-9e \\\x08\x0a\x12";

/// One mutation of `input` (`other`: another seed of the same target, for splicing).
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = BYTES[rng.below(BYTES.len())];
            }
            2 => {
                let i = rng.below(len + 1);
                v.insert(i, BYTES[rng.below(BYTES.len())]);
            }
            3 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(16)).min(len);
                v.drain(a..b);
            }
            4 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                let chunk = v[a..b].to_vec();
                let at = rng.below(len + 1);
                v.splice(
                    at..at,
                    chunk
                        .iter()
                        .copied()
                        .cycle()
                        .take(chunk.len() * (1 + rng.below(8))),
                );
            }
            5 => v.truncate(rng.below(len + 1)),
            6 if !other.is_empty() => {
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ => {
                // A run of digits replaced by an extreme value.
                let digits: Vec<usize> = (0..len).filter(|&i| v[i].is_ascii_digit()).collect();
                if digits.is_empty() {
                    continue;
                }
                let start = digits[rng.below(digits.len())];
                let end = (start..len)
                    .find(|&i| !v[i].is_ascii_digit())
                    .unwrap_or(len);
                let with = NUMBERS[rng.below(NUMBERS.len())].as_bytes();
                v.splice(start..end, with.iter().copied());
            }
        }
    }
    v
}

#[test]
fn every_fuzz_target_is_replayed_here_and_has_seeds() {
    let mut on_disk: Vec<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned()))
        .collect();
    on_disk.sort();
    let mut here: Vec<String> = TARGETS.iter().map(|t| t.name.to_owned()).collect();
    here.sort();
    assert_eq!(
        on_disk, here,
        "fuzz/fuzz_targets/ and this test's TARGETS differ"
    );
    for t in TARGETS {
        let seeds = files(&fuzz_dir().join("corpus").join(t.name));
        let named = |prefix: &str| {
            seeds
                .iter()
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix))
                })
                .count()
        };
        assert!(named("valid-") > 0, "{}: no valid-* seed", t.name);
        assert_eq!(
            named("invalid-") > 0,
            t.refuses,
            "{}: invalid-* seeds",
            t.name
        );
    }
}

#[test]
fn corpus_and_regression_inputs_are_accepted_or_refused_as_named() {
    let mut wrong = Vec::new();
    let mut count = 0;
    for t in TARGETS {
        for dir in ["corpus", "regressions"] {
            for path in files(&fuzz_dir().join(dir).join(t.name)) {
                count += 1;
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                match run(t, &read(&path)) {
                    Err(panic) => wrong.push(format!("{}: PANIC {panic}", path.display())),
                    Ok(Ok(())) if name.starts_with("invalid-") => {
                        wrong.push(format!("{}: accepted, should be refused", path.display()))
                    }
                    Ok(Err(e)) if name.starts_with("valid-") => wrong.push(format!(
                        "{}: refused ({e}), should be accepted",
                        path.display()
                    )),
                    Ok(_) => {}
                }
            }
        }
    }
    assert!(count >= 2 * TARGETS.len(), "only {count} inputs found");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn mutated_inputs_never_panic() {
    let trace = std::env::var_os(TRACE_VAR).is_some();
    let mut panics = Vec::new();
    for (k, t) in TARGETS.iter().enumerate() {
        let mut seeds: Vec<Vec<u8>> = Vec::new();
        for dir in ["corpus", "regressions"] {
            seeds.extend(
                files(&fuzz_dir().join(dir).join(t.name))
                    .iter()
                    .map(|p| read(p)),
            );
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (k as u64 + 1));
        let last = trace.then(|| failures_dir(t.name).join("last-input"));
        let (mut accepted, mut runs) = (0, 0);
        let started = std::time::Instant::now();
        for n in 0..MUTATIONS_PER_TARGET {
            let (seed, other) = (&seeds[n % seeds.len()], &seeds[(n + 1) % seeds.len()]);
            let input = mutate(&mut rng, seed, other);
            runs += 1;
            // An abort (an allocation too large to succeed) ends the process before
            // any report; with the trace on, the input it died on is left here.
            if let Some(last) = &last {
                let _ = std::fs::write(last, &input);
            }
            match run(t, &input) {
                Ok(Ok(())) => accepted += 1,
                Ok(Err(_)) => {}
                Err(panic) => {
                    let kept = keep(t.name, panics.len(), &input);
                    panics.push(format!("{}: {panic} (input: {})", t.name, kept.display()));
                }
            }
        }
        // Mutations that keep a seed valid exist for every target: a body that refused
        // everything would pass the panic check while testing nothing.
        assert!(
            accepted > 0,
            "{}: none of {runs} mutations accepted",
            t.name
        );
        eprintln!(
            "{}: {runs} mutations, {accepted} accepted, {:.1?}",
            t.name,
            started.elapsed()
        );
    }
    assert!(panics.is_empty(), "{}", panics.join("\n"));
}

/// What each regression input gives now that its bug is fixed: accepted (`None`) or
/// refused with an error containing the text. Every file in `fuzz/regressions/` is
/// listed here, so a new one comes with the behaviour it pins.
const REGRESSIONS: &[(&str, &str, Option<&str>)] = &[
    (
        "checkpoint_index",
        "invalid-shard-named-dot.json",
        Some("shard name `.` must be a plain file name"),
    ),
    (
        "config_json",
        "invalid-head-dim-2-pow-32.json",
        Some("`head_dim` is 4294967296; at most 1048576 is supported"),
    ),
    (
        "placement_document",
        "invalid-device-listed-twice.json",
        Some("device w0/cpu:0 is listed twice"),
    ),
    ("tokenizer_input", "valid-window-grew-past-bound.bin", None),
];

#[test]
fn regression_inputs_give_the_fixed_behaviour() {
    let mut on_disk = Vec::new();
    for t in TARGETS {
        for path in files(&fuzz_dir().join("regressions").join(t.name)) {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            on_disk.push(format!("{}/{name}", t.name));
        }
    }
    on_disk.sort();
    let mut listed: Vec<String> = REGRESSIONS
        .iter()
        .map(|(t, name, _)| format!("{t}/{name}"))
        .collect();
    listed.sort();
    assert_eq!(on_disk, listed, "fuzz/regressions/ and REGRESSIONS differ");
    for &(target, name, want) in REGRESSIONS {
        let t = TARGETS.iter().find(|t| t.name == target).expect("a target");
        let path = fuzz_dir().join("regressions").join(target).join(name);
        let got = run(t, &read(&path)).unwrap_or_else(|p| panic!("{target}/{name}: PANIC {p}"));
        match (want, got) {
            (None, Ok(())) => {}
            (Some(text), Err(e)) => assert!(e.contains(text), "{target}/{name}: {e}"),
            (want, got) => panic!("{target}/{name}: got {got:?}, want {want:?}"),
        }
    }
}

/// A safetensors file: the 8-byte header length, the JSON header, the data.
fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

/// The entry points give the right answer on inputs whose answer is known, so the
/// replay above cannot pass by refusing (or accepting) everything.
#[test]
fn entry_points_accept_and_refuse_known_inputs() {
    use moe_proto::v1::{DType, DispatchRequest};
    use prost::Message;

    let err = |r: Result<(), String>| r.expect_err("should be refused");
    let run_named = |name: &str, input: &[u8]| {
        let t = TARGETS.iter().find(|t| t.name == name).expect("a target");
        run(t, input).unwrap_or_else(|p| panic!("{name}: PANIC {p}"))
    };

    // Completions: prompts × n requests, each tokenised with the limits applied.
    let body = br#"{"prompt": ["a b", "c"], "n": 2, "max_tokens": 3}"#;
    let seqs = moe_router::fuzzing::completion_body(body).expect("a valid body");
    assert_eq!(seqs.len(), 4);
    assert!(seqs.iter().all(|s| s.stop.max_tokens == 3));
    let e = moe_router::fuzzing::completion_body(br#"{"prompt": "a", "best_of": 2}"#)
        .expect_err("best_of is refused");
    assert_eq!(e.param.as_deref(), Some("best_of"), "{}", e.message);
    let e = moe_router::fuzzing::completion_body(br#"{"prompt": "a", "n": 129}"#)
        .expect_err("too many choices");
    assert!(e.message.contains("at most 128 choices"), "{}", e.message);
    assert!(err(run_named("completion_body", br#"{"prompt": [99999]}"#)).contains("99999"));

    // Chat: the conversation rendered with the template.
    let body = br#"{"messages": [{"role": "user", "content": "hi"}], "n": 3}"#;
    assert_eq!(
        moe_router::fuzzing::chat_body(body).expect("valid").len(),
        3
    );
    assert!(moe_router::fuzzing::chat_body(br#"{"messages": []}"#).is_err());

    // Dispatch: one row of the tiny DeepSeek-V3 (hidden 64) to two experts of layer 1.
    let spec = moe_worker::fuzzing::spec();
    let hidden = spec.hidden_size;
    let req = DispatchRequest {
        layer: 1,
        num_rows: 1,
        hidden_size: hidden as u32,
        dtype: DType::DtypeF32 as i32,
        rows: vec![0; hidden * 4],
        top_k: 2,
        expert_ids: vec![0, 1],
        expert_weights: vec![0.5, 0.5],
        ..Default::default()
    };
    assert_eq!(
        moe_worker::fuzzing::dispatch_message(&req.encode_to_vec()).expect("valid"),
        1
    );
    let too_many = DispatchRequest {
        num_rows: 1 << 20,
        ..req.clone()
    };
    let e = err(run_named("dispatch_message", &too_many.encode_to_vec()));
    assert!(e.contains("at most 8192 rows"), "{e}");
    let dense = DispatchRequest { layer: 0, ..req };
    let e = err(run_named("dispatch_message", &dense.encode_to_vec()));
    assert!(e.contains("not a MoE layer"), "{e}");

    // config.json: the tiny Mixtral parses; without `hidden_size` it does not.
    let mut json = moe_model::tiny::config_json(
        moe_model::Arch::Mixtral,
        moe_model::tiny::Size::Tiny,
        moe_model::tiny::StoreDtype::F32,
    );
    let spec = moe_model::fuzzing::config_json(json.to_string().as_bytes()).expect("valid");
    assert_eq!(spec.hidden_size, 64);
    json.as_object_mut()
        .expect("an object")
        .remove("hidden_size");
    let e = err(run_named("config_json", json.to_string().as_bytes()));
    assert!(e.contains("hidden_size"), "{e}");

    // safetensors: two f32 values read; a header claiming 2^40 bytes refused unread.
    let header = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let file = safetensors(header, &[0, 0, 128, 63, 0, 0, 0, 64]);
    assert_eq!(
        moe_model::fuzzing::safetensors_file(&file).expect("valid"),
        1
    );
    let mut huge = file.clone();
    huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(err(run_named("safetensors_file", &huge)).contains("not a valid safetensors"));
    let short = safetensors(header, &[0; 4]);
    assert!(err(run_named("safetensors_file", &short)).contains("not a valid safetensors"));

    // Index files: shard names, deduplicated; a path out of the folder refused.
    let index = br#"{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}}"#;
    assert_eq!(
        moe_model::fuzzing::checkpoint_index(index).expect("valid"),
        ["m-1.safetensors", "m-2.safetensors"]
    );
    let e = err(run_named(
        "checkpoint_index",
        br#"{"weight_map": {"a": "../x.safetensors"}}"#,
    ));
    assert!(e.contains("must be a plain file name"), "{e}");

    // Tokenizer: any bytes (invalid UTF-8 included) encode and stream-decode.
    assert!(moe_model::fuzzing::tokenizer_input(b"hello world").expect("valid") > 0);
    assert!(moe_model::fuzzing::tokenizer_input(b"\xff\xfe\x00a\xe2\x82").is_ok());

    // Placements: a document naming an expert the model lacks is refused.
    let doc = br#"{"version": 1, "placement": {"controller": "r", "token": 1, "workers": {},
        "devices": [{"worker": "w", "device": "cpu:0", "capacity_bytes": 0, "experts": [[0, 99]]}]}}"#;
    let e = err(run_named("placement_document", doc));
    assert!(e.contains("expert 99 of layer 0"), "{e}");
}
