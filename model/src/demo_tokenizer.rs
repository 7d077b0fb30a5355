//! A real, small `tokenizer.json` for the tiny random-weight checkpoints the tests write.
//!
//! Those checkpoints are in the exact Hugging Face layout, so they need a tokenizer that
//! `tokenizers` (and `transformers`) load like any other: a GPT-2/Llama-3 style byte-level BPE
//! with no unknown tokens, whose vocabulary is exactly as large as the model's embedding.
//!
//! Layout of the ids:
//! - 0, 1, 2: the special tokens `<|bos|>`, `<|eos|>`, `<|pad|>`;
//! - 3..259: the 256 byte symbols, in byte order, so any text can be encoded;
//! - then merges learned by plain pair counting over a small built-in corpus, most frequent first
//!   (ties go to the smaller pair of ids, which makes the result deterministic);
//! - once the corpus has nothing left to merge, compound merges of lowercase word pieces
//!   ("Ġthe" + "re", ...) in a fixed order fill the vocabulary up to the requested size.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::path::{Path, PathBuf};

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::{json, Value};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

use crate::tokenizer::{TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};

pub const BOS_TOKEN: &str = "<|bos|>";
pub const EOS_TOKEN: &str = "<|eos|>";
pub const PAD_TOKEN: &str = "<|pad|>";
pub const MIN_VOCAB_SIZE: usize = 512;
pub const MAX_VOCAB_SIZE: usize = 200_000;
pub const MODEL_MAX_LENGTH: usize = 4096;

/// Renders each message as "<|role|>\ncontent\n" and, when asked, opens an assistant turn.
/// No `bos_token` here: [`crate::tokenizer::Tokenizer::encode`] adds BOS itself.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

const SPECIAL_TOKENS: [&str; 3] = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN];
/// How the byte-level scheme spells a leading space.
const SPACE_SYMBOL: char = '\u{120}';

/// Training text for the merges. Mixed prose, code and some non-ASCII so that common words,
/// code idioms and a few multi-byte characters become single tokens.
const CORPUS: &str = r#"
The quick brown fox jumps over the lazy dog while the old cat watches from the window.
A mixture of experts model routes every token to a few experts chosen by a small gating network.
Each expert is a feed forward block; the router picks the top two and mixes their outputs.
Serving a large model means splitting the experts across machines and moving activations between them.
The worker loads its shard of the weights, answers requests from the router, and reports its health.
When a request arrives, the server tokenizes the prompt, runs the prefill, and then decodes one token at a time.
The key value cache remembers attention state so that each new token costs far less than the first.
We measure latency in milliseconds and throughput in tokens per second, and we watch both under load.
If a machine fails, the control plane notices the missing heartbeat and moves its experts elsewhere.
Good tests check behaviour that could actually break, not just that the code compiles.
She said that the weather would be fine tomorrow, but he took an umbrella anyway.
They walked along the river to the bridge, then turned north toward the station.
In the morning the market opens early and the bakery sells fresh bread and warm coffee.
Numbers like 1, 2, 3, 10, 42, 100, 2024 and 3.14159 appear in text and in code.
Questions? Answers! Lists: first, second, third; quotes "like this" and 'like that'.
I'd say it's fine, you're right, we'll see, they've gone, he'll know, she's here.
The café on the corner serves a naïve but charming crème brûlée, and the résumé looked über cool.
Señor Muñoz visited São Paulo, Zürich, Kraków and Reykjavík in one long, tiring month.
日本語のテキストも少し入れておきます。東京は大きな都市です。
中文也有一点：你好，世界。我们今天学习机器学习。
Ελληνικά: καλημέρα κόσμε. Русский язык: привет, мир. 한국어: 안녕하세요.
Emoji show up in chat: 🙂 😀 🎉 🚀 👍 ❤️ and sometimes a whole row 🎉🎉🎉.
Math symbols too: α + β = γ, x ≤ y, ∑ f(i), √2 ≈ 1.414, and arrows → ← ⇒.
fn main() {
    let mut total = 0;
    for i in 0..10 {
        total += i * i;
    }
    println!("total = {}", total);
}
pub struct Config {
    pub hidden_size: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
}
impl Config {
    pub fn new(hidden_size: usize) -> Self {
        Self { hidden_size, num_experts: 8, num_experts_per_tok: 2 }
    }
}
def softmax(values):
    largest = max(values)
    exps = [math.exp(v - largest) for v in values]
    total = sum(exps)
    return [e / total for e in exps]
