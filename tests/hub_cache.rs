//! The Hugging Face cache laid out by the test itself (blobs, snapshot symlinks, refs), no
//! network: listing with family, size and completeness; resolving a hub id from the cache;
//! a download that cannot reach the hub; folder checks with errors that say what is missing.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use qlora_studio::hub::{self, DownloadOptions, ResolveOptions, SourceKind};
use qlora_studio::model::{BaseWeights, Model};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// `<cache>/models--<owner>--<name>` with the files as blobs and the snapshot as links to them.
fn cache_repo(cache: &Path, repo_id: &str, files: &[(&str, Vec<u8>)], main: bool) -> PathBuf {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for (i, (name, data)) in files.iter().enumerate() {
        let blob = repo.join("blobs").join(format!("blob{i:04}"));
        std::fs::write(&blob, data).unwrap();
        link(&Path::new("../../blobs").join(format!("blob{i:04}")), &snapshot.join(name), &blob);
    }
    if main {
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    }
    snapshot
}

#[cfg(unix)]
fn link(relative: &Path, at: &Path, _blob: &Path) {
    std::os::unix::fs::symlink(relative, at).unwrap();
}

#[cfg(not(unix))]
fn link(_relative: &Path, at: &Path, blob: &Path) {
    std::fs::copy(blob, at).unwrap();
}

fn model_files() -> Vec<(&'static str, Vec<u8>)> {
    let fixture = common::fixture("models/llama");
    vec![
        ("config.json", std::fs::read(fixture.join("config.json")).unwrap()),
        ("model.safetensors", std::fs::read(fixture.join("model.safetensors")).unwrap()),
        ("tokenizer.json", b"{}".to_vec()),
        ("tokenizer_config.json", b"{}".to_vec()),
    ]
}

fn offline(cache: &Path) -> ResolveOptions {
    ResolveOptions { hf_cache: cache.to_path_buf(), app_cache: cache.join("app"), download: None, progress: None }
}

#[test]
fn lists_cached_models_with_family_size_and_completeness() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path();
    let files = model_files();
    let size: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    cache_repo(cache, "test-org/tiny-llama", &files, true);
    // an interrupted download: weights not linked yet, a blob still .incomplete
    let partial = cache_repo(cache, "test-org/partial", &files[..1], true);
    std::fs::write(partial.join("../../blobs/abc.incomplete"), b"half").unwrap();
    std::fs::create_dir_all(cache.join("datasets--x--y/snapshots")).unwrap(); // not a model

    let models = hub::list_cached_models(cache).unwrap();
    assert_eq!(models.len(), 2, "{models:?}");
    let tiny = &models[1];
    assert_eq!(tiny.repo_id, "test-org/tiny-llama");
    assert_eq!(tiny.revision, COMMIT);
    assert_eq!(tiny.refs, ["main"]);
    assert_eq!(tiny.family.as_deref(), Some("LLaMA"));
    assert_eq!(tiny.size_bytes, size);
    assert!(tiny.complete, "{:?}", tiny.problem);
    let part = &models[0];
    assert_eq!(part.repo_id, "test-org/partial");
    assert!(!part.complete);
    assert!(part.problem.as_deref().unwrap().contains("safetensors"), "{:?}", part.problem);

    assert!(hub::list_cached_models(&cache.join("missing")).unwrap().is_empty());
}

#[test]
fn a_hub_id_resolves_from_the_cache_and_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let snapshot = cache_repo(tmp.path(), "test-org/tiny-llama", &model_files(), true);
    for id in ["test-org/tiny-llama", "test-org/tiny-llama@main", &format!("test-org/tiny-llama@{COMMIT}")] {
        let resolved = hub::resolve_with(id, &offline(tmp.path())).unwrap();
        assert_eq!(resolved.dir, snapshot);
        assert_eq!(
            resolved.kind,
            SourceKind::HubCache { repo_id: "test-org/tiny-llama".into(), revision: COMMIT.into() }
        );
        assert_eq!(resolved.check.family, "llama");
    }
    let resolved = hub::resolve_with("test-org/tiny-llama", &offline(tmp.path())).unwrap();
    let model = Model::load(&resolved.dir, BaseWeights::Dense(DType::F32), &Device::Cpu).unwrap();
    assert_eq!(model.spec.family, "llama");

    // a folder path resolves to itself
    let as_folder = hub::resolve_with(snapshot.to_str().unwrap(), &offline(tmp.path())).unwrap();
    assert_eq!(as_folder.kind, SourceKind::Folder);
}

