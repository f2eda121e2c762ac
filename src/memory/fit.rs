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

/// One way to make a run fit, and its estimate.
#[derive(Debug, Clone)]
pub struct Suggestion {
    pub change: String,
    pub input: EstimateInput,
    pub estimate: Estimate,
}

/// What to change when the run does not fit in `memory`: QLoRA instead of LoRA, gradient
/// accumulation instead of a large batch, fewer targets, a shorter sequence.
pub fn suggestions(input: &EstimateInput, memory: u64) -> Vec<Suggestion> {
    let mut out = Vec::new();
    let mut push = |change: String, i: EstimateInput| {
        if let Ok(estimate) = estimate(&i) {
            out.push(Suggestion { change, input: i, estimate });
        }
    };
    if input.method == Method::Lora {
        let mut i = input.clone();
        i.method = Method::Qlora { double_quant: true };
        push("QLoRA (NF4 base) instead of LoRA".into(), i);
    }
    if input.batch > 1 {
        let mut i = input.clone();
        i.batch = 1;
        push(format!("batch 1 with {} gradient-accumulation steps", input.batch), i);
    }
    let defaults = &input.spec.default_targets;
    if !defaults.is_empty() && *defaults != input.targets {
        let mut i = input.clone();
        i.targets = defaults.clone();
        push(format!("targets {} only", defaults.join(",")), i);
    }
    if let Some(seq) = largest_seq(input, memory) {
        if seq < input.seq {
            let mut i = input.clone();
            i.seq = seq;
            push(format!("sequences of at most {seq} tokens"), i);
        }
    }
    out
}
