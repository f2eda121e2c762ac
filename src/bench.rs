//! Benchmarks run by `qlora-studio bench ...`. Figures come from one process, and every
//! comparison is a ratio from the same run, because shared machines are noisy.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use serde::Serialize;

use crate::lora::LoraSettings;
use crate::model::{BaseWeights, Model};
use crate::quant::{self, FloatType, FrozenLinear, FrozenWeight};
use crate::train::optim::{AdamW, AdamWParams};
use crate::Result;

/// One weight shape's NF4 figures.
#[derive(Debug, Serialize)]
pub struct Nf4BenchRow {
    pub out_features: usize,
    pub in_features: usize,
    pub tokens: usize,
    /// Millions of weights per second.
    pub quantize_mweights_s: f64,
    pub quantize_double_mweights_s: f64,
    pub dequantize_f32_mweights_s: f64,
    /// Frozen-linear forward + backward (input gradient), median seconds.
    pub dense_f32_fwd_bwd_s: f64,
    pub nf4_fwd_bwd_s: f64,
    /// nf4 / dense: below 1.3 is the target on the CPU.
    pub nf4_over_dense: f64,
}

/// Median wall time of `iters` runs of `f`, after one warm-up run.
fn median_secs(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// Median wall times of `a` and `b`, run alternately so that drift in the machine's load hits
/// both alike. Short runs are repeated until each side has had about half a second.
fn interleaved_medians(
    iters: usize,
    mut a: impl FnMut() -> Result<()>,
    mut b: impl FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let start = Instant::now();
        f()?;
        Ok(start.elapsed().as_secs_f64())
    };
    let first = time(&mut a)?.max(time(&mut b)?);
    let iters = iters.max((0.5 / first.max(1e-6)).ceil() as usize).min(1000);
    let (mut ta, mut tb) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
    for _ in 0..iters {
        ta.push(time(&mut a)?);
        tb.push(time(&mut b)?);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    };
    Ok((median(ta), median(tb)))
}

/// A deterministic pseudo-random normal-ish weight (no RNG dependency, same every run).
fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            // sum of four uniforms: roughly normal, like trained weights
            let mut s = 0f32;
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                s += (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            s * 0.05
        })
        .collect()
}

/// Quantize/dequantize throughput and frozen-linear forward+backward, NF4 against dense f32,
/// for a weight of [out, in] and `tokens` input rows.
pub fn nf4_row(out_features: usize, in_features: usize, tokens: usize, iters: usize) -> Result<Nf4BenchRow> {
    let n = out_features * in_features;
    let shape = [out_features, in_features];
    let w = weights(n, 1);
    let mweights = n as f64 / 1e6;

    let t_quant = median_secs(iters, || quant::quantize(&w, &shape, FloatType::F32, 64, false).map(drop))?;
    let t_quant_dq = median_secs(iters, || quant::quantize(&w, &shape, FloatType::F32, 64, true).map(drop))?;
    let q = quant::quantize(&w, &shape, FloatType::F32, 64, true)?;
    let t_dequant = median_secs(iters, || {
        std::hint::black_box(q.dequantize_f32());
        Ok(())
    })?;

    let device = Device::Cpu;
    let x = Var::from_tensor(&Tensor::from_vec(weights(tokens * in_features, 2), (tokens, in_features), &device)?)?;
    let dense =
        FrozenLinear::new(FrozenWeight::Dense(Tensor::from_vec(w, (out_features, in_features), &device)?), None)?;
    let nf4 = FrozenLinear::new(FrozenWeight::Nf4(std::sync::Arc::new(q)), None)?;
    let fwd_bwd = |lin: &FrozenLinear| -> Result<()> {
        let y = lin.forward(x.as_tensor())?;
        let grads = y.sum_all()?.backward()?;
        std::hint::black_box(grads.get(x.as_tensor()));
        Ok(())
    };
    let (t_dense, t_nf4) = interleaved_medians(iters, || fwd_bwd(&dense), || fwd_bwd(&nf4))?;

    Ok(Nf4BenchRow {
        out_features,
        in_features,
        tokens,
        quantize_mweights_s: mweights / t_quant,
        quantize_double_mweights_s: mweights / t_quant_dq,
        dequantize_f32_mweights_s: mweights / t_dequant,
        dense_f32_fwd_bwd_s: t_dense,
        nf4_fwd_bwd_s: t_nf4,
        nf4_over_dense: t_nf4 / t_dense,
    })
}