#[test]
fn without_network_the_error_says_so_and_names_the_local_options() {
    let tmp = tempfile::tempdir().unwrap();
    // a port nothing listens on stands for an unreachable hub
    let options = ResolveOptions {
        download: Some(DownloadOptions {
            endpoint: Some("http://127.0.0.1:9".into()),
            retries: Some(0),
            ..Default::default()
        }),
        ..offline(tmp.path())
    };
    let err = hub::resolve_with("test-org/not-cached", &options).unwrap_err().to_string();
    assert!(err.contains("no network"), "{err}");
    assert!(err.contains("test-org/not-cached") && err.contains(".gguf") && err.contains("folder"), "{err}");

    // the background form reports the same error from its thread
    let (events, handle) = hub::spawn_download(
        "test-org/not-cached".into(),
        None,
        tmp.path().to_path_buf(),
        DownloadOptions { endpoint: Some("http://127.0.0.1:9".into()), retries: Some(0), ..Default::default() },
    );
    let err = handle.join().unwrap().unwrap_err().to_string();
    assert!(err.contains("no network"), "{err}");
    assert!(events.try_iter().all(|e| !matches!(e, hub::DownloadEvent::Finished { .. })));

    let err = hub::resolve_with("test-org/not-cached", &offline(tmp.path())).unwrap_err().to_string();
    assert!(err.contains("not (completely) in the Hugging Face cache"), "{err}");
}

#[test]
fn folder_checks_name_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    let check = |d: &Path| hub::check_folder(d).unwrap_err().to_string();
    assert!(check(&dir).contains("no config.json"));
    std::fs::copy(common::fixture("models/llama/config.json"), dir.join("config.json")).unwrap();
    assert!(check(&dir).contains("no safetensors weights"));
    std::fs::write(dir.join("pytorch_model.bin"), b"").unwrap();
    assert!(check(&dir).contains("pytorch_model.bin"));
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    std::fs::write(dir.join("model-00001-of-00002.safetensors"), b"").unwrap();
    let err = check(&dir);
    assert!(err.contains("model-00002-of-00002.safetensors") && err.contains("incomplete"), "{err}");
    std::fs::write(dir.join("model-00002-of-00002.safetensors"), b"").unwrap();
    assert!(check(&dir).contains("no tokenizer.json"));
    // a GPT-2 style slow tokenizer alone: the error says how to make tokenizer.json from it
    std::fs::write(dir.join("vocab.json"), b"{}").unwrap();
    let err = check(&dir);
    assert!(err.contains("no tokenizer.json") && err.contains("save_pretrained(folder)"), "{err}");
    std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
    let ok = hub::check_folder(&dir).unwrap();
    assert_eq!(ok.weight_files.len(), 2);
    assert!(!ok.has_tokenizer_config && !ok.has_generation_config);

    let err = hub::resolve_with(tmp.path().join("nothing-here").to_str().unwrap(), &offline(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a hub id"), "{err}");
}

#[test]
fn a_download_lands_in_the_cache_with_progress_and_is_not_fetched_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let files: Vec<(String, Vec<u8>)> = model_files().into_iter().map(|(n, d)| (n.to_string(), d)).collect();
    let total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    let hub = common::fake_hub::serve("test-org/tiny", files, 4, std::time::Duration::from_millis(1));
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = events.clone();
    let options = ResolveOptions {
        download: Some(DownloadOptions {
            endpoint: Some(hub.endpoint.clone()),
            retries: Some(0),
            ..Default::default()
        }),
        progress: Some(std::sync::Arc::new(move |e| sink.lock().unwrap().push(e))),
        ..offline(tmp.path())
    };
    let resolved = hub::resolve_with("test-org/tiny", &options).unwrap();
    assert_eq!(resolved.kind, SourceKind::HubDownload { repo_id: "test-org/tiny".into() });
    assert_eq!(resolved.check.family, "llama");
    assert!(resolved.dir.ends_with(format!("models--test-org--tiny/snapshots/{}", common::fake_hub::COMMIT)));
    Model::load(&resolved.dir, BaseWeights::Dense(DType::F32), &Device::Cpu).unwrap();

    let events = events.lock().unwrap().clone();
    assert_eq!(events.first(), Some(&hub::DownloadEvent::Started { files: 4, bytes: total }), "{events:?}");
    let last_progress = events.iter().rev().find_map(|e| match e {
        hub::DownloadEvent::Progress { bytes_done, files_done, .. } => Some((*bytes_done, *files_done)),
        _ => None,
    });
    assert_eq!(last_progress, Some((total, 4)), "{events:?}");
    assert!(matches!(events.last(), Some(hub::DownloadEvent::Finished { .. })));
    assert_eq!(hub.bodies_sent.load(std::sync::atomic::Ordering::SeqCst), 4);

    // the second time it comes from the cache, even with the hub reachable
    let again = hub::resolve_with("test-org/tiny", &options).unwrap();
    assert!(matches!(again.kind, SourceKind::HubCache { .. }));
    assert_eq!(again.dir, resolved.dir);
    assert_eq!(hub.bodies_sent.load(std::sync::atomic::Ordering::SeqCst), 4);
    let listed = hub::list_cached_models(tmp.path()).unwrap();
    assert!(listed.iter().any(|m| m.repo_id == "test-org/tiny" && m.complete));
}

