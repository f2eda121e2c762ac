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

use crate::model::spec::{Activation, MlpKind, ModelSpec, NormKind, PlannedLinear, Position, Role};
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
    /// The compute dtype the trainer uses there by default ("auto"): bf16 on CUDA; on the CPU
    /// bf16 where its matmuls are the faster (`bf16_matmul::pays_on_this_cpu`), else f32.
    pub fn default_dtype(self) -> DType {
        match self {
            DeviceKind::Cpu if crate::quant::bf16_matmul::pays_on_this_cpu() => DType::BF16,
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
    /// Per-block gradient checkpointing (only each block's input kept for the backward).
    pub checkpointing: bool,
    /// DoRA: a magnitude per output row, and the composite forward that scales by it.
    pub dora: bool,
    /// On the CPU, the resident memory of the process outside the run's tensors (binary,
    /// libraries, tokenizer, data; in the GUI the window), as measured where the estimate is
    /// made; 0 counts only the run's own allocations (what `bench memory` measures).
    pub process_bytes: u64,
}

impl EstimateInput {
    /// A run with the device's default dtype, no dropout.
    pub fn new(spec: ModelSpec, method: Method, targets: Vec<String>, rank: usize, batch: usize, seq: usize) -> Self {
        Self {
            spec,
            method,
            targets,
            rank,
            dropout: 0.0,
            batch,
            seq,
            dtype: DType::F32,
            device: DeviceKind::Cpu,
            checkpointing: false,
            dora: false,
            process_bytes: 0,
        }
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
    /// On CUDA, the part of `mid` outside candle's memory pool (context, cuBLAS, reserve);
    /// 0 on the CPU.
    pub outside_pool: u64,
    /// On the CPU, the part of `mid` that is the process around the run (binary, data, window:
    /// `EstimateInput::process_bytes`); 0 on CUDA.
    pub process: u64,
}

impl Estimate {
    /// On CUDA, the predicted high-water mark of the memory pool our tensors come from (the
    /// reading `pool_peak` of a step).
    pub fn pool_peak(&self) -> u64 {
        self.mid - self.outside_pool
    }

    pub fn term(&self, name: &str) -> u64 {
        self.terms.iter().filter(|t| t.name == name).map(|t| t.bytes).sum()
    }

    /// Fits when even the high end is within `memory`.
    pub fn fits(&self, memory: u64) -> bool {
        self.high <= memory
    }
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

/// Bytes the CPU runtime allocates once per process (gemm packing buffers, thread pool): about
/// 1 MiB of packing buffers per thread that multiplies, on 2 cores the two rayon workers (the
/// computing thread is one of them, `model::ops::on_compute_pool`).
pub const CPU_RUNTIME: f64 = 2.0 * 1024.0 * 1024.0;

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
    let linears = &s.linears;
    s.check_targets(&input.targets)?;
    let targeted = |l: &PlannedLinear| ModelSpec::targets_select(&input.targets, &s.linear_path(0, l));

    let f4 = 4.0;
    let cpu = input.device == DeviceKind::Cpu;
    // bf16 on the CPU holds the frozen weights in bf16 and keeps the activations in f32
    // (model/decoder.rs `BaseWeights::activation_dtype`); elsewhere both are the compute dtype
    let cpu_bf16 = cpu && input.dtype == DType::BF16;
    let e_weight = input.dtype.size_in_bytes() as f64;
    let e = if cpu_bf16 { f4 } else { e_weight };
    // our fused CPU kernels (model/ops.rs) run only on f32 CPU tensors; elsewhere the
    // composite candle ops run and keep more
    let fused = cpu && (input.dtype == DType::F32 || cpu_bf16);
    let (b, t) = (input.batch as f64, input.seq as f64);
    let tok = b * t;
    let (h, f, v) = (s.hidden as f64, s.intermediate as f64, s.vocab as f64);
    let (nh, nkv, hd) = (s.heads as f64, s.kv_heads as f64, s.head_dim as f64);
    let (q_out, kv_out) = (nh * hd, nkv * hd);
    let layers = s.layers as f64;
    let r = input.rank as f64;

    // ------------------------------------------------------------------ static terms
    let mut frozen = 0f64;
    let mut biases = 0f64;
    let mut max_linear = 0usize;
    let mut lora_params = 0f64;
    for l in linears {
        frozen += match input.method {
            Method::Lora => (l.out_features * l.in_features) as f64 * e_weight,
            Method::Qlora { double_quant } => nf4_bytes(l.out_features * l.in_features, double_quant) as f64,
        };
        if l.bias {
            biases += l.out_features as f64 * e;
        }
        max_linear = max_linear.max(l.out_features * l.in_features);
        if targeted(l) {
            lora_params += r * (l.out_features + l.in_features) as f64;
            if input.dora {
                // DoRA's magnitude vector
                lora_params += l.out_features as f64;
            }
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
    let unquantized =
        (v * h + lm_head) * e_weight + (n_norms * norm_params + if s.lm_head_bias { v } else { 0.0 }) * e + biases;
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
    // frozen linear: its output (quant/frozen_linear.rs, one op on every device)
    let base_out = |out: f64| tok * out * e;
    // LoRA branch (lora/mod.rs), in the compute dtype: [the dropout output; its mask is drawn
    // again in the backward, not kept], x·Aᵀ, ·Bᵀ, ·scale and the sum with the base output
    // On the CPU in f32 the LoRA linear is one op (lora/fused.rs) that keeps only its output,
    // counted as the base output.
    // DoRA (lora/mod.rs forward_dora): on the CPU the one-node LoRA linear with the magnitude's
    // scale inside keeps only its output; with dropout also the dropped input, x − h, the base of
    // that and the sum. Elsewhere composite ops keep the input with A's rows appended and the
    // base of it, x·Aᵀ·Bᵀ and its scaled copy, the base less its bias (when it has one), both
    // products with the magnitude scale, their sum and the output; with dropout also the dropped
    // input and the base of the undropped one.
    let lora_out = |l: &PlannedLinear| -> f64 {
        let (out, inp) = (l.out_features as f64, l.in_features as f64);
        let bias = if l.bias { 1.0 } else { 0.0 };
        match (fused, input.dora, input.dropout > 0.0) {
            (true, false, _) | (true, true, false) => return 0.0,
            (true, true, true) => return tok * (2.0 * inp + (2.0 + bias) * out) * e,
            _ => {}
        }
        if input.dora {
            let dropped = if input.dropout > 0.0 { 1.0 } else { 0.0 };
            return tok * ((1.0 + dropped) * inp + r + (6.0 + bias + dropped) * out) * e;
        }
        let mut bytes = tok * r * e + 3.0 * tok * out * e;
        if input.dropout > 0.0 {
            bytes += tok * inp * e;
        }
        bytes
    };
    let linear_kept = |l: &PlannedLinear| base_out(l.out_features as f64) + if targeted(l) { lora_out(l) } else { 0.0 };
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
        // the chunked attention (model/attention.rs) keeps only its inputs: its output and
        // the output's [b, t, heads·d] copy for the output projection
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
    for l in linears {
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
    // gives a gradient to each untracked input of a tracked op, kept until the step. With
    // checkpointing the recomputed block's input is a variable, so this does not happen.
    let attn_in: Vec<&PlannedLinear> =
        linears.iter().filter(|l| matches!(l.role, Role::Q | Role::K | Role::V | Role::Qkv)).collect();
    let any_attn_target = attn_in.iter().any(|l| targeted(l));
    let (first_freed, first_leaks) = if any_attn_target && !input.checkpointing {
        let mut freed = 0.0;
        // the residual sum's embedding input; with dropout, the first layer's dropout outputs
        // (untracked there, as the input is, and given a gradient by the LoRA matmul)
        let mut leaks = tok * h * e
            + if input.dropout > 0.0 && !fused {
                attn_in.iter().filter(|l| targeted(l)).map(|l| tok * l.in_features as f64 * e).sum::<f64>()
            } else {
                0.0
            };
        if fused {
            // the fused LoRA linears hand their untracked input one gradient (summed)
            leaks += tok * h * e;
        }
        for l in &attn_in {
            if targeted(l) && fused {
                continue;
            } else if targeted(l) {
                // the gradient of the LoRA matmul's input is computed with A (a Var), so it
                // keeps its zeroed buffer and the product; the base output's is plain
                leaks += tok * (3.0 * l.in_features as f64 + l.out_features as f64) * e + tok * r * f4;
            } else {
                // the base output is freed (and its head copy where RoPE makes a new tensor);
                // the attention op's untracked argument gets a gradient
                let n = if l.role == Role::Q { nh } else { nkv };
                freed += base_out(l.out_features as f64);
                if l.role != Role::V && n > 1.0 && rope(n) > 0.0 {
                    freed += tok * l.out_features as f64 * e;
                }
                leaks += tok * l.out_features as f64 * e;
            }
        }
        (freed, leaks)
    } else {
        (0.0, 0.0)
    };

    // RoPE tables: cos and sin [t, rotary_dim / 2]
    let positions = match s.position {
        Position::Rope { rotary_dim, .. } => t * rotary_dim as f64 * e,
        Position::Alibi => 0.0,
    };
    // Without checkpointing every layer's tensors are kept; with it only each block's input
    // (model/recompute.rs), and one block's tensors exist again while it is recomputed.
    let activations = if input.checkpointing {
        // the blocks' inputs and the last block's output (the final norm's input)
        (layers + 1.0) * tok * h * e + positions
    } else {
        layers * layer_kept - first_freed + positions
    };

    // --------------------------------------------------------------- logits and loss
    // The chunked loss (model/loss.rs) keeps only the final norm's output; the logits of one
    // chunk of positions exist at a time: with their per-row losses in the forward, with
    // their gradient in the backward (model/ops.rs cross_entropy_*), which then goes through
    // the output layer into the [T, hidden] gradient, assembled from the chunks' parts.
    let logits_fwd = norm_out(tok * h);
    let loss_rows = tok.min(crate::model::loss::loss_chunk_rows(s.vocab) as f64);
    let loss_backward = 2.0 * loss_rows * v * f4 + 2.0 * tok * h * e;

    // ------------------------------------------------------- backward working set
    // candle's backward detaches each incoming gradient, but a gradient computed with a
    // tracked forward tensor (a LoRA matmul with its A or B) is itself tracked and keeps its
    // inputs until its node's turn comes.
    //
    // A layer's backward. candle hands each gradient an op returns to the store through a
    // zeroed buffer and a sum (`or_insert` + `add`), so a gradient of n elements passes
    // through three such tensors at a moment, beside the one being processed. Measured
    // alone on the CPU (SmolLM2's shapes, 2048 and 4096 tokens, examples in the grid):
    // - attention (model/attention.rs): one chunk's probabilities, their gradient and the
    //   scores' gradient (a tile's, on each thread, for bf16 on the CPU), plus about 6 query-sized and 7 key-sized f32 tensors per token (the
    //   f32 key and value accumulators, the query gradient's chunks and their concatenation,
    //   the gradients handed back for q, k and v with their buffers and sums);
    // - a gated MLP: about 7 [T, f] tensors (the silu gate's incoming gradient, its two
    //   results and the product it makes, each result's buffer and sum); 5 for an ungated one.
    // Beside them run the gradients of the residual stream; the peak is in the first layer
    // (processed last), whose untracked input leaves gradients in the store.
    let chunk_queries = crate::model::attention::query_chunk(input.batch, s.heads, input.seq, input.seq) as f64;
    let score_chunk = match cpu_bf16 {
        // tiles per KV head instead (model/attention/tiles.rs), one at a time per computing thread
        true => {
            let tile = (crate::model::attention::TILE_SCORE_BYTES as f64).min(nh / nkv * t * t * f4);
            tile * (rayon::current_num_threads() as f64).min(b * nkv)
        }
        false => b * nh * chunk_queries * t * f4,
    };
    let attention_backward = 3.0 * score_chunk + tok * (6.0 * q_out + 7.0 * kv_out) * f4;
    let mlp_backward = tok * f * e * if matches!(s.mlp, MlpKind::Plain(_)) { 5.0 } else { 7.0 };
    let layer_working = attention_backward.max(mlp_backward) + tok * (h + q_out) * e;
    let (layer_backward, backward_detail) = if input.checkpointing {
        // one block recomputed (its kept tensors), its backward, the incoming gradient and
        // the gradient of its input, the input's copy as a variable and its output times the
        // incoming gradient (the nested backward's root)
        (layer_kept + layer_working + 4.0 * tok * h * e, "recomputed block")
    } else {
        // the first layer's own leaks come after its attention (its q, k, v and LoRA are
        // processed last), except the residual's, which comes before
        let first_residual_leak = if any_attn_target { tok * h * e } else { 0.0 };
        let working = layer_working.max(first_leaks - first_residual_leak + 2.0 * tok * h * e);
        (first_residual_leak + working, "layer backward")
    };
    let peak_in_loss = loss_backward >= layer_backward;
    let (backward, peak_at) =
        if peak_in_loss { (loss_backward, "loss backward") } else { (layer_backward, backward_detail) };

    // ------------------------------------------------------------------ transients
    // QLoRA dequantizes into one buffer the size of the largest frozen linear: kept per
    // thread on the CPU (quant/frozen_linear.rs `with_dequantized`), one at a time on CUDA
    let dequant = match input.method {
        Method::Lora => 0.0,
        Method::Qlora { .. } => max_linear as f64 * e_weight,
    };
    // (DoRA's row norms come from ‖W‖² kept per row and [r, out]-sized products: no dense copy)
    // the LoRA-weight gradients accumulate in the store through the backward (counted in
    // `adapters`); AdamW's step makes a few adapter-sized temporaries per variable at a time

    let mut terms = vec![
        Term {
            name: "frozen linears",
            bytes: frozen as u64,
            detail: match input.method {
                Method::Lora => format!("dense, {} B/param", e_weight),
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
        Term {
            name: "logits + loss",
            bytes: logits_fwd as u64,
            detail: format!("chunks of {} positions × {} vocab", loss_rows, s.vocab),
        },
        Term { name: "backward working set", bytes: backward as u64, detail: peak_at.to_string() },
        Term { name: "dequantized weight", bytes: dequant as u64, detail: "largest frozen linear".into() },
    ];
    let dynamic = activations + logits_fwd + backward + dequant;
    let mut mid: f64 = terms.iter().map(|t| t.bytes as f64).sum();
    // The band: the small tensors not modelled (row statistics, indices, the AdamW
    // temporaries, allocator rounding) on one side, the order in which candle's backward
    // frees gradients on the other (3 to 5 tensors in flight instead of 4).
    let mut low = mid - 0.25 * backward - 0.03 * dynamic;
    if peak_in_loss {
        // at the start of the backward the LoRA gradients (4 B a parameter, counted above)
        // do not exist yet; where the peak then lands depends on how close the layers come
        low -= lora_params * 4.0;
    }
    let mut high = mid + 0.25 * backward + 0.05 * dynamic;
    if cpu {
        // the matmul library's per-thread packing buffers and the thread pool, made once per
        // process and sized by the CPU's caches, threads and the shapes multiplied (measured: 3.05 MiB
        // on 2 threads after the grid's warm-up step)
        terms.push(Term {
            name: "CPU runtime buffers",
            bytes: CPU_RUNTIME as u64,
            detail: "gemm packing, per thread".into(),
        });
        mid += CPU_RUNTIME;
        low += 0.5 * CPU_RUNTIME;
        high += 1.5 * CPU_RUNTIME;
        // whether a run fits is decided by the whole process's resident memory
        if input.process_bytes > 0 {
            let p = input.process_bytes as f64;
            terms.push(Term {
                name: "process: binary, data, window",
                bytes: input.process_bytes,
                detail: "resident now, outside the run's tensors".into(),
            });
            mid += p;
            high += p;
            // the resident set counts touched pages: the zeroed buffers candle's backward only
            // reads (a gradient's `zeros` before its add) stay on the shared zero page, so the
            // process can sit below its heap's count by part of the transient tensors (measured
            // on short chat records: up to 7% below the heap's middle)
            low += p - 0.05 * dynamic;
        }
    }
    let mut outside_pool = 0.0;
    if !cpu {
        // Every tensor above comes from the stream-ordered pool candle allocates from: its
        // high-water mark is what the terms above predict (gpu-check compares the two). Outside
        // it: the CUDA context with the loaded kernels (candle's and ours), cuBLAS/cuBLASLt
        // workspaces, and the pool's reserve beyond its use (docs/memory-model.md §3.5).
        let ctx = 0.45 * GIB;
        terms.push(Term {
            name: "CUDA context, cuBLAS, pool reserve",
            bytes: (ctx + 0.1 * dynamic) as u64,
            detail: "outside the pool: 0.3–0.6 GiB + 5–15%".into(),
        });
        outside_pool = ctx + 0.1 * dynamic;
        mid += outside_pool;
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
        outside_pool: outside_pool as u64,
        process: if cpu { input.process_bytes } else { 0 },
    })
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// DeepSpeed's ZeRO stage of a job handed to a multi-GPU trainer (`handoff`): stage 2 shards
/// the gradients and the optimizer state across the GPUs, stage 3 the parameters too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Zero {
    Two,
    Three,
}

impl Zero {
    pub fn label(self) -> &'static str {
        match self {
            Zero::Two => "ZeRO-2",
            Zero::Three => "ZeRO-3",
        }
    }
}

/// Elements in one of DeepSpeed's reduce / all-gather buckets (the `5e8` of the ZeRO configs a
/// handoff writes), held in the 2-byte compute dtype.
pub const ZERO_BUCKET: f64 = 5e8;

/// The peak on each of `gpus` GPUs (all nodes together) when the run trains data-parallel under
/// DeepSpeed ZeRO `stage`, `input` being one GPU's share (its micro-batch). From the one-GPU
/// estimate, with the terms of docs/memory-model.md sharded as ZeRO shards them:
/// - ZeRO-2: each GPU keeps the whole model and the LoRA weights (4 B a parameter), but only
///   its 1/N of their gradients and AdamW state (12 B a parameter); the gradient reduction and
///   the all-gather of updated weights go through two buckets of up to 5·10⁸ elements (bounded
///   by the trainable parameters);
/// - ZeRO-3: the frozen weights (NF4 or dense), the embeddings and the LoRA weights are split
///   N ways too, and each layer's weights are gathered whole while it runs: the current and the
///   prefetched layer, or the embedding matrix, whichever is larger.
///
/// Activations, logits and the backward's working set are per GPU and do not shrink. This is the
/// arithmetic of sharding applied to our one-GPU model of the step, not a measurement of
/// DeepSpeed: a band to plan cards with.
pub fn estimate_per_gpu(input: &EstimateInput, gpus: usize, stage: Zero) -> Result<Estimate> {
    if gpus == 0 {
        return Err(Error::Invalid("the per-GPU estimate needs at least one GPU".into()));
    }
    let mut one = input.clone();
    one.device = DeviceKind::Cuda;
    let mut e = estimate(&one)?;
    let n = gpus as f64;
    let trainable = e.trainable_params as f64;
    let old_mid = e.mid as f64;
    let frozen = input_term(&e, "frozen linears");
    let unquantized = input_term(&e, "embeddings, lm_head, norms");
    let mut replace = |name: &str, bytes: f64, detail: String| {
        if let Some(t) = e.terms.iter_mut().find(|t| t.name == name) {
            t.bytes = bytes as u64;
            t.detail = detail;
        }
    };
    let (s, e_weight) = (&one.spec, one.dtype.size_in_bytes() as f64);
    let extra: (&'static str, f64, String) = match stage {
        Zero::Two => {
            replace(
                "LoRA + grads + AdamW",
                trainable * (4.0 + 12.0 / n),
                format!("4 B/param + 12 B/param ÷ {gpus} GPUs"),
            );
            let buckets = 2.0 * ZERO_BUCKET.min(trainable) * 2.0;
            ("ZeRO buckets", buckets, "reduce + all-gather, ≤ 5e8 elements each".into())
        }
        Zero::Three => {
            replace("frozen linears", frozen / n, format!("÷ {gpus} GPUs"));
            replace("embeddings, lm_head, norms", unquantized / n, format!("÷ {gpus} GPUs"));
            replace("LoRA + grads + AdamW", trainable * 16.0 / n, format!("16 B/param ÷ {gpus} GPUs"));
            let layer = frozen / s.layers.max(1) as f64;
            let embedding = (s.vocab * s.hidden) as f64 * e_weight;
            let gathered = (2.0 * layer).max(embedding);
            ("ZeRO-3 gathered weights", gathered, "current + prefetched layer, or the embedding".into())
        }
    };
    e.terms.push(Term { name: extra.0, bytes: extra.1 as u64, detail: extra.2 });
    let new_mid: f64 = e.terms.iter().map(|t| t.bytes as f64).sum();
    let delta = new_mid - old_mid;
    e.mid = new_mid as u64;
    e.low = (e.low as f64 + delta).max(0.0) as u64;
    e.high = (e.high as f64 + delta).max(0.0) as u64;
    Ok(e)
}

fn input_term(e: &Estimate, name: &str) -> f64 {
    e.term(name) as f64
}
