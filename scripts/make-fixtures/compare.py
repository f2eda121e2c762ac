#!/usr/bin/env python3
"""Compare a fixture set made by make_fixtures.py with another one (usually the committed
tests/fixtures).

  compare.py tests/fixtures /tmp/fixtures            # same shapes: values within the tolerances
  compare.py --format tests/fixtures /tmp/fixtures-alt  # other shapes: same files, keys, dtypes

Values: weights, inputs, adapters and NF4 data must be equal bit for bit; logits within
meta.json's logits_abs, the loss within loss_abs, LoRA gradients within grad_rel (L2 norm of the
difference over the reference's); JSON files equal but for version strings. Exits 1 on any
difference, and prints each.
"""

import argparse
import json
import os
import re
import sys

import torch
from safetensors import safe_open

REMOTE_CODE = {"chatglm3", "baichuan_7b", "baichuan_13b", "baichuan2_7b", "baichuan2_13b", "internlm", "qwen", "xverse",
               "phi_msft"}
# "source": the real fixture names the transformers version in it
VERSION_KEYS = {"transformers_version", "transformers", "peft", "torch", "bitsandbytes", "peft_version", "source"}
TOL = {"logits_abs": 1e-4, "loss_abs": 1e-5, "grad_rel": 1e-3}


def layerless(keys):
    """Key names with the layer (and expert) numbers taken out: sets of other depths compare."""
    return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}


def load(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def strip_versions(v):
    if isinstance(v, dict):
        return {k: strip_versions(x) for k, x in v.items() if k not in VERSION_KEYS}
    if isinstance(v, list):
        return [strip_versions(x) for x in v]
    return v


def order_free(v):
    """target_modules is a set that PEFT writes in no fixed order."""
    if isinstance(v, dict):
        return {k: (sorted(x) if k == "target_modules" and isinstance(x, list) else order_free(x))
                for k, x in v.items()}
    return v


def compare_json(a, b, rel, fmt, errors):
    ja, jb = (json.load(open(p, encoding="utf-8")) for p in (a, b))
    if fmt:
        # other shapes: the same keys at every level
        def keys(v, prefix=""):
            if isinstance(v, dict):
                out = set()
                for k, x in v.items():
                    out |= {prefix + k} | keys(x, prefix + k + ".")
                return out
            return set()
        if keys(ja) != keys(jb):
            errors.append(f"{rel}: keys differ: {sorted(keys(ja) ^ keys(jb))}")
        return
    if order_free(strip_versions(ja)) != order_free(strip_versions(jb)):
        errors.append(f"{rel}: differs")


def tolerance(meta_path):
    if os.path.exists(meta_path):
        return {**TOL, **json.load(open(meta_path)).get("tolerance", {})}
    return TOL


def compare_safetensors(a, b, rel, fmt, errors, tol):
    ta, ma = load(a)
    tb, mb = load(b)
    ka, kb = (layerless(t) if fmt else set(t) for t in (ta, tb))
    if ka != kb:
        errors.append(f"{rel}: keys differ: only in the first {sorted(ka - kb)[:5]}, "
                      f"only in the second {sorted(kb - ka)[:5]}")
    if ma != mb:
        errors.append(f"{rel}: metadata {ma} != {mb}")
    worst = {}
    for k in sorted(set(ta) & set(tb)):
        x, y = ta[k], tb[k]
        if x.dtype != y.dtype or x.dim() != y.dim():
            errors.append(f"{rel}:{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            continue
        if fmt:
            continue
        if x.shape != y.shape:
            errors.append(f"{rel}:{k}: shape {list(x.shape)} vs {list(y.shape)}")
            continue
        base = os.path.basename(rel)
        if base == "reference.safetensors" and (k in ("logits", "lora_logits") or k == "lora_loss"):
            d = (x.double() - y.double()).abs().max().item()
            limit = tol["loss_abs"] if k == "lora_loss" else tol["logits_abs"]
            worst[k] = d
            if d > limit:
                errors.append(f"{rel}:{k}: max abs difference {d:.3g} > {limit}")
        elif base == "reference.safetensors" and k.startswith("grad."):
            d = ((x.double() - y.double()).norm() / y.double().norm()).item()
            worst["grad"] = max(worst.get("grad", 0.0), d)
            if d > tol["grad_rel"]:
                errors.append(f"{rel}:{k}: relative difference {d:.3g} > {tol['grad_rel']}")
        elif not torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)):
            n = (x != y).sum().item()
            errors.append(f"{rel}:{k}: {n} values differ")
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", help="fixture folder, e.g. tests/fixtures")
    ap.add_argument("second", help="fixture folder made by make_fixtures.py")
    ap.add_argument("--format", action="store_true", help="other shapes: compare files, keys and dtypes only")
    a = ap.parse_args()
    errors, checked = [], 0
    for root, _, files in os.walk(a.second):
        for f in sorted(files):
            p2 = os.path.join(root, f)
            rel = os.path.relpath(p2, a.second)
            p1 = os.path.join(a.first, rel)
            if not os.path.exists(p1):
                errors.append(f"{rel}: not in {a.first}")
                continue
            checked += 1
            if f.endswith(".json"):
                compare_json(p1, p2, rel, a.format, errors)
            elif f.endswith(".safetensors"):
                tol = tolerance(os.path.join(os.path.dirname(p1), "meta.json"))
                worst = compare_safetensors(p1, p2, rel, a.format, errors, tol)
                if worst:
                    print(f"{rel}: " + ", ".join(f"{k} {v:.2g}" for k, v in worst.items()))
            elif open(p1, "rb").read() != open(p2, "rb").read():
                errors.append(f"{rel}: differs")
    # what the first set has and the second lacks (the remote-code families make_fixtures.py does
    # not make are only named)
    not_made = set()
    for root, _, files in os.walk(a.first):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), a.first)
            if os.path.exists(os.path.join(a.second, rel)) or f == "README.md":
                continue
            parts = rel.split(os.sep)
            if parts[0] == "models" and parts[1] in REMOTE_CODE:
                not_made.add(parts[1])
            elif parts[0] == "real":
                not_made.add("real/ (--skip-real)")
            else:
                errors.append(f"{rel}: missing from {a.second}")
    if not_made:
        print("not compared (not made by make_fixtures.py, or skipped): " + ", ".join(sorted(not_made)))
    for e in errors:
        print("DIFF " + e)
    print(f"{checked} files compared, {len(errors)} differences")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
