//! Differentiable fused ops for the decoder: RMSNorm, LayerNorm, softmax, RoPE and the SiLU
//! gate, each a custom op with a backward (candle's own fast versions have none and silently
//! cut the graph, docs/candle-training.md §4).
//!
//! The fused kernels run on the CPU in f32; other devices and dtypes take the composite
//! candle ops, which compute the same thing more slowly. Norm weights are frozen: their
//! backward returns no gradient for them.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

type Res<T> = candle_core::Result<T>;

/// Call once at start-up, before any thread runs candle. candle's CPU ops hand work to a
/// worker that spins 25,000 times after each op before it sleeps; ops come every few tens of
/// microseconds, so the worker never sleeps and takes a core from the matmuls beside it (a fifth
/// of a 2-core machine's step in `perf`). A short spin gives 10–15% more tokens/s in
/// `bench step`. A user's own CANDLE_BARRIER_POOL_SPIN_LIMIT is left as set.
pub fn configure_cpu_thread_pools() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100");
    }
}

/// Runs `f` on a worker of rayon's global pool (inline when already on one) and returns its
/// result. A training step makes thousands of parallel calls; made from a worker, each is split
/// by that worker itself instead of handed to the pool with a wake-up while the caller sleeps
/// (4× fewer context switches, +8% tokens/s in `bench step`). Only for a thread that computes:
/// a worker blocked waiting on another thread would leave that thread's work one core.
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::join(f, || ()).0
}

fn fused_ok(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

// ------------------------------------------------------------------------------------- exp
//
// The softmaxes, the SiLU gate and the cross-entropy take ~40 million exps a step on
// SmolLM2 at 256 tokens; libm's expf is a call per element (7% of a step in `perf`). With
// AVX-512 sixteen are computed at once (Cephes' expf polynomial, within 2 ulp of libm's);
// elsewhere libm's.

/// v[i] = exp(v[i] − shift) for every i; returns the sum of the results.
fn exp_shifted_in_place(v: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked just above.
        return unsafe { avx512_exp::exp_shifted_in_place(v, shift) };
    }
    v.iter_mut().fold(0.0, |sum, x| {
        *x = (*x - shift).exp();
        sum + *x
    })
}

/// y = softmax(x[j]·scale + slope·(key0 + j)) over one row of visible scores (j from 0). Every
/// element of y is written (so y may be uninitialized).
pub(crate) fn softmax_row(x: &[f32], y: &mut [MaybeUninit<f32>], scale: f32, slope: f32, key0: f32) {
    assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F checked just above; x and y have the same length.
        return unsafe { avx512_exp::softmax_row(x, y, scale, slope, key0) };
    }
    for (j, (y, &x)) in y.iter_mut().zip(x).enumerate() {
        y.write(x * scale + slope * (key0 + j as f32));
    }
    // SAFETY: every element was written just above (MaybeUninit<f32> has f32's layout).
    let y = unsafe { &mut *(y as *mut [MaybeUninit<f32>] as *mut [f32]) };
    let max = y.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum = exp_shifted_in_place(y, max);
    y.iter_mut().for_each(|v| *v /= sum);
}

/// g ← y ⊙ (g − Σ g ⊙ y) over one row: a softmax's input gradient from its output y and the
/// output's gradient g, in place (`SoftmaxBwd`'s row).
pub(crate) fn softmax_backward_row(y: &[f32], g: &mut [f32]) {
    let dot: f32 = y.iter().zip(g.iter()).map(|(y, g)| y * g).sum();
    for (g, y) in g.iter_mut().zip(y) {
        *g = y * (*g - dot);
    }
}

