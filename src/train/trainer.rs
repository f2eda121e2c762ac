//! The training loop on its own thread: load, probe, then step — forward, masked loss,
//! backward, gradient accumulation, clipping, AdamW, schedule — reporting every step as a
//! `TrainEvent` and obeying `Command`s between steps.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use crossbeam_channel::{Receiver, Sender};

use super::checkpoint::{self, CheckpointContents, LoadedCheckpoint, TrainerState};
use super::config::{Mode, RunConfig};
use super::events::{Command, RunEstimate, RunFinished, RunStarted, StepStats, TrainEvent};
use super::memory_plan;
use super::optim::{clip_scale, global_norm, AdamW, AdamWParams};
use super::schedule::learning_rate;
use crate::data::{self, Example, ModelTokenizer};
use crate::error::{Error, Result};
use crate::lora::export::ExportInfo;
use crate::lora::LoraSettings;
use crate::model::{BaseWeights, Model};
use crate::rng::Rng;

/// Start a run on its own thread. `resume_from` continues from a checkpoint folder (its own
/// RunConfig is used, so the run goes on exactly as it was).
pub fn spawn(
    config: RunConfig,
    resume_from: Option<PathBuf>,
) -> (Receiver<TrainEvent>, Sender<Command>, JoinHandle<()>) {
    let (event_tx, event_rx) = crossbeam_channel::unbounded();
    let (command_tx, command_rx) = crossbeam_channel::unbounded();
    let handle = std::thread::Builder::new()
        .name("trainer".into())
        .spawn(move || {
            let events = event_tx.clone();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                crate::model::ops::on_compute_pool(|| run(config, resume_from.as_deref(), &event_tx, &command_rx))
            }));
            let message = match outcome {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(panic) => format!(
                    "the trainer stopped on an internal error ({}); checkpoints already written are kept",
                    panic_text(&panic)
                ),
            };
            let _ = events.send(TrainEvent::Failed { message });
        })
        .expect("the OS can start a thread");
    (event_rx, command_tx, handle)
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Run to the end on this thread (the CLI and tests may call it directly).
pub fn run(
    mut config: RunConfig,
    resume_from: Option<&Path>,
    events: &Sender<TrainEvent>,
    commands: &Receiver<Command>,
) -> Result<()> {
    let send = |e: TrainEvent| {
        // a closed channel means nobody listens any more; the run still finishes and saves
        let _ = events.send(e);
    };
    let resumed = match resume_from {
        Some(dir) => {
            send(TrainEvent::Loading { stage: format!("reading checkpoint {}", dir.display()), fraction: 0.0 });
            let loaded = checkpoint::load(dir, &Device::Cpu)?;
            let insist = config.train.ignore_memory_estimate;
            config = loaded.config.clone();
            config.train.ignore_memory_estimate |= insist;
            Some(loaded)
        }
        None => {
            // a new run must not write over the checkpoints of an earlier one
            if let Some(earlier) = checkpoint::latest(&config.train.output_dir) {
                return Err(Error::Invalid(format!(
                    "{} already holds checkpoints of an earlier run (the latest: {}); set train.output_dir to a new \
                     folder, or continue that run with --resume {}",
                    config.train.output_dir.display(),
                    earlier.display(),
                    earlier.display()
                )));
            }
            None
        }
    };
    config.validate()?;
    let device = device_of(&config.model.device)?;

    send(TrainEvent::Loading { stage: format!("loading model {}", config.model.source), fraction: 0.05 });
    let model_dir = resolve_model(&config.model.source, Some(events))?;
    // the data first (config.json names the family): its longest sequences decide whether the
    // model, once loaded, will fit
    send(TrainEvent::Loading { stage: "tokenizing the dataset".into(), fraction: 0.1 });
    let spec = crate::memory::presets::spec_for(&model_dir.display().to_string())?;
    let tokenizer = ModelTokenizer::from_dir(&model_dir)?;
    let prepared = data::prepare(&config.data, &tokenizer, Some(&spec.family))?;
    let budget = crate::memory::cli::memory_budget(&config.model.device, None).unwrap_or((None, String::new()));
    let plan = memory_plan::plan(&config, spec, &prepared.report, budget.0, &budget.1)?;
    for notice in &plan.notices {
        send(TrainEvent::Notice(notice.clone()));
    }

    send(TrainEvent::Loading { stage: format!("loading model {}", config.model.source), fraction: 0.2 });
    // the heap held before the model (the window, the tokenizer, the data): what the estimate
    // leaves out, and so does the step's peak
    let heap_before = crate::memory::live_bytes();
    let mut model = Model::load(&model_dir, base_weights(&config)?, &device)?;
    let settings = config.lora.settings(&model.spec.default_targets);
    model.set_gradient_checkpointing(plan.checkpointing);
    match &resumed {
        Some(ck) => {
            model.load_adapter(&ck.dir)?;
        }
        None => model.add_lora(&settings, config.train.seed)?,
    }
    if let Some(warning) = prepared.report.template_check.as_ref().and_then(|c| c.warning.clone()) {
        send(TrainEvent::Notice(warning));
    }
    if !prepared.report.skipped.is_empty() {
        send(TrainEvent::Notice(format!(
            "{} bad records were skipped, the first: {}",
            prepared.report.skipped.len(),
            prepared.report.skipped[0]
        )));
    }
    let report = &prepared.report;
    if report.truncated > 0 {
        send(TrainEvent::Notice(format!(
            "{} conversations are longer than max_length = {} and were cut: {} tokens dropped",
            report.truncated, config.data.max_length, report.dropped_tokens
        )));
    }
    if report.split_documents > 0 {
        send(TrainEvent::Notice(format!(
            "{} text documents are longer than max_length = {}: {} into blocks, no token dropped",
            report.split_documents,
            config.data.max_length,
            if config.data.packing { "packed as one token stream" } else { "split" }
        )));
    }
    // what exports of this run must carry: the template it was trained with and its stop tokens
    let template = data::ChatTemplate::resolve(&config.data.template, &tokenizer, Some(&model.spec.family)).ok();
    let card = ExportInfo {
        chat_template: template.as_ref().map(|t| t.source.clone()),
        stop_tokens: tokenizer.eos_token.iter().cloned().collect(),
        ..Default::default()
    };
    let (train, dropped) = trainable_examples(prepared.train);
    let (validation, _) = trainable_examples(prepared.validation);
    if dropped > 0 {
        send(TrainEvent::Notice(format!(
            "{dropped} training examples have no response token within the max length and are left out"
        )));
    }
    if train.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no training example has a token to train on (are the responses empty or cut off by max_length?)",
            config.data.path.display()
        )));
    }

    let sampler = template.map(|template| Sampler { tokenizer, template });
    let mut trainer = Trainer::new(config, settings, model, train, validation, resumed, card)?;
    // a resumed run keeps the micro-batch it found, unless that no longer fits
    trainer.state.micro_batch = trainer.state.micro_batch.min(plan.micro_batch);
    trainer.sampler = sampler;
    trainer.heap_before = heap_before;
    trainer.estimate = Some(RunEstimate::new(&plan.estimate));
    send(TrainEvent::Loading { stage: "ready".into(), fraction: 1.0 });
    trainer.train(&send, commands)
}

