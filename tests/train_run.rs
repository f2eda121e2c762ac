//! The trainer end to end: a tiny LLaMA made here learns a small dataset from tests/data, the
//! events come in order, and a run stopped and resumed repeats the uninterrupted one exactly.

mod common;

use std::path::{Path, PathBuf};

use common::tiny_llama::TinyLlama;
use qlora_studio::train::checkpoint;
use qlora_studio::train::events::{Command, TrainEvent};
use qlora_studio::train::{Checkpointing, Mode, RunConfig, Schedule};

fn dataset() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/colors.jsonl")
}

/// A tiny model whose vocabulary covers the dataset and the prompt template, and a config for it.
fn setup(dir: &Path, mode: Mode) -> RunConfig {
    let text = std::fs::read_to_string(dataset()).unwrap();
    let template_words = "### Instruction : Response : Input : System : [INST] [/INST] <<SYS>> <</SYS>> user assistant";
    let model_dir = dir.join("model");
    TinyLlama::default().write(&model_dir, &[text, template_words.to_string()]);
    let mut c = RunConfig::default();
    c.model.source = model_dir.display().to_string();
    c.model.mode = mode;
    c.lora.targets = vec!["all-linear".into()];
    c.lora.r = 8;
    c.lora.alpha = 16.0;
    c.lora.dropout = 0.0;
    c.data.path = dataset();
    c.data.max_length = 64;
    c.train.batch_size = 4;
    c.train.grad_accum = 2;
    c.train.learning_rate = 1e-2;
    c.train.warmup_steps = 2;
    c.train.schedule = Schedule::Cosine;
    c.train.output_dir = dir.join("out");
    c
}

fn collect(rx: crossbeam_channel::Receiver<TrainEvent>) -> Vec<TrainEvent> {
    rx.iter().collect()
}

fn step_losses(events: &[TrainEvent]) -> Vec<(usize, f64)> {
    events.iter().filter_map(|e| if let TrainEvent::Step(s) = e { Some((s.step, s.loss)) } else { None }).collect()
}

fn failure(events: &[TrainEvent]) -> Option<&str> {
    events.iter().find_map(|e| if let TrainEvent::Failed { message } = e { Some(message.as_str()) } else { None })
}