/// σ(v[i]) = 1 / (1 + exp(−v[i])) into out.
fn sigmoid_into(v: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(v) {
        *o = -x;
    }
    exp_shifted_in_place(out, 0.0);
    for o in out.iter_mut() {
        *o = 1.0 / (1.0 + *o);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512_exp {
    use std::arch::x86_64::*;

    /// exp of 16 lanes: x = n·ln2 + r with |r| ≤ ln2/2, exp(r) by Cephes' degree-6 polynomial,
    /// times 2ⁿ by `vscalefps` (which also gives exact 0 for x → −∞ and ∞ above the range).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
        let x = _mm512_min_ps(x, _mm512_set1_ps(89.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_2e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
        let r2 = _mm512_mul_ps(r, r);
        let e = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
        _mm512_scalef_ps(e, n)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_shifted_in_place(v: &mut [f32], shift: f32) -> f32 {
        let s = _mm512_set1_ps(shift);
        let mut acc = _mm512_setzero_ps();
        let mut chunks = v.chunks_exact_mut(16);
        for c in &mut chunks {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), s));
            _mm512_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm512_add_ps(acc, e);
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mask: __mmask16 = (1u16 << rest.len()) - 1;
            let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, rest.as_ptr()), s));
            _mm512_mask_storeu_ps(rest.as_mut_ptr(), mask, e);
            acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(mask, e));
        }
        _mm512_reduce_add_ps(acc)
    }

    /// `super::softmax_row` in three passes of 16 lanes: the scaled scores and their maximum,
    /// exp and sum, the division. The same operations in the same order per element as the
    /// scalar loop, so the same bits.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_row(
        x: &[f32],
        y: &mut [std::mem::MaybeUninit<f32>],
        scale: f32,
        slope: f32,
        key0: f32,
    ) {
        let n = x.len();
        let mask = |j: usize| -> __mmask16 {
            let valid = n - j;
            if valid >= 16 {
                0xffff
            } else {
                (1u16 << valid) - 1
            }
        };
        let out = y.as_mut_ptr() as *mut f32;
        let (scale, slope) = (_mm512_set1_ps(scale), _mm512_set1_ps(slope));
        let lanes = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
        let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
        for j in (0..n).step_by(16) {
            let m = mask(j);
            let keys = _mm512_add_ps(_mm512_set1_ps(key0 + j as f32), lanes);
            let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(j));
            let v = _mm512_add_ps(_mm512_mul_ps(v, scale), _mm512_mul_ps(slope, keys));
            _mm512_mask_storeu_ps(out.add(j), m, v);
            max = _mm512_mask_max_ps(max, m, max, v);
        }
        // SAFETY: all n elements were written just above.
        let y = std::slice::from_raw_parts_mut(out, n);
        let sum = _mm512_set1_ps(exp_shifted_in_place(y, _mm512_reduce_max_ps(max)));
        for j in (0..n).step_by(16) {
            let m = mask(j);
            let v = _mm512_maskz_loadu_ps(m, out.add(j));
            _mm512_mask_storeu_ps(out.add(j), m, _mm512_div_ps(v, sum));
        }
    }
}

/// The contiguous f32 data of a CPU storage.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Res<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("fused op: expected f32, got {:?}", s.dtype()) };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("fused op: non-contiguous input"),
    }
}

/// Rows of `n` for parallel loops: big enough to amortise the task, small enough to balance.
fn chunk_rows(n: usize) -> usize {
    (16384 / n.max(1)).max(1)
}

// ---------------------------------------------------------------------------------- RMSNorm