/// The shapes of the NF4 benchmark: SmolLM2-135M's MLP and LLaMA-7B's down projection.
pub const NF4_SHAPES: [(usize, usize); 2] = [(576, 1536), (4096, 11008)];

pub fn print_nf4_table(rows: &[Nf4BenchRow]) {
    println!(
        "{:>12} {:>6} | {:>10} {:>10} {:>10} | {:>10} {:>10} {:>8}",
        "weight", "tokens", "quant", "quant+dq", "dequant", "dense f32", "nf4", "nf4/dense"
    );
    println!(
        "{:>12} {:>6} | {:>32} | {:>10} {:>10} {:>8}",
        "[out×in]", "", "(million weights / s)", "fwd+bwd s", "fwd+bwd s", ""
    );
    for r in rows {
        println!(
            "{:>12} {:>6} | {:>10.0} {:>10.0} {:>10.0} | {:>10.4} {:>10.4} {:>8.2}",
            format!("{}×{}", r.out_features, r.in_features),
            r.tokens,
            r.quantize_mweights_s,
            r.quantize_double_mweights_s,
            r.dequantize_f32_mweights_s,
            r.dense_f32_fwd_bwd_s,
            r.nf4_fwd_bwd_s,
            r.nf4_over_dense
        );
    }
}

/// One matmul shape: the f32 gemm candle runs against our bf16-operand kernel.
#[derive(Debug, Serialize)]
pub struct MatmulBenchRow {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub f32_gflop_s: f64,
    pub bf16_gflop_s: f64,
    /// bf16 / f32 throughput; the kernel is chosen by default where this is well above 1.
    pub speedup: f64,
    /// The backward's input gradient dY [m, n] · W [n, k] on the bf16 kernel (the other
    /// packing of the same weight).
    pub bf16_input_grad_gflop_s: f64,
    /// Whether this CPU runs the AVX512-BF16 kernel (else "bf16" is the f32 gemm on rounded operands).
    pub bf16_dot: bool,
}

/// The shapes of a SmolLM2-135M step at 256 tokens (q/o, k/v, gate/up, down, the output layer
/// in the loss's chunks of 160 rows: `loss::loss_chunk_rows(49152)`) and LLaMA-7B's MLP at 512
/// tokens. (The output layer over 256 rows at once, 48 MiB of logits, measured its page faults:
/// a buffer over glibc's 32 MiB mmap ceiling is mapped afresh each call.)
pub const MATMUL_SHAPES: [(usize, usize, usize); 6] =
    [(256, 576, 576), (256, 576, 192), (256, 576, 1536), (256, 1536, 576), (160, 576, 49152), (512, 4096, 11008)];

/// C [m, n] = A [m, k] · Wᵀ (W [n, k], the frozen linear's forward) in f32 and with bf16 operands.
pub fn matmul_row(m: usize, k: usize, n: usize, iters: usize) -> Result<MatmulBenchRow> {
    use crate::quant::bf16_matmul::{self, Rhs};
    let a = weights(m * k, 1);
    let w = weights(n * k, 2);
    let w16: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
    // packed once, as a CPU run in bf16 holds its frozen weights
    let packed = bf16_matmul::PackedWeight::pack(Rhs::TransposedBf16(&w16), n, k);
    let dy = weights(m * n, 3);
    let (at, wt) = (Tensor::from_vec(a.clone(), (m, k), &Device::Cpu)?, Tensor::from_vec(w, (n, k), &Device::Cpu)?);
    let (t_f32, t_bf16) = interleaved_medians(
        iters,
        || {
            std::hint::black_box(at.matmul(&wt.t()?)?);
            Ok(())
        },
        || {
            std::hint::black_box(bf16_matmul::matmul(&a, m, k, Rhs::TransposedPacked(&packed), n));
            Ok(())
        },
    )?;
    let (_, t_grad) = interleaved_medians(
        iters,
        || Ok(()),
        || {
            std::hint::black_box(bf16_matmul::matmul(&dy, m, n, Rhs::PlainPacked(&packed), k));
            Ok(())
        },
    )?;
    let flop = 2.0 * (m * k * n) as f64;
    Ok(MatmulBenchRow {
        m,
        k,
        n,
        f32_gflop_s: flop / t_f32 / 1e9,
        bf16_gflop_s: flop / t_bf16 / 1e9,
        speedup: t_f32 / t_bf16,
        bf16_input_grad_gflop_s: flop / t_grad / 1e9,
        bf16_dot: bf16_matmul::has_bf16_dot(),
    })
}

