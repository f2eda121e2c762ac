//! The model source made usable, off the UI thread: a folder is read at once; a GGUF file is
//! imported on a worker; a hub id is looked up in the local cache and, when it is not there,
//! downloaded on the user's word with a progress bar. What comes out is the folder the model
//! panel describes and the memory estimate reads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Receiver;
use eframe::egui;

use super::app::human_bytes;
use super::i18n::{tr, tr_message, Lang};
use crate::hub::{self, DownloadEvent, ResolveOptions};
use crate::model::inspect::{inspect, inspect_config, ModelInfo};

/// Where the current source stands.
#[derive(Debug)]
pub enum SourceState {
    Empty,
    /// A model folder: given, found in the hub cache, imported or downloaded.
    Ready {
        dir: PathBuf,
        info: Box<Result<ModelInfo, String>>,
    },
    /// A GGUF import or a hub download is running.
    Working {
        what: &'static str,
        progress: Option<Progress>,
    },
    /// A hub id that is not (completely) in the local cache; for a well-known checkpoint, what
    /// it is from its published config.
    NotDownloaded {
        repo_id: String,
        preview: Option<Box<Result<ModelInfo, String>>>,
    },
    Failed {
        message: String,
        can_retry: bool,
    },
}

/// Running totals of a download, for the progress bar.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub files_done: usize,
    pub files_total: usize,
    pub file: String,
}

/// A worker making one source local. A download whose source is no longer the chosen one is
/// cancelled (the files it finished stay in the cache); an import runs to its end.
struct Job {
    source: String,
    events: Option<Receiver<DownloadEvent>>,
    /// Set by the Cancel button or a change of source; downloads only.
    cancel: Option<Arc<AtomicBool>>,
    handle: JoinHandle<Result<PathBuf, String>>,
}

impl Job {
    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// Ask a download to stop (an import has no flag and runs on).
    fn cancel(&self) {
        if let Some(cancel) = &self.cancel {
            cancel.store(true, Ordering::Relaxed);
        }
    }
}

pub struct SourceView {
    /// The caches and hub settings (tests point them at a folder of their own).
    pub options: ResolveOptions,
    source: String,
    pub state: SourceState,
    jobs: Vec<Job>,
}

impl Default for SourceView {
    fn default() -> Self {
        Self::new(ResolveOptions::default())
    }
}

impl SourceView {
    pub fn new(options: ResolveOptions) -> Self {
        Self { options, source: String::new(), state: SourceState::Empty, jobs: Vec::new() }
    }

    pub fn is_busy(&self) -> bool {
        matches!(self.state, SourceState::Working { .. })
    }

    /// The model's folder and what it holds, once there is one.
    pub fn info(&self) -> Option<&Result<ModelInfo, String>> {
        match &self.state {
            SourceState::Ready { info, .. } => Some(&**info),
            _ => None,
        }
    }

