//! The peak-memory estimate of a LoRA / QLoRA run, from the model's config alone.
//!
//! Every term is derived from what our own code allocates (docs/memory-model.md §8), not
//! fitted: the decoder (model/decoder.rs) and its ops (model/ops.rs), the frozen linear
//! (quant/frozen_linear.rs), LoRA (lora/mod.rs), the loss (model/loss.rs), AdamW
//! (train/optim.rs) and candle 0.11's autograd (backprop.rs), whose graph keeps every tensor
//! recorded in the forward alive until the loss is dropped, and whose backward keeps a
//! gradient for every untracked input of a tracked op (a mask, the first layer's input) until
//! the gradient store is dropped.

use candle_core::DType;
use serde::Serialize;

use crate::model::spec::{Activation, MlpKind, ModelSpec, NormKind, Position};
use crate::{Error, Result};

/// LoRA on a dense base, or QLoRA on an NF4 base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Method {
    Lora,
    Qlora { double_quant: bool },
}

impl Method {
    pub fn label(self) -> &'static str {
        match self {
            Method::Lora => "LoRA",
            Method::Qlora { double_quant: true } => "QLoRA",
            Method::Qlora { double_quant: false } => "QLoRA (no DQ)",
        }
    }
}

/// Where the run computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// The compute dtype the trainer uses there: f32 on the CPU, bf16 on CUDA.
    pub fn default_dtype(self) -> DType {
        match self {
            DeviceKind::Cpu => DType::F32,
            DeviceKind::Cuda => DType::BF16,
        }
    }
}

/// What the estimate needs to know of a run. Independent of the trainer's RunConfig, which
/// converts into it.
#[derive(Debug, Clone)]
pub struct EstimateInput {
    pub spec: ModelSpec,
    pub method: Method,
    /// Module names as the layout names them (`q_proj`, `W_pack`, ...), or `all-linear`.
    pub targets: Vec<String>,
    pub rank: usize,
    pub dropout: f32,
    /// Micro-batch and padded sequence length.
    pub batch: usize,
    pub seq: usize,
    /// Compute dtype (f32 on the CPU, bf16 on CUDA).
    pub dtype: DType,
    pub device: DeviceKind,
}

impl EstimateInput {
    /// A run with the device's default dtype, no dropout.
    pub fn new(spec: ModelSpec, method: Method, targets: Vec<String>, rank: usize, batch: usize, seq: usize) -> Self {
        Self { spec, method, targets, rank, dropout: 0.0, batch, seq, dtype: DType::F32, device: DeviceKind::Cpu }
    }

    pub fn on(mut self, device: DeviceKind) -> Self {
        self.device = device;
        self.dtype = device.default_dtype();
        self
    }
}

/// One line of the breakdown.
#[derive(Debug, Clone, Serialize)]
pub struct Term {
    pub name: &'static str,
    pub bytes: u64,
    /// How it was computed, for the table.
    pub detail: String,
}

/// The estimate: a breakdown whose sum is `mid`, and the band around it.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub terms: Vec<Term>,
    pub low: u64,
    pub mid: u64,
    pub high: u64,
    /// Where the peak falls: "loss backward" or "layer backward".
    pub peak_at: &'static str,
    pub trainable_params: u64,
}

impl Estimate {
    pub fn term(&self, name: &str) -> u64 {
        self.terms.iter().filter(|t| t.name == name).map(|t| t.bytes).sum()
    }

    /// Fits when even the high end is within `memory`.
    pub fn fits(&self, memory: u64) -> bool {
        self.high <= memory
    }
}

/// One linear of a decoder layer: its module name, output and input features, and how many
/// tokens of a batch pass through it (`share` of T; below 1 for MoE experts).
#[derive(Debug, Clone)]
struct LinearShape {
    name: String,
    out: usize,
    inp: usize,
    role: Role,
    bias: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Q,
    K,
    V,
    Qkv,
    O,
    Gate,
    Up,
    GateUp,
    Down,
    Router,
    ExpertGate,
    ExpertUp,
    ExpertDown,
}

fn last(path: &str) -> String {
    path.rsplit('.').next().unwrap_or(path).to_string()
}