/// y = x / sqrt(mean(x²) + eps) · w over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Res<Tensor> {
    if !fused_ok(x) {
        return candle_nn::ops::rms_norm_slow(x, w, eps as f32);
    }
    x.contiguous()?.apply_op2(&w.to_dtype(DType::F32)?.contiguous()?, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-diff"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Res<(CpuStorage, Shape)> {
        let (x, w) = (slice(xs, xl)?, slice(ws, wl)?);
        let n = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n * chunk_rows(n)).zip(x.par_chunks(n * chunk_rows(n))).for_each(|(y, x)| {
            for (y, x) in y.chunks_mut(n).zip(x.chunks(n)) {
                let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / n as f32 + self.eps).sqrt();
                for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * inv * w;
                }
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Res<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &g.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

/// dx = inv · (w·g − x̂ · mean(w·g·x̂)), x̂ = x · inv.
struct RmsNormBwd {
    eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-diff-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Res<(CpuStorage, Shape)> {
        let (x, w, g) = (slice(xs, xl)?, slice(ws, wl)?, slice(gs, gl)?);
        let n = w.len();
        let rows = chunk_rows(n) * n;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(rows).zip(x.par_chunks(rows)).zip(g.par_chunks(rows)).for_each(|((dx, x), g)| {
            for ((dx, x), g) in dx.chunks_mut(n).zip(x.chunks(n)).zip(g.chunks(n)) {
                let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / n as f32 + self.eps).sqrt();
                let dot: f32 = x.iter().zip(g).zip(w).map(|((x, g), w)| w * g * x * inv).sum::<f32>() / n as f32;
                for (((d, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                    *d = inv * (w * g - x * inv * dot);
                }
            }
        });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

// -------------------------------------------------------------------------------- LayerNorm

/// y = (x − mean) / sqrt(var + eps) · w + b over the last dimension.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Res<Tensor> {
    if !fused_ok(x) {
        return candle_nn::ops::layer_norm_slow(x, w, b, eps as f32);
    }
    let (w, b) = (w.to_dtype(DType::F32)?.contiguous()?, b.to_dtype(DType::F32)?.contiguous()?);
    x.contiguous()?.apply_op3(&w, &b, LayerNorm { eps: eps as f32 })
}

struct LayerNorm {
    eps: f32,
}

fn mean_inv_std(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm-diff"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Res<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?);
        let n = w.len();
        let rows = chunk_rows(n) * n;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(rows).zip(x.par_chunks(rows)).for_each(|(y, x)| {
            for (y, x) in y.chunks_mut(n).zip(x.chunks(n)) {
                let (mean, inv) = mean_inv_std(x, self.eps);
                for (((y, x), w), b) in y.iter_mut().zip(x).zip(w).zip(b) {
                    *y = (x - mean) * inv * w + b;
                }
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Res<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        Ok((Some(dx), None, None))
    }
}

/// dx = inv · (w·g − mean(w·g) − x̂ · mean(w·g·x̂)).
struct LayerNormBwd {
    eps: f32,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "layer-norm-diff-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Res<(CpuStorage, Shape)> {
        let (x, w, g) = (slice(xs, xl)?, slice(ws, wl)?, slice(gs, gl)?);
        let n = w.len();
        let rows = chunk_rows(n) * n;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(rows).zip(x.par_chunks(rows)).zip(g.par_chunks(rows)).for_each(|((dx, x), g)| {
            for ((dx, x), g) in dx.chunks_mut(n).zip(x.chunks(n)).zip(g.chunks(n)) {
                let (mean, inv) = mean_inv_std(x, self.eps);
                let (mut s1, mut s2) = (0f32, 0f32);
                for ((x, g), w) in x.iter().zip(g).zip(w) {
                    let wg = w * g;
                    s1 += wg;
                    s2 += wg * (x - mean) * inv;
                }
                let (s1, s2) = (s1 / n as f32, s2 / n as f32);
                for (((d, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                    *d = inv * (w * g - s1 - (x - mean) * inv * s2);
                }
            }
        });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------- softmax

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Res<Tensor> {
    if !fused_ok(x) {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-diff"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Res<(CpuStorage, Shape)> {
        let x = slice(xs, xl)?;
        let n = *xl.dims().last().unwrap_or(&1);
        let rows = chunk_rows(n) * n;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(rows).zip(x.par_chunks(rows)).for_each(|(y, x)| {
            for (y, x) in y.chunks_mut(n).zip(x.chunks(n)) {
                let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                y.copy_from_slice(x);
                let sum = exp_shifted_in_place(y, max);
                y.iter_mut().for_each(|v| *v /= sum);
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Res<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd)?))
    }
}

/// dx = y · (g − Σ g·y)
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax-diff-bwd"
    }

    fn cpu_fwd(&self, ys: &CpuStorage, yl: &Layout, gs: &CpuStorage, gl: &Layout) -> Res<(CpuStorage, Shape)> {
        let (y, g) = (slice(ys, yl)?, slice(gs, gl)?);
        let n = *yl.dims().last().unwrap_or(&1);
        let rows = chunk_rows(n) * n;
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(rows).zip(y.par_chunks(rows)).zip(g.par_chunks(rows)).for_each(|((dx, y), g)| {
            for ((dx, y), g) in dx.chunks_mut(n).zip(y.chunks(n)).zip(g.chunks(n)) {
                dx.copy_from_slice(g);
                softmax_backward_row(y, dx);
            }
        });
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Res<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::softmax_backward(ys, yl, gs, gl)?, yl.shape().clone()))
    }
}

// ------------------------------------------------------------------------------------- RoPE

/// Rotate-half RoPE on x [b, h, t, d] with cos and sin [t, d/2].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Res<Tensor> {
    if !fused_ok(x) || cos.dtype() != DType::F32 {
        return candle_nn::rotary_emb::rope_slow(x, cos, sin);
    }
    let t = x.dim(2)?;
    let (cos, sin) = (cos.narrow(0, 0, t)?.contiguous()?, sin.narrow(0, 0, t)?.contiguous()?);
    x.contiguous()?.apply_op3(&cos, &sin, Rope)
}

struct Rope;

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope-diff"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Res<(CpuStorage, Shape)> {
        let (x, cos, sin) = (slice(xs, xl)?, slice(cs, cl)?, slice(ss, sl)?);
        let &[_, _, t, d] = xl.dims() else { candle_core::bail!("rope: expected [b, h, t, d]") };
        let half = d / 2;
        if cos.len() != t * half || sin.len() != t * half {
            candle_core::bail!("rope: cos/sin must be [{t}, {half}]");
        }
        let mut y = vec![0f32; x.len()];
        // one task per (batch, head): t·d elements
        y.par_chunks_mut(t * d).zip(x.par_chunks(t * d)).for_each(|(y, x)| {
            for p in 0..t {
                let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
                let (x, y) = (&x[p * d..(p + 1) * d], &mut y[p * d..(p + 1) * d]);
                for i in 0..half {
                    let (x1, x2) = (x[i], x[i + half]);
                    y[i] = x1 * c[i] - x2 * s[i];
                    y[i + half] = x2 * c[i] + x1 * s[i];
                }
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Res<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // the rotation's transpose is the rotation by −θ
        let dx = g.contiguous()?.apply_op3_no_bwd(cos, &sin.neg()?, &Rope)?;
        Ok((Some(dx), None, None))
    }
}

// -------------------------------------------------------------------------------- SiLU gate

/// silu(a) · b, the gated MLP's activation.
pub fn silu_gate(a: &Tensor, b: &Tensor) -> Res<Tensor> {
    if !fused_ok(a) || a.dims() != b.dims() {
        return a.silu()? * b;
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, SiluGate)
}

struct SiluGate;

impl CustomOp2 for SiluGate {
    fn name(&self) -> &'static str {
        "silu-gate-diff"
    }

    fn cpu_fwd(&self, as_: &CpuStorage, al: &Layout, bs: &CpuStorage, bl: &Layout) -> Res<(CpuStorage, Shape)> {
        let (a, b) = (slice(as_, al)?, slice(bs, bl)?);
        let mut y = vec![0f32; a.len()];
        y.par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(a.par_chunks(ELEMENTWISE_CHUNK))
            .zip(b.par_chunks(ELEMENTWISE_CHUNK))
            .for_each(|((y, a), b)| {
                sigmoid_into(a, y);
                for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                    *y *= a * b;
                }
            });
        Ok((CpuStorage::F32(y), al.shape().clone()))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor) -> Res<(Option<Tensor>, Option<Tensor>)> {
        // da = g·b·σ(a)·(1 + a·(1 − σ(a))), db = g·silu(a): one pass over a, b and g
        let g = g.contiguous()?;
        let (a_storage, al) = a.storage_and_layout();
        let (b_storage, bl) = b.storage_and_layout();
        let (g_storage, gl) = g.storage_and_layout();
        let (candle_core::Storage::Cpu(a_s), candle_core::Storage::Cpu(b_s), candle_core::Storage::Cpu(g_s)) =
            (&*a_storage, &*b_storage, &*g_storage)
        else {
            candle_core::bail!("silu gate backward: tensors not on the CPU");
        };
        let (av, bv, gv) = (slice(a_s, al)?, slice(b_s, bl)?, slice(g_s, gl)?);
        let (mut da, mut db) = (vec![0f32; av.len()], vec![0f32; av.len()]);
        let c = ELEMENTWISE_CHUNK;
        da.par_chunks_mut(c)
            .zip(db.par_chunks_mut(c))
            .zip(av.par_chunks(c))
            .zip(bv.par_chunks(c).zip(gv.par_chunks(c)))
            .for_each(|(((da, db), a), (b, g))| {
                sigmoid_into(a, db);
                for ((((da, db), &a), &b), &g) in da.iter_mut().zip(db.iter_mut()).zip(a).zip(b).zip(g) {
                    let s = *db;
                    *da = g * b * s * (1.0 + a * (1.0 - s));
                    *db = g * a * s;
                }
            });
        let da = Tensor::from_vec(da, a.shape(), a.device())?;
        let db = Tensor::from_vec(db, a.shape(), a.device())?;
        Ok((Some(da), Some(db)))
    }
}

/// Elements per parallel task of the elementwise kernels.
const ELEMENTWISE_CHUNK: usize = 16384;

// ------------------------------------------------------- attention and loss (outside the graph)
//
// The chunked attention (model::attention) and the chunked loss (model::loss) compute their
// forward and backward outside candle's graph, one chunk at a time. These kernels do each
// chunk's elementwise work in one pass and one allocation; elsewhere their composite twins
// run (the same arithmetic in candle ops, with a few more temporaries).

/// Which keys the rows of a chunk of attention scores see, and how scores are scaled and
/// biased: row (…, head, i) is the query at position `query_start + i`; column j the key at
/// `key_start + j`, visible when it is not after the query and, with a window, less than
/// `window` positions before it. ALiBi adds `slopes[head] · key position`.
#[derive(Clone, Debug)]
pub struct ScoreMask {
    pub scale: f64,
    pub query_start: usize,
    pub key_start: usize,
    pub window: Option<usize>,
    pub slopes: Option<Vec<f32>>,
}

impl ScoreMask {
    /// The visible key columns [lo, hi) of the query at `query`, among `keys` columns.
    pub(crate) fn visible(&self, query: usize, keys: usize) -> (usize, usize) {
        let hi = (query + 1).saturating_sub(self.key_start).min(keys);
        let lo = self.window.map_or(0, |w| (query + 1).saturating_sub(w).saturating_sub(self.key_start)).min(hi);
        (lo, hi)
    }
}

/// softmax(scores · scale + mask + ALiBi) over the last dimension of scores
/// [b, kv_heads, group, queries, keys] (query head = kv_head · group + g); f32 probabilities,
/// exactly 0 on hidden keys. No backward: used outside the graph.
pub fn masked_softmax(scores: &Tensor, mask: &ScoreMask) -> Res<Tensor> {
    let (_, kv, group, queries, keys) = scores.dims5()?;
    // our kernel: the CPU's for f32, the GPU's for any float dtype (no mask built on the host)
    if fused_ok(scores) || scores.device().is_cuda() {
        return scores.contiguous()?.apply_op1_no_bwd(&MaskedSoftmax {
            mask: mask.clone(),
            heads: kv * group,
            queries,
        });
    }
    let device = scores.device();
    let s = (scores * mask.scale)?.to_dtype(DType::F32)?;
    let mut bias = vec![f32::NEG_INFINITY; queries * keys];
    for i in 0..queries {
        let (lo, hi) = mask.visible(mask.query_start + i, keys);
        bias[i * keys + lo..i * keys + hi].fill(0.0);
    }
    let mut s = s.broadcast_add(&Tensor::from_vec(bias, (queries, keys), device)?)?;
    if let Some(slopes) = &mask.slopes {
        let positions =
            Tensor::arange(mask.key_start as u32, (mask.key_start + keys) as u32, device)?.to_dtype(DType::F32)?;
        let slopes = Tensor::new(slopes.as_slice(), device)?.reshape((kv, group, 1, 1))?;
        s = s.broadcast_add(&slopes.broadcast_mul(&positions.reshape((1, 1, 1, keys))?)?)?;
    }
    candle_nn::ops::softmax_last_dim(&s)
}

struct MaskedSoftmax {
    mask: ScoreMask,
    heads: usize,
    queries: usize,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Res<(CpuStorage, Shape)> {
        let x = slice(xs, xl)?;
        let n = *xl.dims().last().unwrap_or(&1);
        let scale = self.mask.scale as f32;
        // never zero-filled first: each row writes its hidden keys' zeros and its softmax
        let mut y = Vec::with_capacity(x.len());
        y.spare_capacity_mut()[..x.len()].par_chunks_mut(n).zip(x.par_chunks(n)).enumerate().for_each(
            |(row, (y, x))| {
                let (lo, hi) = self.mask.visible(self.mask.query_start + row % self.queries, n);
                let slope = self.mask.slopes.as_ref().map_or(0.0, |s| s[(row / self.queries) % self.heads]);
                y[..lo].fill(MaybeUninit::new(0.0));
                y[hi..].fill(MaybeUninit::new(0.0));
                softmax_row(&x[lo..hi], &mut y[lo..hi], scale, slope, (self.mask.key_start + lo) as f32);
            },
        );
        // SAFETY: every row wrote all of its n elements.
        unsafe { y.set_len(x.len()) };
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, xs: &candle_core::CudaStorage, xl: &Layout) -> Res<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::masked_softmax(xs, xl, &self.mask, self.heads, self.queries)?, xl.shape().clone()))
    }
}

