//! The application driven as a user would, in-process with egui_kittest: choose a model and a
//! dataset, change rank and targets, start a run, watch the loss plot fill, stop it.

mod common;

use std::time::{Duration, Instant};

use common::gui::wait_until;
use common::tiny_llama::TinyLlama;
use eframe::egui;
use egui_kittest::kittest::{by, NodeT, Queryable};
use egui_kittest::Harness;
use qlora_studio::gui::run_view::RunState;
use qlora_studio::gui::source_view::{SourceState, SourceView};
use qlora_studio::gui::StudioApp;
use qlora_studio::hub::{DownloadOptions, ResolveOptions};
use qlora_studio::train::Checkpointing;

/// The app in a 1400×900 window, after its first frame; drawn with the bundled font subset, which
/// must cover every glyph the app draws (kittest panics on a missing one).
fn window(mut app: StudioApp) -> Harness<'static, StudioApp> {
    app.system_fonts = false;
    let mut harness = Harness::builder()
        .with_size(egui::vec2(1400.0, 900.0))
        .build_ui_state(|ui, app: &mut StudioApp| app.show(ui), app);
    harness.step();
    harness
}

fn trainable_label(harness: &Harness<'_, StudioApp>) -> String {
    {
        let node = harness.get_by_label_contains("Trainable parameters");
        let n = node.accesskit_node();
        n.label().or_else(|| n.value()).unwrap_or_default()
    }
}

/// On the Export tab: pick `format`, press "Export as…" with `target` standing in for the save
/// dialog, wait for the worker, and return what the tab reports.
fn export_through_dialog(
    harness: &mut Harness<'_, StudioApp>,
    format: &str,
    target: &std::path::Path,
) -> Result<String, String> {
    harness.state_mut().export_target = Some(target.to_path_buf());
    harness.get_by_label(format).click();
    harness.step();
    harness.get_by_label("Export as…").click();
    harness.step();
    assert!(harness.state().export.is_busy() || harness.state().export.result.is_some());
    wait_until(harness, "the export", |app| !app.export.is_busy());
    harness.state_mut().export.poll();
    harness.step();
    harness.state().export.result.clone().expect("an export result")
}