/// The linears of one layer, as `Model::from_source` builds them.
fn layer_linears(s: &ModelSpec) -> Vec<LinearShape> {
    let (h, hd) = (s.hidden, s.head_dim);
    let (q_out, kv_out) = (s.heads * hd, s.kv_heads * hd);
    let w = &s.weights;
    let f = s.intermediate;
    let lin = |name: &str, out: usize, inp: usize, role: Role, bias: bool| LinearShape {
        name: last(name),
        out,
        inp,
        role,
        bias,
    };
    let mut out = Vec::new();
    match (&w.qkv, &w.q, &w.k, &w.v) {
        (Some(qkv), ..) => out.push(lin(qkv, q_out + 2 * kv_out, h, Role::Qkv, s.qkv_bias)),
        (None, Some(q), Some(k), Some(v)) => {
            out.push(lin(q, q_out, h, Role::Q, s.qkv_bias));
            out.push(lin(k, kv_out, h, Role::K, s.qkv_bias));
            out.push(lin(v, kv_out, h, Role::V, s.qkv_bias));
        }
        _ => {}
    }
    out.push(lin(&w.o, h, q_out, Role::O, s.o_bias));
    match s.mlp {
        MlpKind::Gated(_) if w.gate_up.is_some() => {
            out.push(lin(w.gate_up.as_deref().unwrap_or_default(), 2 * f, h, Role::GateUp, s.mlp_bias));
            out.push(lin(&w.down, h, f, Role::Down, s.mlp_bias));
        }
        MlpKind::Gated(_) => {
            out.push(lin(w.gate.as_deref().unwrap_or_default(), f, h, Role::Gate, s.mlp_bias));
            out.push(lin(&w.up, f, h, Role::Up, s.mlp_bias));
            out.push(lin(&w.down, h, f, Role::Down, s.mlp_bias));
        }
        MlpKind::Plain(_) => {
            out.push(lin(&w.up, f, h, Role::Up, s.mlp_bias));
            out.push(lin(&w.down, h, f, Role::Down, s.mlp_bias));
        }
        MlpKind::Moe { experts, .. } => {
            out.push(lin(w.router.as_deref().unwrap_or_default(), experts, h, Role::Router, false));
            for _ in 0..experts {
                out.push(lin(w.gate.as_deref().unwrap_or_default(), f, h, Role::ExpertGate, false));
                out.push(lin(&w.up, f, h, Role::ExpertUp, false));
                out.push(lin(&w.down, h, f, Role::ExpertDown, false));
            }
        }
    }
    out
}

/// The linears of one layer grouped by module name: ([out, in], instances per layer), in the
/// order the decoder builds them — what a checkpoint would hold, known from the config alone.
pub fn layer_linear_shapes(spec: &ModelSpec) -> Vec<(String, [usize; 2], usize)> {
    let mut shapes: Vec<(String, [usize; 2], usize)> = Vec::new();
    for l in layer_linears(spec) {
        match shapes.iter_mut().find(|(name, ..)| *name == l.name) {
            Some((.., count)) => *count += 1,
            None => shapes.push((l.name, [l.out, l.inp], 1)),
        }
    }
    shapes
}

/// Parameters of the model the spec describes: linears (with biases), embeddings, the output
/// layer unless tied, and the norms.
pub fn parameter_count(spec: &ModelSpec) -> usize {
    let per_layer: usize = layer_linears(spec).iter().map(|l| l.out * l.inp + if l.bias { l.out } else { 0 }).sum();
    let (v, h) = (spec.vocab, spec.hidden);
    let norm = if spec.norm == NormKind::Layer { 2 * h } else { h };
    let lm_head = if spec.tie_embeddings { 0 } else { v * h };
    // one norm before attention, one before the MLP unless they share it (Falcon-7B, Phi)
    let layer_norms = 1 + usize::from(spec.weights.mlp_norm.is_some());
    let embed_norm = if spec.weights.embed_norm.is_some() { norm } else { 0 };
    let lm_head_bias = if spec.lm_head_bias { v } else { 0 };
    spec.layers * (per_layer + layer_norms * norm) + v * h + lm_head + lm_head_bias + norm + embed_norm
}

/// The module names a run may target on this model.
pub fn linear_names(spec: &ModelSpec) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for l in layer_linears(spec) {
        if !names.contains(&l.name) {
            names.push(l.name);
        }
    }
    names
}

/// NF4 bytes of a weight of n elements, as `Nf4Tensor::storage_bytes` counts them: packed
/// codes (two per byte) and f32 absmax per block of 64, or with double quantization u8 codes
/// per block, an f32 per 256 blocks, the 256-entry f32 code table and the offset.
pub fn nf4_bytes(n: usize, double_quant: bool) -> u64 {
    let blocks = n.div_ceil(64);
    let packed = n.div_ceil(2);
    let scales = if double_quant { blocks + 4 * blocks.div_ceil(256) + 4 * 256 + 4 } else { 4 * blocks };
    (packed + scales) as u64
}

