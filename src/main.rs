//! qlora-studio's command line. Without arguments it opens the GUI; subcommands run the same
//! jobs headless. No logic of its own: each command calls the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use qlora_studio::{arch, bench, gui, memory};

// Counts live heap bytes: the peak of live tensors on the CPU (bench memory, step events).
#[global_allocator]
static ALLOC: memory::CountingAllocator = memory::CountingAllocator::new();

#[derive(Parser)]
#[command(name = "qlora-studio", version, about = "LoRA and QLoRA fine-tuning of decoder-only LLMs")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Open the desktop application (the default).
    Gui,
    /// Model families: list the table, or recognise a model's config.json.
    Arch {
        #[command(subcommand)]
        command: ArchCommand,
    },
    /// Peak memory of a run before launching it, as a breakdown (no weights are loaded).
    Estimate(memory::cli::EstimateArgs),
    /// Benchmarks, with ratios against a baseline from the same run.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum ArchCommand {
    /// Every family with its sizes and default LoRA targets.
    List,
    /// Which family a model is: give its config.json or its folder.
    Detect { path: PathBuf },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// NF4 quantize/dequantize throughput and frozen-linear forward+backward, NF4 vs dense f32.
    Nf4 {
        /// Timed repetitions per figure (the median is reported).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Input rows (tokens) for the forward+backward figure.
        #[arg(long, default_value_t = 256)]
        tokens: usize,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Load a checkpoint folder: time, peak RSS, bytes of the frozen weights held.
    Load {
        model: PathBuf,
        /// lora (dense f32 base) or qlora (NF4 base, double quantization)
        #[arg(long, default_value = "qlora")]
        mode: String,
    },
    /// Training steps (forward + backward + AdamW) on a preset-shaped model with generated
    /// weights; the same fields as ../shared/bench/peft_baseline.py prints.
    Step {
        #[arg(long, default_value = "smollm2-135m")]
        preset: String,
        /// lora (dense f32 base) or qlora (NF4 base, double quantization)
        #[arg(long, default_value = "qlora")]
        mode: String,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Timed steps, after two warm-up steps.
        #[arg(long, default_value_t = 6)]
        steps: usize,
        #[arg(long, default_value_t = 8)]
        rank: usize,
        #[arg(long, default_value = "q_proj,v_proj")]
        targets: String,
        /// Print one JSON line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The memory estimator's validation grid: real training steps on the CPU, their peak of
    /// live heap bytes against the estimate's band; writes a markdown table.
    Memory {
        /// A few points only (about a minute).
        #[arg(long)]
        quick: bool,
        /// Where to write the table (printed too).
        #[arg(long, default_value = "memory-grid.md")]
        out: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // The table is validated at start: a broken row is reported before anything else runs.
    let table = arch::table()?;
    match cli.command.unwrap_or(Command::Gui) {
        Command::Gui => gui::run(table),
        Command::Arch { command: ArchCommand::List } => {
            println!("{:<12} {:<40} Default module", "Model", "Sizes");
            for f in table.families() {
                println!("{:<12} {:<40} {}", f.name, f.sizes.join("/"), f.default_targets.join(","));
            }
            Ok(())
        }
        Command::Arch { command: ArchCommand::Detect { path } } => {
            let config = if path.is_dir() { path.join("config.json") } else { path };
            let r = table.recognise_file(&config)?;
            println!("family:          {} ({})", r.family.name, r.family.id);
            println!("layout:          {} (layers at {})", r.layout_name, r.layout.layers);
            println!("default targets: {}", r.default_targets().join(", "));
            println!("all linear:      {}", r.all_linear_names().join(", "));
            for f in &r.layout.fused {
                println!("fused:           {} ({:?})", f.module, f.split);
            }
            Ok(())
        }
        Command::Bench { command: BenchCommand::Nf4 { iters, tokens, json } } => {
            let mut rows = Vec::new();
            for (out_f, in_f) in bench::NF4_SHAPES {
                let row = bench::nf4_row(out_f, in_f, tokens, iters.max(1))
                    .with_context(|| format!("benchmark of a {out_f}×{in_f} weight"))?;
                if json {
                    println!("{}", serde_json::to_string(&row)?);
                }
                rows.push(row);
            }
            if !json {
                bench::print_nf4_table(&rows);
            }
            Ok(())
        }
        Command::Estimate(args) => {
            print!("{}", memory::cli::estimate_command(&args)?);
            Ok(())
        }
        Command::Bench { command: BenchCommand::Memory { quick, out } } => {
            let ok = memory::cli::grid_command(quick, &out)?;
            if !ok {
                anyhow::bail!("some grid points are outside the band or more than 10% off");
            }
            Ok(())
        }
        Command::Bench { command: BenchCommand::Load { model, mode } } => {
            println!("{}", serde_json::to_string(&bench::load(&model, &mode)?)?);
            Ok(())
        }
        Command::Bench { command: BenchCommand::Step { preset, mode, seq, batch, steps, rank, targets, json } } => {
            if steps == 0 || seq < 2 || batch == 0 {
                anyhow::bail!("--steps and --batch must be at least 1 and --seq at least 2");
            }
            let targets = targets.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
            let row =
                bench::step(&bench::StepBench { preset: &preset, mode: &mode, seq, batch, steps, rank, targets })?;
            if json {
                println!("{}", serde_json::to_string(&row)?);
            } else {
                println!(
                    "{} {} seq {} batch {}: {:.1} tokens/s, median step {:.3} s, peak RSS {:.0} MiB, loss {:.4} → {:.4}",
                    row.preset, row.mode, row.seq, row.batch, row.tokens_per_s, row.step_s_median, row.peak_rss_mib,
                    row.loss_first, row.loss_last
                );
            }
            Ok(())
        }
    }
}
