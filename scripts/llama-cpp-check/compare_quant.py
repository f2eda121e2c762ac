#!/usr/bin/env python3
"""Our Q4_K_M (or Q8_0) file against llama-quantize's of our F16 file: each tensor's type, and how
far each dequantizes from the F16 values (relative RMS), ours and llama-quantize's side by side.
python compare_quant.py OURS.gguf LLAMA_QUANTIZE.gguf F16.gguf"""
import sys
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
ours, theirs, f16 = (GGUFReader(p) for p in sys.argv[1:4])
t_ours = {t.name: t for t in ours.tensors}
t_theirs = {t.name: t for t in theirs.tensors}
same_type = same_bytes = 0
ratios = []
for t in f16.tensors:
    a, b = t_ours[t.name], t_theirs[t.name]
    ref = dequantize(t.data, t.tensor_type).astype(np.float64)
    if a.tensor_type == b.tensor_type:
        same_type += 1
        same_bytes += int(np.array_equal(np.asarray(a.data), np.asarray(b.data)))
    else:
        print(f"type differs: {t.name}: ours {a.tensor_type.name}, llama-quantize {b.tensor_type.name}")
    if len(t.shape) < 2:
        continue
    rms = lambda x: float(np.sqrt(np.mean(x * x)))
    ea = rms(dequantize(a.data, a.tensor_type) - ref) / rms(ref)
    eb = rms(dequantize(b.data, b.tensor_type) - ref) / rms(ref)
    ratios.append(ea / eb if eb > 0 else 1.0)
n = len(f16.tensors)
print(f"{same_type} of {n} tensors of the same type; {same_bytes} of them byte-identical")
r = np.array(ratios)
print(f"quantization error ours / llama-quantize's over {len(r)} matrices: median {np.median(r):.4f}, "
      f"min {r.min():.4f}, max {r.max():.4f}")
