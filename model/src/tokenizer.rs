//! Text <-> token ids for a Hugging Face checkpoint directory.
//!
//! Serving needs more than `tokenizer.json`: which id is BOS, whether to add it, which ids end
//! generation, and the chat template. Hugging Face spreads those over `tokenizer.json`,
//! `tokenizer_config.json` and `generation_config.json`; [`Tokenizer::from_dir`] reads all three
//! and settles the precedence once, so the rest of the server never looks at these files.
//!
//! Streaming output goes through [`IncrementalDecoder`], which turns one id at a time into text
//! without ever splitting a UTF-8 character and without losing the spaces that SentencePiece-style
//! decoders only produce when they see a token's left neighbour.
//!
//! Models often pad their embedding matrix beyond the tokenizer's vocabulary (for example to a
//! multiple of 64), so a sampler can return ids the tokenizer has never heard of. [`Tokenizer::decode`]
//! and [`IncrementalDecoder::push`] drop such ids silently instead of failing the request.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The tokenizer model, pre-tokenizer and decoder (required).
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Special tokens, BOS policy and chat template (optional).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// BOS/EOS ids as the model's authors want them used at generation time (optional).
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// Newer `transformers` versions save the chat template here instead of in the config.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// `transformers` writes `int(1e30)` as `model_max_length` to mean "no limit"; nothing real comes
/// near this bound, so anything at or above it is treated as absent.
const MAX_PLAUSIBLE_CONTEXT: u64 = 1_000_000_000_000;

/// How many ids the incremental decoder holds back waiting for a UTF-8 character to complete.
/// A character is at most 4 bytes and every token carries at least one byte, so anything longer
/// is a genuinely invalid sequence and is emitted (lossily) rather than held forever.
const MAX_PENDING_IDS: usize = 8;

/// Most ids an [`IncrementalDecoder`] ever holds: the ids of its last emission (at most
/// one more than [`MAX_PENDING_IDS`], or the [`MAX_CONTEXT_IDS`] of the prompt) as context,
/// plus as many unread ones.
pub const MAX_WINDOW_IDS: usize = 2 * (MAX_PENDING_IDS + 1);

/// How many prompt ids [`IncrementalDecoder::with_context`] keeps: enough left context for any
/// decoder that looks at neighbours, while keeping each push cheap.
const MAX_CONTEXT_IDS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("{} sets {field} to {token:?}, which is not in the tokenizer vocabulary", path.display())]
    UnknownToken {
        path: PathBuf,
        field: String,
        token: String,
    },
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("decoding failed: {0}")]
    Decode(String),
}

/// A loaded checkpoint tokenizer with its BOS/EOS policy resolved.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    add_bos_token: bool,
    vocab_size: usize,
    /// Ids of the special added tokens (what `skip_special_tokens` drops).
    special_ids: std::collections::HashSet<u32>,
    chat_template: Option<String>,
    model_max_length: Option<usize>,
}

