//! The validation grid: real forward + backward + AdamW steps on the CPU, whose peak of live
//! heap bytes (the counting allocator) and resident set are compared with the estimate.

use std::fmt::Write as _;

use candle_core::{Device, Tensor};
use serde::Serialize;

use super::estimate::{estimate, EstimateInput, Method};
use super::{alloc, process_memory};
use crate::lora::LoraSettings;
use crate::model::{BaseWeights, Model};
use crate::train::optim::{AdamW, AdamWParams};
use crate::{Error, Result};

/// One point of the grid.
#[derive(Debug, Clone, Serialize)]
pub struct GridPoint {
    pub preset: String,
    pub method: Method,
    pub seq: usize,
    pub batch: usize,
    pub rank: usize,
    pub targets: Vec<String>,
    /// LoRA dropout (its masks are kept for backward).
    pub dropout: f32,
    /// Per-block gradient checkpointing.
    pub checkpointing: bool,
    /// DoRA on the targets.
    pub dora: bool,
    /// bf16 compute on the CPU (frozen weights and their matmuls in bf16, activations f32: what
    /// "auto" picks where the CPU's bf16 dot products pay); f32 otherwise.
    pub bf16: bool,
}

impl GridPoint {
    fn dtype(&self) -> candle_core::DType {
        if self.bf16 {
            candle_core::DType::BF16
        } else {
            candle_core::DType::F32
        }
    }
}

/// What one step of a grid point used, in bytes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Measured {
    /// Peak of live heap bytes during a training step, less what was live before the model
    /// was built.
    pub heap_peak: u64,
    /// Live heap bytes after building the model, adapters and optimizer (the static part).
    pub heap_static: u64,
    /// The process's peak resident set (VmHWM) after the steps.
    pub peak_rss: u64,
}

/// Build the point's model, run three training steps (as `bench step` does: forward, loss,
/// backward, AdamW) and measure the peak of the last, when the dequantization buffer and the
/// optimizer's moments already exist as they do through a run.
pub fn measure(point: &GridPoint) -> Result<Measured> {
    measure_from(point, None)
}

/// As `measure`, with the peak counted from `baseline` live bytes instead of from the bytes
/// live before the model is built.
pub fn measure_from(point: &GridPoint, baseline: Option<usize>) -> Result<Measured> {
    // on a rayon worker, as `train` computes: the threads that hold matmul packing buffers are
    // then the ones of a real run (`estimate::CPU_RUNTIME`)
    crate::model::ops::on_compute_pool(|| measure_here(point, baseline))
}

fn measure_here(point: &GridPoint, baseline: Option<usize>) -> Result<Measured> {
    if !alloc::counting_installed() {
        return Err(Error::Invalid(
            "the memory grid needs memory::CountingAllocator installed as the global allocator".into(),
        ));
    }
    let device = Device::Cpu;
    let base = match point.method {
        Method::Lora => BaseWeights::Dense(point.dtype()),
        Method::Qlora { double_quant } => BaseWeights::Nf4 { double_quant, compute: point.dtype() },
    };
    // each point carries its own dequantization buffer, not the largest of the points before
    crate::quant::frozen_linear::release_dequantize_buffer();
    let before = baseline.unwrap_or_else(alloc::live_bytes);
    let mut model = Model::from_preset(&point.preset, base, &device)?;
    let settings = LoraSettings {
        dropout: point.dropout,
        use_dora: point.dora,
        ..LoraSettings::with_rank(point.rank, point.targets.clone())
    };
    model.add_lora(&settings, 0)?;
    model.set_gradient_checkpointing(point.checkpointing);
    let vars = model.trainable().into_iter().map(|(_, v)| v).collect();
    let mut opt = AdamW::new(vars, AdamWParams { lr: 1e-4, ..Default::default() })?;
    let mut rng = crate::rng::Rng::new(1);
    let n = point.batch * point.seq;
    let ids: Vec<u32> = (0..n).map(|_| rng.below(model.spec.vocab as u64) as u32).collect();
    let ids = Tensor::from_vec(ids, (point.batch, point.seq), &device)?;
    let heap_static = alloc::live_bytes().saturating_sub(before) as u64;
    let mut peak = 0;
    for _ in 0..3 {
        alloc::reset_peak();
        let loss = model.loss(&ids, &ids, true)?;
        let grads = model.backward(&loss)?;
        opt.step(&grads, 1.0)?;
        drop((grads, loss));
        peak = alloc::peak_bytes().saturating_sub(before);
    }
    Ok(Measured { heap_peak: peak as u64, heap_static, peak_rss: process_memory().map_or(0, |m| m.peak_rss) })
}

