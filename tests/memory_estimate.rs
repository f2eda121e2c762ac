//! The memory estimate against real training steps (a few tiny points of the validation grid),
//! the model presets, and the estimate's static terms against independently computed sizes.

use qlora_studio::memory::{self, estimate, fit, grid, presets, DeviceKind, EstimateInput, Method};

#[global_allocator]
static ALLOC: memory::CountingAllocator = memory::CountingAllocator::new();

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// The counting allocator is process-wide: tests of this binary run one at a time so that one
/// test's allocations do not land in another's measured peak.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn point(method: Method, seq: usize, batch: usize, rank: usize, targets: &[&str]) -> grid::GridPoint {
    grid::GridPoint {
        preset: "tiny".into(),
        method,
        seq,
        batch,
        rank,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        dropout: 0.0,
        checkpointing: false,
        dora: false,
        bf16: false,
    }
}

#[test]
fn tiny_grid_points_lie_in_the_band() {
    let _serial = serial();
    // one process-wide warm-up so that every point carries the runtime's buffers, as a run does
    let baseline = memory::live_bytes();
    grid::warm_up().unwrap();
    let points = [
        point(Method::Lora, 128, 1, 8, &["q_proj", "v_proj"]),
        point(Method::Qlora { double_quant: true }, 256, 2, 16, &["all-linear"]),
        point(Method::Qlora { double_quant: false }, 384, 3, 32, &["q_proj", "v_proj"]),
        grid::GridPoint { dropout: 0.1, ..point(Method::Lora, 192, 2, 8, &["all-linear"]) },
        grid::GridPoint {
            checkpointing: true,
            ..point(Method::Qlora { double_quant: true }, 256, 2, 16, &["all-linear"])
        },
        grid::GridPoint { checkpointing: true, dropout: 0.1, ..point(Method::Lora, 384, 1, 8, &["q_proj", "v_proj"]) },
        grid::GridPoint { bf16: true, ..point(Method::Qlora { double_quant: true }, 256, 2, 16, &["all-linear"]) },
        grid::GridPoint { bf16: true, ..point(Method::Lora, 64, 4, 8, &["q_proj", "v_proj"]) },
        grid::GridPoint { dora: true, ..point(Method::Qlora { double_quant: true }, 256, 2, 16, &["all-linear"]) },
        grid::GridPoint { dora: true, dropout: 0.1, ..point(Method::Lora, 128, 2, 8, &["q_proj", "v_proj"]) },
    ];
    for p in &points {
        let row = grid::run_point(p, Some(baseline)).unwrap();
        assert!(
            row.passes(),
            "{p:?}: measured {} bytes, band {}–{} (mid {}, {:+.1}%)",
            row.measured.heap_peak,
            row.low,
            row.high,
            row.mid,
            row.error_pct
        );
    }
}

fn input(name: &str, method: Method, targets: &[&str], rank: usize) -> EstimateInput {
    let spec = presets::spec_of(&presets::config(name).unwrap(), name).unwrap();
    let targets = targets.iter().map(|t| t.to_string()).collect();
    EstimateInput::new(spec, method, targets, rank, 1, 512).on(DeviceKind::Cuda)
}

#[test]
fn llama2_7b_static_terms_match_the_published_sizes() {
    let _serial = serial();
    // docs/memory-model.md §2.1: P_lin = 32·(4·4096² + 3·4096·11008) = 6.476e9 weights;
    // NF4 + double quantization ≈ 0.5159 B/param (3.34 GB), without ≈ 0.5625 (3.64 GB)
    let p_lin = 32.0 * (4.0 * 4096f64.powi(2) + 3.0 * 4096.0 * 11008.0);
    let dq = estimate(&input("llama-2-7b", Method::Qlora { double_quant: true }, &["q_proj", "v_proj"], 8)).unwrap();
    let plain =
        estimate(&input("llama-2-7b", Method::Qlora { double_quant: false }, &["q_proj", "v_proj"], 8)).unwrap();
    let frozen = dq.term("frozen linears") as f64;
    assert!((frozen / (p_lin * (0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0))) - 1.0).abs() < 0.002, "{frozen}");
    assert!((plain.term("frozen linears") as f64 / (p_lin * 0.5625) - 1.0).abs() < 0.002);
    // with the bf16 embeddings and lm_head the QLoRA weights are 3.5–4 GiB
    let weights = (frozen + dq.term("embeddings, lm_head, norms") as f64) / GIB;
    assert!((3.5..4.0).contains(&weights), "{weights} GiB");
    // §2.3: r = 8 on q,v is 4.19M trainable parameters; on all 7 linears 19.99M
    assert_eq!(dq.trainable_params, 32 * 8 * 2 * (4096 + 4096));
    let all = estimate(&input("llama-2-7b", Method::Lora, &["all-linear"], 8)).unwrap();
    assert_eq!(all.trainable_params, 32 * 8 * (4 * (4096 + 4096) + 3 * (4096 + 11008)));
    assert_eq!(all.term("LoRA + grads + AdamW"), all.trainable_params * 16);
    // a dense bf16 base is 2 B/param
    assert_eq!(all.term("frozen linears") as f64, 2.0 * p_lin);
}