impl std::fmt::Debug for Tokenizer {
    // The inner tokenizer would print its whole vocabulary.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("add_bos_token", &self.add_bos_token)
            .field("model_max_length", &self.model_max_length)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (required) plus `tokenizer_config.json`, `generation_config.json`
    /// and `chat_template.jinja` when present.
    ///
    /// Precedence: BOS/EOS ids from `generation_config.json` win over the token strings of
    /// `tokenizer_config.json`, which are looked up in the vocabulary. BOS is added on encode when
    /// `add_bos_token` says so; when that key is missing it defaults to whether
    /// `tokenizer_config.json` names a `bos_token` (Qwen-style checkpoints leave `bos_token` null
    /// yet list a `bos_token_id` in the generation config, and must not get one).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join(TOKENIZER_FILE);
        let bytes = std::fs::read(&path).map_err(|source| TokenizerError::Io {
            path: path.clone(),
            source,
        })?;
        let mut inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Parse {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        // Some exported tokenizer.json files carry training-time truncation/padding; applied
        // here they would silently cut prompts or add pad ids, so serving always turns them off.
        inner
            .with_truncation(None)
            .map_err(|e| TokenizerError::Parse {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        inner.with_padding(None);

        let config = JsonFile::read_optional(&dir.join(TOKENIZER_CONFIG_FILE))?;
        let generation = JsonFile::read_optional(&dir.join(GENERATION_CONFIG_FILE))?;

        let mut bos_token = None;
        let mut eos_token = None;
        let mut add_bos_token = false;
        let mut chat_template = None;
        let mut model_max_length = None;
        if let Some(config) = &config {
            bos_token = config.token("bos_token")?;
            eos_token = config.token("eos_token")?;
            add_bos_token = config.bool("add_bos_token")?.unwrap_or(bos_token.is_some());
            chat_template = config.chat_template()?;
            model_max_length = config.max_length("model_max_length")?;
        }
        if chat_template.is_none() {
            chat_template = read_optional_text(&dir.join(CHAT_TEMPLATE_FILE))?;
        }

        let generation_bos = match &generation {
            Some(g) => g.ids("bos_token_id")?.and_then(|ids| ids.first().copied()),
            None => None,
        };
        let generation_eos = match &generation {
            Some(g) => g.ids("eos_token_id")?.filter(|ids| !ids.is_empty()),
            None => None,
        };

        // Token strings are only resolved when the generation config does not already give the
        // id, so a stale string in tokenizer_config.json cannot block an otherwise usable model.
        let resolve = |field: &str, token: Option<String>| -> Result<Option<u32>, TokenizerError> {
            let (Some(token), Some(config)) = (token, &config) else {
                return Ok(None);
            };
            match inner.token_to_id(&token) {
                Some(id) => Ok(Some(id)),
                None => Err(TokenizerError::UnknownToken {
                    path: config.path.clone(),
                    field: field.to_owned(),
                    token,
                }),
            }
        };
        let bos_token_id = match generation_bos {
            Some(id) => Some(id),
            None => resolve("bos_token", bos_token)?,
        };
        let mut eos_token_ids = match generation_eos {
            Some(ids) => ids,
            None => resolve("eos_token", eos_token)?.into_iter().collect(),
        };
        let mut seen = std::collections::HashSet::new();
        eos_token_ids.retain(|id| seen.insert(*id));

        // One more than the largest id rather than a count, so a vocabulary with holes still
        // reports the size an embedding matrix must have.
        let largest = inner.get_vocab(true).into_values().max();
        let vocab_size = largest
            .map_or(0, |id| id as usize + 1)
            .max(inner.get_vocab_size(true));

        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();

        Ok(Self {
            inner,
            bos_token_id,
            eos_token_ids,
            add_bos_token,
            vocab_size,
            special_ids,
            chat_template,
            model_max_length,
        })
    }

    /// Encodes `text`. With `add_bos` and a config that asks for BOS, the result starts with
    /// exactly one BOS: it is prepended here (the tokenizer.json post-processor is bypassed so
    /// every tokenizer behaves alike) unless the text itself already began with the BOS token,
    /// as chat templates that render `{{ bos_token }}` do.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let ids = encoding.get_ids();
        match self.bos_token_id {
            Some(bos) if add_bos && self.add_bos_token && ids.first() != Some(&bos) => {
                let mut out = Vec::with_capacity(ids.len() + 1);
                out.push(bos);
                out.extend_from_slice(ids);
                Ok(out)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// Decodes `ids` to text. Ids at or beyond [`Self::vocab_size`] (a padded model vocabulary)
    /// decode to nothing instead of failing.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        let known: Cow<'_, [u32]> = if ids.iter().all(|&id| self.is_known(id)) {
            Cow::Borrowed(ids)
        } else {
            Cow::Owned(
                ids.iter()
                    .copied()
                    .filter(|&id| self.is_known(id))
                    .collect(),
            )
        };
        self.inner
            .decode(&known, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    fn is_known(&self, id: u32) -> bool {
        (id as usize) < self.vocab_size
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// Every id that ends generation (generation configs may list several, e.g. end-of-turn and
    /// end-of-text). Empty when the checkpoint names none.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Whether [`Self::encode`] with `add_bos = true` actually adds BOS.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token && self.bos_token_id.is_some()
    }

    /// One more than the largest id, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// `model_max_length` from the config, unless it is absent or the "unlimited" sentinel.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The underlying `tokenizers` tokenizer, for anything this wrapper does not cover.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// A fresh streaming decoder that skips special tokens.
    pub fn decoder(&self) -> IncrementalDecoder {
        IncrementalDecoder::new(true)
    }
}

/// Streaming detokenisation: feed ids one by one and get back the text they completed.
///
/// Decoding each id on its own is wrong twice over: byte-level BPE can split one character over
/// several tokens, and SentencePiece-style decoders drop the leading space of whatever token comes
/// first. So this keeps a short window of ids. Everything before `read` has been emitted; the ids
/// before it stay only as left context. Each push decodes the window with and without the unread
/// ids and emits the difference once it no longer ends in U+FFFD (a character still incomplete).
/// After emitting, the old unread ids become the new context and older ids are dropped, so a push
/// costs O(window), not O(sequence).
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    /// Context ids followed by not-yet-emitted ids.
    window: Vec<u32>,
    /// Index in `window` of the first id whose text has not been emitted.
    read: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self::with_context(skip_special_tokens, &[])
    }

    /// A decoder whose first output follows `context` (typically the prompt's ids), which is
    /// never emitted itself. SentencePiece-style decoders drop the leading space of the first
    /// token they see, so without context a reply's first word loses its space; with it, the
    /// output reads as a continuation of the prompt.
    pub fn with_context(skip_special_tokens: bool, context: &[u32]) -> Self {
        let window = context[context.len().saturating_sub(MAX_CONTEXT_IDS)..].to_vec();
        Self {
            read: window.len(),
            window,
            skip_special_tokens,
        }
    }

    /// Adds one id and returns the text that became final (often empty). Ids beyond the
    /// tokenizer's vocabulary are ignored, and so are special tokens when they are
    /// skipped: they carry no text, so they must neither count towards the ids held back
    /// for an incomplete character nor stay in the window.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        if !tok.is_known(id) || (self.skip_special_tokens && tok.special_ids.contains(&id)) {
            return Ok(String::new());
        }
        self.window.push(id);
        self.advance(tok, false)
    }