/// The same step in PyTorch + PEFT (+ bitsandbytes), run by ../shared/bench/peft_baseline.py
/// in a child process with this row's settings; its JSON line as printed. A bf16 row runs the
/// baseline under `--autocast bf16`, PyTorch's fastest CPU setting.
pub fn peft_baseline(
    python: &str,
    script: &std::path::Path,
    b: &StepBench,
    row: &StepBenchRow,
) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context;
    if !script.is_file() {
        anyhow::bail!("{}: baseline script not found (set --baseline)", script.display());
    }
    if b.dora {
        anyhow::bail!(
            "the PyTorch baseline runs LoRA only: compare DoRA with our own LoRA row (bench step without --dora)"
        );
    }
    let mut cmd = std::process::Command::new(python);
    cmd.arg(script)
        .args(["--preset", b.preset, "--mode", b.mode])
        .args(["--seq", &row.seq.to_string(), "--batch", &row.batch.to_string()])
        .args(["--steps", &b.steps.to_string(), "--rank", &b.rank.to_string()])
        .args(["--targets", &peft_targets(&b.targets), "--threads", &row.threads.to_string()])
        .args(["--device", &row.device]);
    if b.checkpointing {
        cmd.arg("--checkpointing");
    }
    if row.dtype == "bf16" && row.device == "cpu" {
        cmd.args(["--autocast", "bf16"]);
    }
    let out = cmd.output().with_context(|| format!("running {python} {}", script.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("no message")
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line =
        stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).context("no JSON line from the baseline")?;
    Ok(serde_json::from_str(line)?)
}

/// Target modules as peft_baseline.py's --targets takes them: it hands PEFT a list, in which
/// "all-linear" would be a module name, so that is spelled out (the presets are LLaMA-shaped).
fn peft_targets(targets: &[String]) -> String {
    if targets.iter().any(|t| t == "all-linear") {
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj".into()
    } else {
        targets.join(",")
    }
}

/// "ours vs theirs" for one row: tokens/s and peak RSS with their ratios.
pub fn comparison_line(row: &StepBenchRow, theirs: &serde_json::Value) -> String {
    let their_tps = theirs["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    let their_rss = theirs["peak_rss_mib"].as_f64().unwrap_or(f64::NAN);
    format!(
        "{} {} {} seq {} batch {}: qlora-studio {:.1} tokens/s vs {} {:.1} → {:.2}×; peak RSS {:.0} vs {:.0} MiB → {:.2}×",
        row.preset,
        row.mode,
        row.dtype,
        row.seq,
        row.batch,
        row.tokens_per_s,
        theirs["impl"].as_str().unwrap_or("baseline"),
        their_tps,
        row.tokens_per_s / their_tps,
        row.peak_rss_mib,
        their_rss,
        row.peak_rss_mib / their_rss
    )
}

/// One training-step benchmark, with the fields ../shared/bench/peft_baseline.py prints.
#[derive(Debug, Serialize)]
pub struct StepBenchRow {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub preset: String,
    pub mode: String,
    pub seq: usize,
    pub batch: usize,
    pub rank: usize,
    pub targets: String,
    /// Per-block gradient checkpointing (not a field of the PyTorch baseline's rows).
    pub gradient_checkpointing: bool,
    /// DoRA on the targets.
    pub dora: bool,
    /// LoRA dropout (0: the PyTorch baseline's setting).
    #[serde(default)]
    pub lora_dropout: f32,
    pub threads: usize,
    pub tokens_per_s: f64,
    pub step_s_median: f64,
    pub peak_rss_mib: f64,
    pub loss_first: f32,
    pub loss_last: f32,
    /// Every step's loss, the two warm-up steps included.
    pub losses: Vec<f32>,
    pub device: String,
    pub dtype: String,
    /// Model FLOPs utilisation on a GPU: 4 × parameters × tokens per second (forward and input
    /// gradients; frozen weights get no weight gradient; recomputation not counted) over the
    /// card's dense bf16/f16 peak. Absent where the card's peak is not known.
    pub mfu: Option<f64>,
    /// GPU: the pool's high-water mark over the timed steps (our tensors) and the card's used
    /// memory after them (cuMemGetInfo), MiB.
    pub pool_peak_mib: Option<f64>,
    pub device_used_mib: Option<f64>,
    /// The memory estimate of this run (middle; on a GPU also its pool part), MiB.
    pub estimate_mib: f64,
    pub estimate_pool_mib: f64,
}

/// Dense bf16 tensor-core peak (TFLOP/s, no sparsity) of the cards users train on, by name.
pub fn bf16_peak_tflops(gpu_name: &str) -> Option<f64> {
    let n = gpu_name.to_ascii_uppercase();
    let table: [(&str, f64); 9] = [
        ("H200", 989.0),
        ("H100 PCIE", 756.0),
        ("H100", 989.0),
        ("A100", 312.0),
        ("L40S", 362.0),
        ("A6000", 155.0),
        ("4090", 165.0),
        ("3090", 71.0),
        ("L4", 121.0),
    ];
    table.iter().find(|(k, _)| n.contains(k)).map(|&(_, t)| t)
}

pub struct StepBench<'a> {
    pub preset: &'a str,
    /// "lora" (dense f32 base) or "qlora" (NF4 base with double quantization)
    pub mode: &'a str,
    /// Every combination of these is run on the one loaded model.
    pub seqs: Vec<usize>,
    pub batches: Vec<usize>,
    pub steps: usize,
    pub rank: usize,
    pub targets: Vec<String>,
    pub checkpointing: bool,
    pub dora: bool,
    pub dropout: f32,
    /// "cpu", "cuda" or "cuda:N"
    pub device: &'a str,
    /// "auto" (bf16 on a GPU, f32 on the CPU), "f32", "bf16" or "f16"
    pub dtype: &'a str,
}