/// The input gradient of a softmax from its output y and the output's gradient g:
/// y · (g − Σ g·y) over the last dimension. No backward: used outside the graph.
pub fn softmax_backward(y: &Tensor, g: &Tensor) -> Res<Tensor> {
    if (fused_ok(y) || (y.device().is_cuda() && y.dtype() == DType::F32)) && g.dtype() == DType::F32 {
        return y.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd);
    }
    let dot = (g * y)?.sum_keepdim(D::Minus1)?;
    y * g.broadcast_sub(&dot)?
}

/// Per row of logits [rows, vocab] (f32): log Σ exp(logits) − logits[target], the token's
/// negative log-likelihood. No backward: used outside the graph.
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> Res<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if targets.len() != rows || targets.iter().any(|&t| t as usize >= vocab) {
        candle_core::bail!("cross entropy: {} targets for {rows} rows of {vocab}", targets.len());
    }
    if fused_ok(logits) {
        return logits.contiguous()?.apply_op1_no_bwd(&CrossEntropyRows { targets: targets.to_vec() });
    }
    let t = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    logits.log_sum_exp(D::Minus1)? - logits.gather(&t, 1)?.squeeze(1)?
}

/// d loss / d logits for rows of logits [rows, vocab] (f32) whose loss is Σ weight · nll:
/// (softmax(logits) − one-hot(target)) · weight; rows of weight 0 are all zero. No backward.
pub fn cross_entropy_grad(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Res<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if targets.len() != rows || weights.len() != rows || targets.iter().any(|&t| t as usize >= vocab) {
        candle_core::bail!("cross entropy: {} targets and {} weights for {rows} rows", targets.len(), weights.len());
    }
    if fused_ok(logits) {
        let op = CrossEntropyGrad { targets: targets.to_vec(), weights: weights.to_vec() };
        return logits.contiguous()?.apply_op1_no_bwd(&op);
    }
    let device = logits.device();
    let t = Tensor::new(targets, device)?.unsqueeze(1)?;
    let minus_one = Tensor::full(-1f32, (rows, 1), device)?.to_dtype(logits.dtype())?;
    let d = candle_nn::ops::softmax_last_dim(logits)?.scatter_add(&t, &minus_one, 1)?;
    d.broadcast_mul(&Tensor::new(weights, device)?.to_dtype(logits.dtype())?.unsqueeze(1)?)
}