#[test]
fn choose_tune_start_watch_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/colors.jsonl");
    let text = std::fs::read_to_string(&data).unwrap();
    let model_dir = dir.path().join("model");
    TinyLlama::default().write(&model_dir, &[text, "### Instruction : Response :".into()]);

    let mut app = StudioApp::new(None);
    {
        let c = app.config_mut();
        c.model.source = model_dir.display().to_string();
        // no targets chosen: the picker fills in the family's default
        c.lora.targets = Vec::new();
        c.lora.r = 8;
        c.data.path = data;
        c.data.max_length = 64;
        c.train.max_steps = 500;
        c.train.batch_size = 2;
        c.train.learning_rate = 5e-3;
        c.train.probe = false;
        c.train.output_dir = dir.path().join("out");
    }
    app.refresh_model_info();
    let mut harness = window(app);
    // the dataset preview is made on a worker thread; once in, it shows the rendered examples
    wait_until(&mut harness, "the dataset preview", |app| app.data_view.preview.is_some() && !app.data_view.is_busy());
    let preview = harness.state().data_view.preview.clone().unwrap().expect("a preview");
    assert_eq!(preview.records, 24);
    assert!(preview.examples.iter().all(|e| e.segments.iter().any(|s| s.trained)));
    assert!(harness.query_by_label_contains("24 records").is_some());

    // the picker was filled from the checkpoint, with LLaMA's default targets ticked
    assert_eq!(harness.state().config().lora.targets, vec!["q_proj".to_string(), "v_proj".to_string()]);
    let before = trainable_label(&harness);
    let estimate =
        |h: &Harness<'_, StudioApp>| h.state().memory_view.estimate.clone().expect("an estimate").expect("no error");
    let estimate_before = estimate(&harness);
    assert!(estimate_before.low <= estimate_before.mid && estimate_before.mid <= estimate_before.high);
    assert!(harness.query_all_by_label_contains("fits: ").next().is_some(), "a fits / does not fit verdict");
    // per layer r·(in+out): q 8·128 + v 8·96 = 1792, two layers
    assert!(before.contains("3.6 K"), "{before}");

    // tick k_proj: the count grows by 8·(64+32)·2 = 1536
    harness.get_by_label_contains("k_proj").click_accesskit();
    harness.step();
    assert!(harness.state().config().lora.targets.contains(&"k_proj".to_string()));
    let with_k = trainable_label(&harness);
    assert!(with_k.contains("5.1 K"), "{with_k}");

    // rank 8 → 16 through the slider doubles it
    harness.get_all_by_role(egui::accesskit::Role::Slider).next().expect("the rank slider").set_value_accesskit(16.0);
    harness.step();
    harness.step();
    assert_eq!(harness.state().config().lora.r, 16);
    let rank16 = trainable_label(&harness);
    assert!(rank16.contains("10.2 K"), "{rank16}");
    // the estimate follows: more LoRA parameters, more memory
    let estimate_after = estimate(&harness);
    assert!(estimate_after.trainable_params > estimate_before.trainable_params);
    assert!(estimate_after.mid > estimate_before.mid);

    // gradient checkpointing: "auto" leaves it off for a run that fits; switched on, the
    // estimate says so and the run below recomputes its blocks
    assert_eq!(harness.state().config().train.gradient_checkpointing, Checkpointing::Auto);
    assert!(harness.query_by_label("Gradient checkpointing: off").is_some());
    harness.get_by_label("Training").click_accesskit();
    harness.step();
    let switch = |h: &Harness<'_, StudioApp>| {
        h.get_by_label("Gradient checkpointing").accesskit_node().value().unwrap_or_default().to_string()
    };
    assert_eq!(switch(&harness), "auto (on a GPU; on the CPU when it would not fit otherwise)");
    harness.state_mut().config_mut().train.gradient_checkpointing = Checkpointing::On;
    harness.step();
    harness.step();
    assert_eq!(switch(&harness), "on");
    assert_eq!(harness.state().config().train.gradient_checkpointing, Checkpointing::On);
    assert!(harness.state().memory_view.input.as_ref().is_some_and(|i| i.checkpointing));
    assert!(harness.query_by_label("Gradient checkpointing: on").is_some());

    // start: the loss plot gains points
    harness.get_by_label_contains("Start").click();
    harness.step();
    wait_until(&mut harness, "three steps", |app| app.run.as_ref().is_some_and(|r| r.steps.len() >= 3));
    assert!(harness.query_by_label("Loss").is_some());

    // Simplified Chinese renders (with the bundled subset) and labels change
    harness.state_mut().settings.lang = qlora_studio::gui::i18n::Lang::Zh;
    harness.step();
    assert!(harness.query_by_label("停止").is_some());
    harness.state_mut().settings.lang = qlora_studio::gui::i18n::Lang::En;
    harness.step();

    // stop: the run ends at the step it was on, with a checkpoint
    harness.get_by_label("Stop").click();
    wait_until(&mut harness, "the run to stop", |app| app.run.as_ref().is_some_and(|r| !r.is_active()));
    let run = harness.state().run.as_ref().unwrap();
    let RunState::Finished(end) = &run.state else { panic!("{:?}", run.state) };
    assert!(end.stopped && end.step >= 3 && end.step < 500, "{end:?}");
    assert!(end.checkpoint.as_ref().is_some_and(|p| p.join("adapter_model.safetensors").is_file()));
    let stopped_at = end.step;

    // try: the same prompt without and with the adapter of the last checkpoint
    harness.get_by_label("Try").click();
    harness.step();
    // the suggested prompts arrive from a worker and move the Generate button down: wait for
    // them, or the click lands where the button was
    wait_until(&mut harness, "the suggested prompts", |app| !app.try_view.is_reading_dataset());
    harness.step();
    harness.state_mut().try_view.prompt = "What color is the cat ?".into();
    harness.state_mut().try_view.max_tokens = 4;
    harness.step();
    harness.get_by_label("Generate").click();
    harness.step();
    wait_until(&mut harness, "generation", |app| app.try_view.answers.is_some());
    let (base, tuned) = harness.state().try_view.answers.clone().unwrap();
    assert!(base.is_ok(), "{base:?}");
    assert!(tuned.expect("an adapter answer").is_ok());

    // export through the save dialog's injected path: a GGUF adapter with its Modelfile
    let gguf = dir.path().join("exported/adapter.gguf");
    std::fs::create_dir_all(gguf.parent().unwrap()).unwrap();
    harness.get_by_label("Export").click();
    harness.step();
    let text = export_through_dialog(&mut harness, "GGUF adapter (llama.cpp, Ollama)", &gguf).unwrap();
    assert!(text.contains("adapter.gguf") && text.contains("KiB"), "{text}");
    assert!(harness.query_by_label_contains("Exported to").is_some());
    let bytes = std::fs::read(&gguf).unwrap();
    assert_eq!(&bytes[..4], b"GGUF");
    assert!(gguf.with_file_name("Modelfile").is_file());

    // and a PEFT adapter folder
    let peft = dir.path().join("exported/peft");
    assert!(export_through_dialog(&mut harness, "PEFT adapter", &peft).is_ok());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["r"], 16);
    assert_eq!(config["peft_type"], "LORA");

    // a merged GGUF in Q8_0: this test model's word-level tokenizer has no llama.cpp form, so the
    // tab shows the refusal, names the file, and writes nothing
    harness.get_by_label("Merged model as one GGUF (llama.cpp, Ollama)").click();
    harness.step();
    harness.get_by_label("Q8_0").click();
    harness.step();
    let merged_gguf = dir.path().join("exported/merged.gguf");
    let e = export_through_dialog(&mut harness, "Merged model as one GGUF (llama.cpp, Ollama)", &merged_gguf);
    let e = e.unwrap_err();
    assert!(e.contains("tokenizer.json") && e.contains("byte-level BPE"), "{e}");
    assert!(!merged_gguf.exists());
    assert_eq!(std::fs::read_dir(merged_gguf.parent().unwrap()).unwrap().count(), 3, "only the earlier exports");

    // the run is in the history: compared, reopened with its curve, resumed from its checkpoint
    harness.get_by_label("Runs").click();
    harness.step();
    wait_until(&mut harness, "the run history", |app| !app.records_loading());
    assert!(harness.query_by_label("out").is_some(), "the run's folder is listed");
    assert!(harness.query_by_label(&format!("{stopped_at}/500")).is_some(), "its step count is listed");
    harness.get_by_label("Compare").click();
    harness.step();
    // the plot, named by its title
    let plot = harness.get_by_label("Training loss of the compared runs");
    assert_eq!(plot.accesskit_node().role(), egui::accesskit::Role::Unknown, "a comparison plot");
    harness.get_by_label("Reopen").click();
    harness.step();
    let reopened = harness.state().run.as_ref().unwrap();
    assert_eq!(harness.state().tab, qlora_studio::gui::app::Tab::Run);
    assert_eq!(reopened.steps.len(), stopped_at, "the curve of every step is back");
    assert!(!reopened.is_active());

    harness.get_by_label("Runs").click();
    harness.step();
    wait_until(&mut harness, "the run history", |app| !app.records_loading());
    harness.get_by_label("Resume from last checkpoint").click();
    harness.step();
    wait_until(&mut harness, "a step after the resume", |app| {
        app.run.as_ref().is_some_and(|r| r.steps.last().is_some_and(|s| s.step > stopped_at))
    });
    let resumed = harness.state().run.as_ref().unwrap();
    assert_eq!(resumed.steps.first().map(|s| s.step), Some(stopped_at + 1), "it goes on from the checkpoint");
    harness.get_by_label("Stop").click();
    wait_until(&mut harness, "the resumed run to stop", |app| app.run.as_ref().is_some_and(|r| !r.is_active()));

    // the history shows the run's peak memory, and sends its checkpoint to the Export tab
    harness.get_by_label("Runs").click();
    harness.step();
    wait_until(&mut harness, "the run history", |app| !app.records_loading());
    assert!(harness.query_all_by_label_contains("(RSS)").next().is_some(), "a peak memory reading");
    harness.get_by_label("Export…").click();
    harness.step();
    assert_eq!(harness.state().tab, qlora_studio::gui::app::Tab::Export);
    let latest = qlora_studio::train::checkpoint::latest(&dir.path().join("out")).unwrap();
    assert_eq!(harness.state().export.checkpoint.path(), Some(latest.clone()));

    // a new start never writes over that run: it goes to the next free folder and says so
    harness.get_by_label_contains("Start").click();
    harness.step();
    harness.step();
    assert_eq!(harness.state().config().train.output_dir, dir.path().join("out-2"));
    assert!(harness.query_by_label_contains("holds an earlier run").is_some());
    harness.get_by_label("Stop").click();
    wait_until(&mut harness, "the new run to stop", |app| app.run.as_ref().is_some_and(|r| !r.is_active()));
    assert_eq!(qlora_studio::train::checkpoint::latest(&dir.path().join("out")), Some(latest));
}