#[test]
fn a_cancelled_download_stops_at_once_and_the_next_one_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let files: Vec<(String, Vec<u8>)> = model_files().into_iter().map(|(n, d)| (n.to_string(), d)).collect();
    // each body takes 20 s to send, far longer than the cancel may take
    let slow = common::fake_hub::serve("test-org/tiny", files.clone(), 200, std::time::Duration::from_millis(100));
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::unbounded();
    let options = ResolveOptions {
        download: Some(DownloadOptions {
            endpoint: Some(slow.endpoint.clone()),
            token: None,
            retries: Some(0),
            cancel: Some(cancel.clone()),
        }),
        progress: Some(std::sync::Arc::new(move |e| _ = tx.send(e))),
        ..offline(tmp.path())
    };
    let worker = {
        let options = options.clone();
        std::thread::spawn(move || hub::resolve_with("test-org/tiny", &options).map(|r| r.dir))
    };
    // bytes are arriving: cancel
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !matches!(rx.recv_deadline(deadline), Ok(hub::DownloadEvent::Progress { bytes_done, .. }) if bytes_done > 0) {
        assert!(std::time::Instant::now() < deadline, "no progress from the hub");
    }
    let asked = std::time::Instant::now();
    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    let err = worker.join().unwrap().unwrap_err().to_string();
    assert!(asked.elapsed() < std::time::Duration::from_secs(5), "cancel took {:?}", asked.elapsed());
    assert!(err.contains("cancelled") && err.contains("test-org/tiny"), "{err}");
    let cached = hub::hf_cache::find_cached(tmp.path(), "test-org/tiny", None).unwrap();
    assert!(cached.is_none_or(|c| !c.complete), "a cancelled download is not a complete snapshot");

    // a later download (a fast hub this time) completes into the same cache
    let fast = common::fake_hub::serve("test-org/tiny", files, 1, std::time::Duration::ZERO);
    let options = ResolveOptions {
        download: Some(DownloadOptions { endpoint: Some(fast.endpoint.clone()), ..Default::default() }),
        progress: None,
        ..offline(tmp.path())
    };
    let resolved = hub::resolve_with("test-org/tiny", &options).unwrap();
    Model::load(&resolved.dir, BaseWeights::Dense(DType::F32), &Device::Cpu).unwrap();
}