/// Forward + backward + AdamW on a preset-shaped model with generated weights, as the PyTorch
/// baseline does it: LoRA alpha 2r, lr 1e-4, labels = inputs, two warm-up steps not timed.
pub fn step(b: &StepBench<'_>) -> Result<Vec<StepBenchRow>> {
    // "auto" resolves as a run's model.dtype does
    let dtype = crate::train::ModelConfig { dtype: b.dtype.into(), device: b.device.into(), ..Default::default() }
        .compute_dtype();
    let device = crate::train::device_of(b.device)?;
    let mut model = Model::from_preset(b.preset, base_weights(b.mode, dtype)?, &device)?;
    let settings =
        LoraSettings { use_dora: b.dora, dropout: b.dropout, ..LoraSettings::with_rank(b.rank, b.targets.clone()) };
    model.add_lora(&settings, 0)?;
    model.set_gradient_checkpointing(b.checkpointing);
    let mut rows = Vec::new();
    for &seq in &b.seqs {
        for &batch in &b.batches {
            rows.push(step_run(b, &model, dtype, &device, seq, batch)?);
        }
    }
    Ok(rows)
}

/// One (sequence, batch) setting on a loaded model, with a fresh optimizer.
fn step_run(
    b: &StepBench<'_>,
    model: &Model,
    dtype: candle_core::DType,
    device: &Device,
    seq: usize,
    batch: usize,
) -> Result<StepBenchRow> {
    let vars = model.trainable().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(vars, AdamWParams { lr: 1e-4, ..Default::default() })?;
    let vocab = model.spec.vocab as u32;
    let mut rng = crate::rng::Rng::new(1);
    let ids: Vec<u32> = (0..batch * seq).map(|_| rng.below(vocab as u64) as u32).collect();
    let labels = Tensor::from_vec(ids.clone(), (batch, seq), &Device::Cpu)?;
    let ids = Tensor::from_vec(ids, (batch, seq), device)?;
    let (mut times, mut losses) = (Vec::new(), Vec::new());
    let mut monitor = crate::memory::MemoryMonitor::start(device);
    let (mut pool_peak, mut device_used) = (None::<u64>, None);
    for i in 0..b.steps + 2 {
        if i == 2 {
            monitor.read(); // the timed steps' peak starts here
        }
        let start = Instant::now();
        let loss = model.loss(&ids, &labels, true)?;
        let grads = model.backward(&loss)?;
        opt.step(&grads, 1.0)?;
        // reading the loss waits for the device: the step's time is its work
        losses.push(loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?);
        times.push(start.elapsed().as_secs_f64());
        if i >= 2 {
            let m = monitor.read();
            pool_peak = m.pool_peak.max(pool_peak);
            device_used = m.device_used.max(device_used);
        }
    }
    let timed = &times[2..];
    let mut sorted = timed.to_vec();
    sorted.sort_by(|x, y| x.total_cmp(y));
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let peak = crate::memory::process_memory().map_or(0.0, |m| mib(m.peak_rss as f64));
    let tokens_per_s = (batch * seq * timed.len()) as f64 / timed.iter().sum::<f64>();
    let gpu_name = match device {
        Device::Cuda(_) => {
            let ordinal = b.device.strip_prefix("cuda:").and_then(|n| n.parse().ok()).unwrap_or(0);
            crate::memory::detect_gpus().into_iter().find(|g| g.index == ordinal).map(|g| g.name)
        }
        _ => None,
    };
    let params = model.spec.parameter_count() as f64;
    let mfu = gpu_name.as_deref().and_then(bf16_peak_tflops).map(|peak| 4.0 * params * tokens_per_s / (peak * 1e12));
    let mut input = crate::memory::EstimateInput::new(
        model.spec.clone(),
        match b.mode {
            "lora" => crate::memory::Method::Lora,
            _ => crate::memory::Method::Qlora { double_quant: true },
        },
        b.targets.clone(),
        b.rank,
        batch,
        seq,
    )
    .on(if device.is_cpu() { crate::memory::DeviceKind::Cpu } else { crate::memory::DeviceKind::Cuda });
    input.dtype = dtype;
    input.checkpointing = b.checkpointing;
    let estimate = crate::memory::estimate(&input)?;
    Ok(StepBenchRow {
        implementation: "qlora-studio".into(),
        preset: b.preset.into(),
        mode: b.mode.into(),
        seq,
        batch,
        rank: b.rank,
        targets: b.targets.join(","),
        gradient_checkpointing: b.checkpointing,
        dora: b.dora,
        lora_dropout: b.dropout,
        threads: rayon::current_num_threads(),
        tokens_per_s,
        step_s_median: sorted[sorted.len() / 2],
        peak_rss_mib: peak,
        loss_first: losses[0],
        loss_last: *losses.last().unwrap_or(&f32::NAN),
        losses: losses.clone(),
        device: gpu_name.unwrap_or_else(|| b.device.to_string()),
        dtype: crate::memory::estimate::dtype_name(dtype).into(),
        mfu,
        pool_peak_mib: pool_peak.map(|b| mib(b as f64)),
        device_used_mib: device_used.map(|b| mib(b as f64)),
        estimate_mib: mib(estimate.mid as f64),
        estimate_pool_mib: mib(estimate.pool_peak() as f64),
    })
}