#[test]
fn a_hub_id_is_estimated_from_its_preset_then_downloaded_with_a_progress_bar() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    TinyLlama::default().write(&model_dir, &["the cat is red".into()]);
    let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&model_dir)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().to_string(), std::fs::read(e.path()).unwrap()))
        .collect();
    let file_count = files.len();
    // a hub too slow to finish (20 s a file), for Cancel
    let stuck = common::fake_hub::serve("test-org/tiny-llama", files.clone(), 200, Duration::from_millis(100));
    // slow bodies, so the bar is on screen for a few frames
    let hub = common::fake_hub::serve("test-org/tiny-llama", files, 10, Duration::from_millis(30));

    let mut app = StudioApp::new(None);
    app.source = SourceView::new(ResolveOptions {
        hf_cache: dir.path().join("hub"),
        app_cache: dir.path().join("app"),
        download: Some(DownloadOptions {
            endpoint: Some(hub.endpoint.clone()),
            retries: Some(0),
            ..Default::default()
        }),
        progress: None,
    });
    app.config_mut().model.source = "meta-llama/Llama-2-7b-hf".into();
    app.config_mut().model.device = "cuda:0".into();
    app.config_mut().lora.targets = Vec::new();
    let mut harness = window(app);

    // a well-known checkpoint not downloaded: offered for download, estimated from its config
    assert!(matches!(harness.state().source.state, SourceState::NotDownloaded { .. }));
    assert!(harness.query_by_label_contains("not in the local Hugging Face cache").is_some());
    // described from its published config: q_proj, v_proj ticked, 16·(4096+4096)·2·32 trainable
    let described = harness.state().source.described().unwrap().as_ref().unwrap().clone();
    assert_eq!((described.family_id.as_str(), described.spec.layers), ("llama2", 32));
    assert_eq!(harness.state().config().lora.targets, vec!["q_proj".to_string(), "v_proj".to_string()]);
    assert!(harness.query_by_label_contains("Trainable parameters: 8.39 M").is_some());
    // the dataset preview needs the model's tokenizer, so it waits for the download
    assert!(harness.query_by_label_contains("The preview comes once the model is local").is_some());
    let estimate = harness.state().memory_view.estimate.clone().unwrap().expect("an estimate from the preset");
    // 7B in NF4 is over 3.5 GB of weights alone
    assert!(estimate.mid > 3_500_000_000, "{}", estimate.mid);

    // an unknown hub id: no estimate until it is local, and the panel says so
    harness.state_mut().config_mut().model.source = "test-org/tiny-llama".into();
    harness.step();
    harness.step();
    assert!(harness.query_by_label_contains("The estimate comes once the model is local").is_some());

    // Cancel stops a download at once and offers it again
    harness.state_mut().source.options.download.as_mut().unwrap().endpoint = Some(stuck.endpoint.clone());
    harness.get_by_label("Download").click();
    wait_until(
        &mut harness,
        "bytes to arrive",
        |app| matches!(&app.source.state, SourceState::Working { progress: Some(p), .. } if p.bytes_done > 0),
    );
    harness.get_by_label("Cancel").click();
    let asked = Instant::now();
    wait_until(&mut harness, "the cancelled download to be offered again", |app| {
        matches!(app.source.state, SourceState::NotDownloaded { .. })
    });
    assert!(asked.elapsed() < Duration::from_secs(5), "cancel took {:?}", asked.elapsed());
    harness.step();

    harness.state_mut().source.options.download.as_mut().unwrap().endpoint = Some(hub.endpoint.clone());
    harness.get_by_label("Download").click();
    let start = Instant::now();
    let mut bar_seen = false;
    while !matches!(harness.state().source.state, SourceState::Ready { .. }) {
        assert!(start.elapsed() < Duration::from_secs(60), "download: {:?}", harness.state().source.state);
        if let SourceState::Failed { message, .. } = &harness.state().source.state {
            panic!("download failed: {message}");
        }
        harness.step();
        let progress = matches!(&harness.state().source.state, SourceState::Working { progress: Some(p), .. } if p.bytes_total > 0);
        bar_seen |= progress && harness.query_all_by_label_contains(" files ").next().is_some();
        std::thread::sleep(Duration::from_millis(10));
    }
    harness.step();
    assert!(bar_seen, "no progress bar while downloading");
    assert_eq!(hub.bodies_sent.load(std::sync::atomic::Ordering::SeqCst), file_count);

    // now described, with the family's targets and an estimate
    let info = harness.state().source.info().unwrap().as_ref().unwrap().clone();
    assert_eq!(info.family_id, "llama");
    assert_eq!(harness.state().config().lora.targets, vec!["q_proj".to_string(), "v_proj".to_string()]);
    assert!(harness.query_by_label_contains("Trainable parameters").is_some());
    assert!(harness.state().memory_view.estimate.clone().unwrap().is_ok());
}