class Router:
    def __init__(self, experts, top_k=2):
        self.experts = experts
        self.top_k = top_k
    def route(self, scores):
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        return ranked[: self.top_k]
if __name__ == "__main__":
    print(softmax([1.0, 2.0, 3.0]))
{"name": "worker-1", "port": 8080, "experts": [0, 1, 2, 3], "healthy": true, "load": 0.75}
SELECT id, name FROM users WHERE active = 1 ORDER BY name LIMIT 10;
for file in *.txt; do echo "$file"; done
The history of computing is full of clever ideas that seemed obvious only afterwards.
Engineers write documentation so that the next person does not have to guess.
A tokenizer turns text into numbers and numbers back into text, and it must never lose a byte.
Byte level encoding means every string can be represented, even one full of unusual characters.
The model predicts the next token, the sampler picks one, and the loop continues until the end.
Temperature, top p and top k change how adventurous the sampling is.
Please summarize the following article in three sentences and list the main points.
Translate "good morning" into French, German, Spanish and Japanese.
Write a function that returns the largest element of a list, and explain how it works.
What is the capital of France? The capital of France is Paris.
How many experts does the model have? It has sixty four experts and uses eight per token.
Thank you for your help; the answer was clear, correct and easy to follow.
"#;

#[derive(Debug, thiserror::Error)]
pub enum DemoTokenizerError {
    #[error(
        "demo tokenizer vocab_size must be between {MIN_VOCAB_SIZE} and {MAX_VOCAB_SIZE}, got {0}"
    )]
    VocabSize(usize),
    #[error("building the demo tokenizer failed: {0}")]
    Build(String),
    #[error("cannot write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The contents of the two tokenizer files plus the ids a checkpoint's configs need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoTokenizerFiles {
    pub tokenizer_json: String,
    pub tokenizer_config_json: String,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

/// Builds a byte-level BPE tokenizer (GPT-2/Llama-3 style: ByteLevel pre-tokenizer + decoder, no
/// unknown tokens) whose vocabulary has exactly `vocab_size` ids (error if vocab_size < 512 or
/// > 200_000). Deterministic: the same vocab_size always gives byte-identical JSON.
pub fn build(vocab_size: usize) -> Result<DemoTokenizerFiles, DemoTokenizerError> {
    if !(MIN_VOCAB_SIZE..=MAX_VOCAB_SIZE).contains(&vocab_size) {
        return Err(DemoTokenizerError::VocabSize(vocab_size));
    }
    let mut vocab = Vocab::with_specials_and_bytes();
    learn_corpus_merges(&mut vocab, vocab_size)?;
    fill_with_compounds(&mut vocab, vocab_size)?;
    if vocab.tokens.len() != vocab_size {
        return Err(DemoTokenizerError::Build(format!(
            "produced {} tokens instead of {vocab_size}",
            vocab.tokens.len()
        )));
    }
    Ok(DemoTokenizerFiles {
        tokenizer_json: tokenizer_json(&vocab)?,
        tokenizer_config_json: tokenizer_config_json()?,
        bos_token_id: 0,
        eos_token_id: 1,
        pad_token_id: 2,
    })
}

/// Writes tokenizer.json and tokenizer_config.json into `dir` (created if missing).
pub fn write(dir: &Path, vocab_size: usize) -> Result<DemoTokenizerFiles, DemoTokenizerError> {
    let files = build(vocab_size)?;
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| DemoTokenizerError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    for (name, text) in [
        (TOKENIZER_FILE, &files.tokenizer_json),
        (TOKENIZER_CONFIG_FILE, &files.tokenizer_config_json),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(io_error(&path))?;
    }
    Ok(files)
}