/// Bytes the CPU runtime allocates once per process (gemm packing buffers, thread pool).
pub const CPU_RUNTIME: f64 = 6.0 * 1024.0 * 1024.0;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Estimate the peak memory of one training step (forward, loss, backward, AdamW).
pub fn estimate(input: &EstimateInput) -> Result<Estimate> {
    let s = &input.spec;
    if input.batch == 0 || input.seq < 2 {
        return Err(Error::Invalid("the estimate needs a batch of at least 1 and a sequence of at least 2".into()));
    }
    if input.rank == 0 {
        return Err(Error::Invalid("LoRA rank r must be at least 1".into()));
    }
    let linears = layer_linears(s);
    let names = linear_names(s);
    let all = input.targets.iter().any(|t| t == "all-linear");
    if let Some(bad) = input.targets.iter().find(|t| *t != "all-linear" && !names.contains(t)) {
        return Err(Error::Invalid(format!(
            "no linear module named {bad}; this model's linear modules are: {}",
            names.join(", ")
        )));
    }
    if input.targets.is_empty() {
        return Err(Error::Invalid("no LoRA target chosen".into()));
    }
    let targeted = |l: &LinearShape| all || input.targets.contains(&l.name);

    let e = input.dtype.size_in_bytes() as f64;
    let f4 = 4.0;
    let cpu = input.device == DeviceKind::Cpu;
    // our fused CPU kernels (model/ops.rs) run only on f32 CPU tensors; elsewhere the
    // composite candle ops run and keep more
    let fused = cpu && input.dtype == DType::F32;
    let (b, t) = (input.batch as f64, input.seq as f64);
    let tok = b * t;
    let (h, f, v) = (s.hidden as f64, s.intermediate as f64, s.vocab as f64);
    let (nh, nkv, hd) = (s.heads as f64, s.kv_heads as f64, s.head_dim as f64);
    let (q_out, kv_out) = (nh * hd, nkv * hd);
    let layers = s.layers as f64;
    let r = input.rank as f64;
    let n_rep = s.heads / s.kv_heads.max(1);

    // ------------------------------------------------------------------ static terms
    let mut frozen = 0f64;
    let mut biases = 0f64;
    let mut max_linear = 0usize;
    let mut lora_params = 0f64;
    for l in &linears {
        frozen += match input.method {
            Method::Lora => (l.out * l.inp) as f64 * e,
            Method::Qlora { double_quant } => nf4_bytes(l.out * l.inp, double_quant) as f64,
        };
        if l.bias {
            biases += l.out as f64 * e;
        }
        max_linear = max_linear.max(l.out * l.inp);
        if targeted(l) {
            lora_params += r * (l.out + l.inp) as f64;
        }
    }
    frozen *= layers;
    biases *= layers;
    lora_params *= layers;
    // embeddings, lm_head (shared when tied; a second, normalised copy for Baichuan2's
    // NormHead, whose loaded original is dropped), norms
    let norm_params = if s.norm == NormKind::Layer { 2.0 * h } else { h };
    let n_norms = 2.0 * layers + 1.0 + if s.weights.embed_norm.is_some() { 1.0 } else { 0.0 };
    let lm_head = if s.tie_embeddings && !s.normalized_lm_head { 0.0 } else { v * h };
    let unquantized = (v * h + lm_head + n_norms * norm_params + if s.lm_head_bias { v } else { 0.0 }) * e + biases;
    // LoRA A and B in f32, their f32 gradients (held by the gradient store until the step),
    // AdamW's f32 m and v (train/optim.rs): 16 bytes per trainable parameter
    let adapters = lora_params * 16.0;

    // --------------------------------------------------------- activations kept for backward
    // Bytes of the tensors one layer's forward records (all alive until the loss is dropped).
    let norm_out = |x: f64| {
        if fused {
            x * e
        } else if s.norm == NormKind::Rms {
            x * (12.0 + 2.0 * e)
        } else {
            x * (16.0 + 3.0 * e)
        }
    };
    // frozen linear: its output; on CUDA the attach op copies it and keeps both
    // (FrozenLinear::forward_on_device)
    let base_out = |out: f64| tok * out * e * if cpu { 1.0 } else { 2.0 };
    // LoRA branch (lora/mod.rs): [dropout mask and output], x in f32, x·Aᵀ, ·Bᵀ, ·scale,
    // back in the compute dtype, and the sum with the base output
    let lora_out = |l: &LinearShape| -> f64 {
        let (out, inp) = (l.out as f64, l.inp as f64);
        let mut bytes = tok * r * f4 + 2.0 * tok * out * f4 + tok * out * e;
        if e != f4 {
            bytes += tok * out * e + tok * inp * f4;
        }
        if input.dropout > 0.0 {
            bytes += 2.0 * tok * inp * e;
        }
        bytes
    };
    let linear_kept = |l: &LinearShape| base_out(l.out as f64) + if targeted(l) { lora_out(l) } else { 0.0 };
    let rope = |n: f64| -> f64 {
        let Position::Rope { rotary_dim, interleaved, .. } = s.position else { return 0.0 };
        let rd = rotary_dim as f64;
        let partial = rotary_dim != s.head_dim;
        // rotated part: fused op's output; rope_slow: neg (½), cat, two products, sum;
        // rope_i_slow: contiguous copy, four half products, two halves, cat
        let rot = if interleaved {
            5.0
        } else if fused {
            if partial {
                2.0
            } else {
                1.0
            }
        } else {
            4.5
        };
        let per_token = n * rd * rot + if partial { n * hd } else { 0.0 };
        tok * per_token * e
    };
    let scores = b * nh * t * t;
    let attention_core = {
        // heads(): transpose(1, 2) copies (a single head is already contiguous)
        let mut bytes = 0.0;
        let copy_if = |n: f64, width: f64| if n > 1.0 { tok * width * e } else { 0.0 };
        bytes += copy_if(nh, q_out) + 2.0 * copy_if(nkv, kv_out);
        if s.weights.qkv.is_some() {
            // the fused projection's split copies q, k and v once more
            bytes += tok * (q_out + 2.0 * kv_out) * e;
        }
        bytes += rope(nh) + rope(nkv);
        if n_rep > 1 {
            bytes += 2.0 * tok * q_out * e; // repeat_kv copies k and v
        }
        bytes += tok * q_out * e; // kᵀ made contiguous
                                  // scores, ·1/√d, [to f32], + mask, softmax (fused: its output; composite: diff,
                                  // exp, quotient), [back to the compute dtype]
        let softmax = if fused { 1.0 } else { 3.0 };
        bytes += scores * (2.0 * e + (1.0 + softmax) * f4 + if e != f4 { f4 + e } else { 0.0 });
        // probs·v and its [b, t, heads·d] copy
        bytes += tok * q_out * e * if nh > 1.0 { 2.0 } else { 1.0 };
        bytes
    };
    let act_kept = |act: Activation, n: f64| -> f64 {
        // fused SiLU gate keeps its output; elsewhere act(gate) and the product
        match (act, fused) {
            (Activation::Silu, true) => n * e,
            _ => 2.0 * n * e,
        }
    };
    let mlp_kept = match s.mlp {
        MlpKind::Gated(act) => {
            let split = if s.weights.gate_up.is_some() && fused { 2.0 * tok * f * e } else { 0.0 };
            split + act_kept(act, tok * f)
        }
        MlpKind::Plain(_) => tok * f * e,
        MlpKind::Moe { experts, top_k, act } => {
            // each token visits top_k experts: index_select of its rows, the gate/up/down path,
            // the routing weight product; every expert's index_add makes a new [T, h] sum
            let routed = tok * top_k as f64;
            routed * h * e * 2.0
                + act_kept(act, routed * f)
                + experts as f64 * tok * h * e
                + tok * h * e
                + tok * experts as f64 * f4 * 2.0
        }
    };
    let mut linear_sum = 0.0;
    for l in &linears {
        let share = match (s.mlp, l.role) {
            (MlpKind::Moe { experts, top_k, .. }, Role::ExpertGate | Role::ExpertUp | Role::ExpertDown) => {
                top_k as f64 / experts as f64
            }
            _ => 1.0,
        };
        linear_sum += share * linear_kept(l);
    }
    let residual = {
        // the attention norm, the residual sums, the MLP norm where there is one
        let mlp_norm = s.weights.mlp_norm.is_some() || !s.parallel_residual;
        norm_out(tok * h) + 2.0 * tok * h * e + if mlp_norm { norm_out(tok * h) } else { 0.0 }
    };
    let layer_kept = linear_sum + attention_core + mlp_kept + residual;

    // The first layer's input (the embedding) is not tracked: tensors computed from it alone
    // (the frozen projections that carry no LoRA) are freed in the forward, but the backward
    // gives a gradient to each untracked input of a tracked op, kept until the step.
    let attn_in: Vec<&LinearShape> =
        linears.iter().filter(|l| matches!(l.role, Role::Q | Role::K | Role::V | Role::Qkv)).collect();
    let any_attn_target = attn_in.iter().any(|l| targeted(l));
    let (first_freed, first_leaks) = if any_attn_target {
        let mut freed = 0.0;
        // the residual sum's embedding input; with dropout, the first layer's masks (their
        // gradients are plain there: the input is untracked)
        let mut leaks = tok * h * e
            + if input.dropout > 0.0 {
                attn_in.iter().filter(|l| targeted(l)).map(|l| tok * l.inp as f64 * e).sum::<f64>()
            } else {
                0.0
            };
        for l in &attn_in {
            if targeted(l) {
                // the gradient of the LoRA matmul's input is computed with A (a Var), so it
                // keeps its zeroed buffer and the product; the base output's is plain
                leaks += tok * (3.0 * l.inp as f64 + l.out as f64) * e + tok * r * f4;
            } else {
                let n = if l.role == Role::Q { nh } else { nkv };
                // base output and its head copy are freed; kᵀ or the repeated v get a gradient
                freed += base_out(l.out as f64) + if n > 1.0 { tok * l.out as f64 * e } else { 0.0 };
                if l.role == Role::K || l.role == Role::Q {
                    freed += rope(n);
                }
                leaks += tok * q_out * e;
            }
        }
        (freed, leaks)
    } else {
        (0.0, 0.0)
    };

    // position terms: the causal mask [t, t] and the additive mask used in attention
    // ([1, t, t], or [heads, t, t] with ALiBi), RoPE tables
    let positions = t * t * f4 * if s.position == Position::Alibi { 1.0 + nh } else { 2.0 };
    let activations = layers * layer_kept - first_freed + positions;

    // --------------------------------------------------------------- logits and loss
    // final norm, lm_head output (f32 on the CPU; on CUDA the bf16 output, its attach copy
    // and the f32 cast), and in the loss (model/loss.rs) the shifted view — a copy when the
    // batch has more than one row — and candle's composite log_softmax: x − max, exp(·) and
    // the log-probabilities, each [N, V] in f32
    let rows = b * (t - 1.0);
    let logits_fwd = norm_out(tok * h)
        + tok * v * if cpu && e == f4 { f4 } else { 2.0 * e + f4 }
        + rows * v * f4 * (3.0 + if b > 1.0 { 1.0 } else { 0.0 });

    // ------------------------------------------------------- backward working set
    // candle's backward detaches each incoming gradient, but a gradient computed with a
    // tracked forward tensor (exp's output, a matmul operand, the max's mask) is itself a
    // tracked tensor whose op keeps its inputs: the zeroed buffer it was added to, the
    // product and the incoming gradient, until its node's turn comes (and through that
    // node's step, since the detached copy shadows it without dropping it).
    //
    // Loss backward: after the max node the gradient of the logits holds 4¼ [N, V] tensors
    // (itself, the previous sum, the f32 and u8 masks, the masked gradient) while the reshape
    // before it adds a zeroed buffer and a sum: 6¼ traced; examples/lsm_probe.rs runs this op
    // sequence alone and counts 7.0 over the forward's tensors, the figure used here.
    let loss_backward = 7.0 * rows * v * f4;
    // Layer backward: the gradient of the attention probabilities comes from a matmul with v
    // and holds three score-sized f32 tensors (itself, its zeroed buffer, the product); the
    // softmax step adds its result, a zeroed buffer and the sum: six at once, beside the
    // gradients of the residual stream and of v. Each layer leaves the gradient of its
    // broadcast mask (an untracked input) in the store until the step, and with dropout each
    // LoRA module the gradient of its mask; the peak is in the first layer (processed last),
    // with every later layer's leaks.
    let mask_leak = scores * f4;
    // the dropout mask's gradient is computed with the (tracked) input, so it keeps the
    // incoming gradient, the product and its zeroed buffer: four [T, in] tensors per module
    let dropout_leak = if input.dropout > 0.0 {
        linears.iter().filter(|l| targeted(l)).map(|l| 4.0 * tok * l.inp as f64 * e).sum::<f64>()
    } else {
        0.0
    };
    let layer_working = 6.0 * scores * f4 + tok * (h + q_out) * e;
    let later_leaks = (layers - 1.0) * (mask_leak + dropout_leak);
    // the first layer's own leaks come after its attention core (its q, k, v and LoRA are
    // processed last), except the residual's, which comes before
    let first_residual_leak = if any_attn_target { tok * h * e } else { 0.0 };
    let layer_backward = later_leaks
        + first_residual_leak
        + layer_working.max(mask_leak + first_leaks - first_residual_leak + 2.0 * tok * h * e);
    let (backward, peak_at) = if loss_backward >= layer_backward {
        (loss_backward, "loss backward")
    } else {
        (layer_backward, "layer backward")
    };

    // ------------------------------------------------------------------ transients
    // QLoRA dequantizes into one buffer the size of the largest frozen linear: kept per
    // thread on the CPU (quant/frozen_linear.rs `with_dequantized`), one at a time on CUDA
    let dequant = match input.method {
        Method::Lora => 0.0,
        Method::Qlora { .. } => max_linear as f64 * e,
    };
    // the LoRA-weight gradients accumulate in the store through the backward (counted in
    // `adapters`); AdamW's step makes a few adapter-sized temporaries per variable at a time

    let mut terms = vec![
        Term {
            name: "frozen linears",
            bytes: frozen as u64,
            detail: match input.method {
                Method::Lora => format!("dense, {} B/param", e),
                Method::Qlora { double_quant: true } => "NF4 + double quant".into(),
                Method::Qlora { double_quant: false } => "NF4, f32 absmax".into(),
            },
        },
        Term {
            name: "embeddings, lm_head, norms",
            bytes: unquantized as u64,
            detail: format!("{}{}", if s.tie_embeddings { "tied, " } else { "" }, dtype_name(input.dtype)),
        },
        Term {
            name: "LoRA + grads + AdamW",
            bytes: adapters as u64,
            detail: format!("{:.2}M params × 16 B", lora_params / 1e6),
        },
        Term {
            name: "activations",
            bytes: activations as u64,
            detail: format!("{:.1} KiB/token/layer", layer_kept / tok / 1024.0),
        },
        Term { name: "logits + loss", bytes: logits_fwd as u64, detail: format!("{} × {} vocab", rows, s.vocab) },
        Term { name: "backward working set", bytes: backward as u64, detail: peak_at.to_string() },
        Term { name: "dequantized weight", bytes: dequant as u64, detail: "largest frozen linear".into() },
    ];
    let dynamic = activations + logits_fwd + backward + dequant;
    let mut mid: f64 = terms.iter().map(|t| t.bytes as f64).sum();
    // The band: the small tensors not modelled (row statistics, indices, the AdamW
    // temporaries, allocator rounding) on one side, the order in which candle's backward
    // frees gradients on the other (3 to 5 tensors in flight instead of 4).
    let mut low = mid - 0.25 * backward - 0.03 * dynamic;
    let mut high = mid + 0.25 * backward + 0.05 * dynamic;
    if cpu {
        // the matmul library's per-thread packing buffers and the thread pool, made once per
        // process and sized by the CPU's caches and threads (measured: 6.4 MB on 2 threads)
        terms.push(Term {
            name: "CPU runtime buffers",
            bytes: CPU_RUNTIME as u64,
            detail: "gemm packing, per thread".into(),
        });
        mid += CPU_RUNTIME;
        low += 0.5 * CPU_RUNTIME;
        high += 1.5 * CPU_RUNTIME;
    }
    if !cpu {
        // CUDA context and cuBLAS workspace outside the pool; the pool's fragmentation
        // (docs/memory-model.md §3.5)
        let ctx = 0.45 * GIB;
        terms.push(Term {
            name: "CUDA context + slack",
            bytes: (ctx + 0.1 * dynamic) as u64,
            detail: "0.3–0.6 GiB + 5–15%".into(),
        });
        mid += ctx + 0.1 * dynamic;
        low += 0.3 * GIB + 0.05 * dynamic;
        high += 0.6 * GIB + 0.15 * dynamic;
    }
    Ok(Estimate {
        terms,
        low: low.max(0.0) as u64,
        mid: mid as u64,
        high: high as u64,
        peak_at,
        trainable_params: lora_params as u64,
    })
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}
