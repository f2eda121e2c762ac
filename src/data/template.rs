//! Chat templates: the model's own (tokenizer_config.json `chat_template`) or a named one of
//! assets/chat_templates.toml, rendered with minijinja the way transformers renders them, and
//! the check that warns when a run trains with a template other than the model's.

use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use super::records::{Message, Role};
use super::tokenizer::ModelTokenizer;
use crate::error::{Error, Result};

const TEMPLATES_TOML: &str = include_str!("../../assets/chat_templates.toml");

/// Which template a run uses: `auto` (the model's own, else its family's, else `default`),
/// `model` (the model's own; an error when it has none), `model:NAME` (one of a model's list of
/// templates, such as `model:tool_use`) or a built-in named template.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum TemplateChoice {
    #[default]
    Auto,
    Model,
    ModelNamed(String),
    Named(String),
}

impl From<String> for TemplateChoice {
    fn from(s: String) -> Self {
        let s = s.trim();
        match s.to_lowercase().as_str() {
            "" | "auto" => TemplateChoice::Auto,
            "model" => TemplateChoice::Model,
            lower if lower.starts_with("model:") => TemplateChoice::ModelNamed(s["model:".len()..].trim().to_string()),
            _ => TemplateChoice::Named(s.to_string()),
        }
    }
}

impl From<TemplateChoice> for String {
    fn from(c: TemplateChoice) -> Self {
        c.to_string()
    }
}

impl fmt::Display for TemplateChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateChoice::Auto => f.write_str("auto"),
            TemplateChoice::Model => f.write_str("model"),
            TemplateChoice::ModelNamed(n) => write!(f, "model:{n}"),
            TemplateChoice::Named(n) => f.write_str(n),
        }
    }
}

/// One entry of assets/chat_templates.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedTemplate {
    pub name: String,
    pub families: Vec<String>,
    pub source: String,
    pub template: String,
    /// The same format as an Ollama Modelfile TEMPLATE (Go template), where known.
    #[serde(default)]
    pub ollama: Option<String>,
}

#[derive(Deserialize)]
struct TemplatesFile {
    template: Vec<NamedTemplate>,
}

/// The built-in named templates.
pub fn named_templates() -> &'static [NamedTemplate] {
    static TEMPLATES: OnceLock<Vec<NamedTemplate>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        // The file is part of the binary and checked by the tests, so a parse failure is a
        // build defect, not user input.
        toml::from_str::<TemplatesFile>(TEMPLATES_TOML).expect("assets/chat_templates.toml is valid").template
    })
}

pub fn named_template(name: &str) -> Option<&'static NamedTemplate> {
    named_templates().iter().find(|t| t.name.eq_ignore_ascii_case(name))
}

/// The Ollama TEMPLATE for a Jinja chat template: the named template's, when `jinja` is one of
/// ours, or ChatML's for any template built on `<|im_start|>` (SmolLM2, Qwen, Yi models' own).
pub fn ollama_template_for(jinja: &str) -> Option<&'static str> {
    let same = named_templates().iter().find(|t| t.template.trim() == jinja.trim());
    let chatml = || named_template("chatml").filter(|_| jinja.contains("<|im_start|>"));
    same.or_else(chatml).and_then(|t| t.ollama.as_deref())
}

/// The named template a family of the architecture table uses (`default` for none).
pub fn family_template_name(family_id: Option<&str>) -> &'static str {
    family_id
        .and_then(|id| named_templates().iter().find(|t| t.families.iter().any(|f| f == id)))
        .map_or("default", |t| t.name.as_str())
}

/// Where the template a run uses came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateOrigin {
    /// The model's own chat_template.
    Model,
    /// A template of assets/chat_templates.toml.
    Named,
}

/// A compiled chat template.
pub struct ChatTemplate {
    pub name: String,
    pub origin: TemplateOrigin,
    pub source: String,
    env: Environment<'static>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate").field("name", &self.name).field("origin", &self.origin).finish()
    }
}

const TEMPLATE_KEY: &str = "chat";

