//! The Hugging Face cache as huggingface_hub lays it out:
//! `<cache>/models--<owner>--<name>/{refs/<ref>, snapshots/<commit>/<file>, blobs/<etag>}`,
//! snapshot files being symlinks to blobs (copies on Windows), a download in flight a
//! `blobs/<etag>.incomplete`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The cache folder: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (what huggingface_hub and hf-hub use).
pub fn hf_cache_dir() -> PathBuf {
    for var in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"] {
        if let Some(dir) = std::env::var_os(var) {
            return PathBuf::from(dir);
        }
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(xdg).join("huggingface").join("hub");
    }
    super::home_dir().join(".cache").join("huggingface").join("hub")
}

/// One revision of a model in the cache, as the GUI lists it.
#[derive(Debug, Clone)]
pub struct CachedModel {
    pub repo_id: String,
    /// The commit hash (the snapshot folder's name).
    pub revision: String,
    /// Refs (`main`, tags) pointing at this revision.
    pub refs: Vec<String>,
    pub snapshot: PathBuf,
    /// The architecture table's family name, when config.json is there and recognised.
    pub family: Option<String>,
    /// Bytes of the files in this snapshot (their blobs).
    pub size_bytes: u64,
    /// Loadable: config.json, all safetensors and tokenizer.json present, no download in flight.
    pub complete: bool,
    /// Why it is not complete, when it is not.
    pub problem: Option<String>,
}

/// The repository folder name of a model id: `owner/name` → `models--owner--name`.
pub fn repo_folder_name(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

/// Every model revision in the cache, sorted by repo id. A missing cache is an empty list.
pub fn list_cached_models(cache: &Path) -> Result<Vec<CachedModel>> {
    let entries = match std::fs::read_dir(cache) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(cache, e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("models--") else { continue };
        let repo_id = rest.replacen("--", "/", 1);
        out.extend(scan_repo(&entry.path(), &repo_id)?);
    }
    out.sort_by(|a, b| a.repo_id.cmp(&b.repo_id).then(a.revision.cmp(&b.revision)));
    Ok(out)
}

/// The cached revision of `repo_id` for `revision` (a ref such as `main`, or a commit hash);
/// without a revision, `main`, else the only or newest snapshot.
pub fn find_cached(cache: &Path, repo_id: &str, revision: Option<&str>) -> Result<Option<CachedModel>> {
    let repo = cache.join(repo_folder_name(repo_id));
    if !repo.is_dir() {
        return Ok(None);
    }
    let models = scan_repo(&repo, repo_id)?;
    let wanted = revision.unwrap_or("main");
    if let Some(m) = models.iter().find(|m| m.revision == wanted || m.refs.iter().any(|r| r == wanted)) {
        return Ok(Some(m.clone()));
    }
    if revision.is_some() {
        return Ok(None);
    }
    // no `main` ref (e.g. a cache filled offline by hand): the newest complete snapshot
    let newest = models
        .into_iter()
        .filter(|m| m.complete)
        .max_by_key(|m| std::fs::metadata(&m.snapshot).and_then(|md| md.modified()).ok());
    Ok(newest)
}

fn scan_repo(repo: &Path, repo_id: &str) -> Result<Vec<CachedModel>> {
    let snapshots = repo.join("snapshots");
    let Ok(entries) = std::fs::read_dir(&snapshots) else { return Ok(Vec::new()) };
    let refs = read_refs(&repo.join("refs"));
    let in_flight = std::fs::read_dir(repo.join("blobs"))
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".incomplete")))
        .unwrap_or(false);
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let snapshot = entry.path();
        if !snapshot.is_dir() {
            continue;
        }
        let revision = entry.file_name().to_string_lossy().to_string();
        let family = crate::arch::table()
            .ok()
            .and_then(|t| t.recognise_file(&snapshot.join("config.json")).ok().map(|r| r.family.name.clone()));
        let (complete, problem) = match super::check_folder(&snapshot) {
            Ok(_) if in_flight => (false, Some("a download was interrupted; download it again to resume".into())),
            Ok(_) => (true, None),
            Err(e) => (false, Some(e.to_string())),
        };
        out.push(CachedModel {
            repo_id: repo_id.to_string(),
            refs: refs.iter().filter(|(_, c)| *c == revision).map(|(r, _)| r.clone()).collect(),
            size_bytes: dir_size(&snapshot),
            revision,
            snapshot,
            family,
            complete,
            problem,
        });
    }
    Ok(out)
}

/// (ref name, commit) for each file under refs/ (nested names such as `refs/pr/1` included).
fn read_refs(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let (Ok(commit), Ok(rel)) = (std::fs::read_to_string(&p), p.strip_prefix(dir)) {
                out.push((rel.to_string_lossy().replace('\\', "/"), commit.trim().to_string()));
            }
        }
    }
    out
}

/// Bytes of the files under `dir`, following the snapshot symlinks to their blobs.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => dir_size(&p),
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        })
        .sum()
}
