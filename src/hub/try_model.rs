//! "Try the model": resolve a model source, load it (with an adapter), tokenize a prompt (or a
//! chat turn through the model's chat template), generate and decode as the tokens come. The
//! `generate` command and the GUI's try-the-model panel both call `generate_text`.

use std::path::PathBuf;

use candle_core::{DType, Device};

use super::{resolve_with, ResolveOptions};
use crate::data::{ChatTemplate, Message, ModelTokenizer, Role, TemplateChoice};
use crate::error::{Error, Result};
use crate::model::generate::{generate_streaming, GenerateOptions};
use crate::model::{BaseWeights, Model};

#[derive(Clone)]
pub struct GenerateRequest {
    /// A model folder, a .gguf file or a hub id.
    pub model: String,
    /// A PEFT adapter folder to put on the model.
    pub adapter: Option<PathBuf>,
    pub prompt: String,
    /// Wrap the prompt as a user turn with the chat template training uses (the model's own,
    /// else its family's).
    pub chat: bool,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub resolve: ResolveOptions,
}

#[derive(Debug, Clone)]
pub struct GeneratedText {
    pub model_dir: PathBuf,
    /// The text the model saw (the rendered chat template with --chat).
    pub prompt_text: String,
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    pub text: String,
}

/// The base an adapter runs on: one of our QLoRA checkpoints on the NF4 base it was trained
/// against (quantized on load, as PEFT runs a QLoRA adapter on the 4-bit model), anything else
/// on the dense weights. Its answers are then the ones the training saw.
fn base_for(adapter: Option<&std::path::Path>) -> BaseWeights {
    use crate::train::{checkpoint::RUN_CONFIG, Mode, RunConfig};
    match adapter.and_then(|a| RunConfig::load(&a.join(RUN_CONFIG)).ok()) {
        Some(config) if config.model.mode == Mode::Qlora => {
            BaseWeights::Nf4 { double_quant: true, compute: DType::F32 }
        }
        _ => BaseWeights::Dense(DType::F32),
    }
}

/// Resolve, load, generate; `on_text` gets each new piece of decoded text as it comes.
pub fn generate_text(request: &GenerateRequest, mut on_text: impl FnMut(&str)) -> Result<GeneratedText> {
    let resolved = resolve_with(&request.model, &request.resolve)?;
    let dir = resolved.dir;
    let device = Device::Cpu;
    let mut model = Model::load(&dir, base_for(request.adapter.as_deref()), &device)?;
    if let Some(adapter) = &request.adapter {
        model.load_adapter(adapter)?;
    }
    let tokenizer = ModelTokenizer::from_dir(&dir)?;
    let prompt_text = if request.chat {
        let template = ChatTemplate::resolve(&TemplateChoice::Auto, &tokenizer, Some(&resolved.check.family))?;
        let turn = [Message::new(Role::User, &request.prompt)];
        template.render(&turn, true, &tokenizer).map_err(|e| Error::Invalid(format!("chat template: {e}")))?
    } else {
        request.prompt.clone()
    };
    // a chat template writes its own special tokens; a plain prompt gets the tokenizer's
    let prompt_ids = tokenizer.encode(&prompt_text, !request.chat)?.ids;
    let mut eos_ids = tokenizer.stop_token_ids.clone();
    if request.chat {
        // ChatML turns end with <|im_end|> even where the model's eos is another token
        eos_ids.extend(tokenizer.token_to_id("<|im_end|>"));
    }
    let options = GenerateOptions {
        max_new_tokens: request.max_new_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        seed: request.seed,
        eos_ids,
    };
    let mut ids = Vec::new();
    let mut shown = 0usize;
    let mut decode_error = None;
    generate_streaming(&model, &prompt_ids, &options, |id| {
        ids.push(id);
        match tokenizer.decode(&ids, true) {
            // an unfinished multi-byte character decodes to U+FFFD: wait for its next byte
            Ok(text) if !text.ends_with('\u{FFFD}') && text.len() >= shown && text.is_char_boundary(shown) => {
                on_text(&text[shown..]);
                shown = text.len();
            }
            Ok(_) => {}
            Err(e) => decode_error = Some(e.to_string()),
        }
        decode_error.is_none()
    })?;
    if let Some(e) = decode_error {
        return Err(Error::Invalid(format!("cannot decode the generated tokens: {e}")));
    }
    let text = tokenizer.decode(&ids, true)?;
    if text.len() > shown && text.is_char_boundary(shown) {
        on_text(&text[shown..]);
    }
    Ok(GeneratedText { model_dir: dir, prompt_text, prompt_ids, ids, text })
}