/// The GPT-2 byte-to-symbol table: printable Latin-1 bytes stand for themselves, the rest are
/// shifted to U+0100 and up, so every token is a readable string without whitespace.
fn byte_symbols() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut shifted = 0x100;
    for byte in 0..=255u8 {
        table[usize::from(byte)] = if matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            char::from(byte)
        } else {
            // At most 68 bytes are shifted, so this stays within U+0100..U+0144.
            let symbol = char::from_u32(shifted).unwrap_or(char::REPLACEMENT_CHARACTER);
            shifted += 1;
            symbol
        };
    }
    table
}

/// Tokens by id, the reverse index and the merges in rank order.
struct Vocab {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    merges: Vec<(u32, u32)>,
}

impl Vocab {
    fn with_specials_and_bytes() -> Self {
        let mut vocab = Self {
            tokens: Vec::new(),
            ids: HashMap::new(),
            merges: Vec::new(),
        };
        for token in SPECIAL_TOKENS {
            vocab.intern(token.to_owned());
        }
        for symbol in byte_symbols() {
            vocab.intern(symbol.to_string());
        }
        vocab
    }

    fn intern(&mut self, token: String) -> u32 {
        if let Some(&id) = self.ids.get(&token) {
            return id;
        }
        let id = self.tokens.len() as u32;
        self.ids.insert(token.clone(), id);
        self.tokens.push(token);
        id
    }

    /// Records the merge of `left` and `right`, returning the id of the merged token.
    fn merge(&mut self, left: u32, right: u32) -> u32 {
        let merged = format!(
            "{}{}",
            self.tokens[left as usize], self.tokens[right as usize]
        );
        self.merges.push((left, right));
        self.intern(merged)
    }
}

/// Splits the corpus exactly as the runtime pre-tokenizer will, so every learned merge is one
/// that encoding can actually use, and counts each distinct word.
fn corpus_words() -> Result<BTreeMap<String, u64>, DemoTokenizerError> {
    let mut text = PreTokenizedString::from(CORPUS);
    ByteLevel::new(false, true, true)
        .pre_tokenize(&mut text)
        .map_err(|e| DemoTokenizerError::Build(format!("pre-tokenizing the corpus: {e}")))?;
    let mut counts = BTreeMap::new();
    for (word, _, _) in text.get_splits(OffsetReferential::Original, OffsetType::Byte) {
        *counts.entry(word.to_owned()).or_insert(0) += 1;
    }
    Ok(counts)
}

fn pairs(word: &[u32]) -> impl Iterator<Item = (u32, u32)> + '_ {
    word.windows(2).map(|w| (w[0], w[1]))
}