    /// What the model is: inspected when local, else from its published config (a well-known
    /// checkpoint not downloaded yet).
    pub fn described(&self) -> Option<&Result<ModelInfo, String>> {
        match &self.state {
            SourceState::NotDownloaded { preview: Some(preview), .. } => Some(&**preview),
            _ => self.info(),
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        match &self.state {
            SourceState::Ready { dir, .. } => Some(dir),
            _ => None,
        }
    }

    /// Follow `source`: pick up worker results and progress, and look at a changed source.
    /// Returns true when a model was newly inspected (the caller then checks its targets).
    pub fn update(&mut self, source: &str) -> bool {
        let mut inspected = false;
        let current = source.trim();
        let mut i = 0;
        while i < self.jobs.len() {
            let job = &self.jobs[i];
            let is_current = job.source == current;
            if let Some(events) = &job.events {
                for event in events.try_iter() {
                    if let (true, DownloadEvent::Progress { .. } | DownloadEvent::Started { .. }) = (is_current, &event)
                    {
                        if let SourceState::Working { progress, .. } = &mut self.state {
                            apply(progress.get_or_insert_with(Progress::default), event);
                        }
                    }
                }
            }
            if !self.jobs[i].handle.is_finished() {
                i += 1;
                continue;
            }
            let job = self.jobs.remove(i);
            let cancelled = job.cancelled();
            let outcome = job.handle.join().unwrap_or_else(|_| Err("stopped on an internal error".into()));
            if job.source == current && self.source == current {
                self.state = match outcome {
                    Ok(dir) => {
                        inspected = true;
                        ready(dir)
                    }
                    // back to where the download was offered
                    Err(_) if cancelled => self.look_at(current),
                    Err(message) => SourceState::Failed { can_retry: job.events.is_some(), message },
                };
            }
        }
        if current != self.source {
            self.jobs.iter().filter(|job| job.source != current).for_each(Job::cancel);
            self.source = current.to_string();
            self.state = self.look_at(current);
            inspected |= self.described().is_some();
        }
        inspected
    }

    /// What a source is, without waiting on anything slow (slow work goes to a worker).
    fn look_at(&mut self, source: &str) -> SourceState {
        if source.is_empty() {
            return SourceState::Empty;
        }
        let path = Path::new(source);
        if path.is_dir() {
            return ready(path.to_path_buf());
        }
        if path.is_file() {
            if path.file_name().is_some_and(|n| n == "config.json") {
                return ready(path.parent().unwrap_or(Path::new(".")).to_path_buf());
            }
            if let Some(dir) = hub::gguf::imported(path, &self.options.app_cache) {
                return ready(dir);
            }
            // a GGUF file (or not a model: the worker's resolve says so)
            return self.spawn(source, "Importing the GGUF file…", false);
        }
        let Some((repo_id, revision)) = hub::parse_hub_id(source) else {
            return SourceState::Failed {
                message: format!(
                    "{source}: no such file or folder, and not a hub id (owner/name); give a model folder, a .gguf file \
                     or a hub id"
                ),
                can_retry: false,
            };
        };
        match hub::hf_cache::find_cached(&self.options.hf_cache, repo_id, revision) {
            Ok(Some(cached)) if cached.complete => ready(cached.snapshot),
            Ok(_) => {
                let preview = crate::memory::presets::config(repo_id)
                    .ok()
                    .map(|config| Box::new(inspect_config(&config, repo_id).map_err(|e| e.to_string())));
                SourceState::NotDownloaded { repo_id: repo_id.to_string(), preview }
            }
            Err(e) => SourceState::Failed { message: e.to_string(), can_retry: false },
        }
    }

    /// Download the current hub id (the Download button).
    pub fn start_download(&mut self) {
        let source = self.source.clone();
        self.state = self.spawn(&source, "Downloading", true);
    }

    /// Stop the running download of the current source (the Cancel button).
    pub fn cancel_download(&mut self) {
        self.jobs.iter().filter(|job| job.source == self.source).for_each(Job::cancel);
    }

    fn spawn(&mut self, source: &str, what: &'static str, download: bool) -> SourceState {
        let mut options = self.options.clone();
        let mut cancel = None;
        let events = if download {
            let (tx, rx) = crossbeam_channel::unbounded();
            options.progress = Some(Arc::new(move |e| {
                // the view may be gone (window closed): the download still completes
                let _ = tx.send(e);
            }));
            let flag = Arc::new(AtomicBool::new(false));
            if let Some(download) = &mut options.download {
                download.cancel = Some(flag.clone());
            }
            cancel = Some(flag);
            Some(rx)
        } else {
            // an import never downloads
            options.download = None;
            None
        };
        let owned = source.to_string();
        let handle = std::thread::spawn(move || {
            hub::resolve_with(&owned, &options).map(|resolved| resolved.dir).map_err(|e| e.to_string())
        });
        self.jobs.push(Job { source: source.to_string(), events, cancel, handle });
        SourceState::Working { what, progress: None }
    }

    /// The state of the source under the model pickers; the model's details are the caller's.
    pub fn status_ui(&mut self, ui: &mut egui::Ui, lang: Lang) {
        let (mut download, mut cancel) = (false, false);
        match &self.state {
            SourceState::Empty => {
                ui.weak(tr(lang, "no model chosen"));
            }
            SourceState::Ready { .. } => {}
            SourceState::Working { what, progress } => {
                let download_job = self.jobs.iter().find(|job| job.source == self.source && job.cancel.is_some());
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label(format!("{} {}", tr(lang, what), self.source));
                    if let Some(job) = download_job {
                        cancel = ui.add_enabled(!job.cancelled(), egui::Button::new(tr(lang, "Cancel"))).clicked();
                    }
                });
                if let Some(p) = progress {
                    let fraction = if p.bytes_total > 0 { p.bytes_done as f32 / p.bytes_total as f32 } else { 0.0 };
                    ui.add(egui::ProgressBar::new(fraction).show_percentage().text(format!(
                        "{} / {} · {} {}/{} · {}",
                        human_bytes(p.bytes_done),
                        human_bytes(p.bytes_total),
                        tr(lang, "files"),
                        p.files_done,
                        p.files_total,
                        p.file
                    )));
                }
            }
            SourceState::NotDownloaded { repo_id, .. } => {
                ui.label(format!("{repo_id}: {}", tr(lang, "not in the local Hugging Face cache")));
                ui.horizontal(|ui| {
                    download = ui.button(tr(lang, "Download")).clicked();
                    ui.weak(self.options.hf_cache.display().to_string());
                });
                if crate::memory::presets::is_preset(repo_id) {
                    ui.weak(tr(lang, "The memory estimate uses this model's published config until it is downloaded."));
                }
            }
            SourceState::Failed { message, can_retry } => {
                ui.colored_label(ui.visuals().error_fg_color, tr_message(lang, message));
                if *can_retry {
                    download = ui.button(tr(lang, "Retry download")).clicked();
                }
            }
        }
        if download {
            self.start_download();
        }
        if cancel {
            self.cancel_download();
        }
    }
}

fn ready(dir: PathBuf) -> SourceState {
    let info = inspect(&dir).map_err(|e| e.to_string());
    SourceState::Ready { dir, info: Box::new(info) }
}

fn apply(progress: &mut Progress, event: DownloadEvent) {
    match event {
        DownloadEvent::Started { files, bytes } => {
            progress.files_total = files;
            progress.bytes_total = bytes;
        }
        DownloadEvent::Progress { bytes_done, bytes_total, files_done, files_total, file } => {
            *progress = Progress { bytes_done, bytes_total, files_done, files_total, file };
        }
        DownloadEvent::Finished { .. } => {}
    }
}