impl ChatTemplate {
    /// Compiles Jinja source as transformers does: trim_blocks, lstrip_blocks, Python string
    /// methods (`.strip()`, `.startswith()` ...) and `raise_exception`.
    pub fn compile(name: &str, origin: TemplateOrigin, source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned(TEMPLATE_KEY, without_generation_tags(source))
            .map_err(|e| Error::Invalid(format!("chat template `{name}` does not compile: {}", describe(&e))))?;
        Ok(ChatTemplate { name: name.to_string(), origin, source: source.to_string(), env })
    }

    pub fn named(name: &str) -> Result<Self> {
        let t = named_template(name).ok_or_else(|| {
            let names: Vec<&str> = named_templates().iter().map(|t| t.name.as_str()).collect();
            Error::Invalid(format!(
                "unknown chat template `{name}` in [data] template; use auto, model or one of: {}",
                names.join(", ")
            ))
        })?;
        Self::compile(&t.name, TemplateOrigin::Named, &t.template)
    }

    /// The template a run uses for this choice, model and family.
    pub fn resolve(choice: &TemplateChoice, tokenizer: &ModelTokenizer, family_id: Option<&str>) -> Result<Self> {
        match choice {
            TemplateChoice::Model => match &tokenizer.chat_template {
                Some(src) => Self::compile("model", TemplateOrigin::Model, src),
                None => Err(Error::Invalid(format!(
                    "[data] template = \"model\", but {} has no chat_template (tokenizer_config.json, chat_template.jinja); \
                     use template = \"auto\" or name one ({})",
                    tokenizer.source.display(),
                    named_templates().iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
                ))),
            },
            TemplateChoice::Auto => match &tokenizer.chat_template {
                Some(src) => Self::compile("model", TemplateOrigin::Model, src),
                None => Self::named(family_template_name(family_id)),
            },
            TemplateChoice::ModelNamed(name) => match tokenizer.named_chat_templates.get(name) {
                Some(src) => Self::compile(&format!("model:{name}"), TemplateOrigin::Model, src),
                None => Err(Error::Invalid(format!(
                    "[data] template = \"model:{name}\", but {} has no chat template named {name:?}{}",
                    tokenizer.source.display(),
                    if tokenizer.named_chat_templates.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; it has: {}",
                            tokenizer.named_chat_templates.keys().cloned().collect::<Vec<_>>().join(", ")
                        )
                    }
                ))),
            },
            TemplateChoice::Named(name) => Self::named(name),
        }
    }

    /// Renders a conversation. Errors are the template's message (a `raise_exception`, an
    /// undefined method), for the caller to place.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tokenizer: &ModelTokenizer,
    ) -> std::result::Result<String, String> {
        let template = self.env.get_template(TEMPLATE_KEY).map_err(|e| describe(&e))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => tokenizer.bos_token.clone().unwrap_or_default(),
            eos_token => tokenizer.eos_token.clone().unwrap_or_default(),
        };
        template.render(ctx).map_err(|e| describe(&e))
    }

    /// The rendered conversation and the byte ranges of the assistant replies in it (each
    /// reply with whatever the template closes it with, such as `<|im_end|>` or `</s>`).
    ///
    /// The conversation up to each reply is rendered with `add_generation_prompt`; when that is
    /// a prefix of the conversation rendered with the reply, the reply is what follows it. A
    /// template that rewrites earlier turns as the conversation grows (some drop the reasoning
    /// of earlier replies) fails that test; then each reply's text is searched for in order.
    pub fn render_with_replies(
        &self,
        messages: &[Message],
        tokenizer: &ModelTokenizer,
    ) -> std::result::Result<(String, Vec<Range<usize>>), String> {
        let full = self.render(messages, false, tokenizer)?;
        let mut spans = Vec::new();
        let mut by_prefix = true;
        for (i, m) in messages.iter().enumerate() {
            if m.role != Role::Assistant {
                continue;
            }
            let before = self.render(&messages[..i], true, tokenizer)?;
            let through =
                if i + 1 == messages.len() { full.clone() } else { self.render(&messages[..=i], false, tokenizer)? };
            if through.starts_with(&before) && full.starts_with(&through) && through.len() > before.len() {
                spans.push(before.len()..through.len());
            } else {
                by_prefix = false;
                break;
            }
        }
        if by_prefix {
            return Ok((full, spans));
        }
        let mut spans = Vec::new();
        let mut cursor = 0;
        let eos = tokenizer.eos_token.clone().unwrap_or_default();
        for (i, m) in messages.iter().enumerate().filter(|(_, m)| m.role == Role::Assistant) {
            let needle = m.content.trim();
            let Some(found) = full[cursor..].find(needle).map(|p| p + cursor) else {
                return Err(format!(
                    "cannot tell which part of the rendered text is the reply of message {i}: the template changes \
                     earlier text as messages are added and does not show the reply verbatim; choose a named template \
                     or set train_on_prompt = true"
                ));
            };
            let mut end = found + needle.len();
            if !eos.is_empty() && full[end..].starts_with(&eos) {
                end += eos.len();
            }
            spans.push(found..end);
            cursor = end;
        }
        Ok((full, spans))
    }
}