/// Classic BPE training, kept incremental so that a merge only revisits the words containing
/// the pair: a max-heap of (count, smallest pair first) with stale entries skipped on pop.
fn learn_corpus_merges(vocab: &mut Vocab, target: usize) -> Result<(), DemoTokenizerError> {
    let mut words = Vec::new();
    let mut freqs = Vec::new();
    for (word, freq) in corpus_words()? {
        let symbols = word
            .chars()
            .map(|c| vocab.ids.get(c.to_string().as_str()).copied())
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| {
                DemoTokenizerError::Build(format!("corpus word {word:?} is not byte-level"))
            })?;
        words.push(symbols);
        freqs.push(freq);
    }

    let mut counts: HashMap<(u32, u32), u64> = HashMap::new();
    let mut containing: HashMap<(u32, u32), Vec<usize>> = HashMap::new();
    for (w, word) in words.iter().enumerate() {
        for pair in pairs(word) {
            *counts.entry(pair).or_insert(0) += freqs[w];
            let list = containing.entry(pair).or_default();
            if list.last() != Some(&w) {
                list.push(w);
            }
        }
    }
    let mut heap: BinaryHeap<(u64, Reverse<(u32, u32)>)> = counts
        .iter()
        .map(|(&pair, &count)| (count, Reverse(pair)))
        .collect();

    while vocab.tokens.len() < target {
        let Some((count, Reverse(pair))) = heap.pop() else {
            break;
        };
        if count == 0 || counts.get(&pair) != Some(&count) {
            continue; // superseded by a later count
        }
        let merged = vocab.merge(pair.0, pair.1);
        let mut touched = Vec::new();
        for w in containing.remove(&pair).unwrap_or_default() {
            let word = &words[w];
            if !pairs(word).any(|p| p == pair) {
                continue; // listed twice, already rewritten
            }
            for p in pairs(word) {
                let c = counts.entry(p).or_insert(0);
                *c = c.saturating_sub(freqs[w]);
                touched.push(p);
            }
            let mut rewritten = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && (word[i], word[i + 1]) == pair {
                    rewritten.push(merged);
                    i += 2;
                } else {
                    rewritten.push(word[i]);
                    i += 1;
                }
            }
            for p in pairs(&rewritten) {
                *counts.entry(p).or_insert(0) += freqs[w];
                touched.push(p);
                containing.entry(p).or_default().push(w);
            }
            words[w] = rewritten;
        }
        for p in touched {
            if let Some(&c) = counts.get(&p).filter(|&&c| c > 0) {
                heap.push((c, Reverse(p)));
            }
        }
    }
    Ok(())
}

/// Tops the vocabulary up with merges of lowercase pieces: a left piece (a word start like
/// "Ġthe" or a bare run like "ing") joined with a right run of letters. Pairs are taken in order
/// of rank sum, so frequent pieces combine first; the pre-tokenizer can reach every such token.
fn fill_with_compounds(vocab: &mut Vocab, target: usize) -> Result<(), DemoTokenizerError> {
    let letters = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase());
    let mut lefts = Vec::new();
    let mut rights = Vec::new();
    for (id, token) in vocab.tokens.iter().enumerate() {
        let id = id as u32;
        if letters(token) {
            lefts.push(id);
            rights.push(id);
        } else if token.strip_prefix(SPACE_SYMBOL).is_some_and(letters) {
            lefts.push(id);
        }
    }
    if lefts.is_empty() || rights.is_empty() {
        return Err(DemoTokenizerError::Build(
            "no lowercase pieces to combine".into(),
        ));
    }
    let mut rank_sum = 0;
    while vocab.tokens.len() < target {
        if rank_sum + 1 >= lefts.len() + rights.len() {
            return Err(DemoTokenizerError::Build(format!(
                "ran out of compound merges at {} of {target} tokens",
                vocab.tokens.len()
            )));
        }
        let first = rank_sum.saturating_sub(rights.len() - 1);
        let last = rank_sum.min(lefts.len() - 1);
        for i in first..=last {
            if vocab.tokens.len() >= target {
                break;
            }
            let (left, right) = (lefts[i], rights[rank_sum - i]);
            let merged = format!(
                "{}{}",
                vocab.tokens[left as usize], vocab.tokens[right as usize]
            );
            if !vocab.ids.contains_key(&merged) {
                vocab.merge(left, right);
            }
        }
        rank_sum += 1;
    }
    Ok(())
}

/// The vocabulary as a JSON object in id order (as Hugging Face writes it), independent of
/// whether serde_json preserves insertion order.
struct VocabById<'a>(&'a [String]);

impl Serialize for VocabById<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (id, token) in self.0.iter().enumerate() {
            map.serialize_entry(token, &id)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct BpeModel<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: Option<&'a str>,
    continuing_subword_prefix: Option<&'a str>,
    end_of_word_suffix: Option<&'a str>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: VocabById<'a>,
    merges: Vec<[&'a str; 2]>,
}

/// Field order follows the files `tokenizers` itself saves.
#[derive(Serialize)]
struct TokenizerFile<'a> {
    version: &'static str,
    truncation: Option<Value>,
    padding: Option<Value>,
    added_tokens: Vec<Value>,
    normalizer: Option<Value>,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    model: BpeModel<'a>,
}