/// The candle device of a `model.device` value ("cpu", "cuda" or "cuda:N").
pub fn device_of(name: &str) -> Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = name.strip_prefix("cuda:").and_then(|n| n.parse().ok()).unwrap_or(0);
    Device::new_cuda(ordinal).map_err(|e| {
        Error::Invalid(format!(
            "model.device = \"{name}\": {e} (a build with the `cuda` feature and an NVIDIA GPU are needed; use \"cpu\" otherwise)"
        ))
    })
}

fn base_weights(config: &RunConfig) -> Result<BaseWeights> {
    let compute = config.model.compute_dtype();
    Ok(match config.model.mode {
        Mode::Lora => BaseWeights::Dense(compute),
        Mode::Qlora => BaseWeights::Nf4 { double_quant: true, compute },
    })
}

/// The local folder a model source names (a folder, a GGUF file imported once, a hub id from
/// the cache or downloaded), with download progress sent as Loading events.
pub fn resolve_model(source: &str, events: Option<&Sender<TrainEvent>>) -> Result<PathBuf> {
    let mut options = crate::hub::ResolveOptions::default();
    if let Some(tx) = events {
        let tx = tx.clone();
        options.progress = Some(std::sync::Arc::new(move |event| {
            if let crate::hub::download::DownloadEvent::Progress { bytes_done, bytes_total, file, .. } = event {
                let fraction = bytes_done as f32 / bytes_total.max(1) as f32;
                let stage = format!(
                    "downloading {file} ({:.0} of {:.0} MiB)",
                    bytes_done as f64 / 1048576.0,
                    bytes_total as f64 / 1048576.0
                );
                // downloading is the first half of loading
                let _ = tx.send(TrainEvent::Loading { stage, fraction: 0.5 * fraction });
            }
        }));
    }
    Ok(crate::hub::resolve_with(source, &options)?.dir)
}