#[test]
fn qlora_run_learns_the_dataset_and_reports_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = setup(dir.path(), Mode::Qlora);
    config.data.validation = qlora_studio::data::Validation::Fraction(0.25);
    config.train.max_steps = 40;
    config.train.eval_every = 10;
    config.train.checkpoint_every = 20;
    config.train.sample_every = 20;
    config.train.sample_prompts = vec!["What color is the cat ?".into()];
    config.train.sample_max_tokens = 6;
    let (rx, _commands, handle) = qlora_studio::train::spawn(config, None);
    let events = collect(rx);
    handle.join().unwrap();
    assert_eq!(failure(&events), None);

    // Loading first, Started once after it, Finished last
    assert!(matches!(events[0], TrainEvent::Loading { .. }));
    let started = events.iter().position(|e| matches!(e, TrainEvent::Started(_))).expect("a Started event");
    assert!(events[..started].iter().all(|e| matches!(e, TrainEvent::Loading { .. } | TrainEvent::Notice(_))));
    let TrainEvent::Started(info) = &events[started] else { unreachable!() };
    assert_eq!((info.train_examples, info.validation_examples), (18, 6));
    assert_eq!(info.total_steps, 40);
    assert!(info.trainable_params > 0 && info.trainable_params < info.total_params);
    let TrainEvent::Finished(end) = events.last().unwrap() else { panic!("last event: {:?}", events.last()) };
    assert_eq!(end.step, 40);
    assert!(!end.stopped);

    // steps 1..=40 in order, the schedule's learning rate, sane readings
    let steps: Vec<_> =
        events.iter().filter_map(|e| if let TrainEvent::Step(s) = e { Some(s) } else { None }).collect();
    assert_eq!(steps.iter().map(|s| s.step).collect::<Vec<_>>(), (1..=40).collect::<Vec<_>>());
    assert_eq!(steps[0].lr, 0.0, "warmup starts at 0");
    assert!((steps[2].lr - 1e-2).abs() < 1e-4, "after warmup the peak: {}", steps[2].lr);
    assert!(steps[39].lr < steps[20].lr && steps[20].lr < steps[2].lr, "cosine decays");
    for s in &steps {
        assert!(s.loss.is_finite() && s.grad_norm.is_finite() && s.tokens_per_s > 0.0);
        assert!(s.memory.rss > 0);
    }
    assert!(steps[39].eta_s.abs() < 1e-9 && steps[0].eta_s > 0.0);

    // it learned: the loss fell well below its start
    let first: f64 = steps[..3].iter().map(|s| s.loss).sum::<f64>() / 3.0;
    let last: f64 = steps[37..].iter().map(|s| s.loss).sum::<f64>() / 3.0;
    assert!(last < first * 0.5, "training loss went from {first:.3} to {last:.3}");

    // evaluations at 10, 20, 30, 40 and checkpoints at 20 and 40
    let evals: Vec<usize> =
        events.iter().filter_map(|e| if let TrainEvent::Eval { step, .. } = e { Some(*step) } else { None }).collect();
    assert_eq!(evals, vec![10, 20, 30, 40]);
    let saved: Vec<(usize, PathBuf)> = events
        .iter()
        .filter_map(
            |e| if let TrainEvent::CheckpointSaved { step, path } = e { Some((*step, path.clone())) } else { None },
        )
        .collect();
    assert_eq!(saved.iter().map(|s| s.0).collect::<Vec<_>>(), vec![20, 40]);
    let last_dir = &saved[1].1;
    for f in
        [checkpoint::ADAPTER_WEIGHTS, checkpoint::ADAPTER_CONFIG, checkpoint::OPTIMIZER_STATE, checkpoint::RUN_CONFIG]
    {
        assert!(last_dir.join(f).is_file(), "{f} missing in {}", last_dir.display());
    }
    assert_eq!(end.checkpoint.as_ref(), Some(last_dir));
    assert!(end.validation_loss.is_some());

    // samples at 20 and 40, generated with the adapter as it was then; by the end the model
    // answers in the trained form
    let samples: Vec<(usize, &str, &str)> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Sample { step, prompt, text } => Some((*step, prompt.as_str(), text.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(samples.iter().map(|s| s.0).collect::<Vec<_>>(), vec![20, 40]);
    assert!(samples.iter().all(|s| s.1 == "What color is the cat ?"));
    assert!(samples[1].2.starts_with("The"), "{samples:?}");
}

#[test]
fn a_model_with_only_a_sentencepiece_tokenizer_trains() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = setup(dir.path(), Mode::Qlora);
    // the same tiny model with the SentencePiece fixture (400 pieces) instead of tokenizer.json
    let model_dir = dir.path().join("model");
    TinyLlama { min_vocab: 400, ..TinyLlama::default() }.write(&model_dir, &["colors".to_string()]);
    std::fs::remove_file(model_dir.join("tokenizer.json")).unwrap();
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/sentencepiece/tiny.model");
    std::fs::copy(fixture, model_dir.join("tokenizer.model")).unwrap();
    config.train.max_steps = 12;
    // byte pieces make the prompts longer than words do
    config.data.max_length = 256;
    let events = run_with_stop(config, None, None);
    assert_eq!(failure(&events), None);
    let losses = step_losses(&events);
    assert_eq!(losses.len(), 12);
    assert!(losses.iter().all(|(_, l)| l.is_finite()));
    // it learns
    assert!(losses[11].1 < losses[0].1, "{losses:?}");
}

/// Run a config to the end, stopping it after `stop_after` steps when given. The event channel
/// is a rendezvous, so the Stop is in the queue before the trainer can start the next step.
fn run_with_stop(config: RunConfig, resume: Option<PathBuf>, stop_after: Option<usize>) -> Vec<TrainEvent> {
    let (event_tx, event_rx) = crossbeam_channel::bounded(0);
    let (command_tx, command_rx) = crossbeam_channel::unbounded();
    let worker = std::thread::spawn(move || {
        let result = qlora_studio::train::run(config, resume.as_deref(), &event_tx, &command_rx);
        if let Err(e) = result {
            event_tx.send(TrainEvent::Failed { message: e.to_string() }).unwrap();
        }
    });
    let mut events = Vec::new();
    for e in event_rx.iter() {
        if let (TrainEvent::Step(s), Some(n)) = (&e, stop_after) {
            if s.step == n {
                command_tx.send(Command::Stop).unwrap();
            }
        }
        events.push(e);
    }
    worker.join().unwrap();
    events
}