fn tokenizer_json(vocab: &Vocab) -> Result<String, DemoTokenizerError> {
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    let added_tokens = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, content)| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    // Like Llama 3, the file itself adds BOS for `transformers` users; our own encode bypasses
    // the post-processor and adds BOS from tokenizer_config.json instead.
    let post_processor = json!({
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}}
        ],
        "pair": [
            {"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": BOS_TOKEN, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}}
        ],
        "special_tokens": {BOS_TOKEN: {"id": BOS_TOKEN, "ids": [0], "tokens": [BOS_TOKEN]}}
    });
    let token = |id: u32| vocab.tokens[id as usize].as_str();
    let file = TokenizerFile {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens,
        normalizer: None,
        pre_tokenizer: byte_level.clone(),
        post_processor,
        decoder: byte_level,
        model: BpeModel {
            kind: "BPE",
            dropout: None,
            unk_token: None,
            continuing_subword_prefix: None,
            end_of_word_suffix: None,
            fuse_unk: false,
            byte_fallback: false,
            ignore_merges: false,
            vocab: VocabById(&vocab.tokens),
            merges: vocab
                .merges
                .iter()
                .map(|&(l, r)| [token(l), token(r)])
                .collect(),
        },
    };
    serde_json::to_string(&file).map_err(|e| DemoTokenizerError::Build(e.to_string()))
}