/// The label of the widget that has the keyboard focus. A frame may lay out without it (a
/// worker's result arriving changes the panel), so a few frames are allowed for it to show.
fn focused_label(harness: &mut Harness<'_, StudioApp>) -> String {
    let mut nodes = Vec::new();
    for _ in 0..5 {
        nodes = harness
            .query_all(by().predicate(|n| n.is_focused()))
            .map(|n| n.accesskit_node().label().unwrap_or_default())
            .collect::<Vec<String>>();
        if nodes.len() == 1 {
            return nodes.remove(0);
        }
        harness.step();
    }
    panic!("one focused widget, not {nodes:?}");
}

/// Press Tab until the widget labelled `label` has the focus.
fn tab_to(harness: &mut Harness<'_, StudioApp>, label: &str) {
    for _ in 0..200 {
        harness.key_press(egui::Key::Tab);
        harness.step();
        if focused_label(harness) == label {
            return;
        }
    }
    panic!("Tab never reached {label}");
}

#[test]
fn the_keyboard_reaches_every_control_in_reading_order() {
    let app = StudioApp::new(None);
    let mut harness = window(app);
    wait_until(&mut harness, "the dataset preview", |app| app.data_view.preview.is_some() && !app.data_view.is_busy());

    // one full round of Tab: every stop is named, and the order is the page's reading order
    let mut stops = Vec::new();
    for _ in 0..200 {
        harness.key_press(egui::Key::Tab);
        harness.step();
        let label = focused_label(&mut harness);
        if stops.first() == Some(&label) {
            break;
        }
        stops.push(label);
    }
    assert!(stops.iter().all(|l| !l.is_empty()), "a focusable widget without a name: {stops:?}");
    let reading_order = [
        "Load config…",
        "Save config…",
        "Language",
        "Model",
        "From the table",
        "Size",
        "QLoRA (NF4)",
        "Dataset",
        "Max length",
        "LoRA",
        "Rank r",
        "Alpha",
        "Training",
        "Memory",
        "▶ Start",
        "Run",
        "Runs",
        "Try",
        "Export",
    ];
    let mut at = 0;
    for want in reading_order {
        let found = stops[at..].iter().position(|l| l == want);
        at += found.unwrap_or_else(|| panic!("{want:?} not reached after {:?}; the stops: {stops:?}", stops.get(at)));
    }
    // Shift+Tab goes back one stop
    tab_to(&mut harness, "Alpha");
    harness.key_press_modifiers(egui::Modifiers::SHIFT, egui::Key::Tab);
    harness.step();
    assert_eq!(focused_label(&mut harness), "Rank r");

    // values change from the keyboard: the rank's number field takes the arrow keys
    let r = harness.state().config().lora.r;
    harness.key_press(egui::Key::ArrowUp);
    harness.step();
    assert_eq!(harness.state().config().lora.r, r + 1);

    // a check box toggles with Space, a button presses with Enter
    tab_to(&mut harness, "Packing");
    let packing = harness.state().config().data.packing;
    harness.key_press(egui::Key::Space);
    harness.step();
    assert_eq!(harness.state().config().data.packing, !packing);
    // a plot keeps the focus while a new preview is made above it (its spinner comes and goes)
    let lengths = "Token lengths (the line is the max length)";
    wait_until(&mut harness, "the new preview", |app| !app.data_view.is_busy());
    tab_to(&mut harness, lengths);
    harness.state_mut().config_mut().data.packing ^= true;
    wait_until(&mut harness, "the next preview", |app| !app.data_view.is_busy());
    assert_eq!(focused_label(&mut harness), lengths);
    tab_to(&mut harness, "Runs");
    harness.key_press(egui::Key::Enter);
    harness.step();
    assert_eq!(harness.state().tab, qlora_studio::gui::app::Tab::Runs);
    assert!(harness.query_by_label("No runs yet.").is_some());
}

