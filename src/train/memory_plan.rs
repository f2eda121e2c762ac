//! Before a run loads its model: does it fit? The estimate of the largest micro-batch its data
//! makes, against the memory the device has free, decides gradient checkpointing ("auto") and
//! the micro-batch, or refuses the run with what to change, so that a run that cannot fit
//! never starts blind (and dies in an allocation, or under the kernel's OOM killer).

use std::fmt::Write as _;

use super::config::{Checkpointing, RunConfig};
use crate::data::DataReport;
use crate::memory::cli::gib;
use crate::memory::{estimate, fit, DeviceKind, Estimate};
use crate::model::ModelSpec;
use crate::{Error, Result};

/// How a refusal begins: the window offers to start the run anyway after one.
pub const REFUSED: &str = "the run does not fit:";

/// Whether a run's failure message is this module's refusal.
pub fn is_refusal(message: &str) -> bool {
    message.starts_with(REFUSED)
}

/// How the run will use memory.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub checkpointing: bool,
    /// Examples per forward/backward; below batch_size when smaller micro-batches (with more
    /// accumulation, the same effective batch) are what fits.
    pub micro_batch: usize,
    /// The estimate of the run as planned.
    pub estimate: Estimate,
    /// What the plan changed, and why, for the log.
    pub notices: Vec<String>,
}