/// Examples with at least one trained (shifted) label; and how many had none.
fn trainable_examples(examples: Vec<Example>) -> (Vec<Example>, usize) {
    let before = examples.len();
    let kept: Vec<Example> = examples.into_iter().filter(|e| trained_tokens(e) > 0).collect();
    let dropped = before - kept.len();
    (kept, dropped)
}

/// Tokens the loss sees in one example: labels after the first position that are not -100.
fn trained_tokens(e: &Example) -> usize {
    e.labels.iter().skip(1).filter(|&&l| l != crate::model::IGNORE_INDEX).count()
}

struct Trainer {
    config: RunConfig,
    settings: LoraSettings,
    model: Model,
    train: Vec<Example>,
    validation: Vec<Example>,
    optimizer: AdamW,
    trainable_keys: Vec<String>,
    state: TrainerState,
    /// The effective batch: examples per optimizer step.
    effective_batch: usize,
    /// The shuffled order of the current epoch.
    order: Vec<usize>,
    /// Chat template and stop tokens for the checkpoints' model cards.
    card: ExportInfo,
    /// Renders and decodes the sample prompts (None when the template could not be resolved).
    sampler: Option<Sampler>,
    /// Live heap bytes before the model was loaded, which the step's memory peak leaves out.
    heap_before: usize,
    /// The memory estimate of the run's plan, for the Started event.
    estimate: Option<RunEstimate>,
}

/// Generates from the config's sample prompts with the adapter as it is now.
struct Sampler {
    tokenizer: ModelTokenizer,
    template: data::ChatTemplate,
}

impl Sampler {
    /// Greedy continuation of `prompt` as a user turn of the chat template.
    fn sample(&self, model: &Model, prompt: &str, max_tokens: usize) -> Result<String> {
        let messages = [data::Message::new(data::Role::User, prompt)];
        let text = self.template.render(&messages, true, &self.tokenizer).map_err(Error::Invalid)?;
        let ids = self.tokenizer.encode(&text, false)?.ids;
        let options = crate::model::GenerateOptions {
            max_new_tokens: max_tokens,
            eos_ids: self.tokenizer.stop_token_ids.clone(),
            ..Default::default()
        };
        let out = crate::model::generate(model, &ids, &options)?;
        self.tokenizer.decode(&out, true)
    }
}

impl Trainer {
    fn new(
        config: RunConfig,
        settings: LoraSettings,
        model: Model,
        train: Vec<Example>,
        validation: Vec<Example>,
        resumed: Option<LoadedCheckpoint>,
        card: ExportInfo,
    ) -> Result<Self> {
        let t = &config.train;
        let effective_batch = t.batch_size * t.grad_accum;
        let steps_per_epoch = train.len().div_ceil(effective_batch);
        let total_steps =
            if t.max_steps > 0 { t.max_steps } else { ((t.epochs * steps_per_epoch as f64).ceil() as usize).max(1) };
        let trainable = model.trainable();
        let trainable_keys: Vec<String> = trainable.iter().map(|(k, _)| k.clone()).collect();
        let params = AdamWParams { lr: t.learning_rate, weight_decay: t.weight_decay, ..Default::default() };
        let mut optimizer = AdamW::new(trainable.into_iter().map(|(_, v)| v).collect(), params)?;
        let state = match resumed {
            Some(mut ck) => {
                let mut moments = Vec::with_capacity(trainable_keys.len());
                for key in &trainable_keys {
                    let pair = ck.moments.remove(key).ok_or_else(|| {
                        Error::bad_entry(ck.dir.join(checkpoint::OPTIMIZER_STATE), format!("{key}.exp_avg"), "missing")
                    })?;
                    moments.push(pair);
                }
                optimizer.restore(ck.state.optimizer_step, moments)?;
                ck.state
            }
            None => TrainerState {
                step: 0,
                total_steps,
                epoch: 0,
                epoch_position: 0,
                optimizer_step: 0,
                micro_batch: t.batch_size,
                losses: Vec::new(),
                eval_losses: Vec::new(),
                peak_rss: 0,
                peak_device: None,
            },
        };
        let order = epoch_order(train.len(), t.seed, state.epoch);
        Ok(Self {
            config,
            settings,
            model,
            train,
            validation,
            optimizer,
            trainable_keys,
            state,
            effective_batch,
            order,
            card,
            sampler: None,
            heap_before: 0,
            estimate: None,
        })
    }

