//! `ModelSpec`: everything the generic decoder needs from a config.json, with old and new
//! field names resolved, so the decoder never sees a missing key.

use serde_json::Value;

pub use crate::arch::Role;
use crate::arch::{target_matches, LayoutLinear, ModuleLayout, Recognised, SplitKind, WeightNames};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    Rms,
    /// LayerNorm with weight and bias.
    Layer,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    /// GELU with erf (PyTorch's nn.GELU()).
    GeluErf,
    /// GELU with the tanh approximation (gelu_new, BLOOM's bloom_gelu).
    GeluTanh,
}

impl Activation {
    fn from_name(name: &str, what: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu" => Ok(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            other => Err(Error::Invalid(format!("{what}: activation {other:?} is not supported"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Position {
    /// Rotary embedding over the first `rotary_dim` of each head: in the rotate-half layout,
    /// or on interleaved pairs (x[2i], x[2i+1]) (ChatGLM).
    Rope { theta: f64, rotary_dim: usize, interleaved: bool },
    /// ALiBi: a per-head linear bias on the key position (BLOOM's slopes).
    Alibi,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MlpKind {
    /// down(act(gate(x)) · up(x))
    Gated(Activation),
    /// down(act(up(x)))
    Plain(Activation),
    /// A router picks `top_k` of `experts` gated MLPs per token (Mixtral).
    Moe { experts: usize, top_k: usize, act: Activation },
}

/// One linear module of a decoder layer with its shape: the layer plan. The loader, the memory
/// estimate, inspect, the exporters and the GUI's target presets all read it, so what a layer
/// holds is written down once.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedLinear {
    pub role: Role,
    /// The path relative to the layer prefix (an expert's with its index).
    pub path: String,
    /// The name targets use (`LayoutLinear::name`).
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
    pub bias: bool,
    pub expert: Option<usize>,
    /// How a fused projection's output rows split.
    pub split: Option<SplitKind>,
}

impl PlannedLinear {
    pub fn shape(&self) -> [usize; 2] {
        [self.out_features, self.in_features]
    }
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
    /// Baichuan2's NormHead: logits use lm_head rows scaled to unit L2 norm.
    pub normalized_lm_head: bool,
    pub tie_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub lm_head_bias: bool,
    /// How a fused qkv output splits, when the layout has one.
    pub qkv_split: Option<SplitKind>,
    /// Attention and MLP both read the layer input and add to it (Falcon, Phi).
    pub parallel_residual: bool,
    pub mlp: MlpKind,
    /// The layer prefix, with `{i}` for the layer index.
    pub layer_prefix: String,
    pub weights: WeightNames,
    /// The family's default LoRA targets as this layout names them.
    pub default_targets: Vec<String>,
    /// The linear modules of every layer (they are alike), in the order the decoder builds them.
    pub linears: Vec<PlannedLinear>,
    /// llama.cpp's architecture name for the checkpoint, where its converter handles it.
    pub gguf_arch: Option<String>,
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
        let mut weights = recognised.layout.weights.clone();
        let c = Config { json: config, what };
        let hidden = c.usize(&["hidden_size", "n_embed", "n_embd", "d_model"])?;
        let heads = c.usize(&["num_attention_heads", "n_head"])?;
        let layout = recognised.layout_name;
        let qkv_split =
            weights.qkv.as_deref().and_then(|m| recognised.layout.fused(ModuleLayout::module_name(m))).map(|f| f.split);
        let rope_params = config.get("rope_parameters");
        let rope_param =
            |key: &str| rope_params.and_then(|p| p.get(key)).or_else(|| config.get(key)).and_then(Value::as_f64);
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
        let theta = rope_param("rope_theta").unwrap_or(10_000.0);

