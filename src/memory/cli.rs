//! The `estimate` and `bench memory` commands: argument types and their text output.

use std::fmt::Write as _;
use std::path::Path;

use super::estimate::{estimate, DeviceKind, Estimate, EstimateInput, Method};
use super::{fit, grid, presets};
use crate::{Error, Result};

/// `qlora-studio estimate`: a run config, or the run given by flags.
#[derive(Debug, Clone, clap::Args)]
pub struct EstimateArgs {
    /// A run config (TOML); its model, mode, targets, rank, batch, max length and device are
    /// used, and the flags below are ignored except --memory.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// A model folder, its config.json, or a preset (see --list).
    #[arg(long, default_value = "llama-2-7b")]
    pub model: String,
    /// lora (dense base), qlora (NF4 + double quantization) or qlora-nodq
    #[arg(long, default_value = "qlora")]
    pub mode: String,
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// Comma-separated module names, or all-linear; the family's defaults when absent.
    #[arg(long)]
    pub targets: Option<String>,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f32,
    /// Per-block gradient checkpointing: off, on, or auto (on when the run does not fit
    /// otherwise).
    #[arg(long, default_value = "off")]
    pub checkpointing: String,
    /// cpu or cuda[:N]
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The memory to fit in (e.g. 24GiB, 16GB, 8000MiB); by default the GPU's free memory,
    /// or the machine's available memory on the CPU.
    #[arg(long)]
    pub memory: Option<String>,
    /// List the model presets and exit.
    #[arg(long)]
    pub list: bool,
    /// Also the peak on each of N GPUs when the run trains data-parallel under DeepSpeed
    /// ZeRO-2 and ZeRO-3 (as `handoff` hands it to LLaMA-Factory or axolotl), in the GPU's terms.
    #[arg(long)]
    pub gpus: Option<usize>,
}

/// The per-GPU estimate on `gpus` GPUs under ZeRO-2 and ZeRO-3, term by term.
pub fn per_gpu_report(input: &EstimateInput, gpus: usize) -> Result<String> {
    use super::estimate::{estimate_per_gpu, Zero};
    let mut gpu = input.clone();
    gpu.device = DeviceKind::Cuda;
    gpu.process_bytes = 0;
    let z2 = estimate_per_gpu(&gpu, gpus, Zero::Two)?;
    let z3 = estimate_per_gpu(&gpu, gpus, Zero::Three)?;
    let mut out = String::new();
    let _ = writeln!(out, "\nper GPU on {gpus} GPUs (DeepSpeed, data-parallel, micro-batch {} each):", input.batch);
    let _ = writeln!(out, "{:<36} {:>12} {:>12}", "", "ZeRO-2", "ZeRO-3");
    let mut names: Vec<&str> = z2.terms.iter().map(|t| t.name).collect();
    for t in &z3.terms {
        if !names.contains(&t.name) {
            names.push(t.name);
        }
    }
    for name in names {
        let _ = writeln!(out, "{name:<36} {:>12} {:>12}", gib(z2.term(name)), gib(z3.term(name)));
    }
    let _ = writeln!(out, "{:<36} {:>12} {:>12}", "peak (mid)", gib(z2.mid), gib(z3.mid));
    let _ = writeln!(
        out,
        "{:<36} {:>12} {:>12}",
        "band",
        format!("{}–{}", gib(z2.low).trim_end_matches(" GiB"), gib(z2.high)),
        format!("{}–{}", gib(z3.low).trim_end_matches(" GiB"), gib(z3.high))
    );
    Ok(out)
}

/// Parse a memory size: a number with an optional unit B, KiB, MiB, GiB, TiB, KB, MB, GB, TB.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 =
        num.trim().parse().map_err(|_| Error::Invalid(format!("memory size {text:?}: expected e.g. 24GiB")))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => return Err(Error::Invalid(format!("memory size {text:?}: unknown unit {other:?}"))),
    };
    if value < 0.0 || !value.is_finite() {
        return Err(Error::Invalid(format!("memory size {text:?} must be positive")));
    }
    Ok((value * scale) as u64)
}

pub fn parse_method(mode: &str) -> Result<Method> {
    match mode {
        "lora" => Ok(Method::Lora),
        "qlora" => Ok(Method::Qlora { double_quant: true }),
        "qlora-nodq" => Ok(Method::Qlora { double_quant: false }),
        other => Err(Error::Invalid(format!("--mode {other:?}: use lora, qlora or qlora-nodq"))),
    }
}

/// (device kind, GPU index) of `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(device: &str) -> Result<(DeviceKind, Option<usize>)> {
    match device {
        "cpu" => Ok((DeviceKind::Cpu, None)),
        "cuda" => Ok((DeviceKind::Cuda, Some(0))),
        d => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok((DeviceKind::Cuda, Some(i))),
            _ => Err(Error::Invalid(format!("--device {d:?}: use cpu, cuda or cuda:N"))),
        },
    }
}

/// The machine's available memory (Linux: MemAvailable).
pub fn available_ram() -> Option<u64> {
    super::live::available_memory()
}

pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1024.0 * 1024.0 * 1024.0))
}

/// The breakdown as a table.
pub fn breakdown_table(est: &Estimate) -> String {
    let mut out = String::new();
    for t in &est.terms {
        let _ = writeln!(out, "  {:<36} {:>11}   {}", t.name, gib(t.bytes), t.detail);
    }
    let _ =
        writeln!(out, "  {:<36} {:>11}   band {} – {}", "peak (estimate)", gib(est.mid), gib(est.low), gib(est.high));
    out
}