/// Loading a checkpoint folder: wall time, peak RSS, and the bytes of the frozen weights held.
#[derive(Debug, Serialize)]
pub struct LoadBenchRow {
    pub model: String,
    pub mode: String,
    pub load_s: f64,
    pub peak_rss_mib: f64,
    pub frozen_linear_mib: f64,
    pub file_mib: f64,
}

pub fn base_weights(mode: &str, compute: candle_core::DType) -> Result<BaseWeights> {
    match mode {
        "lora" => Ok(BaseWeights::Dense(compute)),
        "qlora" => Ok(BaseWeights::Nf4 { double_quant: true, compute }),
        other => Err(crate::Error::Invalid(format!("mode {other:?}: use lora or qlora"))),
    }
}

pub fn load(dir: &std::path::Path, mode: &str) -> Result<LoadBenchRow> {
    let start = Instant::now();
    let model = Model::load(dir, base_weights(mode, candle_core::DType::F32)?, &Device::Cpu)?;
    let load_s = start.elapsed().as_secs_f64();
    let peak = crate::memory::process_memory().map_or(0.0, |m| m.peak_rss as f64);
    let frozen: usize = model.linears().map(|l| l.base.weight().storage_bytes()).sum();
    let file_bytes: u64 = std::fs::read_dir(dir)
        .map_err(|e| crate::Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let mib = |b: f64| b / (1024.0 * 1024.0);
    Ok(LoadBenchRow {
        model: dir.display().to_string(),
        mode: mode.into(),
        load_s,
        peak_rss_mib: mib(peak),
        frozen_linear_mib: mib(frozen as f64),
        file_mib: mib(file_bytes as f64),
    })
}
