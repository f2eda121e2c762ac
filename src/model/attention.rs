//! Causal attention in chunks of queries that keeps for the backward only q, k and v: the
//! scores and probabilities of a chunk exist only while that chunk is computed, in the forward
//! and again in the backward (the FlashAttention recipe, at the granularity of candle's
//! matmuls). Eager attention keeps several [heads, t, t] tensors per layer instead, which is
//! what made long sequences run out of memory.
//!
//! Grouped-query attention folds each KV group's query heads into one matmul, so keys and
//! values are never repeated; a chunk reads only the keys its queries can see (causal, sliding
//! window), which also halves the work of causal attention.
//!
//! A CPU run in bf16 computes the same recipe in `tiles`: per KV head, in tiles of queries
//! small enough that their scores stay in cache, with the matmuls on the bf16 kernel.

use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::ops::{self, ScoreMask};
use crate::stash::Stash;

mod tiles;
pub use tiles::TILE_SCORE_BYTES;

type Res<T> = candle_core::Result<T>;

/// Bytes of f32 scores one chunk may hold: chunks are as many queries as fit in this.
pub const CHUNK_SCORE_BYTES: usize = 16 << 20;

/// Which keys a query sees: query i of the call sits at position `offset + i` and sees keys
/// j ≤ offset + i (and offset + i − j < window with a sliding window); with ALiBi, scores get
/// slope_h · j added (under softmax the same as slope_h · (j − i)).
#[derive(Clone, Debug)]
pub struct AttentionMask {
    pub offset: usize,
    pub window: Option<usize>,
    /// ALiBi slopes, one per query head.
    pub alibi: Option<Vec<f32>>,
}

/// Queries per chunk for a batch of `b`, `heads` query heads and `keys` key positions.
pub fn query_chunk(b: usize, heads: usize, queries: usize, keys: usize) -> usize {
    let per_query = b * heads * keys * 4;
    (CHUNK_SCORE_BYTES / per_query.max(1)).clamp(1, queries.max(1))
}

/// softmax(q·kᵀ/√d + mask)·v for q [b, heads, t, d], k and v [b, kv_heads, offset + t, d];
/// returns [b, heads, t, d]. Scores and softmax are computed in f32. With `bf16_operands` (a
/// CPU run in bf16, f32 activations) the matmuls round their operands to bf16 and sum in f32,
/// as the frozen linears do and as torch's autocast runs attention's matmuls.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask, bf16_operands: bool) -> Res<Tensor> {
    let bf16_operands = bf16_operands && q.device().is_cpu() && q.dtype() == DType::F32;
    let plan = Plan::new(q, k, mask, bf16_operands)?;
    let out = plan.output(&q.detach(), &k.detach(), &v.detach())?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    q.apply_op3(k, v, AttentionOp { plan, out: Stash::new(out) })
}

/// The shapes of one call and its chunks.
#[derive(Clone, Debug)]
struct Plan {
    b: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    d: usize,
    chunk: usize,
    scale: f64,
    mask: AttentionMask,
    /// The matmuls take bf16 operands (`bf16_matmul`); f32 CPU tensors only, computed in
    /// cache-sized tiles (`tiles`), `chunk` queries per tile.
    bf16_operands: bool,
}

/// One chunk: queries `start..start + len`, seeing keys `lo..hi`.
struct Chunk {
    start: usize,
    len: usize,
    lo: usize,
    hi: usize,
}