    fn train(&mut self, send: &dyn Fn(TrainEvent), commands: &Receiver<Command>) -> Result<()> {
        let mut probe_peak = None;
        if self.config.train.probe && self.state.step == 0 {
            probe_peak = self.probe(send)?;
        }
        let trainable_params: usize = self.optimizer.vars().map(|v| v.elem_count()).sum();
        send(TrainEvent::Started(RunStarted {
            trainable_params,
            total_params: self.base_parameter_count() + trainable_params,
            train_examples: self.train.len(),
            train_tokens: self.train.iter().map(|e| e.input_ids.len()).sum(),
            validation_examples: self.validation.len(),
            total_steps: self.state.total_steps,
            first_step: self.state.step,
            micro_batch: self.state.micro_batch,
            grad_accum: self.effective_batch.div_ceil(self.state.micro_batch),
            probe_peak_bytes: probe_peak,
            gradient_checkpointing: self.model.gradient_checkpointing(),
            estimate: self.estimate,
        }));
        if self.state.step > 0 {
            send(TrainEvent::Notice(format!("resumed at step {} of {}", self.state.step, self.state.total_steps)));
        }

        let started = Instant::now();
        let first_step = self.state.step;
        // the readings' peaks count from here
        crate::memory::reset_peak();
        let mut monitor = crate::memory::MemoryMonitor::start(self.model.device()).with_heap_baseline(self.heap_before);
        let mut last_checkpoint = None;
        let mut stopped = false;
        while self.state.step < self.state.total_steps {
            let mut save_now = false;
            // Commands are read between steps: a step is never cut in half.
            while let Ok(cmd) = commands.try_recv() {
                match cmd {
                    Command::Stop => stopped = true,
                    Command::SaveNow => save_now = true,
                    Command::Resume => {}
                    Command::Pause => {
                        send(TrainEvent::Paused { step: self.state.step });
                        loop {
                            match commands.recv() {
                                Ok(Command::Resume) => break,
                                Ok(Command::Stop) | Err(_) => {
                                    stopped = true;
                                    break;
                                }
                                Ok(Command::SaveNow) => save_now = true,
                                Ok(Command::Pause) => {}
                            }
                        }
                        if !stopped {
                            send(TrainEvent::Resumed { step: self.state.step });
                        }
                    }
                }
            }
            if save_now || stopped {
                if self.state.step > 0 {
                    last_checkpoint = Some(self.save_checkpoint(send)?);
                }
                if stopped {
                    break;
                }
            }

            // the reading after the step is this step's peak, not the eval's or checkpoint's before
            monitor.begin_step();
            let step_started = Instant::now();
            let outcome = self.step()?;
            let step = self.state.step;
            if !outcome.loss.is_finite() || !outcome.grad_norm.is_finite() {
                let kept = match &last_checkpoint {
                    Some(p) => format!("the last good checkpoint is {}", p.display()),
                    None => "no checkpoint had been written yet".into(),
                };
                return Err(Error::Invalid(format!(
                    "the loss became {} at step {step} (gradient norm {}); the run stopped and {kept}. \
                     Lower train.learning_rate, or check the data for empty or broken examples",
                    outcome.loss, outcome.grad_norm
                )));
            }
            let elapsed = started.elapsed().as_secs_f64();
            let done = step - first_step;
            let memory = monitor.read();
            self.state.peak_rss = self.state.peak_rss.max(memory.peak_rss);
            if let Some(device) = memory.device_peak {
                self.state.peak_device = Some(self.state.peak_device.unwrap_or(0).max(device));
            }
            send(TrainEvent::Step(StepStats {
                step,
                total_steps: self.state.total_steps,
                epoch: self.state.epoch as f64 + self.state.epoch_position as f64 / self.train.len() as f64,
                loss: outcome.loss,
                lr: outcome.lr,
                grad_norm: outcome.grad_norm,
                tokens_per_s: outcome.tokens as f64 / step_started.elapsed().as_secs_f64().max(1e-9),
                elapsed_s: elapsed,
                eta_s: elapsed / done as f64 * (self.state.total_steps - step) as f64,
                memory,
            }));
            let t = &self.config.train;
            let last = step == self.state.total_steps;
            if !self.validation.is_empty() && ((t.eval_every > 0 && step.is_multiple_of(t.eval_every)) || last) {
                let loss = self.evaluate()?;
                self.state.eval_losses.push((step, loss));
                send(TrainEvent::Eval { step, loss });
            }
            if t.sample_every > 0 && step.is_multiple_of(t.sample_every) {
                if let Some(sampler) = &self.sampler {
                    for prompt in &t.sample_prompts {
                        let text = sampler.sample(&self.model, prompt, t.sample_max_tokens)?;
                        send(TrainEvent::Sample { step, prompt: prompt.clone(), text });
                    }
                }
            }
            if (t.checkpoint_every > 0 && step.is_multiple_of(t.checkpoint_every)) || last {
                last_checkpoint = Some(self.save_checkpoint(send)?);
            }
        }
        send(TrainEvent::Finished(RunFinished {
            step: self.state.step,
            stopped: stopped && self.state.step < self.state.total_steps,
            checkpoint: last_checkpoint.or_else(|| checkpoint::latest(&self.config.train.output_dir)),
            train_loss: self.state.losses.last().map(|l| l.1),
            validation_loss: self.state.eval_losses.last().map(|l| l.1),
        }));
        Ok(())
    }

