//! The memory a step event reports is the peak inside that step, as the estimate predicts it:
//! counted from the step's start (not from the run's, so an evaluation or a checkpoint between
//! steps does not stay in it) and without the heap the app held before the run (the window).

mod common;

use std::hint::black_box;
use std::path::PathBuf;

use candle_core::Device;
use common::tiny_llama::TinyLlama;
use qlora_studio::memory::{self, MemoryMonitor};
use qlora_studio::train::events::TrainEvent;
use qlora_studio::train::{Mode, RunConfig};

#[global_allocator]
static ALLOC: memory::CountingAllocator = memory::CountingAllocator::new();

const MIB: usize = 1024 * 1024;

/// The counting allocator is process-wide: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn a_step_peak_counts_from_the_step_start_and_from_the_baseline() {
    let _serial = serial();
    // 16 MiB the app holds throughout (its window, say): not the run's
    let app = black_box(vec![1u8; 16 * MIB]);
    let mut monitor = MemoryMonitor::start(&Device::Cpu).with_heap_baseline(memory::live_bytes());
    // something big between two steps (an evaluation, a checkpoint): not the next step's peak
    drop(black_box(vec![1u8; 64 * MIB]));
    monitor.begin_step();
    drop(black_box(vec![1u8; 8 * MIB]));
    let first = monitor.read();
    let peak = first.step_peak.expect("the counting allocator is installed") as usize;
    // (within a MiB: the test harness allocates and frees beside it)
    assert!((7 * MIB..16 * MIB).contains(&peak), "step peak {:.2} MiB", peak as f64 / MIB as f64);
    // the run's heap peak keeps what came before the step
    assert!(first.heap_peak.unwrap() as usize >= 64 * MIB + 16 * MIB);

    // the next step starts afresh
    monitor.begin_step();
    drop(black_box(vec![1u8; 2 * MIB]));
    let second = monitor.read().step_peak.unwrap() as usize;
    assert!((MIB..8 * MIB).contains(&second), "step peak {:.2} MiB", second as f64 / MIB as f64);
    drop(app);
}

/// A short run with 48 MiB held before it: every step event carries its own peak, and none of
/// it is that 48 MiB, while the live heap (the old reading) is above it.
#[test]
fn step_events_carry_the_peak_of_their_step() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/colors.jsonl");
    let text = std::fs::read_to_string(&data).unwrap();
    let model_dir = dir.path().join("model");
    TinyLlama::default().write(&model_dir, &[text, "### Instruction : Response : Input :".into()]);
    let mut config = RunConfig::default();
    config.model.source = model_dir.display().to_string();
    config.model.mode = Mode::Qlora;
    config.data.path = data;
    config.data.max_length = 64;
    config.train.max_steps = 4;
    config.train.batch_size = 4;
    config.train.eval_every = 0;
    config.train.checkpoint_every = 0;
    config.train.output_dir = dir.path().join("out");

    let held = black_box(vec![1u8; 48 * MIB]);
    let (events, _commands, handle) = qlora_studio::train::spawn(config, None);
    let events: Vec<TrainEvent> = events.iter().collect();
    handle.join().unwrap();
    drop(held);
    let steps: Vec<_> =
        events.iter().filter_map(|e| if let TrainEvent::Step(s) = e { Some(s) } else { None }).collect();
    assert_eq!(steps.len(), 4, "{events:?}");
    let estimate = events
        .iter()
        .find_map(|e| if let TrainEvent::Started(s) = e { s.estimate } else { None })
        .expect("the run's estimate in its Started event");
    let [low, _, high] = estimate.step;
    for s in steps {
        let peak = s.memory.step_peak.expect("a step peak on the CPU");
        let live = s.memory.heap_live.unwrap() as usize;
        assert!(peak > 0 && (peak as usize) < 48 * MIB, "step {}: peak {} MiB", s.step, peak as usize / MIB);
        assert!(live > 48 * MIB, "step {}: live {} MiB", s.step, live / MIB);
        // like with like: the step's peak near the estimate of it, the process near the whole
        assert!(low / 2 <= peak && peak <= 2 * high, "step {}: peak {peak} against {estimate:?}", s.step);
        let rss = s.memory.rss;
        assert!(
            estimate.whole / 2 <= rss && rss <= 2 * estimate.whole,
            "step {}: RSS {rss} against {estimate:?}",
            s.step
        );
    }
}
