//! A model's chat template (tokenizer_config.json `chat_template`, a Jinja template) rendered
//! with minijinja, for `generate --chat` and the GUI's try-the-model panel. Falls back to
//! ChatML when the model has no template.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// What a chat template needs from tokenizer_config.json.
#[derive(Debug, Clone, Default)]
pub struct ChatTemplate {
    pub template: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
}

pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
     message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A special token as tokenizer_config.json writes it: a string, or an object with `content`.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or("").to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Read from a model folder's tokenizer_config.json (absent file: no template).
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_entry(&path, "chat_template", format!("not JSON: {e}")))?;
        // a list of named templates ([{name, template}]) is allowed too: take "default"
        let template = match json.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        Ok(Self {
            template,
            bos_token: token_text(json.get("bos_token")),
            eos_token: token_text(json.get("eos_token")),
        })
    }

    /// The prompt text for `messages`; with `add_generation_prompt`, ending where the
    /// assistant's answer starts.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let source = self.template.as_deref().unwrap_or(CHATML_TEMPLATE);
        let mut env = minijinja::Environment::new();
        // Python-style string methods (strip, startswith, ...) that hub templates use
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", source).map_err(|e| Error::Invalid(format!("the model's chat template: {e}")))?;
        let tmpl = env.get_template("chat").map_err(|e| Error::Invalid(format!("the model's chat template: {e}")))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::Invalid(format!("rendering the model's chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_renders_turns_and_the_generation_prompt() {
        let t = ChatTemplate::default();
        let text = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }
}