        let mut spec = ModelSpec {
            family: recognised.family.id.clone(),
            hidden,
            layers: c.usize(&["num_hidden_layers", "n_layer", "num_layers"])?,
            heads,
            kv_heads: heads,
            head_dim: hidden / heads.max(1),
            intermediate: 4 * hidden,
            vocab: c.usize(&["vocab_size", "padded_vocab_size"])?,
            norm: NormKind::Rms,
            norm_eps: 1e-6,
            position: Position::Rope { theta, rotary_dim: hidden / heads.max(1), interleaved: false },
            sliding_window: None,
            normalized_lm_head: false,
            tie_embeddings: c.bool_or(&["tie_word_embeddings"], false),
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            lm_head_bias: false,
            qkv_split,
            parallel_residual: false,
            mlp: MlpKind::Gated(Activation::Silu),
            layer_prefix: recognised.layout.layers.clone(),
            weights: weights.clone(),
            default_targets: recognised.default_targets(),
            linears: Vec::new(),
            gguf_arch: recognised.gguf_arch().map(str::to_string),
        };
        match layout {
            // one config dialect for LLaMA, Qwen2 and Mixtral checkpoints
            "llama" | "qwen2" | "mixtral" => {
                spec.kv_heads = c.opt_usize(&["num_key_value_heads"])?.unwrap_or(heads);
                spec.head_dim = c.opt_usize(&["head_dim"])?.unwrap_or(spec.head_dim);
                spec.position = Position::Rope { theta, rotary_dim: spec.head_dim, interleaved: false };
                spec.intermediate = c.usize(&["intermediate_size"])?;
                spec.norm_eps = c.f64_or(&["rms_norm_eps"], 1e-6)?;
                if c.bool_or(&["use_sliding_window"], true) {
                    spec.sliding_window = c.opt_usize(&["sliding_window"])?;
                }
                let bias = c.bool_or(&["attention_bias", "bias"], false);
                // Qwen2 has biases on q, k and v only
                spec.qkv_bias = recognised.layout.qkv_bias || bias;
                spec.o_bias = !recognised.layout.qkv_bias && bias;
                spec.mlp_bias = c.bool_or(&["mlp_bias"], false);
                let act =
                    Activation::from_name(c.get(&["hidden_act"]).and_then(Value::as_str).unwrap_or("silu"), what)?;
                spec.mlp = if weights.experts.is_some() {
                    MlpKind::Moe {
                        experts: c.usize(&["num_local_experts"])?,
                        top_k: c.usize(&["num_experts_per_tok"])?,
                        act,
                    }
                } else {
                    MlpKind::Gated(act)
                };
            }
            "falcon" => {
                if c.bool_or(&["alibi"], false) {
                    return Err(Error::Invalid(format!("{what}: Falcon with ALiBi (falcon-rw) is not supported")));
                }
                // the original 40B/180B configs (model_type RefinedWeb) predate the flag
                let refined_web = config.get("model_type").and_then(Value::as_str) == Some("RefinedWeb");
                let new_arch = c.bool_or(&["new_decoder_architecture"], refined_web);
                // transformers fills num_kv_heads with the head count when absent; derive it
                // from the architecture flags instead (docs/adapter-formats.md §2.7)
                spec.kv_heads = if new_arch {
                    c.opt_usize(&["num_kv_heads", "n_head_kv"])?.unwrap_or(heads)
                } else if c.bool_or(&["multi_query"], true) {
                    1
                } else {
                    heads
                };
                spec.norm = NormKind::Layer;
                spec.norm_eps = c.f64_or(&["layer_norm_epsilon"], 1e-5)?;
                spec.intermediate = c.opt_usize(&["ffn_hidden_size"])?.unwrap_or(4 * hidden);
                let bias = c.bool_or(&["bias"], false);
                (spec.qkv_bias, spec.o_bias, spec.mlp_bias) = (bias, bias, bias);
                spec.mlp = MlpKind::Plain(Activation::from_name(
                    c.get(&["activation"]).and_then(Value::as_str).unwrap_or("gelu"),
                    what,
                )?);
                spec.tie_embeddings = c.bool_or(&["tie_word_embeddings"], true);
                if new_arch {
                    spec.parallel_residual = true;
                    weights.attn_norm = "ln_attn".into();
                    weights.mlp_norm = Some("ln_mlp".into());
                } else {
                    spec.parallel_residual = c.bool_or(&["parallel_attn"], true);
                    if !spec.parallel_residual {
                        weights.mlp_norm = Some("post_attention_layernorm".into());
                    }
                }
                if !new_arch && spec.kv_heads == heads && !c.bool_or(&["multi_query"], true) {
                    return Err(Error::Invalid(format!(
                        "{what}: Falcon without multi-query or the new decoder architecture (falcon-rw) is not supported"
                    )));
                }
            }
            "bloom" => {
                spec.norm = NormKind::Layer;
                spec.norm_eps = c.f64_or(&["layer_norm_epsilon"], 1e-5)?;
                spec.position = Position::Alibi;
                (spec.qkv_bias, spec.o_bias, spec.mlp_bias) = (true, true, true);
                spec.mlp = MlpKind::Plain(Activation::GeluTanh);
                spec.tie_embeddings = c.bool_or(&["tie_word_embeddings"], true);
                if c.bool_or(&["apply_residual_connection_post_layernorm"], false) {
                    return Err(Error::Invalid(format!(
                        "{what}: apply_residual_connection_post_layernorm = true is not supported"
                    )));
                }
            }
            "phi" => {
                if c.bool_or(&["qk_layernorm"], false) {
                    return Err(Error::Invalid(format!("{what}: Phi with qk_layernorm is not supported")));
                }
                spec.kv_heads = c.opt_usize(&["num_key_value_heads"])?.unwrap_or(heads);
                spec.norm = NormKind::Layer;
                spec.norm_eps = c.f64_or(&["layer_norm_eps"], 1e-5)?;
                spec.intermediate = c.usize(&["intermediate_size"])?;
                let factor = rope_param("partial_rotary_factor").unwrap_or(0.5);
                spec.position =
                    Position::Rope { theta, rotary_dim: (spec.head_dim as f64 * factor) as usize, interleaved: false };
                (spec.qkv_bias, spec.o_bias, spec.mlp_bias, spec.lm_head_bias) = (true, true, true, true);
                spec.parallel_residual = true;
                spec.mlp = MlpKind::Plain(Activation::from_name(
                    c.get(&["hidden_act"]).and_then(Value::as_str).unwrap_or("gelu_new"),
                    what,
                )?);
            }
            "baichuan" => {
                spec.intermediate = c.usize(&["intermediate_size"])?;
                spec.norm_eps = c.f64_or(&["rms_norm_eps"], 1e-6)?;
                // 7B configs give max_position_embeddings and use RoPE; 13B ones give only
                // model_max_length and use ALiBi (llama.cpp tells them apart by depth instead)
                if config.get("max_position_embeddings").is_none() {
                    spec.position = Position::Alibi;
                }
            }
            "qwen" => {
                // intermediate_size is twice the width of each MLP branch
                spec.intermediate = c.usize(&["intermediate_size"])? / 2;
                spec.head_dim = c.opt_usize(&["kv_channels"])?.unwrap_or(spec.head_dim);
                spec.norm_eps = c.f64_or(&["layer_norm_epsilon"], 1e-6)?;
                let theta = c.f64_or(&["rotary_emb_base"], 10_000.0)?;
                let pct = c.f64_or(&["rotary_pct"], 1.0)?;
                spec.position =
                    Position::Rope { theta, rotary_dim: (spec.head_dim as f64 * pct) as usize, interleaved: false };
                spec.qkv_bias = true;
                spec.o_bias = !c.bool_or(&["no_bias"], true);
            }
            "phi_msft" => {
                spec.kv_heads = c.opt_usize(&["n_head_kv"])?.unwrap_or(heads);
                spec.norm = NormKind::Layer;
                spec.norm_eps = c.f64_or(&["layer_norm_epsilon"], 1e-5)?;
                spec.intermediate = c.opt_usize(&["n_inner"])?.unwrap_or(4 * hidden);
                let rotary_dim = c.usize(&["rotary_dim"])?;
                spec.position = Position::Rope { theta, rotary_dim, interleaved: false };
                (spec.qkv_bias, spec.o_bias, spec.mlp_bias, spec.lm_head_bias) = (true, true, true, true);
                spec.parallel_residual = true;
                spec.mlp = MlpKind::Plain(Activation::from_name(
                    c.get(&["activation_function"]).and_then(Value::as_str).unwrap_or("gelu_new"),
                    what,
                )?);
            }
            "chatglm" => {
                if !c.bool_or(&["rmsnorm"], true) || !c.bool_or(&["post_layer_norm"], true) {
                    return Err(Error::Invalid(format!(
                        "{what}: ChatGLM without RMSNorm or a final norm is not supported"
                    )));
                }
                spec.head_dim = c.opt_usize(&["kv_channels"])?.unwrap_or(spec.head_dim);
                spec.kv_heads = if c.bool_or(&["multi_query_attention"], false) {
                    c.usize(&["multi_query_group_num"])?
                } else {
                    heads
                };
                spec.intermediate = c.usize(&["ffn_hidden_size"])?;
                spec.norm_eps = c.f64_or(&["layernorm_epsilon"], 1e-5)?;
                let theta = 10_000.0 * c.f64_or(&["rope_ratio"], 1.0)?;
                spec.position = Position::Rope { theta, rotary_dim: spec.head_dim / 2, interleaved: true };
                spec.qkv_bias = c.bool_or(&["add_qkv_bias"], false);
                let bias = c.bool_or(&["add_bias_linear"], false);
                (spec.o_bias, spec.mlp_bias) = (bias, bias);
            }
            other => {
                return Err(Error::Invalid(format!("{what}: no config reader for the {other} layout yet")));
            }
        }
        if spec.kv_heads == 0 || heads % spec.kv_heads != 0 {
            return Err(Error::Invalid(format!(
                "{what}: {heads} attention heads cannot share {} key/value heads evenly",
                spec.kv_heads
            )));
        }
        if let Position::Rope { rotary_dim, .. } = spec.position {
            if rotary_dim == 0 || rotary_dim % 2 != 0 || rotary_dim > spec.head_dim {
                return Err(Error::Invalid(format!(
                    "{what}: rotary dimension {rotary_dim} does not fit heads of {}",
                    spec.head_dim
                )));
            }
        }
        spec.normalized_lm_head = recognised.family.normalized_lm_head;
        spec.linears = spec.plan(&weights.layer_linears());
        spec.weights = weights;
        Ok(spec)
    }

