//! The LoRA linear as one graph node on the CPU: y = base(x) + s·(drop(x)·Aᵀ)·Bᵀ.
//!
//! Written as candle ops the branch is about ten nodes (dropout, two transposes, two matmuls
//! with their broadcasts, the scale, the sum), and candle's backward gives every node's input
//! a zero tensor and then adds the gradient to it: for the [tokens, out] tensors of a LoRA
//! linear that is most of the memory traffic of its backward. This op computes the same
//! values in one pass each way and keeps nothing but its input and output: the small
//! [tokens, r] product and the dropout mask are computed again in the backward.
//!
//! With DoRA the op also applies the magnitude's per-output scale g = m/‖W + s·B·A‖:
//! y = g ⊙ (base(x) − bias + s·x·Aᵀ·Bᵀ) + bias, without dropout of its own (with dropout,
//! `LoraLinear::forward_dora` gives it the dropped input and adds the base of what dropout
//! removed). g comes in as a last column of B, so its gradient flows to m through the graph; in
//! the backward the unscaled output is (y − bias)/g, read off the op's own output, so nothing
//! more is kept.
//!
//! Other devices and dtypes take the composite path in `LoraLinear::forward`, which the tests
//! check this op against (and the parity tests check both against PEFT).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::dropout_mul_cpu;
use crate::model::ops::slice as f32_slice;
use crate::quant::bf16_matmul::{f32_matmul_into as matmul_into, Mat};
use crate::quant::FrozenLinear;

pub(super) struct FusedLora {
    pub base: FrozenLinear,
    pub scale: f32,
    /// Dropout probability and mask key (`Rng::key(seed, path)`), when dropout is on.
    pub dropout: Option<(f32, u64)>,
    /// DoRA: B's input is [B | g], g the per-output scale (never zero; the caller checks).
    pub dora: bool,
}

type Res<T> = candle_core::Result<T>;

/// Splits DoRA's [B | g] ([out, r + 1]) into B ([out, r]) and g.
fn split_scale(b_ext: &[f32], out_f: usize, r: usize) -> (Vec<f32>, Vec<f32>) {
    let mut b = Vec::with_capacity(out_f * r);
    let mut g = Vec::with_capacity(out_f);
    for row in b_ext.chunks_exact(r + 1) {
        b.extend_from_slice(&row[..r]);
        g.push(row[r]);
    }
    (b, g)
}

impl FusedLora {
    /// The base linear's bias as a host vector of `out_f` values (zeros without one).
    fn bias(&self, out_f: usize) -> Res<Vec<f32>> {
        match self.base.bias() {
            Some(b) => b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>(),
            None => Ok(vec![0.0; out_f]),
        }
    }

    /// drop(x) when dropout is on (a fresh copy), else None (x itself is used).
    fn dropped(&self, x: &CpuStorage, xl: &Layout) -> Res<Option<Vec<f32>>> {
        match self.dropout {
            Some((p, key)) => match dropout_mul_cpu(x, xl, key, p)? {
                CpuStorage::F32(v) => Ok(Some(v)),
                _ => candle_core::bail!("fused LoRA: dropout changed the dtype"),
            },
            None => Ok(None),
        }
    }
}

