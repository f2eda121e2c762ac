//! Where models come from: a local folder, the Hugging Face cache, a hub download, or a GGUF
//! file imported into a folder. `resolve` turns any of them into a local folder that
//! `Model::load` reads. No model math here.

pub mod demo;
pub mod download;
pub mod gguf;
pub mod hf_cache;
pub mod sentencepiece;
pub mod tokenizer;
pub mod try_model;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::arch;
use crate::error::{Error, Result};

pub use download::{download, spawn_download, DownloadEvent, DownloadOptions};
pub use hf_cache::{hf_cache_dir, list_cached_models, CachedModel};

/// What a model source string turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    Folder,
    /// A GGUF file, imported into a folder of the app's cache.
    Gguf {
        file: PathBuf,
    },
    /// A hub id already in the Hugging Face cache.
    HubCache {
        repo_id: String,
        revision: String,
    },
    /// A hub id downloaded now.
    HubDownload {
        repo_id: String,
    },
}

/// A model source made local: `dir` holds config.json, safetensors and the tokenizer files.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub dir: PathBuf,
    pub kind: SourceKind,
    pub check: FolderCheck,
}

/// What a model folder holds; optional files that are missing are listed, not errors.
#[derive(Debug, Clone)]
pub struct FolderCheck {
    /// The architecture table's family id (`llama`, `qwen2`, ...).
    pub family: String,
    pub family_name: String,
    pub weight_files: Vec<PathBuf>,
    pub has_tokenizer_config: bool,
    pub has_generation_config: bool,
}

/// The app's own cache (GGUF imports, the real-model download): `QLS_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/qlora-studio`, else `~/.cache/qlora-studio`.
pub fn app_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("QLS_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(xdg).join("qlora-studio");
    }
    home_dir().join(".cache").join("qlora-studio")
}

pub(crate) fn home_dir() -> PathBuf {
    std::env::var_os("HOME").or_else(|| std::env::var_os("USERPROFILE")).map(PathBuf::from).unwrap_or_default()
}

const WHAT_A_FOLDER_NEEDS: &str =
    "a model folder needs config.json, model.safetensors (or shards with model.safetensors.index.json) and tokenizer.json \
     (or a SentencePiece BPE tokenizer.model)";

/// Check that `dir` is a model folder the loader and the tokenizer can use, with an error that
/// names what is missing and what to do.
pub fn check_folder(dir: &Path) -> Result<FolderCheck> {
    if !dir.is_dir() {
        return Err(Error::Invalid(format!("{}: no such folder; {WHAT_A_FOLDER_NEEDS}", dir.display())));
    }
    let config = dir.join("config.json");
    if !config.is_file() {
        return Err(Error::Invalid(format!("{}: no config.json; {WHAT_A_FOLDER_NEEDS}", dir.display())));
    }
    let recognised = arch::table()?.recognise_file(&config)?;
    let index = dir.join("model.safetensors.index.json");
    let weight_files = if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_entry(&index, "weight_map", format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::bad_entry(&index, "weight_map", "missing or not an object"))?;
        let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        names.sort();
        names.dedup();
        let missing: Vec<&str> = names.iter().copied().filter(|n| !dir.join(n).is_file()).collect();
        if !missing.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: shards {} listed in model.safetensors.index.json are missing; the download is incomplete: \
                 download the model again",
                dir.display(),
                missing.join(", ")
            )));
        }
        names.iter().map(|n| dir.join(n)).collect()
    } else if dir.join("model.safetensors").is_file() {
        vec![dir.join("model.safetensors")]
    } else {
        let hint = if dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists() {
            " (only pytorch_model.bin found: save the model with safetensors, e.g. save_pretrained(safe_serialization=True))"
        } else {
            ""
        };
        return Err(Error::Invalid(format!("{}: no safetensors weights{hint}; {WHAT_A_FOLDER_NEEDS}", dir.display())));
    };
    if !dir.join("tokenizer.json").is_file() && !dir.join("tokenizer.model").is_file() {
        return Err(Error::Invalid(format!(
            "{}: no tokenizer.json (nor a SentencePiece tokenizer.model); {}; {WHAT_A_FOLDER_NEEDS}",
            dir.display(),
            crate::data::missing_tokenizer_hint(dir)
        )));
    }
    Ok(FolderCheck {
        family: recognised.family.id.clone(),
        family_name: recognised.family.name.clone(),
        weight_files,
        has_tokenizer_config: dir.join("tokenizer_config.json").is_file(),
        has_generation_config: dir.join("generation_config.json").is_file(),
    })
}