#[test]
fn a_stopped_and_resumed_run_repeats_the_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = setup(dir.path(), Mode::Lora);
    config.lora.dropout = 0.1; // seeded dropout must repeat too
    config.train.max_steps = 8;
    config.train.probe = false;
    // the checkpoint after step 4 is an event the test receives after sending Stop, so the
    // trainer reads the Stop before it can start step 5
    config.train.checkpoint_every = 4;

    config.train.gradient_checkpointing = Checkpointing::Off;
    let whole = run_with_stop(config.clone(), None, None);
    assert_eq!(failure(&whole), None);

    // the interrupted run recomputes its blocks in the backward: the same steps to 1e-6, and
    // the setting comes back with the resumed run's config
    config.train.gradient_checkpointing = Checkpointing::On;
    config.train.output_dir = dir.path().join("interrupted");
    let first = run_with_stop(config.clone(), None, Some(4));
    assert_eq!(failure(&first), None);
    let TrainEvent::Finished(end) = first.last().unwrap() else { panic!("{:?}", first.last()) };
    assert!(end.stopped && end.step == 4, "{end:?}");
    let ck = checkpoint::latest(&config.train.output_dir).expect("the stop saved a checkpoint");
    assert_eq!(ck, checkpoint::checkpoint_dir(&config.train.output_dir, 4));

    // a new run into the same folder is refused: the earlier checkpoints are kept
    let again = run_with_stop(config.clone(), None, None);
    let message = failure(&again).expect("a Failed event");
    assert!(message.contains("already holds checkpoints") && message.contains("--resume"), "{message}");
    assert_eq!(checkpoint::latest(&config.train.output_dir), Some(ck.clone()));

    // the resumed run takes everything from the checkpoint; this config is ignored
    let rest = run_with_stop(RunConfig::default(), Some(ck), None);
    assert_eq!(failure(&rest), None);
    let checkpointed =
        |events: &[TrainEvent]| events.iter().any(|e| matches!(e, TrainEvent::Started(s) if s.gradient_checkpointing));
    assert!(checkpointed(&first) && checkpointed(&rest) && !checkpointed(&whole));
    let mut resumed = step_losses(&first);
    resumed.extend(step_losses(&rest));
    let uninterrupted = step_losses(&whole);
    assert_eq!(resumed.len(), 8);
    for ((sa, a), (sb, b)) in uninterrupted.iter().zip(&resumed) {
        assert_eq!(sa, sb);
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "step {sa}: {a} uninterrupted, {b} resumed");
    }
    // and the adapters at the end are the same
    let a = qlora_studio::weights::SafetensorsFile::open(
        checkpoint::checkpoint_dir(&dir.path().join("out"), 8).join(checkpoint::ADAPTER_WEIGHTS),
    )
    .unwrap();
    let b = qlora_studio::weights::SafetensorsFile::open(
        checkpoint::checkpoint_dir(&config.train.output_dir, 8).join(checkpoint::ADAPTER_WEIGHTS),
    )
    .unwrap();
    for key in a.keys() {
        let (va, _) = a.f32_values(&key).unwrap();
        let (vb, _) = b.f32_values(&key).unwrap();
        let diff = va.iter().zip(&vb).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-6, "{key}: adapters differ by {diff}");
    }
}

#[test]
fn pause_resume_and_bad_configs() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = setup(dir.path(), Mode::Lora);
    config.train.max_steps = 3;
    config.train.probe = false;
    // the Pause is queued before the trainer starts, so it pauses before the first step and
    // nothing moves until Resume
    let (events_tx, rx) = crossbeam_channel::unbounded();
    let (commands, commands_rx) = crossbeam_channel::unbounded();
    commands.send(Command::Pause).unwrap();
    let run_config = config.clone();
    let handle =
        std::thread::spawn(move || qlora_studio::train::run(run_config, None, &events_tx, &commands_rx).unwrap());
    let mut events = Vec::new();
    for e in rx.iter() {
        let paused = matches!(e, TrainEvent::Paused { .. });
        events.push(e);
        if paused {
            std::thread::sleep(std::time::Duration::from_millis(50));
            commands.send(Command::Resume).unwrap();
        }
    }
    handle.join().unwrap();
    let kinds: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Paused { .. } => Some("paused"),
            TrainEvent::Resumed { .. } => Some("resumed"),
            TrainEvent::Step(_) => Some("step"),
            TrainEvent::Finished(_) => Some("finished"),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["paused", "resumed", "step", "step", "step", "finished"]);

    // a model folder that does not exist: one Failed event naming it
    let mut bad = config.clone();
    bad.train.output_dir = dir.path().join("bad-model");
    bad.model.source = dir.path().join("nowhere").display().to_string();
    let (rx, _c, handle) = qlora_studio::train::spawn(bad, None);
    let events = collect(rx);
    handle.join().unwrap();
    let message = failure(&events).expect("a Failed event");
    assert!(message.contains("nowhere"), "{message}");

    // a target the model lacks
    let mut bad = config;
    bad.train.output_dir = dir.path().join("bad-target");
    bad.lora.targets = vec!["query_key_value".into()];
    let (rx, _c, handle) = qlora_studio::train::spawn(bad, None);
    let events = collect(rx);
    handle.join().unwrap();
    let message = failure(&events).expect("a Failed event");
    assert!(message.contains("query_key_value") && message.contains("q_proj"), "{message}");
}