    /// One optimizer step over the next effective batch.
    fn step(&mut self) -> Result<StepOutcome> {
        let batch = self.next_batch();
        let t = &self.config.train;
        let lr = learning_rate(t.learning_rate, t.schedule, t.warmup_steps, self.state.step, self.state.total_steps);
        self.optimizer.set_learning_rate(lr);
        let total_trained: usize = batch.iter().map(|&i| trained_tokens(&self.train[i])).sum();
        let mut grads: Vec<Option<Tensor>> = vec![None; self.trainable_keys.len()];
        // the loss stays on the device until the step ends: one read per optimizer step
        let (mut loss_sum, mut tokens) = (None::<Tensor>, 0usize);
        for (micro_index, micro) in batch.chunks(self.state.micro_batch).enumerate() {
            crate::lora::set_dropout_seed(dropout_seed(t.seed, self.state.step, micro_index));
            let examples: Vec<&Example> = micro.iter().map(|&i| &self.train[i]).collect();
            let micro_trained: usize = examples.iter().map(|e| trained_tokens(e)).sum();
            tokens += examples.iter().map(|e| e.input_ids.len()).sum::<usize>();
            let (ids, labels) = pad_batch(&examples, self.model.device())?;
            let loss = self.model.loss(&ids, &labels, true)?;
            let part = (loss.detach() * micro_trained as f64)?;
            loss_sum = Some(match loss_sum {
                Some(sum) => (sum + part)?,
                None => part,
            });
            // Each micro-batch's mean, weighted by its share of the step's trained tokens, so
            // the step's gradient is that of the mean over all of them whatever the split.
            let weighted = (loss * (micro_trained as f64 / total_trained as f64))?;
            let micro_grads = self.optimizer.grads_of(&self.model.backward(&weighted)?);
            for (acc, g) in grads.iter_mut().zip(micro_grads) {
                *acc = match (acc.take(), g) {
                    (Some(a), Some(g)) => Some((a + g)?),
                    (a, g) => a.or(g),
                };
            }
        }
        let grad_norm = global_norm(&grads)?;
        let loss_sum = match loss_sum {
            Some(sum) => sum.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            None => 0.0,
        };
        let loss = loss_sum / total_trained as f64;
        if loss.is_finite() && grad_norm.is_finite() {
            self.optimizer.step_with(&grads, clip_scale(grad_norm, self.config.train.max_grad_norm))?;
        }
        self.state.step += 1;
        self.state.optimizer_step = self.optimizer.step_count();
        self.state.losses.push((self.state.step, loss));
        Ok(StepOutcome { loss, lr, grad_norm, tokens })
    }

    /// The indices of the next effective batch; a new epoch reshuffles.
    fn next_batch(&mut self) -> Vec<usize> {
        if self.state.epoch_position >= self.order.len() {
            self.state.epoch += 1;
            self.state.epoch_position = 0;
            self.order = epoch_order(self.train.len(), self.config.train.seed, self.state.epoch);
        }
        let start = self.state.epoch_position;
        let end = (start + self.effective_batch).min(self.order.len());
        self.state.epoch_position = end;
        self.order[start..end].to_vec()
    }

