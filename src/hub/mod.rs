//! Where models come from: local folders, the Hugging Face cache, hub downloads and GGUF files.
