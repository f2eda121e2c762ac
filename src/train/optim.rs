//! AdamW with f32 moments and decoupled weight decay (as torch.optim.AdamW), and global-norm
//! gradient clipping. Our own rather than candle_nn's so that its state can be saved.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// torch.optim.AdamW's defaults.
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

struct Slot {
    var: Var,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    pub params: AdamWParams,
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> candle_core::Result<Self> {
        let slots = vars
            .into_iter()
            .map(|var| {
                let m = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Ok(Slot { v: m.clone(), m, var })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { params, slots, step: 0 })
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// This optimizer's variables, in the order of its slots.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.slots.iter().map(|s| &s.var)
    }

    /// The gradients of this optimizer's variables from a backward pass, in slot order.
    pub fn grads_of(&self, grads: &GradStore) -> Vec<Option<Tensor>> {
        self.slots.iter().map(|s| grads.get(s.var.as_tensor()).cloned()).collect()
    }

    /// The global L2 norm of the gradients of this optimizer's variables.
    pub fn grad_norm(&self, grads: &GradStore) -> candle_core::Result<f64> {
        global_norm(&self.grads_of(grads))
    }

    /// One update. Gradients are scaled by `grad_scale` first (clipping, accumulation).
    pub fn step(&mut self, grads: &GradStore, grad_scale: f64) -> candle_core::Result<()> {
        let grads = self.grads_of(grads);
        self.step_with(&grads, grad_scale)
    }

    /// One update from gradients given in slot order (`None`: no gradient, no update).
    pub fn step_with(&mut self, grads: &[Option<Tensor>], grad_scale: f64) -> candle_core::Result<()> {
        if grads.len() != self.slots.len() {
            candle_core::bail!("{} gradients for {} optimizer slots", grads.len(), self.slots.len());
        }
        self.step += 1;
        let p = self.params;
        let bias1 = 1.0 - p.beta1.powi(self.step as i32);
        let bias2 = 1.0 - p.beta2.powi(self.step as i32);
        for (s, g) in self.slots.iter_mut().zip(grads) {
            let Some(g) = g else { continue };
            let g = (g.to_dtype(DType::F32)? * grad_scale)?;
            s.m = ((&s.m * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            s.v = ((&s.v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&s.m / bias1)?;
            let v_hat = (&s.v / bias2)?;
            let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            let theta = s.var.as_tensor().to_dtype(DType::F32)?;
            let theta = ((theta * (1.0 - p.lr * p.weight_decay))? - (update * p.lr)?)?;
            s.var.set(&theta.to_dtype(s.var.dtype())?)?;
        }
        Ok(())
    }

    /// Updates taken so far (the bias correction's t).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// First and second moments of each slot, in slot order (for checkpoints).
    pub fn moments(&self) -> Vec<(Tensor, Tensor)> {
        self.slots.iter().map(|s| (s.m.clone(), s.v.clone())).collect()
    }

    /// Restore the state a checkpoint saved with `moments` and `step_count`.
    pub fn restore(&mut self, step: u64, moments: Vec<(Tensor, Tensor)>) -> candle_core::Result<()> {
        if moments.len() != self.slots.len() {
            candle_core::bail!("optimizer state has {} slots, the model {}", moments.len(), self.slots.len());
        }
        for (s, (m, v)) in self.slots.iter_mut().zip(moments) {
            if m.dims() != s.var.dims() || v.dims() != s.var.dims() {
                candle_core::bail!(
                    "optimizer state of shape {:?} for a parameter of shape {:?}",
                    m.dims(),
                    s.var.dims()
                );
            }
            s.m = m.to_dtype(DType::F32)?.to_device(s.var.device())?;
            s.v = v.to_dtype(DType::F32)?.to_device(s.var.device())?;
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of a set of gradients: the squares summed on their device, read once.
pub fn global_norm(grads: &[Option<Tensor>]) -> candle_core::Result<f64> {
    let squares: Vec<Tensor> =
        grads.iter().flatten().map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()).collect::<candle_core::Result<_>>()?;
    if squares.is_empty() {
        return Ok(0.0);
    }
    Ok((Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f32>()? as f64).sqrt())
}

/// The scale that clips a gradient of norm `norm` to at most `max_norm` (1 when it is within).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_torch_adamw_on_a_quadratic() {
        // minimise (x - 3)^2 from x = 0 with lr 0.1: by the update rule the three steps move
        // x by 1.0, 0.99897 and about 0.9987 times lr, so x ≈ 0.2998
        let x = Var::new(&[0f32], &Device::Cpu).unwrap();
        let mut opt =
            AdamW::new(vec![x.clone()], AdamWParams { lr: 0.1, weight_decay: 0.0, ..Default::default() }).unwrap();
        for _ in 0..3 {
            let loss = (x.as_tensor() - 3.0).unwrap().sqr().unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap(), 1.0).unwrap();
        }
        let v = x.as_tensor().to_vec1::<f32>().unwrap()[0];
        // each early Adam step moves by about lr
        assert!((v - 0.3).abs() < 1e-3, "{v}");
    }

    #[test]
    fn clipping() {
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert!((clip_scale(4.0, 1.0) - 0.25).abs() < 1e-6);
        assert_eq!(clip_scale(4.0, 0.0), 1.0);
    }
}