/// One small step before the grid: the matmul library's per-thread packing buffers and the
/// thread pool are created once per process (a few MiB, `CPU_RUNTIME` in the estimate), and
/// would otherwise land in the first point's peak only.
pub fn warm_up() -> Result<()> {
    let p = GridPoint {
        preset: "smollm2-135m".into(),
        method: Method::Lora,
        seq: 32,
        batch: 1,
        rank: 4,
        targets: vec!["all-linear".into()],
        dropout: 0.0,
        checkpointing: false,
        dora: false,
        bf16: false,
    };
    measure(&p).map(drop)
}

/// The spec of a benchmark preset (model/presets.rs) or of a model preset in assets/.
pub fn preset_spec(name: &str) -> Result<crate::model::ModelSpec> {
    let config = match crate::model::presets::preset_config(name) {
        Ok(c) => c,
        Err(_) => super::presets::config(name)?,
    };
    super::presets::spec_of(&config, &format!("preset {name}"))
}

/// One row of the grid: the point, its estimate and what it measured.
#[derive(Debug, Clone, Serialize)]
pub struct GridRow {
    pub point: GridPoint,
    pub low: u64,
    pub mid: u64,
    pub high: u64,
    pub measured: Measured,
    /// (mid − measured) / measured, in percent.
    pub error_pct: f64,
    pub inside: bool,
}

impl GridRow {
    /// Inside the band and the middle within 10% of the measured peak.
    pub fn passes(&self) -> bool {
        self.inside && self.error_pct.abs() <= 10.0
    }
}

pub fn estimate_point(point: &GridPoint) -> Result<super::Estimate> {
    let spec = preset_spec(&point.preset)?;
    let mut input = EstimateInput::new(spec, point.method, point.targets.clone(), point.rank, point.batch, point.seq);
    input.dropout = point.dropout;
    input.checkpointing = point.checkpointing;
    input.dora = point.dora;
    input.dtype = point.dtype();
    estimate(&input)
}

pub fn run_point(point: &GridPoint, baseline: Option<usize>) -> Result<GridRow> {
    let est = estimate_point(point)?;
    let measured = measure_from(point, baseline)?;
    let m = measured.heap_peak as f64;
    Ok(GridRow {
        point: point.clone(),
        low: est.low,
        mid: est.mid,
        high: est.high,
        measured,
        error_pct: 100.0 * (est.mid as f64 - m) / m,
        inside: est.low <= measured.heap_peak && measured.heap_peak <= est.high,
    })
}

