//! Reading and writing NF4 weights in the layout transformers + bitsandbytes save them in
//! (docs/nf4.md §6): `P.weight` (packed), `P.weight.absmax`, `P.weight.quant_map`, and with
//! double quantization `P.weight.nested_absmax` and `P.weight.nested_quant_map`, plus a JSON
//! quant state in `P.weight.quant_state.bitsandbytes__nf4`.

use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};

use super::nf4::{Absmax, DoubleQuant, FloatType, Nf4Tensor, NF4_CODE};
use crate::error::{Error, Result};
use crate::weights::{bytes_to_f32, f32_bytes, RawTensor, SafetensorsFile};

/// The JSON object bitsandbytes stores beside each 4-bit weight.
#[derive(Debug, Serialize, Deserialize)]
struct QuantStateJson {
    quant_type: String,
    blocksize: usize,
    dtype: String,
    shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested_blocksize: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nested_offset: Option<f64>,
}

const QUANT_STATE_PREFIX: &str = ".weight.quant_state.bitsandbytes__";

/// Whether the linear at `prefix` (e.g. `model.layers.0.self_attn.q_proj`) is stored in
/// bitsandbytes 4-bit form.
pub fn is_4bit(file: &SafetensorsFile, prefix: &str) -> bool {
    ["nf4", "fp4"].iter().any(|t| file.contains(&format!("{prefix}{QUANT_STATE_PREFIX}{t}")))
}

/// The prefixes of every 4-bit linear in the file, sorted.
pub fn quantized_prefixes(file: &SafetensorsFile) -> Vec<String> {
    file.keys()
        .iter()
        .filter_map(|k| {
            let (prefix, quant_type) = k.split_once(QUANT_STATE_PREFIX)?;
            matches!(quant_type, "nf4" | "fp4").then(|| prefix.to_string())
        })
        .collect()
}

/// Whether a config.json describes a bitsandbytes 4-bit checkpoint (`quantization_config`
/// with `quant_method: "bitsandbytes"` and `load_in_4bit: true`). An FP4 or 8-bit one is an
/// error that says what to do instead.
pub fn config_is_4bit(config: &serde_json::Value) -> Result<bool> {
    let Some(q) = config.get("quantization_config") else { return Ok(false) };
    let method = q.get("quant_method").and_then(|v| v.as_str()).unwrap_or("");
    if method != "bitsandbytes" {
        return Err(Error::Invalid(format!(
            "config.json: quantization_config.quant_method is {method:?}; qlora-studio reads unquantized \
             checkpoints and bitsandbytes NF4 ones: use the model's unquantized weights"
        )));
    }
    let flag = |k: &str| q.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    if flag("load_in_8bit") {
        return Err(Error::Invalid(
            "config.json: this is a bitsandbytes 8-bit checkpoint (load_in_8bit); qlora-studio reads NF4 \
             4-bit ones: use the model's unquantized weights and let qlora-studio quantize them"
                .into(),
        ));
    }
    if !flag("load_in_4bit") {
        return Ok(false);
    }
    match q.get("bnb_4bit_quant_type").and_then(|v| v.as_str()).unwrap_or("fp4") {
        "nf4" => Ok(true),
        other => Err(Error::Invalid(format!(
            "config.json: quantization_config.bnb_4bit_quant_type is {other:?}; only \"nf4\" is supported \
             (bitsandbytes defaults to \"fp4\" unless asked): use the unquantized weights instead"
        ))),
    }
}