#[test]
fn a_diverging_run_stops_with_a_clear_event_and_keeps_its_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = setup(dir.path(), Mode::Lora);
    config.train.max_steps = 30;
    config.train.probe = false;
    config.train.warmup_steps = 0;
    config.train.schedule = Schedule::Constant;
    // f16 activations overflow once the adapter grows this fast: inf - inf gives NaN
    config.model.dtype = "f16".into();
    config.train.learning_rate = 100.0;
    config.train.max_grad_norm = 0.0;
    config.train.checkpoint_every = 1;
    let (rx, _c, handle) = qlora_studio::train::spawn(config.clone(), None);
    let events = collect(rx);
    handle.join().unwrap();
    let message = failure(&events)
        .unwrap_or_else(|| panic!("the run must fail once the loss is not finite: {:?}", step_losses(&events)));
    assert!(message.contains("loss became") && message.contains("learning_rate"), "{message}");
    assert!(matches!(events.last(), Some(TrainEvent::Failed { .. })));
    // every checkpoint saved before is still there, and the last one is named
    let saved: Vec<PathBuf> = events
        .iter()
        .filter_map(|e| if let TrainEvent::CheckpointSaved { path, .. } = e { Some(path.clone()) } else { None })
        .collect();
    assert!(!saved.is_empty(), "{events:?}");
    assert!(saved.iter().all(|p| p.join(checkpoint::ADAPTER_WEIGHTS).is_file()));
    assert!(message.contains(&saved.last().unwrap().display().to_string()), "{message}");
}

/// DoRA (`lora.dora`) on an NF4 base: the run trains its magnitude vectors with A and B, its
/// checkpoints are PEFT DoRA adapters, and a stopped run resumes to the same losses.
#[test]
fn a_dora_run_checkpoints_as_peft_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = setup(dir.path(), Mode::Qlora);
    config.lora.dora = true;
    config.train.max_steps = 6;
    config.train.probe = false;
    config.train.checkpoint_every = 3;
    let whole = run_with_stop(config.clone(), None, None);
    assert_eq!(failure(&whole), None);
    let losses = step_losses(&whole);
    assert!(losses.last().unwrap().1 < losses[0].1, "DoRA does not learn: {losses:?}");

    config.train.output_dir = dir.path().join("interrupted");
    let first = run_with_stop(config.clone(), None, Some(3));
    assert_eq!(failure(&first), None);
    let ck = checkpoint::latest(&config.train.output_dir).expect("a checkpoint");
    let adapter_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(adapter_config["use_dora"], true);
    let weights = qlora_studio::weights::SafetensorsFile::open(ck.join(checkpoint::ADAPTER_WEIGHTS)).unwrap();
    let keys = weights.keys();
    let magnitudes = keys.iter().filter(|k| k.ends_with(".lora_magnitude_vector")).count();
    assert_eq!(magnitudes, keys.iter().filter(|k| k.ends_with(".lora_A.weight")).count(), "{keys:?}");

    let rest = run_with_stop(RunConfig::default(), Some(ck), None);
    assert_eq!(failure(&rest), None);
    let mut resumed = step_losses(&first);
    resumed.extend(step_losses(&rest));
    assert_eq!(resumed.len(), losses.len());
    for ((sa, a), (sb, b)) in losses.iter().zip(&resumed) {
        assert_eq!(sa, sb);
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "step {sa}: {a} uninterrupted, {b} resumed");
    }
}
