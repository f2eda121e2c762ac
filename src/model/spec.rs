//! `ModelSpec`: everything the generic decoder needs from a config.json, with old and new
//! field names resolved, so the decoder never sees a missing key.

use serde_json::Value;

use crate::arch::{Recognised, WeightNames};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    Rms,
    Layer,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Position {
    /// Rotary embedding in the rotate-half layout over the first `rotary_dim` of each head.
    Rope { theta: f64, rotary_dim: usize },
}

#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub family: String,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub norm: NormKind,
    pub norm_eps: f64,
    pub position: Position,
    /// Keys attend to at most this many positions back (Mistral), `None` for full attention.
    pub sliding_window: Option<usize>,
    pub tie_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// The layer prefix, with `{i}` for the layer index.
    pub layer_prefix: String,
    pub weights: WeightNames,
}

/// Typed access to config.json fields, with errors that name the key.
struct Config<'a> {
    json: &'a Value,
    what: &'a str,
}

impl Config<'_> {
    fn get(&self, keys: &[&str]) -> Option<&Value> {
        keys.iter().find_map(|k| self.json.get(*k).filter(|v| !v.is_null()))
    }

    fn usize(&self, keys: &[&str]) -> Result<usize> {
        self.opt_usize(keys)?.ok_or_else(|| {
            Error::Invalid(format!("{}: config.json has no `{}`, which this family needs", self.what, keys[0]))
        })
    }

    fn opt_usize(&self, keys: &[&str]) -> Result<Option<usize>> {
        match self.get(keys) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                Error::Invalid(format!("{}: config.json `{}` should be a whole number, found {v}", self.what, keys[0]))
            }),
        }
    }

    fn f64_or(&self, keys: &[&str], default: f64) -> Result<f64> {
        match self.get(keys) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::Invalid(format!("{}: config.json `{}` should be a number, found {v}", self.what, keys[0]))
            }),
        }
    }

    fn bool_or(&self, keys: &[&str], default: bool) -> bool {
        self.get(keys).and_then(Value::as_bool).unwrap_or(default)
    }
}

impl ModelSpec {
    /// Build the spec of a recognised config.json. `what` names the model in messages.
    pub fn from_config(config: &Value, recognised: &Recognised<'_>, what: &str) -> Result<Self> {
        let weights = recognised.layout.weights.clone().ok_or_else(|| {
            Error::Invalid(format!(
                "{what}: {} checkpoints ({} layout) are recognised but the decoder cannot load them yet",
                recognised.family.name, recognised.layout_name
            ))
        })?;
        let c = Config { json: config, what };
        let hidden = c.usize(&["hidden_size", "n_embd", "d_model"])?;
        let heads = c.usize(&["num_attention_heads", "n_head"])?;
        let kv_heads = c.opt_usize(&["num_key_value_heads"])?.unwrap_or(heads);
        let head_dim = c.opt_usize(&["head_dim"])?.unwrap_or(hidden / heads.max(1));
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(Error::Invalid(format!(
                "{what}: {heads} attention heads cannot share {kv_heads} key/value heads evenly"
            )));
        }
        // rope_theta moved into rope_parameters in transformers 5
        let rope_params = config.get("rope_parameters");
        let theta = match rope_params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64) {
            Some(t) => t,
            None => c.f64_or(&["rope_theta"], 10_000.0)?,
        };
        if let Some(kind) = rope_params
            .and_then(|p| p.get("rope_type"))
            .or_else(|| config.get("rope_scaling").and_then(|s| s.get("rope_type").or_else(|| s.get("type"))))
            .and_then(Value::as_str)
        {
            if kind != "default" {
                return Err(Error::Invalid(format!(
                    "{what}: rope_type {kind:?} (RoPE scaling) is not supported yet; only the default rotary embedding is"
                )));
            }
        }
        let sliding_window =
            if c.bool_or(&["use_sliding_window"], true) { c.opt_usize(&["sliding_window"])? } else { None };
        let qkv_bias = match recognised.layout_name {
            "qwen2" => true,
            _ => c.bool_or(&["attention_bias", "bias"], false),
        };
        let o_bias = recognised.layout_name != "qwen2" && c.bool_or(&["attention_bias", "bias"], false);
        Ok(ModelSpec {
            family: recognised.family.id.clone(),
            hidden,
            layers: c.usize(&["num_hidden_layers", "n_layer", "num_layers"])?,
            heads,
            kv_heads,
            head_dim,
            intermediate: c.usize(&["intermediate_size", "ffn_hidden_size", "n_inner"])?,
            vocab: c.usize(&["vocab_size", "padded_vocab_size"])?,
            norm: NormKind::Rms,
            norm_eps: c.f64_or(&["rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps"], 1e-6)?,
            position: Position::Rope { theta, rotary_dim: head_dim },
            sliding_window,
            tie_embeddings: c.bool_or(&["tie_word_embeddings"], false),
            qkv_bias,
            o_bias,
            mlp_bias: c.bool_or(&["mlp_bias"], false),
            layer_prefix: recognised.layout.layers.clone(),
            weights,
        })
    }

    pub fn layer_prefix(&self, i: usize) -> String {
        self.layer_prefix.replace("{i}", &i.to_string())
    }
}
