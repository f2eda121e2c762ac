//! Hub downloads with hf-hub into the Hugging Face cache, with progress events.
//!
//! Resuming: hf-hub keeps every finished file (a blob in the cache) and skips it on the next
//! try, so an interrupted download continues with the files it had not finished; a file cut
//! off midway is fetched again from its start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hf_hub::progress::{DownloadEvent as HubEvent, FileStatus, ProgressEvent, ProgressHandler};
use hf_hub::{HFClientBuilder, HFError};

use crate::error::{Error, Result};

/// Progress of a download, for a progress bar.
#[derive(Debug, Clone, PartialEq)]
pub enum DownloadEvent {
    /// The hub answered; this many files and bytes will be fetched (files already in the
    /// cache included).
    Started {
        files: usize,
        bytes: u64,
    },
    /// Running totals; `file` is the file that just moved.
    Progress {
        bytes_done: u64,
        bytes_total: u64,
        files_done: usize,
        files_total: usize,
        file: String,
    },
    Finished {
        dir: PathBuf,
    },
}

/// Hub settings; `None` fields fall back to the environment (HF_ENDPOINT, HF_TOKEN or the
/// token file of `huggingface-cli login`).
#[derive(Debug, Clone, Default)]
pub struct DownloadOptions {
    pub endpoint: Option<String>,
    pub token: Option<String>,
    /// Retries after a failed request (hf-hub's default when `None`).
    pub retries: Option<usize>,
    /// Set to stop the download: requests in flight are dropped within a tenth of a second,
    /// finished files stay in the cache for the next try.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// The files a model needs: configs, tokenizer and safetensors weights (never .bin, .h5, .onnx
/// or GGUF copies, which would multiply the download).
pub const MODEL_FILE_PATTERNS: &[&str] = &["*.json", "*.safetensors", "tokenizer.model", "*.jinja"];

struct Tracker {
    state: Mutex<TrackerState>,
    on_event: Box<dyn Fn(DownloadEvent) + Send + Sync>,
}

#[derive(Default)]
struct TrackerState {
    files_total: usize,
    bytes_total: u64,
    /// file → (bytes done, finished)
    files: HashMap<String, (u64, bool)>,
    aggregate: u64,
}

impl ProgressHandler for Tracker {
    fn on_progress(&self, event: &ProgressEvent) {
        let ProgressEvent::Download(event) = event else { return };
        let Ok(mut s) = self.state.lock() else { return };
        let (mut last, mut started) = (String::new(), None);
        match event {
            HubEvent::Start { total_files, total_bytes } => {
                s.files_total = *total_files;
                s.bytes_total = *total_bytes;
                started = Some(DownloadEvent::Started { files: *total_files, bytes: *total_bytes });
            }
            HubEvent::Progress { files } => {
                for f in files {
                    let done = f.status == FileStatus::Complete;
                    s.files.insert(f.filename.clone(), (f.bytes_completed, done));
                    last = f.filename.clone();
                }
            }
            HubEvent::AggregateProgress { bytes_completed, .. } => s.aggregate = *bytes_completed,
            HubEvent::Complete => return,
        }
        let event = started.unwrap_or_else(|| {
            let per_file: u64 = s.files.values().map(|(b, _)| *b).sum();
            DownloadEvent::Progress {
                bytes_done: per_file.max(s.aggregate),
                bytes_total: s.bytes_total,
                files_done: s.files.values().filter(|(_, d)| *d).count(),
                files_total: s.files_total,
                file: last,
            }
        });
        drop(s);
        (self.on_event)(event);
    }
}

/// Download the model files of `repo_id` at `revision` (default `main`) into the Hugging Face
/// cache `cache` and return the snapshot folder. `on_event` gets the progress (from hf-hub's
/// thread: it must not block); a crossbeam `Sender::send` is a good one.
pub fn download(
    repo_id: &str,
    revision: Option<&str>,
    cache: &Path,
    options: &DownloadOptions,
    on_event: impl Fn(DownloadEvent) + Send + Sync + 'static,
) -> Result<PathBuf> {
    let mut builder = HFClientBuilder::new().cache_dir(cache);
    if let Some(e) = &options.endpoint {
        builder = builder.endpoint(e.clone());
    }
    if let Some(t) = &options.token {
        builder = builder.token(t.clone());
    }
    if let Some(n) = options.retries {
        builder = builder.retry_max_attempts(n);
    }
    let endpoint = options
        .endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok())
        .unwrap_or_else(|| "https://huggingface.co".into());
    let client = builder.build().map_err(|e| Error::Invalid(format!("hub client for {endpoint}: {e}")))?;
    let (owner, name) = hf_hub::split_id(repo_id);
    let tracker = Arc::new(Tracker { state: Mutex::new(TrackerState::default()), on_event: Box::new(on_event) });
    let progress: Arc<dyn ProgressHandler> = tracker.clone();
    let repository = client.model(owner, name);
    let snapshot = repository
        .snapshot_download()
        .maybe_revision(revision.map(str::to_string))
        .allow_patterns(MODEL_FILE_PATTERNS.iter().map(|p| p.to_string()).collect())
        .progress(progress)
        .send();
    // hf-hub's blocking client cannot be interrupted, so the async one runs on a runtime of
    // our own, raced against the cancel flag: dropping the download future drops its requests.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start the download runtime: {e}")))?;
    let cancel = options.cancel.clone().unwrap_or_default();
    let cancelled = async {
        while !cancel.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let outcome = runtime.block_on(async {
        match futures::future::select(Box::pin(snapshot), Box::pin(cancelled)).await {
            futures::future::Either::Left((outcome, _)) => Some(outcome),
            futures::future::Either::Right(_) => None,
        }
    });
    let Some(outcome) = outcome else {
        return Err(Error::Invalid(format!(
            "download of {repo_id} cancelled; the files it finished stay in {} and the next download skips them",
            cache.display()
        )));
    };
    let dir = outcome.map_err(|e| explain(e, repo_id, &endpoint, cache))?;
    (tracker.on_event)(DownloadEvent::Finished { dir: dir.clone() });
    Ok(dir)
}

/// `download` on a background thread, for the GUI: progress comes over the channel, the
/// snapshot folder (or the error) from the thread's handle.
pub fn spawn_download(
    repo_id: String,
    revision: Option<String>,
    cache: PathBuf,
    options: DownloadOptions,
) -> (crossbeam_channel::Receiver<DownloadEvent>, std::thread::JoinHandle<Result<PathBuf>>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let handle = std::thread::spawn(move || {
        download(&repo_id, revision.as_deref(), &cache, &options, move |e| {
            // the receiver may be gone (window closed): the download still completes
            let _ = tx.send(e);
        })
    });
    (rx, handle)
}

/// hf-hub's error as what happened and what the user can do.
fn explain(e: HFError, repo_id: &str, endpoint: &str, cache: &Path) -> Error {
    let local = format!(
        "use a local model folder, a .gguf file, or a model already in the Hugging Face cache ({})",
        cache.display()
    );
    Error::Invalid(match e {
        HFError::Request { .. } => format!(
            "cannot reach the Hugging Face hub at {endpoint} to download {repo_id}: no network ({e}). Offline, {local}; \
             HF_ENDPOINT selects a mirror"
        ),
        HFError::AuthRequired { .. } | HFError::Forbidden { .. } => format!(
            "{repo_id} needs a Hugging Face token with access to it (a gated model: accept its licence on the hub, \
             then set HF_TOKEN): {e}"
        ),
        HFError::RepoNotFound { .. } => {
            format!("{repo_id}: no such model on {endpoint} (a private one needs HF_TOKEN); check the spelling")
        }
        HFError::RevisionNotFound { .. } => format!("{repo_id}: {e}"),
        HFError::Io(io) => format!("writing the download of {repo_id} into {}: {io}", cache.display()),
        other => format!("downloading {repo_id} from {endpoint}: {other}; {local}"),
    })
}

#[cfg(test)]
mod tests {
    use hf_hub::progress::FileProgress;