impl Plan {
    fn new(q: &Tensor, k: &Tensor, mask: &AttentionMask, bf16_operands: bool) -> Res<Self> {
        let (b, heads, t, d) = q.dims4()?;
        let (kb, kv_heads, keys, kd) = k.dims4()?;
        if kb != b || kd != d || kv_heads == 0 || heads % kv_heads != 0 || keys != mask.offset + t {
            candle_core::bail!("attention: q {:?} and k {:?} do not fit (offset {})", q.dims(), k.dims(), mask.offset);
        }
        if mask.alibi.as_ref().is_some_and(|s| s.len() != heads) {
            candle_core::bail!(
                "attention: ALiBi slopes for {} heads, not {heads}",
                mask.alibi.as_ref().map_or(0, Vec::len)
            );
        }
        let chunk = match bf16_operands {
            true => tiles::tile_queries(heads / kv_heads, t, keys),
            false => query_chunk(b, heads, t, keys),
        };
        let scale = 1.0 / (d as f64).sqrt();
        Ok(Plan { b, heads, kv_heads, t, d, chunk, scale, mask: mask.clone(), bf16_operands })
    }

    /// The output [b, heads, t, d], from untracked inputs: in tiles per KV head with bf16
    /// operands, else in chunks of queries through candle's ops.
    fn output(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        if !self.bf16_operands {
            return self.forward(q, k, v);
        }
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let out = with_f32_slices(&[&q, &k, &v], |s| self.forward_tiles(s[0], s[1], s[2]))?;
        Tensor::from_vec(out, q.shape(), q.device())
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn chunks(&self) -> Vec<Chunk> {
        let offset = self.mask.offset;
        (0..self.t)
            .step_by(self.chunk)
            .map(|start| {
                let len = self.chunk.min(self.t - start);
                let hi = offset + start + len;
                let lo = self.mask.window.map_or(0, |w| (offset + start + 1).saturating_sub(w));
                Chunk { start, len, lo, hi }
            })
            .collect()
    }

    /// [b, heads, len, d] rows of a chunk as [b, kv_heads, group·len, d]: the query heads of
    /// one KV head side by side, so one matmul serves the whole group.
    fn grouped(&self, x: &Tensor, c: &Chunk) -> Res<Tensor> {
        x.narrow(2, c.start, c.len)?.contiguous()?.reshape((self.b, self.kv_heads, self.group() * c.len, self.d))
    }

    fn ungrouped(&self, x: &Tensor, c: &Chunk) -> Res<Tensor> {
        x.reshape((self.b, self.heads, c.len, self.d))
    }

    fn keys(&self, k: &Tensor, c: &Chunk) -> Res<Tensor> {
        k.narrow(2, c.lo, c.hi - c.lo)?.contiguous()
    }

    /// The chunk's f32 probabilities [b, kv_heads, group·len, hi − lo].
    fn probs(&self, q: &Tensor, k: &Tensor, c: &Chunk) -> Res<Tensor> {
        let keys = c.hi - c.lo;
        let scores = q.matmul(&k.t()?)?.reshape((self.b, self.kv_heads, self.group(), c.len, keys))?;
        let mask = ScoreMask {
            scale: self.scale,
            query_start: self.mask.offset + c.start,
            key_start: c.lo,
            window: self.mask.window,
            slopes: self.mask.alibi.clone(),
        };
        ops::masked_softmax(&scores, &mask)?.reshape((self.b, self.kv_heads, self.group() * c.len, keys))
    }

    /// The output [b, heads, t, d], from untracked inputs.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        let mut outs = Vec::new();
        for c in self.chunks() {
            let p = self.probs(&self.grouped(q, &c)?, &self.keys(k, &c)?, &c)?.to_dtype(q.dtype())?;
            outs.push(self.ungrouped(&p.matmul(&self.keys(v, &c)?)?, &c)?);
        }
        Tensor::cat(&outs, 2)
    }

