//! The inverse questions: the largest sequence and batch that fit, and what to change when a
//! run does not fit, each with its new estimate.

use super::estimate::{estimate, Estimate, EstimateInput, Method};

/// The largest value in [lo, hi] for which `fits` holds, given that it is monotone
/// (true up to some point); `None` if not even `lo` fits.
fn largest(lo: usize, hi: usize, fits: impl Fn(usize) -> bool) -> Option<usize> {
    if !fits(lo) {
        return None;
    }
    let (mut good, mut bad) = (lo, hi + 1);
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if fits(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    Some(good)
}

fn fits_with(input: &EstimateInput, memory: u64, change: impl Fn(&mut EstimateInput)) -> bool {
    let mut i = input.clone();
    change(&mut i);
    estimate(&i).is_ok_and(|e| e.fits(memory))
}

/// The longest sequence (at the input's batch) whose high estimate fits in `memory`.
pub fn largest_seq(input: &EstimateInput, memory: u64) -> Option<usize> {
    largest(2, 1 << 20, |s| fits_with(input, memory, |i| i.seq = s))
}

/// The largest batch (at the input's sequence length) whose high estimate fits in `memory`.
pub fn largest_batch(input: &EstimateInput, memory: u64) -> Option<usize> {
    largest(1, 1 << 16, |b| fits_with(input, memory, |i| i.batch = b))
}

/// A change that makes a run smaller.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Per-block gradient checkpointing on.
    Checkpointing,
    Qlora,
    /// Batch 1, with this many accumulation steps to keep the effective batch.
    BatchOne {
        accumulation: usize,
    },
    /// The architecture table's default targets only.
    DefaultTargets(Vec<String>),
    /// Sequences cut to this many tokens.
    MaxSeq(usize),
}

impl Change {
    /// The English sentence, with `{}` where the value goes (the GUI translates these).
    pub fn template(&self) -> &'static str {
        match self {
            Change::Checkpointing => "gradient checkpointing (each block recomputed in the backward)",
            Change::Qlora => "QLoRA (NF4 base) instead of LoRA",
            Change::BatchOne { .. } => "batch 1 with {} gradient-accumulation steps",
            Change::DefaultTargets(_) => "targets {} only",
            Change::MaxSeq(_) => "sequences of at most {} tokens",
        }
    }

    /// The sentence, its template passed through `translate` first.
    pub fn describe(&self, translate: impl Fn(&'static str) -> &'static str) -> String {
        let value = match self {
            Change::Checkpointing | Change::Qlora => String::new(),
            Change::BatchOne { accumulation } => accumulation.to_string(),
            Change::DefaultTargets(targets) => targets.join(","),
            Change::MaxSeq(seq) => seq.to_string(),
        };
        translate(self.template()).replace("{}", &value)
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(&self.describe(|english| english))
    }
}

/// One way to make a run fit, and its estimate.
#[derive(Debug, Clone)]
pub struct Suggestion {
    pub change: Change,
    pub input: EstimateInput,
    pub estimate: Estimate,
}

/// What to change when the run does not fit in `memory`: gradient checkpointing, QLoRA
/// instead of LoRA, gradient accumulation instead of a large batch, fewer targets, a shorter
/// sequence.
pub fn suggestions(input: &EstimateInput, memory: u64) -> Vec<Suggestion> {
    let mut out = Vec::new();
    let mut push = |change: Change, i: EstimateInput| {
        if let Ok(estimate) = estimate(&i) {
            out.push(Suggestion { change, input: i, estimate });
        }
    };
    if !input.checkpointing {
        let mut i = input.clone();
        i.checkpointing = true;
        push(Change::Checkpointing, i);
    }
    if input.method == Method::Lora {
        let mut i = input.clone();
        i.method = Method::Qlora { double_quant: true };
        push(Change::Qlora, i);
    }
    if input.batch > 1 {
        let mut i = input.clone();
        i.batch = 1;
        push(Change::BatchOne { accumulation: input.batch }, i);
    }
    let defaults = &input.spec.default_targets;
    if !defaults.is_empty() && *defaults != input.targets {
        let mut i = input.clone();
        i.targets = defaults.clone();
        push(Change::DefaultTargets(defaults.clone()), i);
    }
    if let Some(seq) = largest_seq(input, memory) {
        if seq < input.seq {
            let mut i = input.clone();
            i.seq = seq;
            push(Change::MaxSeq(seq), i);
        }
    }
    out
}
