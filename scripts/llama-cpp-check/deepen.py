#!/usr/bin/env python3
"""A copy of a model folder made LAYERS deep by repeating its layers (layer i is layer i mod n):
llama.cpp tells some families' variants apart by depth alone (Baichuan: RoPE at 32 layers, ALiBi
at 40). python deepen.py MODEL_DIR LAYERS  (in place)"""
import json, os, re, sys
from safetensors.torch import load_file, save_file
d, layers = sys.argv[1], int(sys.argv[2])
cfg_path = os.path.join(d, "config.json")
cfg = json.load(open(cfg_path))
key = next(k for k in ["num_hidden_layers", "n_layer", "num_layers"] if k in cfg)
n = cfg[key]
tensors = load_file(os.path.join(d, "model.safetensors"))
out = {}
for name, t in tensors.items():
    m = re.search(r"\.(\d+)\.", name)
    if not m:
        out[name] = t
        continue
    i = int(m.group(1))
    for j in range(i, layers, n):
        out[name[:m.start(1)] + str(j) + name[m.end(1):]] = t.clone()
save_file(out, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
cfg[key] = layers
json.dump(cfg, open(cfg_path, "w"), indent=2)