    /// Gradients of q, k and v, recomputing each chunk's probabilities P:
    /// dP = dO·vᵀ, dS = P ⊙ (dP − Σ dP ⊙ P), dq = dS·k/√d, dk = dSᵀ·q/√d, dv = Pᵀ·dO.
    fn backward(&self, q: &Tensor, k: &Tensor, v: &Tensor, grad: &Tensor) -> Res<(Tensor, Tensor, Tensor)> {
        let dtype = q.dtype();
        let grad = grad.to_dtype(dtype)?;
        // keys and values collect the gradients of every chunk, in f32
        let dk = Tensor::zeros(k.shape(), DType::F32, k.device())?;
        let dv = Tensor::zeros(v.shape(), DType::F32, v.device())?;
        let mut dqs = Vec::new();
        for c in self.chunks() {
            let (qc, kc, vc) = (self.grouped(q, &c)?, self.keys(k, &c)?, self.keys(v, &c)?);
            let go = self.grouped(&grad, &c)?;
            let p = self.probs(&qc, &kc, &c)?;
            let dp = go.matmul(&vc.t()?)?.to_dtype(DType::F32)?;
            let ds = ops::softmax_backward(&p, &dp)?.to_dtype(dtype)?;
            drop(dp);
            dqs.push(self.ungrouped(&(ds.matmul(&kc)? * self.scale)?, &c)?);
            accumulate(&dk, &(ds.t()?.matmul(&qc)? * self.scale)?, c.lo)?;
            accumulate(&dv, &p.to_dtype(dtype)?.t()?.matmul(&go)?, c.lo)?;
        }
        Ok((Tensor::cat(&dqs, 2)?, dk.to_dtype(dtype)?, dv.to_dtype(dtype)?))
    }
}

