//! The checkpoint's chat template: the Jinja text Hugging Face checkpoints ship (in
//! `tokenizer_config.json` as `chat_template`, or as a `chat_template.jinja` file), or the
//! file given with `--chat-template`, compiled once at start with minijinja and
//! minijinja-contrib's Python string methods (`.strip()`, `.startswith()`, …, which real
//! templates use). Rendering gets `messages`, `add_generation_prompt: true`,
//! `bos_token`, `eos_token` and `raise_exception` — what `transformers` passes.

use std::path::Path;

use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use serde_json::Value;

use crate::ServeError;

const NAME: &str = "chat";

/// The roles a conversation may hold.
pub const ROLES: &[&str] = &["system", "user", "assistant"];

/// Why a chat request is refused when the model has no template.
pub const NO_TEMPLATE: &str = "this model has no chat template (none in tokenizer_config.json, \
     no chat_template.jinja); start the server with --chat-template FILE, or send a prompt";

/// One chat message as the template sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template with the special tokens it may render.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// `bos_token` from `tokenizer_config.json` ("" when none).
    pub bos_token: String,
    pub eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// A token entry of `tokenizer_config.json`: a string or `{"content": …}`.
fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Loads the template of the checkpoint in `dir`, or `override_file` when given.
    /// `Ok(None)`: the model has no chat template (chat requests then get a 400).
    pub fn load(dir: &Path, override_file: Option<&Path>) -> anyhow::Result<Option<ChatTemplate>> {
        let config: Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| {
                anyhow::anyhow!("{}: {e}", dir.join("tokenizer_config.json").display())
            })?,
            Err(_) => Value::Null,
        };
        let source = match override_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("reading --chat-template {}: {e}", f.display()))?,
            ),
            None => match config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
                _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
            },
        };
        let Some(source) = source else {
            return Ok(None);
        };
        Ok(Some(ChatTemplate::new(
            source,
            token_text(config.get("bos_token")),
            token_text(config.get("eos_token")),
        )?))
    }

    /// Compiles `source`.
    pub fn new(
        source: String,
        bos_token: String,
        eos_token: String,
    ) -> anyhow::Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(NAME, source)
            .map_err(|e| anyhow::anyhow!("the chat template does not compile: {e}"))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The prompt of a conversation: roles checked, rendered, tokenised without a second
    /// BOS when the template already wrote one. Both client APIs chat through this.
    pub fn prompt_ids(
        &self,
        tok: &moe_model::Tokenizer,
        messages: &[ChatMessage],
    ) -> Result<Vec<u32>, ServeError> {
        if messages.is_empty() {
            return Err(ServeError::invalid(
                "messages",
                "at least one message is needed",
            ));
        }
        for (i, m) in messages.iter().enumerate() {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ServeError::invalid(
                    &format!("messages[{i}].role"),
                    format!("role `{}` is not supported ({})", m.role, ROLES.join(", ")),
                ));
            }
        }
        let rendered = self.render(messages)?;
        let add_bos = self.bos_token.is_empty() || !rendered.starts_with(&self.bos_token);
        tok.encode(&rendered, add_bos)
            .map_err(|e| ServeError::invalid("messages", e.to_string()))
    }

    /// Renders the conversation, opening the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ServeError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| ServeError::Internal(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| {
            // `raise_exception` is how templates refuse a conversation (wrong role order…).
            let mut msg = e.to_string();
            if let Some(detail) = e.detail() {
                msg = detail.to_owned();
            }
            ServeError::invalid("messages", format!("the chat template refused it: {msg}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_with_python_methods_and_special_tokens() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}[{{ m.role.upper() }}]{{ m.content.strip() }}{% endfor %}{% if add_generation_prompt %}[A]{% endif %}".into(),
            "<s>".into(),
            "</s>".into(),
        )
        .unwrap();
        let out = t.render(&[msg("user", "  hi  ")]).unwrap();
        assert_eq!(out, "<s>[USER]hi[A]");
    }

    #[test]
    fn raise_exception_is_a_bad_request() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let e = t.render(&[msg("assistant", "x")]).unwrap_err();
        assert!(e.to_string().contains("first must be user"), "{e}");
        assert!(matches!(e, ServeError::InvalidArgument { .. }));
    }

    #[test]
    fn every_checkpoint_template_renders() {
        for arch in moe_model::Arch::ALL {
            let src = moe_model::chat_templates::for_arch(arch);
            let t = ChatTemplate::new(src.into(), "<|bos|>".into(), "<|eos|>".into()).unwrap();
            let conv = [
                msg("system", "be brief"),
                msg("user", "hi"),
                msg("assistant", "yo"),
                msg("user", "again"),
            ];
            let out = t.render(&conv).unwrap_or_else(|e| panic!("{arch:?}: {e}"));
            assert!(
                out.contains("be brief") && out.contains("again"),
                "{arch:?}: {out}"
            );
        }
    }

    #[test]
    fn missing_template_is_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
        assert!(ChatTemplate::load(dir.path(), None).unwrap().is_none());
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{{ messages[0].content }}",
        )
        .unwrap();
        let t = ChatTemplate::load(dir.path(), None).unwrap().unwrap();
        assert_eq!(t.render(&[msg("user", "x")]).unwrap(), "x");
    }
}
