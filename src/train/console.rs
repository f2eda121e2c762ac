//! The trainer on a terminal (`qlora-studio train`): a progress bar with the live figures, and
//! a log line for everything else the trainer says.

use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::config::RunConfig;
use super::events::{RunFinished, TrainEvent};
use crate::error::{Error, Result};

/// Run to the end with a progress bar; the run's last event decides the outcome.
pub fn train_in_terminal(config: RunConfig, resume_from: Option<PathBuf>) -> Result<RunFinished> {
    let (events, _commands, handle) = super::spawn(config, resume_from);
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} steps (ETA {eta}) {msg}")
            .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    // indicatif draws nothing when stderr is not a terminal; the log lines must still appear
    let log = |line: String| if bar.is_hidden() { eprintln!("{line}") } else { bar.println(line) };
    let mut outcome = Err(Error::Invalid("the trainer ended without a final event".into()));
    for event in events.iter() {
        match event {
            TrainEvent::Loading { stage, .. } => bar.set_message(stage),
            TrainEvent::Started(s) => {
                bar.set_length(s.total_steps as u64);
                bar.set_position(s.first_step as u64);
                log(format!(
                    "training {} of {} parameters ({:.3}%) on {} examples ({} tokens), {} validation; \
                     {} steps, micro-batch {} × {} accumulation{}{}",
                    s.trainable_params,
                    s.total_params,
                    100.0 * s.trainable_params as f64 / s.total_params.max(1) as f64,
                    s.train_examples,
                    s.train_tokens,
                    s.validation_examples,
                    s.total_steps,
                    s.micro_batch,
                    s.grad_accum,
                    if s.gradient_checkpointing { ", gradient checkpointing" } else { "" },
                    s.probe_peak_bytes
                        .map(|b| format!("; probe peak {:.0} MiB", b as f64 / 1048576.0))
                        .unwrap_or_default()
                ));
            }
            TrainEvent::Notice(text) => log(format!("note: {text}")),
            TrainEvent::Step(s) => {
                bar.set_position(s.step as u64);
                if bar.is_hidden() && (s.step % 10 == 0 || s.step == s.total_steps) {
                    log(format!(
                        "step {}/{}: loss {:.4} lr {:.2e} {:.0} tok/s",
                        s.step, s.total_steps, s.loss, s.lr, s.tokens_per_s
                    ));
                }
                // the step's peak is what the estimate predicts; RSS is the whole process
                let mib = |b: u64| b as f64 / 1048576.0;
                let peak = s.memory.step_peak.map(|p| format!(" step peak {:.0} MiB,", mib(p))).unwrap_or_default();
                let memory = format!("{peak} rss {:.0} MiB", mib(s.memory.rss));
                bar.set_message(format!(
                    "loss {:.4} lr {:.2e} |g| {:.3} {:.0} tok/s{memory}",
                    s.loss, s.lr, s.grad_norm, s.tokens_per_s
                ));
            }
            TrainEvent::Eval { step, loss } => log(format!("step {step}: validation loss {loss:.4}")),
            TrainEvent::Sample { step, prompt, text } => {
                log(format!("step {step}: sample\n  > {prompt}\n  {}", text.replace('\n', "\n  ")))
            }
            TrainEvent::CheckpointSaved { step, path } => {
                log(format!("step {step}: checkpoint saved to {}", path.display()))
            }
            TrainEvent::Paused { step } => log(format!("paused at step {step}")),
            TrainEvent::Resumed { step } => log(format!("resumed at step {step}")),
            TrainEvent::Finished(f) => {
                bar.finish_and_clear();
                outcome = Ok(f);
            }
            TrainEvent::Failed { message } => {
                bar.abandon();
                outcome = Err(Error::Invalid(message));
            }
        }
    }
    let _ = handle.join();
    outcome
}
