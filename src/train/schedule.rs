//! Learning rate over the run: linear warmup, then cosine, linear or constant decay, as
//! transformers' get_*_schedule_with_warmup compute it.

use super::config::Schedule;

/// The learning rate of optimizer step `step` (0-based) of `total` steps.
pub fn learning_rate(base: f64, schedule: Schedule, warmup: usize, step: usize, total: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_steps).min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress).max(0.0),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let lr = |s, step| learning_rate(1.0, s, 10, step, 110);
        assert_eq!(lr(Schedule::Cosine, 0), 0.0);
        assert!((lr(Schedule::Cosine, 5) - 0.5).abs() < 1e-12);
        assert!((lr(Schedule::Cosine, 10) - 1.0).abs() < 1e-12);
        assert!((lr(Schedule::Cosine, 60) - 0.5).abs() < 1e-12);
        assert!(lr(Schedule::Cosine, 110).abs() < 1e-12);
        assert!((lr(Schedule::Linear, 60) - 0.5).abs() < 1e-12);
        assert_eq!(lr(Schedule::Constant, 100), 1.0);
    }
}