    fn evaluate(&self) -> Result<f64> {
        mean_loss(&self.model, &self.validation, self.state.micro_batch)
    }

    /// One forward+backward on the longest micro-batch; halves the micro-batch (and so doubles
    /// the accumulation) while it runs out of memory. Returns the measured peak in bytes.
    fn probe(&mut self, send: &dyn Fn(TrainEvent)) -> Result<Option<u64>> {
        let mut by_length: Vec<&Example> = self.train.iter().collect();
        by_length.sort_by_key(|e| std::cmp::Reverse(e.input_ids.len()));
        loop {
            let micro = self.state.micro_batch;
            let examples = &by_length[..micro.min(by_length.len())];
            crate::memory::reset_rss_peak();
            let before = crate::memory::process_memory();
            let attempt = (|| -> Result<()> {
                let (ids, labels) = pad_batch(examples, self.model.device())?;
                let loss = self.model.loss(&ids, &labels, true)?;
                self.model.backward(&loss)?;
                Ok(())
            })();
            let after = crate::memory::process_memory();
            let out_of_memory = match &attempt {
                Err(e) => is_out_of_memory(e),
                Ok(()) => after.is_some_and(|m| crate::memory::total_memory().is_some_and(|t| m.peak_rss > t / 10 * 9)),
            };
            if out_of_memory && micro > 1 {
                self.state.micro_batch = micro / 2;
                send(TrainEvent::Notice(format!(
                    "a micro-batch of {micro} does not fit in memory: training with micro-batches of {} and {}× \
                     gradient accumulation instead (the same effective batch of {})",
                    micro / 2,
                    self.effective_batch.div_ceil(micro / 2),
                    self.effective_batch
                )));
                continue;
            }
            attempt?;
            return Ok(after.zip(before).map(|(a, b)| a.peak_rss.max(b.rss)));
        }
    }

    fn save_checkpoint(&mut self, send: &dyn Fn(TrainEvent)) -> Result<PathBuf> {
        let dir = checkpoint::checkpoint_dir(&self.config.train.output_dir, self.state.step);
        std::fs::create_dir_all(&self.config.train.output_dir)
            .map_err(|e| Error::io(&self.config.train.output_dir, e))?;
        let moments =
            self.trainable_keys.iter().zip(self.optimizer.moments()).map(|(k, (m, v))| (k.clone(), m, v)).collect();
        let contents = CheckpointContents {
            config: &self.config,
            settings: &self.settings,
            base_model: &self.config.model.source,
            state: &self.state,
            moments,
            info: ExportInfo {
                run_config: Some(self.config.to_toml()),
                dataset_name: self.config.data.path.file_name().map(|n| n.to_string_lossy().to_string()),
                dataset_size: Some(self.train.len()),
                steps: Some(self.state.step),
                final_train_loss: self.state.losses.last().map(|l| l.1),
                final_val_loss: self.state.eval_losses.last().map(|l| l.1),
                ..self.card.clone()
            },
        };
        checkpoint::save(&dir, &self.model, &contents)?;
        send(TrainEvent::CheckpointSaved { step: self.state.step, path: dir.clone() });
        Ok(dir)
    }

    /// Frozen parameters: the linears and the embeddings (norms are left out).
    fn base_parameter_count(&self) -> usize {
        let s = &self.model.spec;
        let linears: usize = self.model.linears().map(|l| l.base.in_features() * l.base.out_features()).sum();
        let embeddings = s.vocab * s.hidden * if s.tie_embeddings { 1 } else { 2 };
        linears + embeddings
    }
}

/// The first `n` examples of a run's dataset rendered with its template, prompt and trained
/// parts marked, with the length statistics: `qlora-studio preview`.
pub fn preview_run(config: &RunConfig, n: usize) -> Result<String> {
    let dir = resolve_model(&config.model.source, None)?;
    let family = crate::hub::check_folder(&dir)?.family;
    let tokenizer = ModelTokenizer::from_dir(&dir)?;
    let preview = data::preview(&config.data, &tokenizer, Some(&family), n)?;
    Ok(data::render_preview_text(&preview))
}

