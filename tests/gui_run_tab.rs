//! The window's rough edges, driven in-process with egui_kittest: the Run tab's plots at the
//! default window size and what the mouse wheel does over them, the Chinese UI after a run,
//! the Runs tab reading off the UI thread, the Try tab's prompts, settings that cannot be saved.

mod common;

use std::path::{Path, PathBuf};

use common::gui::wait_until;
use common::tiny_llama::TinyLlama;
use eframe::egui;
use egui_kittest::kittest::{NodeT, Queryable};
use egui_kittest::Harness;
use qlora_studio::gui::app::{plot_id, Tab};
use qlora_studio::gui::i18n::Lang;
use qlora_studio::gui::run_view::{RunState, RunView};
use qlora_studio::gui::StudioApp;
use qlora_studio::train::events::RunFinished;
use qlora_studio::train::RunConfig;

// as the binary does: the step events carry the heap's peak within the step
#[global_allocator]
static ALLOC: qlora_studio::memory::CountingAllocator = qlora_studio::memory::CountingAllocator::new();

/// The window at `size`, drawn with the bundled fonts only; a frame is 1/30 s (two clicks a
/// frame apart are a double-click).
fn window(mut app: StudioApp, size: egui::Vec2) -> Harness<'static, StudioApp> {
    app.system_fonts = false;
    let mut harness = Harness::builder()
        .with_size(size)
        .with_step_dt(1.0 / 30.0)
        .build_ui_state(|ui, app: &mut StudioApp| app.show(ui), app);
    harness.step();
    harness
}

const DEFAULT_SIZE: egui::Vec2 = egui::vec2(1280.0, 820.0);

fn dataset() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/colors.jsonl")
}

/// A tiny model for the colors dataset and a short run of it.
fn tiny_config(dir: &Path) -> RunConfig {
    let text = std::fs::read_to_string(dataset()).unwrap();
    let model_dir = dir.join("model");
    TinyLlama::default().write(&model_dir, &[text, "### Instruction : Response : Input :".into()]);
    let mut c = RunConfig::default();
    c.model.source = model_dir.display().to_string();
    c.lora.targets = vec!["q_proj".into(), "v_proj".into()];
    c.data.path = dataset();
    c.data.max_length = 64;
    c.train.max_steps = 3;
    c.train.batch_size = 2;
    c.train.probe = false;
    c.train.output_dir = dir.join("out");
    c
}

/// The plot named by a title (the title's label names the plot widget).
fn plot_rect(harness: &Harness<'_, StudioApp>, title: &str) -> egui::Rect {
    let node = harness
        .query_all_by_label(title)
        .find(|n| n.accesskit_node().role() == egui::accesskit::Role::Unknown)
        .unwrap_or_else(|| panic!("no plot titled {title}"));
    node.rect()
}

fn plot_memory(harness: &Harness<'_, StudioApp>, id: &str) -> egui_plot::PlotMemory {
    egui_plot::PlotMemory::load(&harness.ctx, plot_id(id)).expect("the plot was shown")
}

fn wheel(harness: &mut Harness<'_, StudioApp>, at: egui::Pos2, modifiers: egui::Modifiers) {
    harness.hover_at(at);
    harness.step();
    harness.event_modifiers(
        egui::Event::MouseWheel {
            unit: egui::MouseWheelUnit::Point,
            delta: egui::vec2(0.0, -120.0),
            phase: egui::TouchPhase::Move,
            source: egui::MouseWheelSource::Unknown,
            modifiers,
        },
        modifiers,
    );
    for _ in 0..20 {
        harness.step();
    }
}

