#!/usr/bin/env python3
"""Checks that both sides train on the same thing (untimed; run after compare.sh or any run):

1. transformers' dequantization of the GGUF equals qlora-studio's import bit for bit (every
   tensor), and the two tokenizer.json files tokenize the dataset identically;
2. the tokenized training set: total tokens and the first record's length / trained tokens, as
   `qlora-studio preview` reports them;
3. the whole dataset's token-weighted mean loss, as `qlora-studio eval` computes it with its own
   tokenization and loss mask, against torch_finetune.py's tokenization and mask: the NF4 base
   without an adapter, and the dense base with our f32 adapter. A different token or mask in any
   record would move these.

    python verify_same_inputs.py [--adapter runs/ours-f32/checkpoint-000120]
"""

import argparse
import glob
import json
import os
import re
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import torch_finetune as tf  # noqa: E402


def our_import_dir(gguf):
    for marker in glob.glob(os.path.expanduser("~/.cache/qlora-studio/gguf/*/qls-gguf-import.json")):
        with open(marker) as f:
            if json.load(f).get("source") == gguf:
                return os.path.dirname(marker)
    return None


@torch.no_grad()
def mean_loss(model, examples):
    total, count = 0.0, 0
    for ids, labels, _ in examples:
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1].float()
        y = torch.tensor(labels[1:])
        keep = y != -100
        total += torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count


def qls_eval(binary, model, data, max_length, mode, adapter=None):
    cmd = [binary, "eval", "--model", model, "--data", data, "--max-length", str(max_length), "--mode", mode]
    if adapter:
        cmd += ["--adapter", adapter]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"mean loss ([0-9.]+)", out).group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(tf.HERE, "run-f32.toml"))
    ap.add_argument("--adapter", default=None, help="an adapter of ours (default: the last checkpoint of runs/ours-f32)")
    ap.add_argument("--bin", default=os.environ.get("QLS_BIN", "/root/.cache/qlora-studio/target/release/qlora-studio"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    from peft import PeftModel
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cfg = tf.load_recipe(args.config)
    gguf, data, max_length = cfg["model"]["source"], cfg["data"]["path"], int(cfg["data"]["max_length"])
    ok = True

    def check(name, good, detail):
        nonlocal ok
        ok &= bool(good)
        print(f"{'PASS' if good else 'FAIL'} {name}: {detail}", flush=True)

    folder, _ = tf.dequantized_folder(gguf, os.path.expanduser("~/.cache/qlora-studio/finetune-compare"))
    ours = our_import_dir(gguf)
    if ours is None:
        subprocess.run([args.bin, "preview", "--config", args.config, "-n", "1"], capture_output=True, check=True)
        ours = our_import_dir(gguf)
    a, b = load_file(os.path.join(folder, "model.safetensors")), load_file(os.path.join(ours, "model.safetensors"))
    same = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    check("weights", same, f"{len(a)} tensors, transformers' dequantization vs {ours}")
    text = open(data).read()
    ta, tb = Tokenizer.from_file(os.path.join(folder, "tokenizer.json")), Tokenizer.from_file(os.path.join(ours, "tokenizer.json"))
    check("tokenizer", ta.encode(text).ids == tb.encode(text).ids, "the dataset file tokenized by both tokenizer.json files")

    tok = AutoTokenizer.from_pretrained(folder)
    records = [json.loads(line) for line in open(data) if line.strip()]
    examples = [tf.encode_record(tok, r["messages"], max_length) for r in records]
    preview = subprocess.run([args.bin, "preview", "--config", args.config, "-n", "1"], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"example 1 .*— (\d+) tokens, (\d+) trained", preview)
    first = (len(examples[0][0]), sum(1 for l in examples[0][1] if l != -100))
    check("first record", m and (int(m.group(1)), int(m.group(2))) == first,
          f"torch {first[0]} tokens / {first[1]} trained; qlora-studio preview: {m.group(0) if m else '?'}")
    mean = sum(len(e[0]) for e in examples) / len(examples)
    m = re.search(r"token lengths of (\d+) records: .* mean ([0-9.]+)", preview)
    check("lengths", m and int(m.group(1)) == len(examples) and abs(float(m.group(2)) - mean) < 0.05,
          f"torch {len(examples)} records, mean {mean:.2f} tokens; preview: {m.group(0) if m else '?'}")

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    nf4 = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, device_map="cpu", dtype=torch.float32)
    tf.exact_nf4(nf4)
    lt = mean_loss(nf4, examples)
    lq = qls_eval(args.bin, gguf, data, max_length, "qlora")
    check("dataset loss, NF4 base", abs(lt - lq) < 1e-3, f"torch {lt:.5f}, qlora-studio eval {lq:.4f}")
    del nf4
    adapter = args.adapter or sorted(glob.glob(os.path.join(tf.HERE, "runs", "ours-f32", "checkpoint-*")))[-1]
    dense = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), adapter)
    dense.eval()
    lt = mean_loss(dense, examples)
    lq = qls_eval(args.bin, gguf, data, max_length, "lora", adapter)
    check("dataset loss, dense base + our adapter", abs(lt - lq) < 1e-3,
          f"torch {lt:.5f}, qlora-studio eval {lq:.4f} ({adapter})")
    print("ALL PASS" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