fn tokenizer_config_json() -> Result<String, DemoTokenizerError> {
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": true,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    });
    serde_json::to_string_pretty(&config).map_err(|e| DemoTokenizerError::Build(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Tokenizer;

    fn load(vocab_size: usize) -> (tempfile::TempDir, Tokenizer) {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), vocab_size).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        (dir, tok)
    }

    const SAMPLES: [&str; 4] = [
        "Hello, world! fn main() { println!(\"{}\", 42); }",
        "The café's naïve crème brûlée — 日本語 and 中文, привет.",
        "emoji: 🙂🎉🚀 and rarer ones 🦀🪐🧬, plus 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 한국어 텍스트",
        "  leading spaces, tabs\tand\nnewlines\r\n  ",
    ];

    #[test]
    fn vocab_size_is_exact() {
        for size in [512, 32_000] {
            let (_dir, tok) = load(size);
            assert_eq!(tok.vocab_size(), size);
            assert_eq!(
                tok.inner().get_vocab_size(true),
                size,
                "no holes or duplicates"
            );
            assert!(tok.id_to_token(size as u32 - 1).is_some());
        }
    }

    #[test]
    fn largest_vocab_builds() {
        let files = build(MAX_VOCAB_SIZE).unwrap();
        let tok = tokenizers::Tokenizer::from_bytes(&files.tokenizer_json).unwrap();
        assert_eq!(tok.get_vocab_size(true), MAX_VOCAB_SIZE);
    }

    #[test]
    fn out_of_range_sizes_are_rejected() {
        for size in [0, MIN_VOCAB_SIZE - 1, MAX_VOCAB_SIZE + 1] {
            let err = build(size).unwrap_err();
            assert!(
                matches!(err, DemoTokenizerError::VocabSize(s) if s == size),
                "{err}"
            );
        }
    }

    #[test]
    fn build_is_deterministic() {
        assert_eq!(build(4000).unwrap(), build(4000).unwrap());
        assert_ne!(
            build(4000).unwrap().tokenizer_json,
            build(4001).unwrap().tokenizer_json
        );
    }

    #[test]
    fn byte_symbols_match_the_byte_level_alphabet() {
        let ours: std::collections::HashSet<char> = byte_symbols().into_iter().collect();
        let theirs: std::collections::HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        assert_eq!(ours.len(), 256);
        assert_eq!(ours, theirs);
        assert_eq!(byte_symbols()[usize::from(b' ')], SPACE_SYMBOL);
    }

    #[test]
    fn round_trip_is_exact_and_merges_are_used() {
        let (_dir, tok) = load(2048);
        for text in SAMPLES {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids, true).unwrap(), text);
            assert!(
                ids.iter().all(|&id| id >= 3),
                "no special ids in plain text"
            );
        }
        // Frequent corpus words are single tokens, so merges were really learned.
        assert_eq!(tok.encode(" the", false).unwrap().len(), 1);
        assert!(tok.encode("The experts", false).unwrap().len() <= 3);
    }

    #[test]
    fn bos_is_prepended_once() {
        let (_dir, tok) = load(512);
        let plain = tok.encode("hello there", false).unwrap();
        let with_bos = tok.encode("hello there", true).unwrap();
        assert_eq!(with_bos[0], 0);
        assert_eq!(&with_bos[1..], &plain[..]);
        assert_eq!(with_bos.iter().filter(|&&id| id == 0).count(), 1);
        let from_template = tok.encode("<|bos|>hello there", true).unwrap();
        assert_eq!(
            from_template, with_bos,
            "a BOS already in the text is not doubled"
        );
        assert_eq!(tok.bos_token_id(), Some(0));
        assert_eq!(tok.eos_token_ids(), &[1]);
        assert_eq!(tok.chat_template(), Some(CHAT_TEMPLATE));
        assert_eq!(tok.model_max_length(), Some(MODEL_MAX_LENGTH));
        // transformers users get BOS from the file's post-processor.
        let hf = tok.inner().encode("hello there", true).unwrap();
        assert_eq!(hf.get_ids(), &with_bos[..]);
    }

    #[test]
    fn special_tokens_decode_or_skip() {
        let (_dir, tok) = load(512);
        let mut ids = vec![0];
        ids.extend(tok.encode("hi", false).unwrap());
        ids.extend([1, 2]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "hi");
        assert_eq!(tok.decode(&ids, false).unwrap(), "<|bos|>hi<|eos|><|pad|>");
    }

    #[test]
    fn ids_beyond_the_vocab_are_skipped() {
        let (_dir, tok) = load(512);
        let ids = tok.encode("ok", false).unwrap();
        let mut padded = ids.clone();
        padded.insert(1, 512);
        padded.push(u32::MAX);
        assert_eq!(tok.decode(&padded, true).unwrap(), "ok");
        let mut dec = tok.decoder();
        assert_eq!(dec.push(&tok, 100_000).unwrap(), "");
        let streamed: String = padded
            .iter()
            .map(|&id| dec.push(&tok, id).unwrap())
            .collect();
        assert_eq!(streamed + &dec.flush(&tok).unwrap(), "ok");
    }

    #[test]
    fn incremental_decoding_never_splits_a_character() {
        let (_dir, tok) = load(1024);
        for text in SAMPLES {
            let ids = tok.encode(text, true).unwrap();
            // Make sure the test exercises the hard case: some token is only part of a character.
            let partial = ids.iter().any(|&id| {
                tok.decode(&[id], true)
                    .unwrap()
                    .contains(char::REPLACEMENT_CHARACTER)
            });
            assert!(
                partial || text.is_ascii(),
                "{text:?} has no split characters"
            );

            let mut dec = tok.decoder();
            let mut out = String::new();
            for &id in &ids {
                let piece = dec.push(&tok, id).unwrap();
                assert!(!piece.contains(char::REPLACEMENT_CHARACTER), "{piece:?}");
                out.push_str(&piece);
            }
            out.push_str(&dec.flush(&tok).unwrap());
            assert_eq!(out, text);
            assert_eq!(out, tok.decode(&ids, true).unwrap());
        }
    }

    #[test]
    fn flush_emits_an_unfinished_character_lossily() {
        let (_dir, tok) = load(512);
        let ids = tok.encode("a🦀", false).unwrap();
        let mut dec = tok.decoder();
        let mut out = String::new();
        for &id in &ids[..ids.len() - 1] {
            out.push_str(&dec.push(&tok, id).unwrap());
        }
        assert_eq!(out, "a", "the partial crab is held back");
        assert_eq!(dec.flush(&tok).unwrap(), "\u{FFFD}");
        assert_eq!(dec.flush(&tok).unwrap(), "");
    }
}