/// At 1280 × 820, after a run (a status line in the header), every plot of the Run tab is in the
/// window; the wheel over a plot scrolls the page and leaves the plot's axes alone; Alt+wheel
/// pans it and a double-click puts its view back.
#[test]
fn the_run_tab_fits_the_window_and_the_wheel_scrolls_the_page() {
    let mut app = StudioApp::new(None);
    let losses: Vec<(usize, f64)> = (1..=80).map(|s| (s, 4.0 + 5.0 / s as f64)).collect();
    let end = RunFinished { step: 80, stopped: false, checkpoint: None, train_loss: Some(4.06), validation_loss: None };
    app.run = Some(RunView::from_history(app.config().clone(), &losses, &[(20, 5.0), (80, 4.2)], end));
    app.status = Some((false, "run finished at step 80; adapter in /tmp/runs/demo/checkpoint-000080".into()));
    let mut harness = window(app, DEFAULT_SIZE);
    harness.step();
    let titles = ["Loss", "Learning rate over steps", "Gradient norm", "Tokens/s", "Memory (MiB)"];
    for title in titles {
        let rect = plot_rect(&harness, title);
        assert!(rect.bottom() <= DEFAULT_SIZE.y, "{title}: {rect:?} reaches below the window");
        assert!(rect.height() >= 90.0, "{title}: {rect:?} too small to read");
    }

    // the wheel over the gradient-norm plot: the page scrolls, the plot's view stays automatic
    let grad = plot_rect(&harness, "Gradient norm");
    let before = *plot_memory(&harness, "grad_norm").bounds();
    wheel(&mut harness, grad.center(), egui::Modifiers::NONE);
    let memory = plot_memory(&harness, "grad_norm");
    assert!(memory.auto_bounds.x && memory.auto_bounds.y, "the wheel panned the plot");
    assert_eq!(*memory.bounds(), before, "the wheel moved the plot's axes");
    let moved = plot_rect(&harness, "Gradient norm");
    assert!(moved.top() < grad.top(), "the page did not scroll: {grad:?} → {moved:?}");

    // Alt + wheel pans the plot (and the page stays), a double-click resets it
    let at = moved.center();
    wheel(&mut harness, at, egui::Modifiers::ALT);
    assert!(!plot_memory(&harness, "grad_norm").auto_bounds.y, "Alt + wheel did not pan");
    // (its left edge may move: the axis labels' width follows the view)
    let panned = plot_rect(&harness, "Gradient norm");
    assert_eq!((panned.top(), panned.bottom()), (moved.top(), moved.bottom()), "Alt + wheel scrolled the page");
    harness.hover_at(at);
    harness.step();
    // two clicks in one frame: a double-click
    for pressed in [true, false, true, false] {
        let modifiers = egui::Modifiers::NONE;
        harness.event(egui::Event::PointerButton { pos: at, button: egui::PointerButton::Primary, pressed, modifiers });
    }
    harness.step();
    harness.step();
    harness.step();
    let reset = plot_memory(&harness, "grad_norm");
    assert!(reset.auto_bounds.x && reset.auto_bounds.y, "a double-click did not reset the view");
}