#[test]
fn settings_and_the_run_config_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("settings.toml");
    let app = StudioApp::new(Some(path.clone()));
    let mut harness = window(app);
    harness.state_mut().config_mut().lora.r = 24;
    harness.state_mut().settings.lang = qlora_studio::gui::i18n::Lang::Zh;
    // saved within a second of the change, without closing the window (a killed app keeps it)
    std::thread::sleep(Duration::from_millis(1100));
    harness.step();
    let again = StudioApp::new(Some(path.clone()));
    assert_eq!(again.config().lora.r, 24);
    assert_eq!(again.lang(), qlora_studio::gui::i18n::Lang::Zh);

    // a damaged settings file is not fatal and not lost: moved aside, the defaults, a message
    std::fs::write(&path, "lang = [").unwrap();
    let fresh = StudioApp::new(Some(path.clone()));
    assert_eq!(fresh.config().lora.r, qlora_studio::gui::app::demo_config().lora.r);
    assert_eq!(std::fs::read_to_string(dir.path().join("settings.toml.damaged")).unwrap(), "lang = [");
    let (is_error, message) = fresh.status.clone().unwrap();
    assert!(is_error && message.contains("settings.toml.damaged"), "{message}");
}

#[test]
fn a_gguf_file_is_imported_off_the_ui_thread_and_described() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    common::gguf_writer::write_gguf_from_fixture(&common::fixture("models/llama_gqa_all_linear"), &gguf, "llama");
    let options = ResolveOptions {
        hf_cache: dir.path().join("hub"),
        app_cache: dir.path().join("app"),
        download: None,
        progress: None,
    };
    let mut app = StudioApp::new(None);
    app.source = SourceView::new(options.clone());
    app.config_mut().model.source = gguf.display().to_string();
    let mut harness = window(app);
    let start = Instant::now();
    while !matches!(harness.state().source.state, SourceState::Ready { .. }) {
        assert!(start.elapsed() < Duration::from_secs(60), "import: {:?}", harness.state().source.state);
        harness.step();
        std::thread::sleep(Duration::from_millis(10));
    }
    harness.step();
    let info = harness.state().source.info().unwrap().as_ref().unwrap().clone();
    assert_eq!(info.family_id, "llama");
    assert!(info.dir.starts_with(dir.path().join("app/gguf")), "{}", info.dir.display());
    // the estimate reads the imported folder
    assert!(harness.state().memory_view.estimate.clone().unwrap().is_ok());

    // chosen again (a new launch), the earlier import is used at once
    let mut again = SourceView::new(options);
    again.update(&gguf.display().to_string());
    assert!(matches!(again.state, SourceState::Ready { .. }), "{:?}", again.state);
}