    /// The layer plan: the layout's linears with their shapes, biases and splits from the
    /// config, each expert's part once per expert.
    fn plan(&self, layout: &[LayoutLinear]) -> Vec<PlannedLinear> {
        let (h, f) = (self.hidden, self.intermediate);
        let (q_out, kv_out) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let experts = match self.mlp {
            MlpKind::Moe { experts, .. } => experts,
            _ => 0,
        };
        let planned = |l: &LayoutLinear, expert: Option<usize>| {
            let ([out_features, in_features], bias) = match l.role {
                Role::Q => ([q_out, h], self.qkv_bias),
                Role::K | Role::V => ([kv_out, h], self.qkv_bias),
                Role::Qkv => ([q_out + 2 * kv_out, h], self.qkv_bias),
                Role::O => ([h, q_out], self.o_bias),
                Role::Gate | Role::Up => ([f, h], self.mlp_bias),
                Role::GateUp => ([2 * f, h], self.mlp_bias),
                Role::Down => ([h, f], self.mlp_bias),
                Role::Router => ([experts, h], false),
                Role::ExpertGate | Role::ExpertUp => ([f, h], false),
                Role::ExpertDown => ([h, f], false),
            };
            let split = match l.role {
                Role::Qkv => self.qkv_split,
                Role::GateUp => Some(SplitKind::GateUp),
                _ => None,
            };
            let path = match expert {
                Some(e) => l.path.replace("{e}", &e.to_string()),
                None => l.path.clone(),
            };
            PlannedLinear { role: l.role, path, name: l.name.clone(), out_features, in_features, bias, expert, split }
        };
        let mut out: Vec<PlannedLinear> =
            layout.iter().filter(|l| !l.role.is_expert()).map(|l| planned(l, None)).collect();
        // expert-major: every part of expert 0, then of expert 1, ...
        let parts: Vec<&LayoutLinear> = layout.iter().filter(|l| l.role.is_expert()).collect();
        for e in 0..experts {
            out.extend(parts.iter().map(|l| planned(l, Some(e))));
        }
        out
    }