/// f(the f32 data of each contiguous CPU tensor).
fn with_f32_slices<R>(tensors: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Res<R> {
    let held: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let slices = held
        .iter()
        .map(|(storage, layout)| match &**storage {
            candle_core::Storage::Cpu(s) => ops::slice(s, layout),
            _ => candle_core::bail!("attention: bf16 operands need CPU tensors"),
        })
        .collect::<Res<Vec<_>>>()?;
    Ok(f(&slices))
}

/// acc[:, :, lo..lo + n] += part, in place (acc is a fresh f32 buffer outside any graph).
fn accumulate(acc: &Tensor, part: &Tensor, lo: usize) -> Res<()> {
    let n = part.dim(2)?;
    let sum = (acc.narrow(2, lo, n)? + part.to_dtype(DType::F32)?)?;
    acc.slice_set(&sum, 2, lo)
}

/// Records attention in the graph with only its inputs, its output and the log-sum-exp kept.
struct AttentionOp {
    plan: Plan,
    out: Stash,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "chunked-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Res<(CpuStorage, Shape)> {
        self.out.cpu_fwd()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Res<(CudaStorage, Shape)> {
        self.out.cuda_fwd()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Res<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, grad) = (q.detach(), k.detach(), v.detach(), grad.detach());
        if self.plan.bf16_operands {
            let (q, k, v, grad) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, grad.contiguous()?);
            let [dq, dk, dv] =
                with_f32_slices(&[&q, &k, &v, &grad], |s| self.plan.backward_tiles(s[0], s[1], s[2], s[3]))?;
            let dev = q.device();
            return Ok((
                Some(Tensor::from_vec(dq, q.shape(), dev)?),
                Some(Tensor::from_vec(dk, k.shape(), dev)?),
                Some(Tensor::from_vec(dv, v.shape(), dev)?),
            ));
        }
        let (dq, dk, dv) = self.plan.backward(&q, &k, &v, &grad)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{max_diff, rand};

    /// Eager attention with the whole score matrix, for tests: the plain twin of `attention`.
    fn attention_eager(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask) -> Res<Tensor> {
        let (b, heads, t, d) = q.dims4()?;
        let kv_heads = k.dim(1)?;
        let keys = k.dim(2)?;
        let repeat = |x: &Tensor| -> Res<Tensor> {
            let n = heads / kv_heads;
            x.unsqueeze(2)?.broadcast_as((b, kv_heads, n, keys, d))?.reshape((b, heads, keys, d))
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let s = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (d as f64).sqrt()))?.to_dtype(DType::F32)?;
        let mut bias = vec![0f32; t * keys];
        for i in 0..t {
            for j in 0..keys {
                let pos = mask.offset + i;
                if j > pos || mask.window.is_some_and(|w| pos - j >= w) {
                    bias[i * keys + j] = f32::NEG_INFINITY;
                }
            }
        }
        let mut s = s.broadcast_add(&Tensor::from_vec(bias, (t, keys), q.device())?)?;
        if let Some(slopes) = &mask.alibi {
            let j = Tensor::arange(0u32, keys as u32, q.device())?.to_dtype(DType::F32)?;
            let slopes = Tensor::new(slopes.as_slice(), q.device())?;
            s = s.broadcast_add(&slopes.reshape((heads, 1, 1))?.broadcast_mul(&j.reshape((1, 1, keys))?)?)?;
        }
        let p = candle_nn::ops::softmax(&s, candle_core::D::Minus1)?.to_dtype(q.dtype())?;
        p.matmul(&v)
    }
    use candle_core::Var;

    /// Outputs and the gradients of q, k and v equal eager attention's, with chunks set by hand
    /// far smaller than the sequence.
    fn check(heads: usize, kv_heads: usize, t: usize, offset: usize, window: Option<usize>, alibi: bool, chunk: usize) {
        check_with(heads, kv_heads, t, offset, window, alibi, chunk, false)
    }

    /// With `bf16_operands` the tolerance is bf16's: every matmul operand rounded to 8 bits of
    /// mantissa (relative 2⁻⁹) over sums of up to a few dozen unit-sized products.
    #[allow(clippy::too_many_arguments)]
    fn check_with(
        heads: usize,
        kv_heads: usize,
        t: usize,
        offset: usize,
        window: Option<usize>,
        alibi: bool,
        chunk: usize,
        bf16_operands: bool,
    ) {
        let (tol_out, tol_grad) = if bf16_operands { (2e-2, 5e-2) } else { (1e-5, 1e-4) };
        let (b, d) = (2, 8);
        let q = Var::from_tensor(&rand(&[b, heads, t, d], 1)).unwrap();
        let k = Var::from_tensor(&rand(&[b, kv_heads, offset + t, d], 2)).unwrap();
        let v = Var::from_tensor(&rand(&[b, kv_heads, offset + t, d], 3)).unwrap();
        let slopes = alibi.then(|| crate::model::block::alibi_slopes(heads));
        let mask = AttentionMask { offset, window, alibi: slopes };
        let mut plan = Plan::new(q.as_tensor(), k.as_tensor(), &mask, bf16_operands).unwrap();
        plan.chunk = chunk;
        let out = plan.output(q.as_tensor(), k.as_tensor(), v.as_tensor()).unwrap();
        let y =
            q.as_tensor().apply_op3(k.as_tensor(), v.as_tensor(), AttentionOp { plan, out: Stash::new(out) }).unwrap();
        let want = attention_eager(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask).unwrap();
        assert!(max_diff(&y, &want) < tol_out, "forward differs by {}", max_diff(&y, &want));
        // the rounding must show: the bf16 path really ran
        assert_eq!(bf16_operands, max_diff(&y, &want) > 1e-4, "forward differs by {}", max_diff(&y, &want));
        let up = rand(y.dims(), 9);
        let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gw = (&want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, e) = (g.get(var.as_tensor()).unwrap(), gw.get(var.as_tensor()).unwrap());
            assert!(max_diff(a, e) < tol_grad, "{name}: gradient differs by {}", max_diff(a, e));
        }
    }

    #[test]
    fn bf16_operands_match_eager_to_bf16_rounding() {
        check_with(4, 2, 13, 0, None, false, 5, true);
        check_with(6, 2, 5, 4, Some(6), true, 2, true);
        check_with(2, 2, 70, 0, None, false, 64, true);
    }

    #[test]
    fn chunked_matches_eager() {
        check(4, 4, 13, 0, None, false, 4);
        check(4, 2, 13, 0, None, false, 5);
        check(4, 1, 9, 0, Some(3), false, 2);
        check(4, 4, 7, 0, None, true, 3);
        check(6, 2, 5, 4, Some(6), false, 2);
        check(2, 2, 6, 0, None, false, 64);
    }
}
