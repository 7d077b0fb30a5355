//! Chat templates that `moe checkpoint new` writes into `tokenizer_config.json`, one per
//! architecture in the style of that model family (Mixtral `[INST]`, Qwen ChatML,
//! DeepSeek `<｜User｜>`, OLMoE `<|user|>`), so the tiny checkpoints chat like real ones.
//! The tiny tokenizer has none of these markers as single tokens: they tokenize as text,
//! except `bos_token`/`eos_token`, which are its own special tokens.

use crate::config::Arch;

/// Mixtral-Instruct: `<s>[INST] … [/INST] answer</s>`; a system message is prefixed to
/// the first user turn; roles must alternate.
const MIXTRAL: &str = "{{ bos_token }}\
{%- if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}\
{%- else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}\
{%- for message in loop_messages %}\
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
{%- if message['role'] == 'user' %}{{ '[INST] ' + (system if loop.first else '') + message['content'].strip() + ' [/INST]' }}\
{%- else %}{{ ' ' + message['content'].strip() + eos_token }}{% endif %}\
{%- endfor %}";

/// Qwen ChatML: `<|im_start|>role\n…<|im_end|>\n`, with Qwen's default system prompt.
const QWEN: &str = "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}\
{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}\
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// DeepSeek-V2/V3: `<｜begin▁of▁sentence｜>system<｜User｜>…<｜Assistant｜>…<｜end▁of▁sentence｜>`
/// (with the checkpoint's own BOS/EOS tokens in their place).
const DEEPSEEK: &str = "{{ bos_token }}\
{%- for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}{% endfor %}\
{%- for message in messages %}\
{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}\
{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}{% endif %}\
{%- endfor %}\
{%- if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}";

/// OLMoE-Instruct (Tülu style): `<|user|>\n…\n<|assistant|>\n…eos\n`.
const OLMOE: &str = "{{ bos_token }}\
{%- for message in messages %}\
{%- if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}\
{%- elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}\
{%- else %}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}{% endif %}\
{%- endfor %}\
{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

/// The chat template written for `arch`.
pub fn for_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::Mixtral => MIXTRAL,
        Arch::Qwen2Moe | Arch::Qwen3Moe => QWEN,
        Arch::DeepseekV2 | Arch::DeepseekV3 => DEEPSEEK,
        Arch::Olmoe => OLMOE,
    }
}