/// Mean loss over `examples`, token-weighted, without dropout, in micro-batches.
pub fn mean_loss(model: &Model, examples: &[Example], micro_batch: usize) -> Result<f64> {
    let (mut sum, mut count) = (0.0f64, 0usize);
    for chunk in examples.chunks(micro_batch.max(1)) {
        let chunk: Vec<&Example> = chunk.iter().filter(|e| trained_tokens(e) > 0).collect();
        if chunk.is_empty() {
            continue;
        }
        let n: usize = chunk.iter().map(|e| trained_tokens(e)).sum();
        let (ids, labels) = pad_batch(&chunk, model.device())?;
        let loss = model.loss(&ids, &labels, false)?;
        sum += loss.to_scalar::<f32>()? as f64 * n as f64;
        count += n;
    }
    if count == 0 {
        return Err(Error::Invalid("no example has a token to compute the loss on".into()));
    }
    Ok(sum / count as f64)
}

/// The mean loss of a model (with an adapter, if given) on a dataset: `qlora-studio eval`.
pub struct EvalReport {
    pub loss: f64,
    pub examples: usize,
}

pub fn evaluate_dataset(
    model_source: &str,
    adapter: Option<&Path>,
    data: &crate::data::DataConfig,
    mode: Mode,
    device: &str,
) -> Result<EvalReport> {
    let device = device_of(device)?;
    let dir = resolve_model(model_source, None)?;
    let base = match mode {
        Mode::Lora => BaseWeights::Dense(DType::F32),
        Mode::Qlora => BaseWeights::Nf4 { double_quant: true, compute: DType::F32 },
    };
    let mut model = Model::load(&dir, base, &device)?;
    if let Some(a) = adapter {
        model.load_adapter(a)?;
    }
    let tokenizer = ModelTokenizer::from_dir(&dir)?;
    let mut prepared = data::prepare(data, &tokenizer, Some(&model.spec.family))?;
    let mut examples = prepared.train;
    examples.append(&mut prepared.validation);
    let loss = mean_loss(&model, &examples, 4)?;
    Ok(EvalReport { loss, examples: examples.len() })
}

struct StepOutcome {
    loss: f64,
    lr: f64,
    grad_norm: f64,
    tokens: usize,
}

/// The shuffled example order of an epoch: a function of the seed and the epoch only, so a
/// resumed run sees the same order.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = Rng::for_key(seed, &format!("epoch {epoch}"));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order
}

fn dropout_seed(seed: u64, step: usize, micro: usize) -> u64 {
    Rng::for_key(seed, &format!("dropout {step} {micro}")).next_u64()
}

/// Right-pad a micro-batch: pad positions get label -100, and causal attention keeps them from
/// changing the positions before them. The ids go to the device; the labels stay in host
/// memory, where the loss reads them to pick its chunks (no device round trip).
fn pad_batch(examples: &[&Example], device: &Device) -> Result<(Tensor, Tensor)> {
    let len = examples.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(examples.len() * len);
    let mut labels = Vec::with_capacity(examples.len() * len);
    for e in examples {
        ids.extend(&e.input_ids);
        ids.extend(std::iter::repeat_n(0u32, len - e.input_ids.len()));
        labels.extend(&e.labels);
        labels.extend(std::iter::repeat_n(crate::model::IGNORE_INDEX, len - e.labels.len()));
    }
    let shape = (examples.len(), len);
    Ok((Tensor::from_vec(ids, shape, device)?, Tensor::from_vec(labels, shape, &Device::Cpu)?))
}

fn is_out_of_memory(e: &Error) -> bool {
    let text = e.to_string().to_lowercase();
    text.contains("out of memory") || text.contains("out_of_memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(50, 1, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(50, 1, 0));
        assert_ne!(a, epoch_order(50, 1, 1));
        assert_ne!(a, epoch_order(50, 2, 0));
    }

    #[test]
    fn padding_masks_the_pad_positions() {
        let a = Example { input_ids: vec![5, 6, 7], labels: vec![-100, 6, 7] };
        let b = Example { input_ids: vec![8], labels: vec![8] };
        let (ids, labels) = pad_batch(&[&a, &b], &Device::Cpu).unwrap();
        assert_eq!(ids.to_vec2::<u32>().unwrap(), vec![vec![5, 6, 7], vec![8, 0, 0]]);
        assert_eq!(labels.to_vec2::<i64>().unwrap(), vec![vec![-100, 6, 7], vec![8, -100, -100]]);
        assert_eq!(trained_tokens(&a), 2);
        assert_eq!(trained_tokens(&b), 0);
    }
}
