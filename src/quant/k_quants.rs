//! ggml's k-quant quantization (Q4_K, Q5_K, Q6_K) as llama-quantize runs it without an
//! importance matrix: `quantize_row_q{4,5,6}_K_ref` of ggml-quants.c, ported operation for
//! operation so that the blocks are byte for byte ggml's (tests/data/k_quants holds ggml's own
//! output for a fixed input). candle quantizes Q4_K with the older `make_qkx1_quants`, whose
//! error on real weights is about 15% above llama-quantize's (Q6_K: 3%); the merged-GGUF export
//! quantizes through this instead, super-blocks in parallel.

use half::f16;
use rayon::prelude::*;

/// Values per super-block.
pub const QK_K: usize = 256;
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round half to even through the float adder.
#[inline]
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// ggml's `make_qkx2_quants`: the scale and (negated) min of an asymmetric quantization of `x`
/// to 0..=nmax under `weights`, searched over `nstep` + 1 candidate scales.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, lf) = (weights[i], q as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type` 1 and no importance weights: a symmetric scale
/// for `x` over -nmax..nmax-1, searched over 18 candidates around nmax / max.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let quantize = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (i, &v) in x.iter().enumerate() {
        let q = quantize(iscale, v);
        l[i] = (q + nmax) as i8;
        let w = v * v;
        sumlx += w * v * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let q = quantize(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                l[i] = (quantize(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// The 6-bit scales and mins of a Q4_K/Q5_K super-block, packed in 12 bytes as ggml packs them.
fn pack_scales_mins(scales: &[f32; 8], mins: &[f32; 8], out: &mut [u8]) -> (f16, f16) {
    let max_scale = scales.iter().fold(0.0f32, |m, &s| if s > m { s } else { m });
    let max_min = mins.iter().fold(0.0f32, |m, &s| if s > m { s } else { m });
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    out[..12].fill(0);
    for j in 0..8 {
        // ggml stores nearest_int's result in a uint8_t before clamping to 63
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            out[j] = ls;
            out[j + 4] = lm;
        } else {
            out[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            out[j - 4] |= (ls >> 4) << 6;
            out[j] |= (lm >> 4) << 6;
        }
    }
    (f16::from_f32(max_scale / 63.0), f16::from_f32(max_min / 63.0))
}

/// ggml's `get_scale_min_k4`.
fn scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// One Q4_K/Q5_K super-block's levels (0..=nmax per value), its header (d, dmin and the packed
/// scales, 16 bytes) written: the shared part of `quantize_row_q4_K_ref` and `_q5_K_ref`.
fn asymmetric_block(x: &[f32], nmax: i32, rmin: f32, nstep: i32, header: &mut [u8]) -> [u8; QK_K] {
    let (dm, scales_out) = header[..16].split_at_mut(4);
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    let mut weights = [0.0f32; 32];
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        (scales[j], mins[j]) = make_qkx2_quants(nmax, xs, &weights, &mut l[32 * j..32 * j + 32], rmin, 0.1, nstep);
    }
    let (d, dmin) = pack_scales_mins(&scales, &mins, scales_out);
    for j in 0..QK_K / 32 {
        let (sc, m) = scale_min(j, scales_out);
        let d = d.to_f32() * sc as f32;
        if d == 0.0 {
            continue;
        }
        let m = dmin.to_f32() * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + m) / d).clamp(0, nmax) as u8;
        }
    }
    dm[0..2].copy_from_slice(&d.to_le_bytes());
    dm[2..4].copy_from_slice(&dmin.to_le_bytes());
    l
}

/// Bytes per super-block of each type.
pub const Q4K_BYTES: usize = 144;
pub const Q5K_BYTES: usize = 176;
pub const Q6K_BYTES: usize = 210;

/// `x` (a multiple of 256 values) as Q4_K blocks: d, dmin, 12 bytes of scales, 128 of nibbles.
pub fn quantize_q4_k(x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; x.len() / QK_K * Q4K_BYTES];
    out.par_chunks_exact_mut(Q4K_BYTES).zip(x.par_chunks_exact(QK_K)).for_each(|(y, x)| {
        let l = asymmetric_block(x, 15, -1.0, 20, y);
        let q = &mut y[16..];
        for (c, j) in (0..QK_K).step_by(64).enumerate() {
            for i in 0..32 {
                q[32 * c + i] = l[j + i] | (l[j + i + 32] << 4);
            }
        }
    });
    out
}