/// The plan for `config` on a model of `spec` with its prepared `data`, in `budget` bytes
/// (None: unknown, nothing is decided by it) of which `source` says what they are.
pub fn plan(
    config: &RunConfig,
    spec: ModelSpec,
    data: &DataReport,
    budget: Option<u64>,
    source: &str,
) -> Result<MemoryPlan> {
    let mut input = config.estimate_input_for(spec, Some(data));
    // called with the tokenizer and the data loaded, before the model: the process's own part
    input.process_bytes = crate::memory::process_memory().map_or(0, |m| m.rss);
    input.checkpointing = config.checkpointing_in(&input, budget);
    let mut notices = Vec::new();
    let shape =
        format!("{} × {} tokens (the longest training sequence: {})", input.batch, input.seq, data.longest.source);
    if input.checkpointing && config.train.gradient_checkpointing == Checkpointing::Auto {
        notices.push(match input.device {
            DeviceKind::Cuda => {
                "gradient checkpointing is on (the default on a GPU; train.gradient_checkpointing = \"off\" turns it off)"
                    .to_string()
            }
            DeviceKind::Cpu => {
                let mut plain = input.clone();
                plain.checkpointing = false;
                let plain = estimate(&plain)?;
                format!(
                    "gradient checkpointing is on: without it the largest micro-batch, {shape}, would need about {} \
                     (up to {}), more than the {} of {source}",
                    gib(plain.mid),
                    gib(plain.high),
                    gib(budget.unwrap_or(0)),
                )
            }
        });
    }
    let est = estimate(&input)?;
    let keep = |estimate: Estimate, notices: Vec<String>| MemoryPlan {
        checkpointing: input.checkpointing,
        micro_batch: input.batch,
        estimate,
        notices,
    };
    let Some(memory) = budget.filter(|&m| !est.fits(m)) else {
        return Ok(keep(est, notices));
    };
    let needs = format!(
        "the largest micro-batch, {shape}, needs about {} (band {} – {}), more than the {} of {source}",
        gib(est.mid),
        gib(est.low),
        gib(est.high),
        gib(memory)
    );
    if config.train.ignore_memory_estimate {
        notices.push(format!("{needs}; starting anyway, as train.ignore_memory_estimate asks"));
        return Ok(keep(est, notices));
    }
    // Smaller micro-batches with more accumulation train the same steps on the same examples:
    // taken whenever the whole band of the configured one does not fit.
    if let Some(micro) = fit::largest_batch(&input, memory).filter(|&b| b < input.batch) {
        let mut smaller = input.clone();
        smaller.batch = micro;
        let effective = config.train.batch_size * config.train.grad_accum;
        notices.push(format!(
            "{needs}: training with micro-batches of {micro} and {}× gradient accumulation instead (the same \
             effective batch of {effective})",
            effective.div_ceil(micro)
        ));
        return Ok(MemoryPlan {
            checkpointing: input.checkpointing,
            micro_batch: micro,
            estimate: estimate(&smaller)?,
            notices,
        });
    }
    // Nothing the run may change by itself fits: it starts only where it may (its lower
    // bound within the memory), with a warning and the probe step as the check.
    if est.low <= memory {
        notices.push(format!("{needs}: it may not fit (the lower end of the band does)"));
        return Ok(keep(est, notices));
    }
    let mut message = format!("{REFUSED} {needs}. To fit:");
    for s in fit::suggestions(&input, memory) {
        let _ = write!(message, "\n  {}", crate::memory::cli::suggestion_line(&s, memory));
    }
    let _ = write!(
        message,
        "\nor set train.ignore_memory_estimate = true (`train --ignore-memory-estimate`) to start it anyway"
    );
    Err(Error::Invalid(message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Longest;

    fn smollm2() -> ModelSpec {
        crate::memory::grid::preset_spec("smollm2-135m").unwrap()
    }

    fn data(sequences: usize, longest: usize) -> DataReport {
        DataReport {
            train_examples: sequences,
            longest: Longest { tokens: longest, source: "data.jsonl:7".into() },
            ..Default::default()
        }
    }

    fn config(batch: usize, max_length: usize) -> RunConfig {
        let mut c = RunConfig::default();
        c.train.batch_size = batch;
        c.train.gradient_checkpointing = Checkpointing::Off;
        c.data.max_length = max_length;
        c
    }

    #[test]
    fn the_data_sizes_the_micro_batch() {
        let c = config(8, 2048);
        let short = c.estimate_input_for(smollm2(), Some(&data(100, 60)));
        assert_eq!((short.batch, short.seq), (8, 60));
        let few = c.estimate_input_for(smollm2(), Some(&data(3, 2048)));
        assert_eq!((few.batch, few.seq), (3, 2048));
        let unknown = c.estimate_input_for(smollm2(), None);
        assert_eq!((unknown.batch, unknown.seq), (8, 2048));
    }

    #[test]
    fn a_run_that_cannot_fit_is_refused_with_the_changes_that_would_fit() {
        let c = config(1, 2048);
        let d = data(100, 2048);
        let need = estimate(&c.estimate_input_for(smollm2(), Some(&d))).unwrap();
        let e = plan(&c, smollm2(), &d, Some(need.low / 2), "test memory").unwrap_err().to_string();
        assert!(is_refusal(&e) && e.contains("data.jsonl:7"), "{e}");
        assert!(e.contains("gradient checkpointing") && e.contains("ignore_memory_estimate"), "{e}");
        // a user may insist
        let mut insist = c.clone();
        insist.train.ignore_memory_estimate = true;
        let p = plan(&insist, smollm2(), &d, Some(need.low / 2), "test memory").unwrap();
        assert_eq!(p.micro_batch, 1);
        assert!(p.notices[0].contains("starting anyway"), "{:?}", p.notices);
        // what fits starts as configured, without a word
        let p = plan(&c, smollm2(), &d, Some(need.high * 2), "test memory").unwrap();
        assert!(p.notices.is_empty() && !p.checkpointing);
        // inside the band, with nothing to shrink: it starts, warned
        let p = plan(&c, smollm2(), &d, Some((need.low + need.high) / 2), "test memory").unwrap();
        assert!(p.notices[0].contains("may not fit"), "{:?}", p.notices);
    }

    #[test]
    fn a_batch_too_large_trains_in_micro_batches_that_fit() {
        let c = config(8, 1024);
        let d = data(100, 1024);
        let one = estimate(&c.estimate_input_for(smollm2(), Some(&data(1, 1024)))).unwrap();
        let full = estimate(&c.estimate_input_for(smollm2(), Some(&d))).unwrap();
        // room for a few sequences, not for eight
        let memory = one.high + (full.high - one.high) / 3;
        let p = plan(&c, smollm2(), &d, Some(memory), "test memory").unwrap();
        assert!(p.micro_batch > 1 && p.micro_batch < 8, "{}", p.micro_batch);
        assert!(p.estimate.fits(memory));
        assert!(p.notices[0].contains("gradient accumulation"), "{:?}", p.notices);
        // "auto" checkpointing comes first, and may make the whole batch fit
        let mut auto = c.clone();
        auto.train.gradient_checkpointing = Checkpointing::Auto;
        let p = plan(&auto, smollm2(), &d, Some(memory), "test memory").unwrap();
        assert!(p.checkpointing);
        assert!(p.estimate.low <= memory);
    }
}