    use super::*;

    fn file(name: &str, done: u64, total: u64, status: FileStatus) -> FileProgress {
        FileProgress { filename: name.into(), bytes_completed: done, total_bytes: total, status }
    }

    #[test]
    fn hub_progress_becomes_running_totals() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let tracker = Tracker {
            state: Mutex::new(TrackerState::default()),
            on_event: Box::new(move |e| sink.lock().unwrap().push(e)),
        };
        let send = |e: HubEvent| tracker.on_progress(&ProgressEvent::Download(e));
        send(HubEvent::Start { total_files: 2, total_bytes: 110 });
        send(HubEvent::Progress { files: vec![file("config.json", 10, 10, FileStatus::Complete)] });
        send(HubEvent::Progress { files: vec![file("model.safetensors", 40, 100, FileStatus::InProgress)] });
        send(HubEvent::Progress { files: vec![file("model.safetensors", 100, 100, FileStatus::Complete)] });
        send(HubEvent::Complete);
        let progress = |bytes_done, files_done, file: &str| DownloadEvent::Progress {
            bytes_done,
            bytes_total: 110,
            files_done,
            files_total: 2,
            file: file.into(),
        };
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                DownloadEvent::Started { files: 2, bytes: 110 },
                progress(10, 1, "config.json"),
                progress(50, 1, "model.safetensors"),
                progress(110, 2, "model.safetensors"),
            ]
        );
    }
}