impl CustomOp3 for FusedLora {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        b_s: &CpuStorage,
        bl: &Layout,
    ) -> Res<(CpuStorage, Shape)> {
        let (rows, in_f) = xl.shape().dims2()?;
        let (r, out_f) = (al.dims()[0], bl.dims()[0]);
        let a = f32_slice(a_s, al)?;
        let (b_own, scale_g) = match self.dora {
            true => {
                let (b, g) = split_scale(f32_slice(b_s, bl)?, out_f, r);
                (Some(b), Some(g))
            }
            false => (None, None),
        };
        let b = b_own.as_deref().map_or_else(|| f32_slice(b_s, bl), Ok)?;
        let mut y = match self.base.forward_cpu(xs, xl)? {
            CpuStorage::F32(y) => y,
            other => candle_core::bail!("fused LoRA: the base linear gave {:?}", other.dtype()),
        };
        let dropped = self.dropped(xs, xl)?;
        let h = match &dropped {
            Some(h) => h.as_slice(),
            None => f32_slice(xs, xl)?,
        };
        let mut u = vec![0f32; rows * r];
        matmul_into(&mut u, 0.0, Mat::new(h, rows, in_f), Mat::new(a, r, in_f).t(), 1.0);
        matmul_into(&mut y, 1.0, Mat::new(&u, rows, r), Mat::new(b, out_f, r).t(), self.scale);
        if let Some(g) = &scale_g {
            // y = g ⊙ (y − bias) + bias
            let bias = self.bias(out_f)?;
            y.par_chunks_mut(out_f).for_each(|row| {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = g[j] * (*v - bias[j]) + bias[j];
                }
            });
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, out_f))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Res<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (rows, in_f) = x.dims2()?;
        let (r, out_f) = (a.dims()[0], b.dims()[0]);
        // DoRA: the gradient reaching the LoRA linear is g_out ⊙ scale, and the scale's own is
        // Σ_rows g_out ⊙ (y − bias)/scale
        let (b, g, grad_scale) = match self.dora {
            false => (b.clone(), g, None),
            true => {
                let b_ext = b.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                let (b_own, scale) = split_scale(&b_ext, out_f, r);
                let (gy, yv) = (g.flatten_all()?.to_vec1::<f32>()?, y.contiguous()?.flatten_all()?.to_vec1::<f32>()?);
                let bias = self.bias(out_f)?;
                let mut gz = gy.clone();
                gz.par_chunks_mut(out_f).for_each(|row| row.iter_mut().zip(&scale).for_each(|(v, s)| *v *= s));
                // partial sums over fixed blocks of rows, added in order: the same bits every run
                // (a resumed run repeats the uninterrupted one exactly)
                const BLOCK: usize = 64;
                let partials: Vec<Vec<f32>> = gy
                    .par_chunks(out_f * BLOCK)
                    .zip(yv.par_chunks(out_f * BLOCK))
                    .map(|(gb, yb)| {
                        let mut acc = vec![0f32; out_f];
                        for (gr, yr) in gb.chunks_exact(out_f).zip(yb.chunks_exact(out_f)) {
                            for j in 0..out_f {
                                acc[j] += gr[j] * (yr[j] - bias[j]) / scale[j];
                            }
                        }
                        acc
                    })
                    .collect();
                let mut grad_scale = vec![0f32; out_f];
                for p in &partials {
                    grad_scale.iter_mut().zip(p).for_each(|(a, v)| *a += v);
                }
                let device = x.device();
                (
                    Tensor::from_vec(b_own, (out_f, r), device)?,
                    Tensor::from_vec(gz, (rows, out_f), device)?,
                    Some(grad_scale),
                )
            }
        };
        let (x_storage, xl) = x.storage_and_layout();
        let (a_storage, al) = a.storage_and_layout();
        let (b_storage, bl) = b.storage_and_layout();
        let (g_storage, gl) = g.storage_and_layout();
        use candle_core::Storage::Cpu;
        let (Cpu(xs), Cpu(a_s), Cpu(b_s), Cpu(gs)) = (&*x_storage, &*a_storage, &*b_storage, &*g_storage) else {
            candle_core::bail!("fused LoRA: tensors not on the CPU");
        };
        let (av, bv, gv) = (f32_slice(a_s, al)?, f32_slice(b_s, bl)?, f32_slice(gs, gl)?);
        let dropped = self.dropped(xs, xl)?;
        let h = match &dropped {
            Some(h) => h.as_slice(),
            None => f32_slice(xs, xl)?,
        };
        let s = self.scale;
        // u = h·Aᵀ [rows, r] again; v = g·B [rows, r]
        let mut u = vec![0f32; rows * r];
        matmul_into(&mut u, 0.0, Mat::new(h, rows, in_f), Mat::new(av, r, in_f).t(), 1.0);
        let mut v = vec![0f32; rows * r];
        matmul_into(&mut v, 0.0, Mat::new(gv, rows, out_f), Mat::new(bv, out_f, r), 1.0);
        // dB = s·gᵀ·u [out, r]; dA = s·vᵀ·h [r, in]
        let mut grad_b = vec![0f32; out_f * r];
        matmul_into(&mut grad_b, 0.0, Mat::new(gv, rows, out_f).t(), Mat::new(&u, rows, r), s);
        let mut grad_a = vec![0f32; r * in_f];
        matmul_into(&mut grad_a, 0.0, Mat::new(&v, rows, r).t(), Mat::new(h, rows, in_f), s);
        drop(dropped);
        // dx = g·W + mask ⊙ (s·v·A) / (1 − p)
        let mut grad_x = match self.base.input_grad_cpu(gs, gl)? {
            CpuStorage::F32(d) => d,
            other => candle_core::bail!("fused LoRA: the base gradient is {:?}", other.dtype()),
        };
        match self.dropout {
            None => matmul_into(&mut grad_x, 1.0, Mat::new(&v, rows, r), Mat::new(av, r, in_f), s),
            Some((p, key)) => {
                let mut branch = vec![0f32; rows * in_f];
                matmul_into(&mut branch, 0.0, Mat::new(&v, rows, r), Mat::new(av, r, in_f), s);
                let masked = dropout_mul_cpu(&CpuStorage::F32(branch), &Layout::contiguous((rows, in_f)), key, p)?;
                let CpuStorage::F32(masked) = masked else { unreachable!("f32 in, f32 out") };
                grad_x.iter_mut().zip(&masked).for_each(|(d, m)| *d += m);
            }
        }
        let device = x.device();
        let grad_b = match grad_scale {
            None => Tensor::from_vec(grad_b, (out_f, r), device)?,
            // [dB | d scale], the shape of [B | scale]
            Some(gs) => {
                let mut ext = Vec::with_capacity(out_f * (r + 1));
                for (row, s) in grad_b.chunks_exact(r).zip(&gs) {
                    ext.extend_from_slice(row);
                    ext.push(*s);
                }
                Tensor::from_vec(ext, (out_f, r + 1), device)?
            }
        };
        Ok((
            Some(Tensor::from_vec(grad_x, (rows, in_f), device)?),
            Some(Tensor::from_vec(grad_a, (r, in_f), device)?),
            Some(grad_b),
        ))
    }
}