    /// How many ids the window holds (left context and ids not yet emitted); at most
    /// [`MAX_WINDOW_IDS`].
    pub fn held_ids(&self) -> usize {
        self.window.len()
    }

    /// Any text still held back (e.g. an incomplete char at the very end gets emitted lossily here).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        self.advance(tok, true)
    }

    fn advance(&mut self, tok: &Tokenizer, force: bool) -> Result<String, TokenizerError> {
        if self.read >= self.window.len() {
            return Ok(String::new());
        }
        let context = tok.decode(&self.window[..self.read], self.skip_special_tokens)?;
        let full = tok.decode(&self.window, self.skip_special_tokens)?;
        if full == context {
            // The unread ids produce no text at all (skipped special tokens). The decoder never
            // sees them either, so dropping them keeps the window small during runs of them.
            self.window.truncate(self.read);
            return Ok(String::new());
        }
        let pending = self.window.len() - self.read;
        let incomplete = full.ends_with(char::REPLACEMENT_CHARACTER);
        // Text that is not final yet (an incomplete character, or no longer than the
        // context: a lossy context whose bytes the new ids complete) is held back, but
        // only for MAX_PENDING_IDS ids. Holding the second case without that bound let
        // skipped special tokens grow the window without limit (found by fuzzing).
        let not_final = incomplete || full.len() <= context.len();
        if not_final && !force && pending <= MAX_PENDING_IDS {
            return Ok(String::new());
        }
        let text = new_suffix(&context, &full).to_owned();
        self.window.drain(..self.read);
        self.read = self.window.len();
        Ok(text)
    }
}

/// The part of `full` beyond `context`. Normally `context` is a prefix of `full`; if a decoder
/// rewrote earlier text anyway, cut at the nearest character boundary instead of panicking.
fn new_suffix<'a>(context: &str, full: &'a str) -> &'a str {
    if let Some(rest) = full.strip_prefix(context) {
        return rest;
    }
    let mut cut = context.len().min(full.len());
    while !full.is_char_boundary(cut) {
        cut += 1;
    }
    &full[cut..]
}

/// Reads a whole optional text file; a missing file is `None`.
fn read_optional_text(path: &Path) -> Result<Option<String>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A JSON object read from one config file, with typed getters whose errors name the file and key.
/// A key set to `null` counts as absent, as `transformers` treats it.
struct JsonFile {
    path: PathBuf,
    root: Map<String, Value>,
}