pub fn estimate_command(args: &EstimateArgs) -> Result<String> {
    let mut out = String::new();
    if args.list {
        for name in presets::names() {
            let spec = presets::spec_of(&presets::config(&name)?, &name)?;
            let _ = writeln!(
                out,
                "{name:<16} {:<10} {} layers, hidden {}, vocab {}, default targets {}",
                spec.family,
                spec.layers,
                spec.hidden,
                spec.vocab,
                spec.default_targets.join(",")
            );
        }
        return Ok(out);
    }
    let spec = presets::spec_for(&args.model)?;
    let (device, _) = parse_device(&args.device)?;
    let targets = match &args.targets {
        Some(t) => t.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        None => spec.default_targets.clone(),
    };
    let mut input =
        EstimateInput::new(spec, parse_method(&args.mode)?, targets, args.rank, args.batch, args.seq).on(device);
    input.dropout = args.dropout;
    let budget = memory_budget(&args.device, args.memory.as_deref())?;
    input.checkpointing = match args.checkpointing.as_str() {
        "off" => false,
        "on" => true,
        "auto" => budget.0.is_some_and(|b| estimate(&input).is_ok_and(|e| !e.fits(b))),
        other => return Err(Error::Invalid(format!("--checkpointing {other:?}: use off, on or auto"))),
    };
    let mut out = estimate_report(&input, &args.model, &args.device, &budget)?;
    if let Some(n) = args.gpus {
        out.push_str(&per_gpu_report(&input, n)?);
    }
    Ok(out)
}

/// The memory a run on `device` must fit in, and where the figure comes from: `memory` when
/// given, else the GPU's free memory, else the available RAM.
pub fn memory_budget(device: &str, memory: Option<&str>) -> Result<(Option<u64>, String)> {
    let (_, gpu) = parse_device(device)?;
    Ok(match (memory, gpu) {
        (Some(m), _) => (Some(parse_size(m)?), "given".to_string()),
        (None, Some(i)) => match super::detect_gpus().into_iter().find(|g| g.index == i) {
            Some(g) => (Some(g.free), format!("free on {}", g.name)),
            None => (None, String::new()),
        },
        (None, None) => (available_ram(), "available RAM".to_string()),
    })
}

/// The breakdown of one run's estimate, whether it fits in the `budget` (`memory_budget`), the
/// largest sequence and batch, and what to change.
pub fn estimate_report(
    input: &EstimateInput,
    model: &str,
    device_name: &str,
    budget: &(Option<u64>, String),
) -> Result<String> {
    let mut out = String::new();
    let (_, gpu) = parse_device(device_name)?;
    let est = estimate(input)?;
    let (memory, source) = (budget.0, &budget.1);
    let _ = writeln!(
        out,
        "{} {} on {}, rank {} on {}, batch {} × seq {}, {:?}, gradient checkpointing {}",
        model,
        input.method.label(),
        device_name,
        input.rank,
        input.targets.join(","),
        input.batch,
        input.seq,
        input.dtype,
        if input.checkpointing { "on" } else { "off" }
    );
    out.push_str(&breakdown_table(&est));
    let Some(memory) = memory else {
        let _ = writeln!(out, "no GPU {} found: give --memory to check the fit", gpu.unwrap_or(0));
        return Ok(out);
    };
    let verdict = if est.fits(memory) { "fits" } else { "does NOT fit" };
    let _ = writeln!(out, "\n{verdict} in {} ({source}); peak at the {}", gib(memory), est.peak_at);
    match fit::largest_seq(input, memory) {
        Some(s) => _ = writeln!(out, "largest sequence at batch {}: {s}", input.batch),
        None => _ = writeln!(out, "no sequence fits at batch {}", input.batch),
    }
    match fit::largest_batch(input, memory) {
        Some(b) => _ = writeln!(out, "largest batch at sequence {}: {b}", input.seq),
        None => _ = writeln!(out, "no batch fits at sequence {}", input.seq),
    }
    if !est.fits(memory) {
        let _ = writeln!(out, "\nto fit:");
        for s in fit::suggestions(input, memory) {
            let _ = writeln!(out, "  {}", suggestion_line(&s, memory));
        }
    }
    Ok(out)
}

/// One way to fit, with its estimate and whether that fits in `memory`.
pub fn suggestion_line(s: &fit::Suggestion, memory: u64) -> String {
    format!(
        "{:<48} {} (band {} – {}){}",
        s.change,
        gib(s.estimate.mid),
        gib(s.estimate.low),
        gib(s.estimate.high),
        if s.estimate.fits(memory) { "  fits" } else { "" }
    )
}

/// Run the grid, write its table to `out` (through a temporary file) and print it; true when
/// every point passes.
pub fn grid_command(quick: bool, out: &Path) -> Result<bool> {
    let points = grid::default_grid(quick);
    // counted from here, so that every point includes the runtime's buffers as a run does
    let baseline = super::live_bytes();
    grid::warm_up()?;
    let mut rows = Vec::new();
    for (i, p) in points.iter().enumerate() {
        eprintln!(
            "[{}/{}] {} {} seq {} batch {} rank {} {}",
            i + 1,
            points.len(),
            p.preset,
            p.method.label(),
            p.seq,
            p.batch,
            p.rank,
            p.targets.join(",")
        );
        rows.push(grid::run_point(p, Some(baseline))?);
    }
    let mut table = grid::markdown(&rows);
    let passed = rows.iter().filter(|r| r.passes()).count();
    let _ = writeln!(
        table,
        "\n{passed} of {} points inside the band with the middle within 10% (measured: peak of live heap bytes during a training step, counting allocator; CPU, f32, {} threads)",
        rows.len(),
        rayon::current_num_threads()
    );
    let tmp = out.with_extension("md.tmp");
    std::fs::write(&tmp, &table).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    print!("{table}");
    println!("written to {}", out.display());
    Ok(passed == rows.len())
}