    /// The family's display name from the table ("LLaMA-2"), or its id.
    pub fn family_name(&self) -> String {
        crate::arch::table().ok().and_then(|t| t.family(&self.family)).map_or(self.family.clone(), |f| f.name.clone())
    }

    pub fn layer_prefix(&self, i: usize) -> String {
        self.layer_prefix.replace("{i}", &i.to_string())
    }

    /// The full path of a planned linear in layer `i`.
    pub fn linear_path(&self, i: usize, linear: &PlannedLinear) -> String {
        format!("{}.{}", self.layer_prefix(i), linear.path)
    }

    /// Every linear module of the model: (layer, full path, plan entry).
    pub fn all_linears(&self) -> impl Iterator<Item = (usize, String, &PlannedLinear)> + '_ {
        (0..self.layers).flat_map(move |i| self.linears.iter().map(move |l| (i, self.linear_path(i, l), l)))
    }

    /// The names of the layer's linear modules whose role passes `keep`, in plan order, each
    /// once (experts share theirs).
    pub fn names_where(&self, keep: impl Fn(Role) -> bool) -> Vec<String> {
        crate::arch::dedup_names(self.linears.iter().filter(|l| keep(l.role)).map(|l| l.name.as_str()))
    }

    /// Every name a layer's linear modules are picked by.
    pub fn linear_names(&self) -> Vec<String> {
        self.names_where(|_| true)
    }

    /// Does the target list (module names, PEFT-style suffixes, or `all-linear`) select the
    /// module at `path`?
    pub fn targets_select(targets: &[String], path: &str) -> bool {
        targets.iter().any(|t| t == "all-linear" || target_matches(path, t))
    }

    /// Targets that select no linear module of this model.
    pub fn unknown_targets<'a>(&self, targets: &'a [String]) -> Vec<&'a str> {
        targets
            .iter()
            .filter(|t| *t != "all-linear" && !self.all_linears().any(|(_, path, _)| target_matches(&path, t)))
            .map(String::as_str)
            .collect()
    }

    /// Checks a target list: not empty, and every target selects a linear module; the error
    /// lists the modules this model has.
    pub fn check_targets(&self, targets: &[String]) -> Result<()> {
        let unknown = self.unknown_targets(targets);
        if !unknown.is_empty() || targets.is_empty() {
            return Err(Error::Invalid(format!(
                "no linear module named {}; this model's linear modules are: {}",
                if unknown.is_empty() { "(none chosen)".to_string() } else { unknown.join(", ") },
                self.linear_names().join(", ")
            )));
        }
        Ok(())
    }

    /// Parameters of the model: linears (with biases), embeddings, the output layer unless
    /// tied, and the norms.
    pub fn parameter_count(&self) -> usize {
        let per_layer: usize =
            self.linears.iter().map(|l| l.out_features * l.in_features + if l.bias { l.out_features } else { 0 }).sum();
        let (v, h) = (self.vocab, self.hidden);
        let norm = if self.norm == NormKind::Layer { 2 * h } else { h };
        let lm_head = if self.tie_embeddings { 0 } else { v * h };
        // one norm before attention, one before the MLP unless they share it (Falcon-7B, Phi)
        let layer_norms = 1 + usize::from(self.weights.mlp_norm.is_some());
        let embed_norm = if self.weights.embed_norm.is_some() { norm } else { 0 };
        let lm_head_bias = if self.lm_head_bias { v } else { 0 };
        self.layers * (per_layer + layer_norms * norm) + v * h + lm_head + lm_head_bias + norm + embed_norm
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(config: Value) -> ModelSpec {
        let table = crate::arch::table().unwrap();
        let r = table.recognise(&config).unwrap();
        ModelSpec::from_config(&config, &r, "test").unwrap()
    }

    #[test]
    fn original_falcon_configs() {
        // tiiuae/falcon-7b's original config.json (RWForCausalLM)
        let s = spec(json!({"model_type": "RefinedWebModel", "architectures": ["RWForCausalLM"], "hidden_size": 4544,
            "n_head": 71, "n_layer": 32, "multi_query": true, "parallel_attn": true, "bias": false,
            "vocab_size": 65024, "layer_norm_epsilon": 1e-5, "alibi": false}));
        assert_eq!((s.heads, s.kv_heads, s.head_dim, s.layers, s.intermediate), (71, 1, 64, 32, 4 * 4544));
        assert!(s.parallel_residual && s.weights.mlp_norm.is_none());
        assert_eq!(s.position, Position::Rope { theta: 10_000.0, rotary_dim: 64, interleaved: false });
        // tiiuae/falcon-40b's: RefinedWeb with n_head_kv, new architecture implied
        let s = spec(json!({"model_type": "RefinedWeb", "hidden_size": 8192, "n_head": 128, "n_head_kv": 8,
            "n_layer": 60, "parallel_attn": true, "bias": false, "vocab_size": 65024}));
        assert_eq!((s.heads, s.kv_heads), (128, 8));
        assert_eq!(s.weights.attn_norm, "ln_attn");
        assert_eq!(s.weights.mlp_norm.as_deref(), Some("ln_mlp"));
    }

    #[test]
    fn old_and_new_rope_theta_and_bloom_names() {
        let llama = |extra: Value| {
            let mut c = json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100});
            c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            spec(c)
        };
        let top = llama(json!({"rope_theta": 500000.0}));
        let nested = llama(json!({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}));
        assert_eq!(top.position, nested.position);
        assert_eq!(top.kv_heads, 4, "num_key_value_heads defaults to the head count");
        let bloom = spec(json!({"model_type": "bloom", "n_embed": 64, "n_head": 4, "n_layer": 3, "vocab_size": 100}));
        assert_eq!((bloom.hidden, bloom.heads, bloom.layers, bloom.intermediate), (64, 4, 3, 256));
        assert_eq!(bloom.position, Position::Alibi);
        assert_eq!(bloom.default_targets, vec!["query_key_value".to_string()]);
    }

    #[test]
    fn unsupported_settings_are_refused_by_name() {
        let table = crate::arch::table().unwrap();
        let c = json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "intermediate_size": 128, "vocab_size": 100, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}});
        let e = ModelSpec::from_config(&c, &table.recognise(&c).unwrap(), "m").unwrap_err().to_string();
        assert!(e.contains("yarn"), "{e}");
        let c = json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3,
            "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100});
        let e = ModelSpec::from_config(&c, &table.recognise(&c).unwrap(), "m").unwrap_err().to_string();
        assert!(e.contains("4 attention heads") && e.contains("3"), "{e}");
        let c = json!({"model_type": "llama", "num_attention_heads": 4});
        let e = ModelSpec::from_config(&c, &table.recognise(&c).unwrap(), "m").unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
    }
}
