//! A small seeded random generator (SplitMix64), so that LoRA initialisation and generated
//! benchmark weights repeat exactly for a given seed on every device (candle's CPU generator
//! cannot be seeded).

pub struct Rng(u64);

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// A generator for one named tensor, independent of the order tensors are made in.
    pub fn for_key(seed: u64, key: &str) -> Self {
        Rng(Self::key(seed, key))
    }

    /// The starting state for one named stream: FNV-1a of the name, mixed with the seed.
    pub fn key(seed: u64, key: &str) -> u64 {
        seed ^ key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
    }

    /// The i-th output (from 0) of the generator that starts at `state`, without drawing the
    /// ones before it: SplitMix64 is counter-based, which lets a GPU kernel draw element i of
    /// a mask on its own thread (kernels/qls.cu, splitmix64_nth, computes the same).
    #[inline]
    pub fn nth(state: u64, i: u64) -> u64 {
        mix(state.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN)))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix(self.0)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + (hi - lo) * self.next_f64() as f32).collect()
    }

    /// Normal samples (Box–Muller).
    pub fn normal(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1 = self.next_f64().max(f64::MIN_POSITIVE);
            let u2 = self.next_f64();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u2;
            out.push(mean + std * (r * t.cos()) as f32);
            out.push(mean + std * (r * t.sin()) as f32);
        }
        out.truncate(n);
        out
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeatable_and_roughly_normal() {
        assert_eq!(Rng::new(7).normal(5, 0.0, 1.0), Rng::new(7).normal(5, 0.0, 1.0));
        assert_ne!(Rng::for_key(7, "a").next_u64(), Rng::for_key(7, "b").next_u64());
        let mut r = Rng::for_key(7, "a");
        for i in 0..5 {
            assert_eq!(r.next_u64(), Rng::nth(Rng::key(7, "a"), i));
        }
        let v = Rng::new(1).normal(20_000, 0.0, 2.0);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.05 && (var.sqrt() - 2.0).abs() < 0.05, "{mean} {var}");
        assert!(Rng::new(3).uniform(1000, -1.0, 1.0).iter().all(|x| (-1.0..1.0).contains(x)));
    }
}