/// transformers' `{% generation %}` ... `{% endgeneration %}` marks assistant text for its own
/// masking; minijinja has no such tag, and the replies are found without it, so it becomes an
/// `if true` block (keeping the tags' whitespace control).
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let Some(close) = rest[open..].find("%}").map(|c| open + c + 2) else { break };
        let tag = &rest[open..close];
        let inner = tag[2..tag.len() - 2].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..open]);
        match inner {
            "generation" => out.push_str(&tag.replacen("generation", "if true", 1)),
            "endgeneration" => out.push_str(&tag.replacen("endgeneration", "endif", 1)),
            _ => out.push_str(tag),
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

/// minijinja's message with the line of the template it points at.
fn describe(e: &minijinja::Error) -> String {
    let mut msg = match (e.kind(), e.detail()) {
        // raise_exception: the template's own words.
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        (kind, Some(detail)) => format!("{kind}: {detail}"),
        (kind, None) => kind.to_string(),
    };
    if let Some(line) = e.line() {
        msg.push_str(&format!(" (template line {line})"));
    }
    msg
}

/// Whether a run's template matches what the model will be prompted with after training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateCheck {
    /// The template used differs from the model's own, or, for a model with none, from its
    /// family's.
    pub differs: bool,
    pub warning: Option<String>,
}

/// Compares the template a run uses with the model's own (or its family's) and says what goes
/// wrong when they differ.
pub fn check_template(used: &ChatTemplate, tokenizer: &ModelTokenizer, family_id: Option<&str>) -> TemplateCheck {
    const WHY: &str = "llama.cpp, Ollama and transformers prompt a model with its own chat template, so a \
        fine-tune trained on another format sees prompts unlike its training data and tends to answer nonsense";
    if let Some(own) = &tokenizer.chat_template {
        if used.origin == TemplateOrigin::Model || used.source.trim() == own.trim() {
            return TemplateCheck { differs: false, warning: None };
        }
        return TemplateCheck {
            differs: true,
            warning: Some(format!(
                "the model has its own chat template (tokenizer_config.json) but this run uses `{}`: {WHY}. Use \
                 template = \"auto\", or set the same template wherever the fine-tuned model runs",
                used.name
            )),
        };
    }
    let family_name = family_template_name(family_id);
    if family_id.is_some() && family_name != "default" && !used.name.eq_ignore_ascii_case(family_name) {
        return TemplateCheck {
            differs: true,
            warning: Some(format!(
                "this run uses the `{}` template, but the {} family's format is `{family_name}`: {WHY}. Use \
                 template = \"auto\" unless you will prompt the model with `{}` yourself",
                used.name,
                family_id.unwrap_or_default(),
                used.name
            )),
        };
    }
    // No template ships with the model: whatever runs it must be told the format.
    TemplateCheck {
        differs: false,
        warning: Some(format!(
            "the model has no chat template of its own; this run uses `{}`. Prompt the fine-tuned model in the same \
             format (llama.cpp --chat-template, an Ollama Modelfile TEMPLATE), or it will see prompts unlike its \
             training data",
            used.name
        )),
    }
}
