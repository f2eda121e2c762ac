//! Shared helpers for integration tests: where the reference fixtures live.
#![allow(dead_code)]

pub mod fake_hub;
pub mod gguf_writer;
pub mod tiny_llama;
pub mod tokenizer;

use std::path::PathBuf;

/// ../shared/fixtures beside the repository, or the folder in QLS_FIXTURES. A missing folder
/// fails the test: parity tests must never pass by skipping.
pub fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("QLS_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    };
    assert!(
        dir.is_dir(),
        "fixture folder {} not found: put the shared folder beside the repository or set QLS_FIXTURES",
        dir.display()
    );
    dir
}

pub fn fixture(rel: &str) -> PathBuf {
    let p = fixtures_dir().join(rel);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

pub fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// The device the parity tests run on: the CPU, or the GPU when QLS_TEST_DEVICE=cuda (the GPU
/// check runs the same tests there, in a build with the `cuda` feature).
pub fn test_device() -> candle_core::Device {
    match std::env::var("QLS_TEST_DEVICE").as_deref() {
        Ok("cuda") => {
            candle_core::Device::new_cuda(0).unwrap_or_else(|e| panic!("QLS_TEST_DEVICE=cuda, but no CUDA device: {e}"))
        }
        Ok("cpu") | Err(_) => candle_core::Device::Cpu,
        Ok(other) => panic!("QLS_TEST_DEVICE={other}: use cpu or cuda"),
    }
}
