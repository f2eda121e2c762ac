//! qlora-studio's command line. Without arguments it opens the GUI; subcommands run the same
//! jobs headless. No logic of its own: each command calls the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use qlora_studio::data::DataConfig;
use qlora_studio::train::console::train_in_terminal;
use qlora_studio::train::{evaluate_dataset, Mode, RunConfig};
use qlora_studio::{arch, bench, gui, handoff, hub, lora, memory};

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
    /// Train headless from a run config (TOML), with a progress bar and a log of events.
    Train {
        /// The run config: [model], [lora], [data] and [train] tables (see the README).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Continue from a checkpoint folder (its own run config is used).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Start even when the memory estimate says the run does not fit (train.ignore_memory_estimate).
        #[arg(long)]
        ignore_memory_estimate: bool,
    },
    /// The GUI's training process: a run read from stdin, its events written to stdout.
    #[command(name = "train-worker", hide = true)]
    TrainWorker,
    /// Print the first examples of a run's dataset as the template renders them, with the
    /// trained parts marked, and the token-length statistics.
    Preview {
        #[arg(long)]
        config: PathBuf,
        /// How many examples to show.
        #[arg(short = 'n', long, default_value_t = 3)]
        examples: usize,
    },
    /// Print the mean loss of a model (with an adapter) on a dataset.
    Eval {
        /// A model folder.
        #[arg(long)]
        model: String,
        /// A PEFT adapter folder or a checkpoint.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// A dataset file or folder.
        #[arg(long)]
        data: PathBuf,
        /// lora (dense f32 base) or qlora (NF4 base)
        #[arg(long, default_value = "lora")]
        mode: String,
        #[arg(long, default_value_t = 1024)]
        max_length: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Export an adapter: a PEFT folder, a llama.cpp GGUF adapter, a merged model, or a merged
    /// model as one GGUF file that llama.cpp and Ollama run as it is.
    Export {
        /// A PEFT adapter folder or a training checkpoint folder.
        #[arg(long)]
        from: PathBuf,
        /// peft, gguf (a LoRA adapter for llama.cpp), merged (safetensors) or gguf-model (merged,
        /// one .gguf file)
        #[arg(long)]
        format: String,
        /// For gguf-model: f16, q8_0 or q4_k_m (default q4_k_m).
        #[arg(long)]
        quant: Option<String>,
        /// The base model folder (default: the adapter's base_model_name_or_path).
        #[arg(long)]
        model: Option<PathBuf>,
        /// A folder (peft, merged) or a .gguf file (gguf, gguf-model).
        #[arg(long)]
        out: PathBuf,
        /// f32, bf16 or f16 (default: f32 for adapters, the base's own types for merged).
        #[arg(long)]
        dtype: Option<String>,
        /// For merged: original (the checkpoint's weights) or dequantized (NF4 round trip, what
        /// a QLoRA adapter was trained against).
        #[arg(long, default_value = "original")]
        merge_into: String,
        /// With --merge-into dequantized: quantize without double quantization of the scales.
        #[arg(long)]
        no_double_quant: bool,
        /// For merged: the adapter was trained on the NF4 base (QLoRA); the divergence check
        /// compares with the NF4 base + adapter.
        #[arg(long)]
        qlora: bool,
        /// For merged: skip the divergence check against base + adapter.
        #[arg(long)]
        no_check: bool,
        /// For gguf and gguf-model: also write an Ollama Modelfile beside the file.
        #[arg(long)]
        modelfile: bool,
        /// The base model's name (hub id) for the model card and base_model_name_or_path.
        #[arg(long)]
        base_name: Option<String>,
    },
    /// Generate text with a model (and an adapter): a folder, a .gguf file or a hub id.
    Generate {
        /// Model folder, GGUF file, or Hugging Face hub id (owner/name[@revision]).
        #[arg(long)]
        model: String,
        /// A PEFT adapter folder to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user turn with the model's chat template.
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a run as a LLaMA-Factory or axolotl job for N GPUs on M nodes: the converted
    /// dataset, the config YAML, DeepSpeed configs, launch.sh and a README.
    Handoff {
        /// The run config (TOML) to hand off.
        #[arg(long)]
        config: PathBuf,
        /// llamafactory or axolotl
        #[arg(long)]
        to: String,
        /// GPUs per node.
        #[arg(long, default_value_t = 1)]
        gpus: usize,
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Memory of one GPU there (e.g. 80GiB, 24GiB): ZeRO-3 when the ZeRO-2 estimate exceeds it.
        #[arg(long, default_value = "80GiB")]
        gpu_memory: String,
        /// Copy a local model folder (or a GGUF file's import) into DIR/model.
        #[arg(long)]
        copy_model: bool,
        /// The job folder to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Read back what a LLaMA-Factory or axolotl job wrote (a PEFT adapter and its trainer
    /// state or log): its steps and losses; with --add, list it in the app's Runs tab.
    ImportRun {
        /// The job's output folder (or the job folder holding output/).
        dir: PathBuf,
        /// Add it to the Runs tab (the app's settings file).
        #[arg(long)]
        add: bool,
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
    /// Matrix multiply throughput: the f32 gemm against the bf16-operand kernel (f32 sums) that
    /// CPU runs in bf16 use, on a SmolLM2 step's shapes and LLaMA-7B's MLP.
    Matmul {
        /// Timed repetitions per figure (at least half a second each; the median is reported).
        #[arg(long, default_value_t = 5)]
        iters: usize,
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
        /// Sequence lengths, comma-separated: every (seq, batch) pair runs on one loaded model.
        #[arg(long, default_value = "256", value_delimiter = ',')]
        seq: Vec<usize>,
        /// Micro-batch sizes, comma-separated.
        #[arg(long, default_value = "1", value_delimiter = ',')]
        batch: Vec<usize>,
        /// Timed steps, after two warm-up steps.
        #[arg(long, default_value_t = 6)]
        steps: usize,
        #[arg(long, default_value_t = 8)]
        rank: usize,
        #[arg(long, default_value = "q_proj,v_proj")]
        targets: String,
        /// Recompute each block in the backward (per-block gradient checkpointing).
        #[arg(long)]
        checkpointing: bool,
        /// DoRA on the targets (a magnitude per output row).
        #[arg(long)]
        dora: bool,
        /// LoRA dropout (the PyTorch baseline runs without).
        #[arg(long, default_value_t = 0.0)]
        dropout: f32,
        /// cpu, cuda or cuda:N
        #[arg(long, default_value = "cpu")]
        device: String,
        /// auto (bf16 on a GPU, f32 on the CPU), f32, bf16 or f16
        #[arg(long, default_value = "auto", value_parser = ["auto", "f32", "bf16", "f16"])]
        dtype: String,
        /// Print one JSON line per run instead of text.
        #[arg(long)]
        json: bool,
        /// Then run PyTorch + PEFT (+ bitsandbytes) on the same settings (peft_baseline.py;
        /// bf16 as its --autocast bf16) and print both and the ratios.
        #[arg(long)]
        compare_peft: bool,
        /// The Python with torch, transformers, peft (and bitsandbytes) for --compare-peft.
        #[arg(long, default_value = "python3")]
        python: String,
        /// The baseline script for --compare-peft.
        #[arg(long, default_value = "../shared/bench/peft_baseline.py")]
        baseline: PathBuf,
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
    qlora_studio::memory::record_startup_rss();
    qlora_studio::model::ops::configure_cpu_thread_pools();
    let cli = Cli::parse();
    // every command but the window keeps freed memory until it exits; the window's runs train
    // in a `train-worker` child, so the long-lived window still hands freed memory back
    if !matches!(cli.command, None | Some(Command::Gui)) {
        memory::keep_freed_memory_for_reuse();
    }
    // commands whose work runs on this thread run it on a rayon worker (see `on_compute_pool`);
    // `train` computes on its trainer thread, which does the same
    let result = if matches!(cli.command, Some(Command::Eval { .. } | Command::Generate { .. } | Command::Bench { .. }))
    {
        qlora_studio::model::ops::on_compute_pool(|| run(cli))
    } else {
        run(cli)
    };
    match result {
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
        Command::Gui => gui::run(),
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
        Command::Train { config, resume, ignore_memory_estimate } => {
            let mut config = match (&config, &resume) {
                (Some(path), None) => RunConfig::load(path)?,
                (None, Some(_)) => RunConfig::default(),
                _ => anyhow::bail!("give either --config run.toml or --resume CHECKPOINT"),
            };
            config.train.ignore_memory_estimate |= ignore_memory_estimate;
            let end = train_in_terminal(config, resume)?;
            let what = if end.stopped { "stopped" } else { "finished" };
            println!("{what} at step {}", end.step);
            if let Some(loss) = end.train_loss {
                println!("training loss    {loss:.4}");
            }
            if let Some(loss) = end.validation_loss {
                println!("validation loss  {loss:.4}");
            }
            if let Some(dir) = end.checkpoint {
                println!("adapter          {}", dir.display());
            }
            Ok(())
        }
        Command::TrainWorker => Ok(qlora_studio::train::worker::serve()?),
        Command::Handoff { config, to, gpus, nodes, gpu_memory, copy_model, out } => {
            let request = handoff::Request {
                config: RunConfig::load(&config)?,
                tool: handoff::Tool::parse(&to)?,
                gpus,
                nodes,
                gpu_memory: memory::cli::parse_size(&gpu_memory)?,
                out,
                copy_model,
            };
            let written = handoff::write(&request)?;
            print!("{}", handoff::summary(&written, request.tool));
            Ok(())
        }
        Command::ImportRun { dir, add } => {
            let imported = handoff::read_result(&dir)?;
            print!("{}", handoff::import::summary(&imported));
            if add {
                let path = gui::app::default_settings_path().context("no home folder for the app's settings")?;
                gui::app::add_run_to_settings(&path, &imported.dir).map_err(anyhow::Error::msg)?;
                println!("added to the Runs tab ({})", path.display());
            }
            Ok(())
        }
        Command::Preview { config, examples } => {
            print!("{}", qlora_studio::train::preview_run(&RunConfig::load(&config)?, examples)?);
            Ok(())
        }
        Command::Eval { model, adapter, data, mode, max_length, device } => {
            let mode = match mode.as_str() {
                "lora" => Mode::Lora,
                "qlora" => Mode::Qlora,
                other => anyhow::bail!("--mode {other}: use lora or qlora"),
            };
            let data = DataConfig { path: data, max_length, ..Default::default() };
            let report = evaluate_dataset(&model, adapter.as_deref(), &data, mode, &device)?;
            println!(
                "mean loss {:.6} over {} examples (perplexity {:.3})",
                report.loss,
                report.examples,
                report.loss.exp()
            );
            Ok(())
        }
        Command::Export {
            from,
            format,
            quant,
            model,
            out,
            dtype,
            merge_into,
            no_double_quant,
            qlora,
            no_check,
            modelfile,
            base_name,
        } => {
            let request = lora::export::ExportRequest {
                from,
                format: match (lora::export::ExportFormat::parse(&format)?, quant) {
                    (lora::export::ExportFormat::GgufModel(_), Some(q)) => {
                        lora::export::ExportFormat::GgufModel(lora::gguf_model::GgufQuant::parse(&q)?)
                    }
                    (_, Some(_)) => anyhow::bail!("--quant applies only to --format gguf-model"),
                    (f, None) => f,
                },
                base: model,
                out,
                dtype: dtype.as_deref().map(lora::export::TensorDType::parse).transpose()?,
                merge_into: lora::merge::MergeInto::parse(&merge_into, !no_double_quant)?,
                modelfile,
                divergence_check: !no_check,
                trained_on_nf4: qlora.then_some(true),
                check_sequences: Vec::new(),
                info: lora::export::ExportInfo { base_model: base_name, ..Default::default() },
            };
            let report = lora::export::export(&request)?;
            for path in &report.written {
                println!("wrote {}", path.display());
            }
            if let Some(d) = report.divergence {
                println!(
                    "merged vs base + adapter over {} positions: top-1 agreement {:.2}%, mean KL {:.3e} nats, \
                     max |logit diff| {:.3e}",
                    d.positions,
                    100.0 * d.top1_agreement,
                    d.mean_kl,
                    d.max_abs_logit_diff
                );
            }
            Ok(())
        }
        Command::Generate { model, adapter, prompt, chat, max_tokens, temperature, top_p, seed } => {
            let request = hub::try_model::GenerateRequest {
                model,
                adapter,
                prompt,
                chat,
                max_new_tokens: max_tokens,
                temperature,
                top_p,
                seed,
                resolve: hub::ResolveOptions { progress: Some(download_bar()), ..Default::default() },
            };
            use std::io::Write;
            hub::try_model::generate_text(&request, |piece| {
                print!("{piece}");
                let _ = std::io::stdout().flush();
            })?;
            println!();
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
            let text = match &args.config {
                Some(path) => {
                    let config = RunConfig::load(path)?;
                    let budget = memory::cli::memory_budget(&config.model.device, args.memory.as_deref())?;
                    // the data's longest sequences size the largest micro-batch; max_length when
                    // the data cannot be read yet
                    let data = config.prepare_data_offline();
                    let input = config.estimate_input(budget.0, data.as_ref().ok(), resident_now())?;
                    let mut text =
                        memory::cli::estimate_report(&input, &config.model.source, &config.model.device, &budget)?;
                    text.push_str(&match &data {
                        Ok(d) => format!(
                            "\nsized by the data: {} training sequences, the longest {} tokens ({}); at batch_size × \
                             max_length = {} × {} it would be {}\n",
                            d.train_examples,
                            d.longest.tokens,
                            d.longest.source,
                            config.train.batch_size,
                            config.data.max_length,
                            memory::cli::gib(
                                memory::estimate(&config.estimate_input(budget.0, None, resident_now())?)?.mid
                            )
                        ),
                        Err(e) => format!(
                            "\nthe data was not read ({e}): the estimate assumes every micro-batch is batch_size × \
                             max_length\n"
                        ),
                    });
                    text
                }
                None => memory::cli::estimate_command(&args)?,
            };
            let text = match (&args.config, args.gpus) {
                (Some(path), Some(n)) => {
                    // the run as it trains on GPUs elsewhere: its compute dtype there, checkpointing
                    // unless it is off
                    let mut config = RunConfig::load(path)?;
                    config.model.device = "cuda".into();
                    let data = config.prepare_data_offline().ok();
                    let mut input = config.estimate_input(None, data.as_ref(), 0)?;
                    input.checkpointing =
                        config.train.gradient_checkpointing != qlora_studio::train::Checkpointing::Off;
                    text + &memory::cli::per_gpu_report(&input, n)?
                }
                _ => text,
            };
            print!("{text}");
            Ok(())
        }
        Command::Bench { command: BenchCommand::Matmul { iters } } => {
            for (m, k, n) in bench::MATMUL_SHAPES {
                println!("{}", serde_json::to_string(&bench::matmul_row(m, k, n, iters.max(1))?)?);
            }
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
        Command::Bench {
            command:
                BenchCommand::Step {
                    preset,
                    mode,
                    seq,
                    batch,
                    steps,
                    rank,
                    targets,
                    checkpointing,
                    dora,
                    dropout,
                    device,
                    dtype,
                    json,
                    compare_peft,
                    python,
                    baseline,
                },
        } => {
            if steps == 0 || seq.iter().any(|&s| s < 2) || batch.contains(&0) {
                anyhow::bail!("--steps and --batch must be at least 1 and --seq at least 2");
            }
            if !(0.0..1.0).contains(&dropout) {
                anyhow::bail!("--dropout {dropout}: give a probability from 0 up to (not including) 1");
            }
            let targets = targets.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
            let bench = bench::StepBench {
                preset: &preset,
                mode: &mode,
                seqs: seq,
                batches: batch,
                steps,
                rank,
                targets,
                checkpointing,
                dora,
                dropout,
                device: &device,
                dtype: &dtype,
            };
            let rows = bench::step(&bench)?;
            for row in &rows {
                if json {
                    println!("{}", serde_json::to_string(&row)?);
                } else {
                    println!(
                        "{} {} {} seq {} batch {}{}{}{}: {:.1} tokens/s, median step {:.3} s, peak RSS {:.0} MiB{}, loss {:.4} → {:.4}",
                        row.preset, row.mode, row.dtype, row.seq, row.batch,
                        if row.dora { " DoRA" } else { "" },
                        if row.lora_dropout > 0.0 { format!(" dropout {}", row.lora_dropout) } else { String::new() },
                        if row.gradient_checkpointing { " checkpointed" } else { "" },
                        row.tokens_per_s, row.step_s_median, row.peak_rss_mib,
                        row.pool_peak_mib.map(|p| format!(", GPU pool peak {p:.0} MiB")).unwrap_or_default(),
                        row.loss_first, row.loss_last
                    );
                }
            }
            if compare_peft {
                for row in &rows {
                    let theirs = bench::peft_baseline(&python, &baseline, &bench, row)?;
                    if json {
                        println!("{}", serde_json::to_string(&theirs)?);
                    }
                    println!("{}", bench::comparison_line(row, &theirs));
                }
            }
            Ok(())
        }
    }
}

/// A terminal progress bar for hub downloads.
/// This process's resident memory now (what the estimate adds for binary, tokenizer and data).
fn resident_now() -> u64 {
    memory::process_memory().map_or(0, |m| m.rss)
}

fn download_bar() -> hub::ProgressCallback {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    std::sync::Arc::new(move |event| match event {
        hub::DownloadEvent::Started { files, bytes } => {
            bar.set_length(bytes);
            bar.set_message(format!("downloading {files} files"));
        }
        hub::DownloadEvent::Progress { bytes_done, files_done, files_total, .. } => {
            bar.set_position(bytes_done);
            bar.set_message(format!("{files_done}/{files_total} files"));
        }
        hub::DownloadEvent::Finished { .. } => bar.finish_and_clear(),
    })
}