#[test]
fn every_preset_parses_and_gives_a_plausible_estimate() {
    let _serial = serial();
    let names = presets::names();
    assert!(names.len() >= 15, "{names:?}");
    for name in &names {
        let spec = presets::spec_of(&presets::config(name).unwrap(), name).unwrap();
        let targets: Vec<&str> = spec.default_targets.iter().map(String::as_str).collect();
        let est = estimate(&input(name, Method::Qlora { double_quant: true }, &targets, 8)).unwrap();
        // NF4 linears: between 0.5 and 0.5625 bytes per weight of a 2.7B–70B model's layers
        let frozen = est.term("frozen linears") as f64 / GIB;
        assert!((1.0..40.0).contains(&frozen), "{name}: {frozen:.2} GiB of NF4 linears");
        assert!(est.low <= est.mid && est.mid <= est.high, "{name}");
        // QLoRA of a 2.7B–70B model at batch 1 × 512 on CUDA: our decoder's attention is eager
        // (scores, mask and softmax materialised per layer), so Falcon-40B's 128 heads × 60
        // layers reach about 120 GiB; a 2.7B model still needs more than 1.5 GiB
        let gib = est.mid as f64 / GIB;
        assert!((1.5..160.0).contains(&gib), "{name}: {gib:.1} GiB");
        let lora = estimate(&input(name, Method::Lora, &targets, 8)).unwrap();
        assert!(lora.mid > est.mid, "{name}: LoRA must need more than QLoRA");
    }
}

#[test]
fn inverse_questions_are_consistent() {
    let _serial = serial();
    let base = input("llama-2-13b", Method::Lora, &["all-linear"], 16);
    let memory = (24.0 * GIB) as u64;
    assert!(!estimate(&base).unwrap().fits(memory), "LoRA of a 13B model does not fit 24 GiB");
    let suggestions = fit::suggestions(&base, memory);
    let qlora = suggestions.iter().find(|s| s.change == fit::Change::Qlora).expect("QLoRA is suggested");
    assert!(qlora.estimate.mid < estimate(&base).unwrap().mid);
    let mut q = input("llama-2-7b", Method::Qlora { double_quant: true }, &["q_proj", "v_proj"], 8);
    q.seq = 256;
    let seq = fit::largest_seq(&q, memory).expect("some sequence fits");
    let at = |s: usize| {
        let mut i = q.clone();
        i.seq = s;
        estimate(&i).unwrap()
    };
    assert!(at(seq).fits(memory) && !at(seq + 1).fits(memory), "{seq}");
    let batch = fit::largest_batch(&q, memory).expect("batch 1 fits");
    let mut i = q.clone();
    i.batch = batch + 1;
    assert!(!estimate(&i).unwrap().fits(memory));
}

#[test]
fn sizes_and_devices_parse() {
    let _serial = serial();
    use memory::cli::{parse_device, parse_size};
    assert_eq!(parse_size("24GiB").unwrap(), 24 * 1024 * 1024 * 1024);
    assert_eq!(parse_size("16 GB").unwrap(), 16_000_000_000);
    assert_eq!(parse_size("8000MiB").unwrap(), 8000 * 1024 * 1024);
    assert!(parse_size("lots").is_err());
    assert_eq!(parse_device("cuda:1").unwrap(), (DeviceKind::Cuda, Some(1)));
    assert!(parse_device("tpu").is_err());
}