/// A run in 简体中文: the memory plot's lines are named in it, and after the run the status
/// line, the log and the dataset preview's cards are Chinese too.
#[test]
fn a_run_in_chinese_reports_in_chinese() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = StudioApp::new(None);
    *app.config_mut() = tiny_config(dir.path());
    app.settings.lang = Lang::Zh;
    app.refresh_model_info();
    let mut harness = window(app, DEFAULT_SIZE);
    wait_until(&mut harness, "the dataset preview", |app| app.data_view.preview.is_some() && !app.data_view.is_busy());
    harness.state_mut().start_run(None);
    wait_until(&mut harness, "the run to end", |app| app.run.as_ref().is_some_and(|r| !r.is_active()));
    harness.step();

    let (is_error, status) = harness.state().status.clone().expect("a status after the run");
    assert!(!is_error && status.starts_with("run finished at step 3; adapter in "), "{status}");
    let shown = |h: &Harness<'_, StudioApp>, text: &str| h.query_all_by_label_contains(text).next().is_some();
    assert!(shown(&harness, "运行已完成，共 3 步；适配器在 "), "the status line is not in Chinese");
    assert!(!shown(&harness, "run finished at step"), "the status line is still in English");
    // the log: kept in English, shown in Chinese
    let run = harness.state().run.as_ref().unwrap();
    assert!(run.log.iter().any(|l| l == "finished at step 3"), "{:?}", run.log);
    assert!(shown(&harness, "已完成，共 3 步"), "the log is not in Chinese");
    assert!(shown(&harness, "正在加载模型 "), "the loading stages are not in Chinese");
    assert!(!shown(&harness, "finished at step 3"), "an English log line");
    // the memory plot compares the step's peak with its estimate, each line named for what it is
    assert!(run.steps.iter().all(|s| s.memory.step_peak.is_some_and(|p| p > 0)));
    assert!(run.estimate.is_some(), "the estimate travels with the run");
    for line in ["每步峰值（张量）", "该峰值的估算", "RSS（整个进程）", "含进程其余部分的估算"]
    {
        assert!(shown(&harness, line), "no line {line} in the memory plot's legend");
    }
    // the dataset preview's cards
    assert!(shown(&harness, "个词元，其中 "), "the preview cards are not in Chinese");
    assert!(!shown(&harness, " tokens, "), "a preview card in English");
}

/// The Runs tab reads past runs on a worker (the first frame shows a spinner, not a frozen
/// window) and resumes from the card's config without reading the optimizer state itself.
#[test]
fn the_runs_tab_reads_off_the_ui_thread() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.lora.r = 6;
    config.train.max_steps = 2;
    let (events, _commands, handle) = qlora_studio::train::spawn(config.clone(), None);
    let _: Vec<_> = events.iter().collect();
    handle.join().unwrap();
    let ck = qlora_studio::train::checkpoint::latest(&config.train.output_dir).expect("a checkpoint");
    // the run as unfinished (2 of 4 steps), with an optimizer state the UI must not need
    let state_path = ck.join("trainer_state.json");
    let state = std::fs::read_to_string(&state_path).unwrap().replace("\"total_steps\": 2", "\"total_steps\": 4");
    std::fs::write(&state_path, state).unwrap();
    std::fs::write(ck.join("optimizer.safetensors"), b"not read by the UI").unwrap();

    let mut app = StudioApp::new(None);
    app.settings.runs = vec![config.train.output_dir.clone()];
    let mut harness = window(app, DEFAULT_SIZE);
    harness.get_by_label("Runs").click();
    harness.step();
    assert!(harness.state().records_loading(), "the history was read on the UI thread");
    wait_until(&mut harness, "the run history", |app| !app.records_loading());
    assert!(harness.query_by_label("2/4").is_some(), "the card shows the run's steps");

    assert_ne!(harness.state().config().lora.r, 6);
    harness.get_by_label("Resume from last checkpoint").click();
    harness.step();
    assert_eq!(harness.state().config().lora.r, 6, "the run's own config");
    assert_eq!(harness.state().tab, Tab::Run);
    // the trainer reads the (broken) optimizer state on its thread and says so
    wait_until(&mut harness, "the resumed run to end", |app| app.run.as_ref().is_some_and(|r| !r.is_active()));
    let run = harness.state().run.as_ref().unwrap();
    assert!(matches!(&run.state, qlora_studio::gui::run_view::RunState::Failed(m) if m.contains("optimizer")));
}

