"""qlora-studio's seeded randomness (src/rng.rs, SplitMix64) in numpy, so that the PyTorch run
can take the same example order per epoch (train::trainer::epoch_order) and the same LoRA A
initialisation (lora::LoraLinear::init_lora: Kaiming-uniform, bound 1/sqrt(in), drawn from
Rng::for_key(seed, module path)). Only the LoRA dropout masks then differ between the sides."""

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1


def key(seed, name):
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK
    return (seed ^ h) & MASK


def _mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


class Rng:
    def __init__(self, state):
        self.state = state

    @classmethod
    def for_key(cls, seed, name):
        return cls(key(seed, name))

    def next_u64(self):
        self.state = (self.state + GOLDEN) & MASK
        return _mix(self.state)

    def below(self, n):
        return self.next_u64() % n


def _outputs(state, n):
    """The first n outputs of the generator starting at `state`, vectorised (numpy wraps uint64)."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(state) + i * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(seed, name, n, lo, hi):
    """Rng::for_key(seed, name).uniform(n, lo, hi): lo + (hi - lo) * (next_f64() as f32), in f32."""
    u = (_outputs(key(seed, name), n) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    lo, hi = np.float32(lo), np.float32(hi)
    return lo + (hi - lo) * u.astype(np.float32)


def lora_a_init(seed, path, r, in_features):
    bound = np.float32(1.0) / np.sqrt(np.float32(in_features))
    return uniform(seed, path, r * in_features, -bound, bound).reshape(r, in_features)


def epoch_order(n, seed, epoch):
    rng = Rng.for_key(seed, f"epoch {epoch}")
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order