struct CrossEntropyRows {
    targets: Vec<u32>,
}

/// log Σ exp(x), using `scratch` (x's length) for the exps.
fn log_sum_exp_row(x: &[f32], scratch: &mut [f32]) -> f32 {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    scratch.copy_from_slice(x);
    max + exp_shifted_in_place(scratch, max).ln()
}

impl CustomOp1 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Res<(CpuStorage, Shape)> {
        let x = slice(xs, xl)?;
        let n = *xl.dims().last().unwrap_or(&1);
        let mut y = vec![0f32; self.targets.len()];
        y.par_iter_mut().zip(x.par_chunks(n)).zip(&self.targets).for_each_init(
            || vec![0f32; n],
            |scratch, ((y, x), &t)| {
                *y = log_sum_exp_row(x, scratch) - x[t as usize];
            },
        );
        Ok((CpuStorage::F32(y), Shape::from(self.targets.len())))
    }
}

struct CrossEntropyGrad {
    targets: Vec<u32>,
    weights: Vec<f32>,
}

impl CustomOp1 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Res<(CpuStorage, Shape)> {
        let x = slice(xs, xl)?;
        let n = *xl.dims().last().unwrap_or(&1);
        let mut d = vec![0f32; x.len()];
        d.par_chunks_mut(n).zip(x.par_chunks(n)).enumerate().for_each(|(row, (d, x))| {
            let w = self.weights[row];
            if w == 0.0 {
                return;
            }
            let lse = log_sum_exp_row(x, d);
            d.copy_from_slice(x);
            exp_shifted_in_place(d, lse);
            d.iter_mut().for_each(|d| *d *= w);
            d[self.targets[row] as usize] -= w;
        });
        Ok((CpuStorage::F32(d), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{max_diff, rand};
    use candle_core::Var;

    #[test]
    fn vector_exp_matches_libm_within_two_ulp_and_is_exactly_zero_far_below() {
        // 20 values per unit over the whole f32 range of exp, shifted by 0.5, plus the edges
        let mut x: Vec<f32> = (-2080..1780).map(|i| i as f32 / 20.0).collect();
        x.extend([f32::NEG_INFINITY, -1e30, 0.0, -0.0, 1e-30]);
        let mut y = x.clone();
        exp_shifted_in_place(&mut y, 0.5);
        for (&x, &y) in x.iter().zip(&y) {
            let want = (x - 0.5).exp();
            if want < f32::MIN_POSITIVE {
                assert!(y < 2.0 * f32::MIN_POSITIVE, "exp({x} - 0.5) = {y}, want {want}");
                continue;
            }
            let ulps = (y.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulps <= 2, "exp({x} - 0.5) = {y}, libm {want} ({ulps} ulp)");
        }
        assert_eq!(y[x.len() - 5], 0.0, "exp(-inf) must be exactly 0");
        // the sum it returns (over a range whose sum f32 holds)
        let x: Vec<f32> = (-400..400).map(|i| i as f32 / 20.0).collect();
        let want: f64 = x.iter().map(|&v| (v as f64 - 0.5).exp()).sum();
        let sum = exp_shifted_in_place(&mut x.clone(), 0.5) as f64;
        assert!(((sum - want) / want).abs() < 1e-5, "sum {sum} vs {want}");
    }

    /// Forward values and input gradients of `fused` and `composite` agree, with a random
    /// upstream gradient.
    fn check(name: &str, inputs: &[Tensor], f: impl Fn(&[Tensor], bool) -> Tensor) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (yf, yc) = (f(&ts, true), f(&ts, false));
        assert!(max_diff(&yf, &yc) < 1e-5, "{name}: forward differs by {}", max_diff(&yf, &yc));
        let up = rand(yf.dims(), 99);
        let gf = (&yf * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (&yc * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            if let (Some(a), Some(b)) = (gf.get(v.as_tensor()), gc.get(v.as_tensor())) {
                assert!(max_diff(a, b) < 1e-4, "{name}: gradient {i} differs by {}", max_diff(a, b));
            } else if i == 0 {
                panic!("{name}: no gradient for the input");
            }
        }
    }

    #[test]
    fn fused_ops_match_composite() {
        let (x, w, b) = (rand(&[3, 5, 48], 1), rand(&[48], 2).affine(0.3, 1.0).unwrap(), rand(&[48], 3));
        check("rms_norm", std::slice::from_ref(&x), |t, fused| {
            if fused {
                rms_norm(&t[0], &w, 1e-5).unwrap()
            } else {
                candle_nn::ops::rms_norm_slow(&t[0], &w, 1e-5).unwrap()
            }
        });
        check("layer_norm", std::slice::from_ref(&x), |t, fused| {
            if fused {
                layer_norm(&t[0], &w, &b, 1e-5).unwrap()
            } else {
                candle_nn::ops::layer_norm_slow(&t[0], &w, &b, 1e-5).unwrap()
            }
        });
        check("softmax", std::slice::from_ref(&x), |t, fused| {
            if fused {
                softmax_last_dim(&t[0]).unwrap()
            } else {
                candle_nn::ops::softmax(&t[0], D::Minus1).unwrap()
            }
        });
        let (cos, sin) = (rand(&[7, 8], 4), rand(&[7, 8], 5));
        check("rope", &[rand(&[2, 3, 7, 16], 6)], |t, fused| {
            if fused {
                rope(&t[0], &cos, &sin).unwrap()
            } else {
                candle_nn::rotary_emb::rope_slow(&t[0], &cos, &sin).unwrap()
            }
        });
        check("silu_gate", &[rand(&[4, 33], 7), rand(&[4, 33], 8)], |t, fused| {
            if fused {
                silu_gate(&t[0], &t[1]).unwrap()
            } else {
                (t[0].silu().unwrap() * &t[1]).unwrap()
            }
        });
    }

    #[test]
    fn attention_and_loss_kernels_match_their_composite_twins() {
        // the composite path runs for non-f32 input: compare on f64 copies
        let twin = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let scores = rand(&[2, 2, 3, 5, 9], 1);
        for mask in [
            ScoreMask { scale: 0.5, query_start: 4, key_start: 0, window: None, slopes: None },
            ScoreMask {
                scale: 0.3,
                query_start: 6,
                key_start: 2,
                window: Some(4),
                slopes: Some(vec![0.5, 0.25, 0.1, 0.05, 0.02, 0.01]),
            },
        ] {
            let fused = masked_softmax(&scores, &mask).unwrap();
            let composite = masked_softmax(&twin(&scores), &mask).unwrap().to_dtype(DType::F32).unwrap();
            assert!(max_diff(&fused, &composite) < 1e-6, "masked softmax: {}", max_diff(&fused, &composite));
            // a hidden key has probability 0: the query at position 4 sees keys 0..=4 only
            if mask.window.is_none() {
                let row = fused.flatten_to(3).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
                assert!(row[5..].iter().all(|&p| p == 0.0) && row[..5].iter().all(|&p| p > 0.0), "{row:?}");
            }
            let g = rand(fused.dims(), 2);
            let d = softmax_backward(&fused, &g).unwrap();
            let dc = softmax_backward(&twin(&fused), &twin(&g)).unwrap().to_dtype(DType::F32).unwrap();
            assert!(max_diff(&d, &dc) < 1e-6);
        }
        let logits = rand(&[4, 11], 3);
        let targets = [3u32, 0, 10, 7];
        let nll = cross_entropy_rows(&logits, &targets).unwrap();
        let nll_c = cross_entropy_rows(&twin(&logits), &targets).unwrap().to_dtype(DType::F32).unwrap();
        assert!(max_diff(&nll, &nll_c) < 1e-5);
        let weights = [0.5f32, 0.0, 0.25, 1.0];
        let d = cross_entropy_grad(&logits, &targets, &weights).unwrap();
        let dc = cross_entropy_grad(&twin(&logits), &targets, &weights).unwrap().to_dtype(DType::F32).unwrap();
        assert!(max_diff(&d, &dc) < 1e-6);
    }

    #[test]
    fn frozen_norm_weights_get_no_gradient() {
        let x = Var::from_tensor(&rand(&[2, 16], 1)).unwrap();
        let w = rand(&[16], 2);
        let grads = rms_norm(x.as_tensor(), &w, 1e-6).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none());
        assert!(grads.get(x.as_tensor()).is_some());
    }
}