/// The Try tab starts from a prompt: the run's sample prompts, then the dataset's first
/// instructions, offered in a list.
#[test]
fn the_try_tab_offers_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = StudioApp::new(None);
    *app.config_mut() = tiny_config(dir.path());
    app.config_mut().train.sample_prompts = vec!["What color is the sky ?".into()];
    let mut harness = window(app, DEFAULT_SIZE);
    harness.get_by_label("Try").click();
    harness.step();
    wait_until(&mut harness, "the dataset's prompts", |app| !app.try_view.is_reading_dataset());
    let try_view = &harness.state().try_view;
    assert_eq!(try_view.prompt, "What color is the sky ?", "the first sample prompt");
    assert_eq!(
        try_view.suggestions[..3],
        ["What color is the sky ?", "What color is the owl ?", "What color is the ant ?"].map(String::from)
    );
    assert_eq!(try_view.suggestions.len(), 6);
    // picked from the list
    harness
        .query_all_by_label("Suggested prompts")
        .find(|n| n.accesskit_node().role() == egui::accesskit::Role::ComboBox)
        .expect("the list of prompts")
        .click();
    // the list opens a frame later
    harness.step();
    harness.step();
    harness.get_by_label("Name the color of the eel .").click();
    harness.step();
    assert_eq!(harness.state().try_view.prompt, "Name the color of the eel .");
}

/// "Save config…" with a path that is not UTF-8 and a settings file that cannot be written: a
/// message in the status line, not a panic and not silence.
#[cfg(unix)]
#[test]
fn unsaveable_configs_and_settings_say_so() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let mut app = StudioApp::new(None);
    app.config_mut().train.output_dir = dir.path().join(std::ffi::OsStr::from_bytes(b"run-\xff"));
    app.save_config_to(&dir.path().join("run.toml"));
    let (is_error, message) = app.status.clone().unwrap();
    assert!(is_error && message.contains("train.output_dir") && message.contains("UTF-8"), "{message}");
    assert!(!dir.path().join("run.toml").exists());

    // the settings file under a path whose "folder" is a file
    let blocker = dir.path().join("not-a-folder");
    std::fs::write(&blocker, "").unwrap();
    let mut app = StudioApp::new(Some(blocker.join("settings.toml")));
    app.config_mut().lora.r = 24;
    app.save_settings();
    let (is_error, message) = app.status.clone().expect("a message");
    assert!(is_error && message.contains("could not be saved") && message.contains("not-a-folder"), "{message}");
}

/// A run the memory plan refused offers "Start anyway": it starts that run once ignoring the
/// estimate, and leaves the setting as it was.
#[test]
fn a_refused_run_can_be_started_anyway() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = StudioApp::new(None);
    *app.config_mut() = tiny_config(dir.path());
    app.refresh_model_info();
    let end = RunFinished { step: 0, stopped: false, checkpoint: None, train_loss: None, validation_loss: None };
    let mut refused = RunView::from_history(app.config().clone(), &[], &[], end);
    refused.state = RunState::Failed(format!(
        "{} the largest micro-batch, 2 × 64 tokens, needs about 90 GiB, more than the 20 GiB of available RAM",
        qlora_studio::train::memory_plan::REFUSED
    ));
    app.run = Some(refused);
    let mut harness = window(app, DEFAULT_SIZE);
    wait_until(&mut harness, "the dataset preview", |app| app.data_view.preview.is_some() && !app.data_view.is_busy());
    harness.get_by_label("Start anyway").click();
    wait_until(&mut harness, "the run to end", |app| {
        app.run.as_ref().is_some_and(|r| !r.is_active() && !matches!(r.state, RunState::Failed(_)))
    });
    let run = harness.state().run.as_ref().unwrap();
    assert!(run.config.train.ignore_memory_estimate, "the run started ignoring the estimate");
    assert!(matches!(&run.state, RunState::Finished(f) if f.step == 3), "{:?}", run.state);
    assert!(!harness.state().config().train.ignore_memory_estimate, "the setting is unchanged");
    assert!(harness.query_by_label("Start anyway").is_none(), "no offer once the run started");
}