/// Load the 4-bit weight of the linear at `prefix`. Every part is checked against the
/// quant state; an FP4 weight is refused, since its code table is not NF4.
pub fn load_nf4(file: &SafetensorsFile, prefix: &str) -> Result<Nf4Tensor> {
    let fp4_key = format!("{prefix}{QUANT_STATE_PREFIX}fp4");
    if file.contains(&fp4_key) {
        return Err(file.error(
            &fp4_key,
            "this weight is quantized as FP4, which qlora-studio does not read; quantize the model with \
             bnb_4bit_quant_type=\"nf4\", or load the unquantized checkpoint and let qlora-studio quantize it",
        ));
    }
    let state_key = format!("{prefix}{QUANT_STATE_PREFIX}nf4");
    let state: QuantStateJson = serde_json::from_slice(file.bytes(&state_key)?)
        .map_err(|e| file.error(&state_key, format!("quant state is not the JSON bitsandbytes writes: {e}")))?;
    if state.quant_type != "nf4" {
        return Err(file.error(&state_key, format!("quant_type is {:?}, expected \"nf4\"", state.quant_type)));
    }
    let dtype = FloatType::from_torch_name(&state.dtype)
        .ok_or_else(|| file.error(&state_key, format!("unsupported dtype {:?}", state.dtype)))?;

    let weight_key = format!("{prefix}.weight");
    // With a quant_storage other than uint8 the same bytes are viewed as another dtype.
    let packed = file.bytes(&weight_key)?.to_vec();

    let code_key = format!("{prefix}.weight.quant_map");
    if file.contains(&code_key) {
        let (code, _) = file.f32_values(&code_key)?;
        if code.len() != 16 || code.iter().zip(NF4_CODE).any(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(file.error(&code_key, "quant_map is not the NF4 code table"));
        }
    }

    let absmax_key = format!("{prefix}.weight.absmax");
    let absmax_view = file.get(&absmax_key)?;
    let absmax = match state.nested_offset {
        None => {
            let values = bytes_to_f32(absmax_view.dtype(), absmax_view.data()).ok_or_else(|| {
                file.error(
                    &absmax_key,
                    format!("expected f32 absmax (no double quantization), found {:?}", absmax_view.dtype()),
                )
            })?;
            Absmax::Plain(values)
        }
        Some(offset) => {
            if absmax_view.dtype() != Dtype::U8 {
                return Err(file.error(
                    &absmax_key,
                    format!("expected 8-bit absmax codes (double quantization), found {:?}", absmax_view.dtype()),
                ));
            }
            let nested_key = format!("{prefix}.weight.nested_absmax");
            let (nested_absmax, _) = file.f32_values(&nested_key)?;
            let nested_code_key = format!("{prefix}.weight.nested_quant_map");
            let (nested_code, _) = file.f32_values(&nested_code_key)?;
            if nested_code.len() != 256 {
                return Err(file.error(&nested_code_key, format!("{} entries, expected 256", nested_code.len())));
            }
            let nested_blocksize = state
                .nested_blocksize
                .ok_or_else(|| file.error(&state_key, "nested_offset without nested_blocksize"))?;
            Absmax::Double(DoubleQuant {
                codes: absmax_view.data().to_vec(),
                nested_absmax,
                nested_code,
                nested_blocksize,
                offset: offset as f32,
            })
        }
    };
    let tensor = Nf4Tensor { shape: state.shape, dtype, blocksize: state.blocksize, packed, absmax };
    tensor.validate().map_err(|m| file.error(&weight_key, format!("disagrees with its quant state: {m}")))?;
    Ok(tensor)
}

/// The entries bitsandbytes would save for this weight under `prefix`, so that a model
/// quantized here loads in transformers unchanged.
pub fn to_bnb_entries(prefix: &str, t: &Nf4Tensor) -> Result<Vec<RawTensor>> {
    let w = format!("{prefix}.weight");
    let mut out = vec![
        RawTensor { name: w.clone(), dtype: Dtype::U8, shape: vec![t.packed.len(), 1], data: t.packed.clone() },
        RawTensor { name: format!("{w}.quant_map"), dtype: Dtype::F32, shape: vec![16], data: f32_bytes(&NF4_CODE) },
    ];
    let mut state = QuantStateJson {
        quant_type: "nf4".into(),
        blocksize: t.blocksize,
        dtype: t.dtype.torch_name().into(),
        shape: t.shape.clone(),
        nested_blocksize: None,
        nested_dtype: None,
        nested_offset: None,
    };
    match &t.absmax {
        Absmax::Plain(a) => out.push(RawTensor {
            name: format!("{w}.absmax"),
            dtype: Dtype::F32,
            shape: vec![a.len()],
            data: f32_bytes(a),
        }),
        Absmax::Double(dq) => {
            out.push(RawTensor {
                name: format!("{w}.absmax"),
                dtype: Dtype::U8,
                shape: vec![dq.codes.len()],
                data: dq.codes.clone(),
            });
            out.push(RawTensor {
                name: format!("{w}.nested_absmax"),
                dtype: Dtype::F32,
                shape: vec![dq.nested_absmax.len()],
                data: f32_bytes(&dq.nested_absmax),
            });
            out.push(RawTensor {
                name: format!("{w}.nested_quant_map"),
                dtype: Dtype::F32,
                shape: vec![256],
                data: f32_bytes(&dq.nested_code),
            });
            state.nested_blocksize = Some(dq.nested_blocksize);
            state.nested_dtype = Some("float32".into());
            state.nested_offset = Some(dq.offset as f64);
        }
    }
    let json = serde_json::to_vec(&state).map_err(|e| Error::Invalid(format!("quant state of {prefix}: {e}")))?;
    out.push(RawTensor {
        name: format!("{w}.quant_state.bitsandbytes__nf4"),
        dtype: Dtype::U8,
        shape: vec![json.len()],
        data: json,
    });
    Ok(out)
}