impl JsonFile {
    fn read_optional(path: &Path) -> Result<Option<Self>, TokenizerError> {
        let Some(text) = read_optional_text(path)? else {
            return Ok(None);
        };
        let parse_error = |reason: String| TokenizerError::Parse {
            path: path.to_owned(),
            reason,
        };
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(root)) => Ok(Some(Self {
                path: path.to_owned(),
                root,
            })),
            Ok(_) => Err(parse_error(
                "expected a JSON object at the top level".into(),
            )),
            Err(e) => Err(parse_error(e.to_string())),
        }
    }

    fn error(&self, key: &str, expected: &str, found: &Value) -> TokenizerError {
        TokenizerError::Parse {
            path: self.path.clone(),
            reason: format!("\"{key}\" must be {expected}, found {found}"),
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.root.get(key).filter(|v| !v.is_null())
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, TokenizerError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.error(key, "true or false", other)),
        }
    }

    /// A special token: either its text or an `AddedToken` object with a "content" field.
    fn token(&self, key: &str) -> Result<Option<String>, TokenizerError> {
        let expected = "a string or an object with a string \"content\"";
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v @ Value::Object(obj)) => match obj.get("content") {
                Some(Value::String(s)) => Ok(Some(s.clone())),
                _ => Err(self.error(key, expected, v)),
            },
            Some(other) => Err(self.error(key, expected, other)),
        }
    }

    /// One token id or a list of them.
    fn ids(&self, key: &str) -> Result<Option<Vec<u32>>, TokenizerError> {
        let expected = "a token id or a list of token ids";
        let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| as_id(v).ok_or_else(|| self.error(key, expected, v)))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => as_id(v)
                .map(|id| Some(vec![id]))
                .ok_or_else(|| self.error(key, expected, v)),
        }
    }

    fn max_length(&self, key: &str) -> Result<Option<usize>, TokenizerError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        if let Some(n) = v.as_u64() {
            return Ok(usize::try_from(n)
                .ok()
                .filter(|_| n < MAX_PLAUSIBLE_CONTEXT));
        }
        // 1e30 does not fit an integer and arrives as a float: that is the "unlimited" sentinel.
        match v.as_f64() {
            Some(f) if f >= MAX_PLAUSIBLE_CONTEXT as f64 => Ok(None),
            _ => Err(self.error(key, "a non-negative integer", v)),
        }
    }

    /// `chat_template` is a string, or a list of named templates where "default" is the one
    /// used for plain chat (others are e.g. "tool_use" or "rag").
    fn chat_template(&self) -> Result<Option<String>, TokenizerError> {
        const KEY: &str = "chat_template";
        let expected = "a string or a list of {\"name\", \"template\"} objects";
        let items = match self.get(KEY) {
            None => return Ok(None),
            Some(Value::String(s)) => return Ok(Some(s.clone())),
            Some(Value::Array(items)) => items,
            Some(other) => return Err(self.error(KEY, expected, other)),
        };
        let mut named = Vec::with_capacity(items.len());
        for item in items {
            let name = item.get("name").and_then(Value::as_str);
            match item.get("template").and_then(Value::as_str) {
                Some(template) => named.push((name, template)),
                None => return Err(self.error(KEY, expected, item)),
            }
        }
        let chosen = named
            .iter()
            .find(|(name, _)| *name == Some("default"))
            .or(named.first());
        Ok(chosen.map(|(_, template)| (*template).to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo_tokenizer;
    use std::fs;

    fn demo_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        demo_tokenizer::write(dir.path(), 512).unwrap();
        dir
    }

    fn set(dir: &tempfile::TempDir, file: &str, json: &str) {
        fs::write(dir.path().join(file), json).unwrap();
    }

    fn load(dir: &tempfile::TempDir) -> Tokenizer {
        Tokenizer::from_dir(dir.path()).unwrap()
    }

    fn load_err(dir: &tempfile::TempDir) -> TokenizerError {
        Tokenizer::from_dir(dir.path()).unwrap_err()
    }

    #[test]
    fn missing_or_corrupt_tokenizer_json_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_err(&dir);
        assert!(matches!(err, TokenizerError::Io { .. }), "{err:?}");
        let path = dir.path().join(TOKENIZER_FILE).display().to_string();
        assert!(err.to_string().contains(&path), "{err}");

        set(&dir, TOKENIZER_FILE, "{\"model\": 12");
        let err = load_err(&dir);
        assert!(matches!(err, TokenizerError::Parse { .. }), "{err:?}");
        assert!(err.to_string().contains(&path), "{err}");
    }

    #[test]
    fn generation_config_ids_override_config_tokens() {
        let dir = demo_dir();
        let tok = load(&dir);
        assert_eq!(
            (tok.bos_token_id(), tok.eos_token_ids()),
            (Some(0), &[1][..])
        );

        set(
            &dir,
            GENERATION_CONFIG_FILE,
            r#"{"bos_token_id": 2, "eos_token_id": [1, 2, 1]}"#,
        );
        let tok = load(&dir);
        // The list wins and is deduplicated.
        assert_eq!(
            (tok.bos_token_id(), tok.eos_token_ids()),
            (Some(2), &[1, 2][..])
        );

        // A lone id works too; the missing bos id falls back to the config's bos_token.
        set(&dir, GENERATION_CONFIG_FILE, r#"{"eos_token_id": 2}"#);
        let tok = load(&dir);
        assert_eq!(
            (tok.bos_token_id(), tok.eos_token_ids()),
            (Some(0), &[2][..])
        );
    }

    #[test]
    fn add_bos_token_false_is_respected() {
        let dir = demo_dir();
        let config = r#"{"bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": false}"#;
        set(&dir, TOKENIZER_CONFIG_FILE, config);
        let tok = load(&dir);
        assert_eq!(tok.bos_token_id(), Some(0));
        assert!(!tok.add_bos_token());
        let ids = tok.encode("hello", true).unwrap();
        assert_ne!(ids.first(), Some(&0));
        assert_eq!(ids, tok.encode("hello", false).unwrap());
    }

    #[test]
    fn bos_is_not_added_without_a_config_bos_token() {
        // Qwen-style: no bos_token in tokenizer_config, but a bos id in generation_config.
        let dir = demo_dir();
        set(&dir, TOKENIZER_CONFIG_FILE, r#"{"bos_token": null}"#);
        set(&dir, GENERATION_CONFIG_FILE, r#"{"bos_token_id": 0}"#);
        let tok = load(&dir);
        assert_eq!(tok.bos_token_id(), Some(0));
        assert_ne!(tok.encode("hello", true).unwrap().first(), Some(&0));
    }

    #[test]
    fn only_tokenizer_json_means_no_special_policy() {
        let dir = demo_dir();
        fs::remove_file(dir.path().join(TOKENIZER_CONFIG_FILE)).unwrap();
        let tok = load(&dir);
        assert_eq!((tok.bos_token_id(), tok.eos_token_ids()), (None, &[][..]));
        assert_eq!((tok.chat_template(), tok.model_max_length()), (None, None));
        assert_eq!(
            tok.encode("hi", true).unwrap(),
            tok.encode("hi", false).unwrap()
        );

        set(&dir, CHAT_TEMPLATE_FILE, "{{ messages }}");
        assert_eq!(load(&dir).chat_template(), Some("{{ messages }}"));
    }

    #[test]
    fn object_tokens_list_templates_and_sentinel_length() {
        let dir = demo_dir();
        let config = r#"{
            "bos_token": {"__type": "AddedToken", "content": "<|bos|>", "special": true},
            "eos_token": {"content": "<|pad|>"},
            "model_max_length": 1000000000000000019884624838656,
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "PLAIN"}
            ]
        }"#;
        set(&dir, TOKENIZER_CONFIG_FILE, config);
        let tok = load(&dir);
        assert_eq!(
            (tok.bos_token_id(), tok.eos_token_ids()),
            (Some(0), &[2][..])
        );
        assert!(
            tok.add_bos_token(),
            "defaults to true when a bos_token is named"
        );
        assert_eq!(
            (tok.chat_template(), tok.model_max_length()),
            (Some("PLAIN"), None)
        );

        // Without a "default" entry the first template is used.
        let config =
            r#"{"model_max_length": 8192, "chat_template": [{"name": "rag", "template": "R"}]}"#;
        set(&dir, TOKENIZER_CONFIG_FILE, config);
        let tok = load(&dir);
        assert_eq!(
            (tok.chat_template(), tok.model_max_length()),
            (Some("R"), Some(8192))
        );
    }

    #[test]
    fn bad_config_values_are_reported_with_file_and_key() {
        let dir = demo_dir();
        set(&dir, GENERATION_CONFIG_FILE, r#"{"eos_token_id": "two"}"#);
        let err = load_err(&dir).to_string();
        assert!(
            err.contains(GENERATION_CONFIG_FILE) && err.contains("eos_token_id"),
            "{err}"
        );

        set(&dir, GENERATION_CONFIG_FILE, "{}");
        set(&dir, TOKENIZER_CONFIG_FILE, r#"{"eos_token": "<|nope|>"}"#);
        let err = load_err(&dir);
        assert!(
            matches!(err, TokenizerError::UnknownToken { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(TOKENIZER_CONFIG_FILE), "{err}");

        set(&dir, TOKENIZER_CONFIG_FILE, "[1, 2]");
        let err = load_err(&dir).to_string();
        assert!(
            err.contains(TOKENIZER_CONFIG_FILE) && err.contains("object"),
            "{err}"
        );

        set(&dir, TOKENIZER_CONFIG_FILE, r#"{"add_bos_token": "yes"}"#);
        assert!(load_err(&dir).to_string().contains("add_bos_token"));
    }

    /// A SentencePiece-style tokenizer whose decoder strips the space of the first token: decoding
    /// ids one at a time would glue words together.
    #[test]
    fn incremental_decoder_keeps_sentencepiece_spaces() {
        let dir = tempfile::tempdir().unwrap();
        let json = r#"{
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "post_processor": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
            "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
            "model": {"type": "WordLevel", "unk_token": "<unk>",
                      "vocab": {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁again": 4}}
        }"#;
        set(&dir, TOKENIZER_FILE, json);
        let tok = load(&dir);
        assert_eq!(tok.vocab_size(), 5);
        let ids = [1, 2, 3, 77, 4];
        let mut dec = tok.decoder();
        let mut pieces: Vec<String> = ids.iter().map(|&id| dec.push(&tok, id).unwrap()).collect();
        pieces.push(dec.flush(&tok).unwrap());
        assert_eq!(pieces[1], " world");
        assert_eq!(pieces.concat(), "Hello world! again");
        assert_eq!(pieces.concat(), tok.decode(&ids, true).unwrap());

        let mut dec = IncrementalDecoder::with_context(true, &[3, 1]);
        assert_eq!(dec.push(&tok, 2).unwrap(), " world", "continues the prompt");
    }

    #[test]
    fn skipped_special_tokens_do_not_grow_the_window() {
        let dir = demo_dir();
        let tok = load(&dir);
        let mut dec = tok.decoder();
        let mut out = String::new();
        for &id in &tok.encode("one", false).unwrap() {
            out += &dec.push(&tok, id).unwrap();
        }
        for _ in 0..100 {
            out += &dec.push(&tok, 2).unwrap();
        }
        assert!(
            dec.window.len() <= 2,
            "window holds {} ids",
            dec.window.len()
        );
        for &id in &tok.encode(" two", false).unwrap() {
            out += &dec.push(&tok, id).unwrap();
        }
        assert_eq!(out + &dec.flush(&tok).unwrap(), "one two");
    }

    /// Found by the `tokenizer_input` fuzz target: a UTF-8 lead byte, then skipped special
    /// tokens counted as ids held back until the byte was emitted lossily as U+FFFD; the
    /// continuation byte after them then made the context's text shorter than before,
    /// and every special token after that was held (the window grew by one id per push,
    /// each push decoding all of it). Skipped specials now stay out of the window.
    #[test]
    fn lossy_context_and_special_tokens_do_not_grow_the_window() {
        let dir = demo_dir();
        let tok = load(&dir);
        let bytes = include_bytes!(
            "../../fuzz/regressions/tokenizer_input/valid-window-grew-past-bound.bin"
        );
        crate::fuzzing::tokenizer_input(bytes).unwrap();
        // The same shape by hand: ">", byte 0xDD, 8 skipped BOS, byte 0xA7, then BOS.
        let byte = |b: u8| 3 + u32::from(b);
        let mut dec = tok.decoder();
        let mut ids = vec![byte(b'>'), byte(0xdd)];
        ids.extend([0; 8]);
        ids.push(byte(0xa7));
        ids.extend([0; 40]);
        let mut out = String::new();
        for &id in &ids {
            out += &dec.push(&tok, id).unwrap();
            assert!(dec.held_ids() <= 2, "{} ids held", dec.held_ids());
        }
        out += &dec.flush(&tok).unwrap();
        assert_eq!(out, ">\u{767}", "0xDD 0xA7 is one character");
        assert_eq!(out, tok.decode(&ids, true).unwrap());
    }

    #[test]
    fn new_suffix_cuts_on_char_boundaries() {
        assert_eq!(new_suffix("ab", "abc"), "c");
        // Not a prefix: byte 4 falls inside "日" (bytes 3..6), so the cut moves past it.
        assert_eq!(new_suffix("abcd", "aé日x"), "x");
    }
}