/// `x` as Q5_K blocks: d, dmin, 12 bytes of scales, 32 of high bits, 128 of low nibbles.
pub fn quantize_q5_k(x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; x.len() / QK_K * Q5K_BYTES];
    out.par_chunks_exact_mut(Q5K_BYTES).zip(x.par_chunks_exact(QK_K)).for_each(|(y, x)| {
        let l = asymmetric_block(x, 31, -0.5, 15, y);
        let (qh, ql) = y[16..].split_at_mut(32);
        let (mut m1, mut m2) = (1u8, 2u8);
        for (c, n) in (0..QK_K).step_by(64).enumerate() {
            for j in 0..32 {
                let (mut l1, mut l2) = (l[n + j], l[n + j + 32]);
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[32 * c + j] = l1 | (l2 << 4);
            }
            m1 <<= 2;
            m2 <<= 2;
        }
    });
    out
}

/// `x` as Q6_K blocks: 128 bytes of low nibbles, 64 of high bits, 16 signed scales, d.
pub fn quantize_q6_k(x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; x.len() / QK_K * Q6K_BYTES];
    out.par_chunks_exact_mut(Q6K_BYTES).zip(x.par_chunks_exact(QK_K)).for_each(|(y, x)| {
        let mut l = [0i8; QK_K];
        let mut scales = [0.0f32; QK_K / 16];
        let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
        for ib in 0..QK_K / 16 {
            let scale = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
            scales[ib] = scale;
            if scale.abs() > max_abs_scale {
                max_abs_scale = scale.abs();
                max_scale = scale;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            return; // an all-zero block (d = 0 too)
        }
        let iscale = -128.0 / max_scale;
        let d = f16::from_f32(1.0 / iscale);
        let sc = &mut y[192..208];
        for ib in 0..QK_K / 16 {
            sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
        }
        for j in 0..QK_K / 16 {
            let dj = d.to_f32() * sc[j] as i8 as f32;
            if dj == 0.0 {
                continue;
            }
            for ii in 0..16 {
                l[16 * j + ii] = (nearest_int(x[16 * j + ii] / dj).clamp(-32, 31) + 32) as i8;
            }
        }
        y[208..210].copy_from_slice(&d.to_le_bytes());
        let (ql, rest) = y.split_at_mut(128);
        let qh = &mut rest[..64];
        for (c, j) in (0..QK_K).step_by(128).enumerate() {
            for i in 0..32 {
                let q = |o: usize| l[j + i + o] as u8;
                ql[64 * c + i] = (q(0) & 0xF) | ((q(64) & 0xF) << 4);
                ql[64 * c + i + 32] = (q(32) & 0xF) | ((q(96) & 0xF) << 4);
                qh[32 * c + i] = (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The input of scripts/llama-cpp-check/kquant_reference.c, computed the same way.
    fn reference_input() -> Vec<f32> {
        let (rows, cols) = (6, 512);
        let mut state: u32 = 12345;
        let mut out = Vec::with_capacity(rows * cols);
        for row in 0..rows {
            for col in 0..cols {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let u = (state >> 8) as f32 / 16_777_216.0 - 0.5;
                out.push(match row {
                    4 if col < 256 => 0.0,
                    4 => 0.25,
                    5 => u * 1e-3 + if col % 97 == 0 { 0.5 } else { 0.0 },
                    _ => u * (row + 1) as f32 * 0.02 + if col % 61 == 0 { u * 0.3 } else { 0.0 },
                });
            }
        }
        out
    }

    /// Byte for byte what ggml's own quantization (llama-quantize's, without an importance
    /// matrix) writes for the same input, with zero, constant and outlier blocks among them.
    #[test]
    fn blocks_are_ggmls_byte_for_byte() {
        let x = reference_input();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/k_quants");
        for (name, ours) in [("q4_k", quantize_q4_k(&x)), ("q5_k", quantize_q5_k(&x)), ("q6_k", quantize_q6_k(&x))] {
            let ggml = std::fs::read(dir.join(format!("{name}.bin"))).unwrap();
            assert_eq!(ours.len(), ggml.len(), "{name}: size");
            let first = ours.iter().zip(&ggml).position(|(a, b)| a != b);
            assert_eq!(first, None, "{name}: first differing byte");
        }
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!([0.5, 1.5, 2.5, -0.5, -1.5, 2.4, -2.6].map(nearest_int), [0, 2, 2, 0, -2, 2, -3]);
    }
}