/// Receives download progress; called from hf-hub's thread, so it must not block.
pub type ProgressCallback = Arc<dyn Fn(DownloadEvent) + Send + Sync>;

/// Where `resolve` looks and whether it may download.
#[derive(Clone)]
pub struct ResolveOptions {
    pub hf_cache: PathBuf,
    pub app_cache: PathBuf,
    /// `None`: never download, only the cache.
    pub download: Option<DownloadOptions>,
    pub progress: Option<ProgressCallback>,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        Self {
            hf_cache: hf_cache_dir(),
            app_cache: app_cache_dir(),
            // huggingface_hub's offline switch
            download: (!matches!(std::env::var("HF_HUB_OFFLINE").as_deref(), Ok("1" | "true" | "TRUE" | "yes")))
                .then(DownloadOptions::default),
            progress: None,
        }
    }
}

/// A folder path, a `.gguf` file, or a hub id (`owner/name`, optionally `@revision`), made
/// local: the hub cache is looked at first, then the hub is asked.
pub fn resolve(source: &str) -> Result<ResolvedModel> {
    resolve_with(source, &ResolveOptions::default())
}

pub fn resolve_with(source: &str, options: &ResolveOptions) -> Result<ResolvedModel> {
    let path = Path::new(source);
    if path.is_dir() {
        return Ok(ResolvedModel { dir: path.to_path_buf(), kind: SourceKind::Folder, check: check_folder(path)? });
    }
    if path.is_file() {
        if is_gguf(path) {
            let dir = gguf::import_cached(path, &options.app_cache)?;
            let check = check_folder(&dir)?;
            return Ok(ResolvedModel { dir, kind: SourceKind::Gguf { file: path.to_path_buf() }, check });
        }
        if path.file_name().is_some_and(|n| n == "config.json") {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            return Ok(ResolvedModel { check: check_folder(&dir)?, dir, kind: SourceKind::Folder });
        }
        return Err(Error::Invalid(format!(
            "{source}: not a model; give a model folder, a .gguf file or a Hugging Face hub id such as \
             HuggingFaceTB/SmolLM2-135M-Instruct"
        )));
    }
    let Some((repo_id, revision)) = parse_hub_id(source) else {
        return Err(Error::Invalid(format!(
            "{source}: no such file or folder, and not a hub id (owner/name); give a model folder, a .gguf file or \
             a hub id"
        )));
    };
    if let Some(cached) = hf_cache::find_cached(&options.hf_cache, repo_id, revision)? {
        if cached.complete {
            let check = check_folder(&cached.snapshot)?;
            return Ok(ResolvedModel {
                dir: cached.snapshot.clone(),
                kind: SourceKind::HubCache { repo_id: repo_id.to_string(), revision: cached.revision.clone() },
                check,
            });
        }
    }
    let Some(dl) = &options.download else {
        return Err(Error::Invalid(format!(
            "{repo_id} is not (completely) in the Hugging Face cache {} and downloading is off (HF_HUB_OFFLINE); \
             use a local model folder, a .gguf file or a model that is in the cache",
            options.hf_cache.display()
        )));
    };
    let progress = options.progress.clone();
    let dir = download(repo_id, revision, &options.hf_cache, dl, move |e| {
        if let Some(p) = &progress {
            p(e)
        }
    })?;
    let check = check_folder(&dir)?;
    Ok(ResolvedModel { dir, kind: SourceKind::HubDownload { repo_id: repo_id.to_string() }, check })
}

fn is_gguf(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
        && &magic == b"GGUF"
}

/// `owner/name` or `owner/name@revision` (a bare `name` is a hub id too, e.g. `gpt2`, but only
/// with a slash is a string unambiguous enough to send to the hub).
pub fn parse_hub_id(source: &str) -> Option<(&str, Option<&str>)> {
    let (id, revision) = match source.split_once('@') {
        Some((id, rev)) if !rev.is_empty() => (id, Some(rev)),
        Some(_) => return None,
        None => (source, None),
    };
    let (owner, name) = id.split_once('/')?;
    let valid = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && !s.contains("..")
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (valid(owner) && valid(name)).then_some((id, revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_owner_slash_name() {
        assert_eq!(parse_hub_id("meta-llama/Llama-2-7b-hf"), Some(("meta-llama/Llama-2-7b-hf", None)));
        assert_eq!(parse_hub_id("a/b@main"), Some(("a/b", Some("main"))));
        assert_eq!(parse_hub_id("gpt2"), None);
        assert_eq!(parse_hub_id("a/b/c"), None);
        assert_eq!(parse_hub_id("../x"), None);
        assert_eq!(parse_hub_id("a/b@"), None);
    }
}