/// A run handed to LLaMA-Factory and brought back (its output folder: a PEFT adapter and
/// trainer_state.json / trainer_log.jsonl) is a card of the Runs tab like ours: its steps, its
/// loss curve to compare, Export; not resumable here.
#[test]
fn a_run_trained_by_llamafactory_opens_in_the_runs_tab() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("llamafactory");
    common::copy_dir(&repo.join("tests/data/handoff/returned/llamafactory"), &job);
    let config = job.join("qlora-studio-run.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace("../../../../../", &format!("{}/", repo.display()));
    std::fs::write(&config, text).unwrap();

    let mut app = StudioApp::new(None);
    app.settings.runs = vec![job.join("output")];
    let mut harness = window(app, DEFAULT_SIZE);
    harness.get_by_label("Runs").click();
    harness.step();
    wait_until(&mut harness, "the run history", |app| !app.records_loading());
    assert!(harness.query_by_label("trained by LLaMA-Factory").is_some(), "the card names the tool");
    assert!(harness.query_by_label("4/4").is_some(), "the card shows the run's steps");
    harness.get_by_label("Compare").click();
    harness.step();
    assert!(harness.query_by_label("Training loss of the compared runs").is_some(), "its loss curve");
    harness.get_by_label("Export…").click();
    harness.step();
    assert_eq!(harness.state().tab, Tab::Export);
    assert_eq!(harness.state().export.checkpoint.path(), Some(job.join("output")), "its adapter is what Export reads");
}

/// A run that fits no device here: the Memory panel says how many cards of each size it needs
/// under ZeRO and offers the handoff, whose panel writes the job.
#[test]
fn the_memory_panel_offers_a_handoff_when_nothing_here_fits() {
    let tmp = tempfile::tempdir().unwrap();
    let mut app = StudioApp::new(None);
    app.config_mut().model.source = "meta-llama/Llama-2-70b-hf".into();
    app.config_mut().model.mode = qlora_studio::train::Mode::Lora;
    app.config_mut().data.max_length = 4096;
    app.config_mut().train.batch_size = 1;
    app.refresh_model_info();
    let mut harness = window(app, DEFAULT_SIZE);
    wait_until(&mut harness, "the estimate", |app| app.memory_view.estimate.is_some());
    assert!(!harness.state().memory_view.cards.is_empty(), "no offer for a run that fits nowhere here");
    assert!(harness.query_by_label_contains("On several GPUs").is_some());
    let cards = harness.state().memory_view.cards.clone();
    assert_eq!(cards.len(), 3, "{cards:?}");
    assert!(
        cards.iter().all(|c| c.needs.is_some_and(|(n, _, _)| n > 1)),
        "a 70B LoRA at 4096 tokens needs several cards: {cards:?}"
    );
    assert_eq!(harness.query_all_by_label_contains(" cards: ").count(), 3, "how many cards of each size it needs");
    // at the foot of the settings column: brought into view first
    harness.get_by_label("Hand off to LLaMA-Factory or axolotl…").scroll_to_me();
    harness.step();
    harness.get_by_label("Hand off to LLaMA-Factory or axolotl…").click_accesskit();
    harness.step();
    assert!(harness.state().handoff.open, "the offer opens the handoff panel");

    // the demo run, written as a job from the panel
    *harness.state_mut().config_mut() = qlora_studio::gui::app::demo_config();
    harness.state_mut().handoff.out = tmp.path().join("job").display().to_string();
    harness.state_mut().handoff.copy_model = true;
    harness.step();
    harness.get_by_label("Write the LLaMA-Factory job").scroll_to_me();
    harness.step();
    harness.get_by_label("Write the LLaMA-Factory job").click();
    harness.step();
    wait_until(&mut harness, "the job", |app| !app.handoff.busy());
    assert!(
        matches!(&harness.state().handoff.result, Some(Ok(s)) if s.contains("launch.sh")),
        "{:?}",
        harness.state().handoff.result
    );
    assert!(tmp.path().join("job/llamafactory.yaml").is_file() && tmp.path().join("job/model/config.json").is_file());
}