/// The grid: tiny and SmolLM2-135M-shaped LLaMA, sequence 64–1024, batch 1–4, rank 8–64,
/// q,v and all-linear, LoRA and QLoRA. `quick` keeps a subset that runs in about a minute.
pub fn default_grid(quick: bool) -> Vec<GridPoint> {
    let qv = || vec!["q_proj".to_string(), "v_proj".to_string()];
    let all = || vec!["all-linear".to_string()];
    let lora = Method::Lora;
    let qlora = Method::Qlora { double_quant: true };
    let p = |preset: &str, method, seq, batch, rank, targets: Vec<String>| GridPoint {
        preset: preset.into(),
        method,
        seq,
        batch,
        rank,
        targets,
        dropout: 0.0,
        checkpointing: false,
        dora: false,
        bf16: false,
    };
    let dora = |mut point: GridPoint| {
        point.dora = true;
        point
    };
    let bf16 = |mut point: GridPoint| {
        point.bf16 = true;
        point
    };
    let with_dropout = |mut point: GridPoint| {
        point.dropout = 0.05;
        point
    };
    let checkpointed = |mut point: GridPoint| {
        point.checkpointing = true;
        point
    };
    let mut grid = vec![
        p("tiny", lora, 64, 1, 8, qv()),
        p("tiny", qlora, 256, 2, 16, all()),
        p("tiny", lora, 1024, 1, 64, all()),
        p("tiny", qlora, 512, 4, 8, qv()),
        with_dropout(p("tiny", lora, 256, 2, 16, all())),
        checkpointed(p("tiny", qlora, 512, 2, 16, all())),
    ];
    if quick {
        grid.push(p("smollm2-135m", qlora, 64, 1, 8, qv()));
        grid.push(checkpointed(p("smollm2-135m", qlora, 256, 1, 16, all())));
        return grid;
    }
    grid.extend([
        p("tiny", qlora, 1024, 4, 32, all()),
        p("smollm2-135m", lora, 64, 1, 8, qv()),
        p("smollm2-135m", qlora, 128, 2, 16, qv()),
        p("smollm2-135m", qlora, 256, 1, 64, all()),
        p("smollm2-135m", lora, 256, 4, 8, all()),
        p("smollm2-135m", qlora, 512, 1, 8, qv()),
        with_dropout(p("smollm2-135m", qlora, 256, 2, 16, qv())),
        p("smollm2-135m", lora, 512, 2, 32, qv()),
        p("smollm2-135m", qlora, 1024, 1, 16, all()),
        checkpointed(p("tiny", lora, 1024, 4, 32, all())),
        checkpointed(with_dropout(p("tiny", qlora, 256, 2, 8, all()))),
        checkpointed(p("smollm2-135m", qlora, 512, 2, 16, qv())),
        checkpointed(p("smollm2-135m", lora, 256, 4, 8, all())),
        checkpointed(p("smollm2-135m", qlora, 1024, 1, 16, all())),
        checkpointed(p("smollm2-135m", qlora, 2048, 1, 16, all())),
        // the CPU's bf16 compute, at the shapes of real runs (short chat records, packed text)
        bf16(p("smollm2-135m", qlora, 64, 4, 16, all())),
        bf16(p("smollm2-135m", lora, 128, 8, 16, qv())),
        bf16(p("smollm2-135m", qlora, 1024, 1, 16, all())),
        bf16(checkpointed(p("smollm2-135m", qlora, 2048, 2, 16, all()))),
        // DoRA: its composite forward keeps more per adapted linear
        dora(p("smollm2-135m", qlora, 256, 2, 16, all())),
        dora(checkpointed(p("smollm2-135m", lora, 512, 1, 8, qv()))),
    ]);
    grid
}

/// The grid as a markdown table.
pub fn markdown(rows: &[GridRow]) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| preset | method | dtype | DoRA | seq | batch | rank | targets | dropout | checkpointing | low MiB | mid MiB | high MiB | measured MiB | error | in band | peak RSS MiB |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let p = &r.point;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:+.1}% | {} | {:.0} |",
            p.preset,
            p.method.label(),
            if p.bf16 { "bf16" } else { "f32" },
            if p.dora { "on" } else { "off" },
            p.seq,
            p.batch,
            p.rank,
            p.targets.join(","),
            p.dropout,
            if p.checkpointing { "on" } else { "off" },
            mib(r.low),
            mib(r.mid),
            mib(r.high),
            mib(r.measured.heap_peak),
            r.error_pct,
            if r.passes() { "yes" } else { "NO" },
            mib(r.measured.peak_rss),
        );
    }
    out
}
