#!/usr/bin/env python3
"""Proof that qlora-studio's GGUF exports run in llama.cpp as they are (issue 19).

For one fine-tune (a qlora-studio checkpoint whose base is a GGUF file, e.g. SmolLM2-135M-Instruct
Q4_1), this exports:
  - the merged model as GGUF in F16, Q8_0 and Q4_K_M (`export --format gguf-model --quant ...
    --merge-into dequantized`: the adapter folded into the NF4-dequantized weights it was trained on),
  - the adapter as a llama.cpp GGUF LoRA adapter (`export --format gguf --dtype f16`),
and answers each prompt greedily with
  - qlora-studio itself (`generate --adapter CHECKPOINT --chat`: the NF4 base + adapter of a QLoRA
    run, as trained): the reference,
  - llama-completion on each merged GGUF,
  - llama-completion with `--lora` on the exported adapter, over the NF4-dequantized base written
    as an F16 GGUF (the base the adapter was trained on), and over the original Q4_1 base GGUF (not
    the weights it was trained on: agreement, not identity),
  - llama-completion on llama-quantize's own Q8_0 and Q4_K_M of our F16 (what llama.cpp's tools
    make from it; compare_quant.py also compares our Q4_K_M with llama-quantize's tensor by tensor),
then prints, per variant, how many answers are the same text as ours; and, for the merged F16 file,
how many of llama.cpp's answers are the same text as qlora-studio's on that same file (imported),
which tells a difference of the file from one of rounding the merged weights to f16.

The prompt llama.cpp gets is the GGUF's own tokenizer.chat_template (read back from the exported
file) rendered with jinja2 for one user turn, so the template in the file is checked too.

    python check.py --bin QLS --llama-bin DIR --checkpoint CK --prompts train.jsonl [-n 30] [--out DIR]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import gguf
import jinja2
import numpy as np
import safetensors.numpy


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def prompts_of(path, n):
    out = []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            user = next(m["content"] for m in rec["messages"] if m["role"] == "user")
            if user not in out:
                out.append(user)
            if len(out) == n:
                break
    return out


def chat_template_of(path):
    reader = gguf.GGUFReader(path)
    field = reader.fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


def render(template, question):
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(Exception(m))
    return env.from_string(template).render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True, bos_token="", eos_token=""
    )


def llama_answer(llama_bin, model, prompt, max_tokens, lora=None):
    cmd = [os.path.join(llama_bin, "llama-completion"), "-m", model, "-p", prompt, "-no-cnv", "--temp", "0",
           "-n", str(max_tokens), "--no-display-prompt", "--simple-io", "-s", "0", "-t", "2", "--no-warmup"]
    if lora:
        cmd += ["--lora", lora]
    out = run(cmd).stdout
    return out.replace("[end of text]", "").strip()


def ours_answer(qls, base, checkpoint, question, max_tokens):
    adapter = ["--adapter", checkpoint] if checkpoint else []
    out = run([qls, "generate", "--model", base, *adapter, "--chat", "--prompt", question,
               "--max-tokens", str(max_tokens), "--temperature", "0"]).stdout
    return out.strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the qlora-studio binary")
    ap.add_argument("--llama-bin", required=True, help="folder with llama-completion and llama-quantize")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--base", required=True, help="the base GGUF the checkpoint was trained on")
    ap.add_argument("--prompts", required=True, help="chat JSONL (messages); the user turns are asked")
    ap.add_argument("-n", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out", default="llama-cpp-check-out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    files = {}
    for quant in ["f16", "q8_0", "q4_k_m"]:
        path = os.path.join(args.out, f"merged-{quant}.gguf")
        t = time.time()
        # into the NF4-dequantized weights: what a QLoRA adapter was trained on, and what
        # `generate --adapter` computes with
        run([args.bin, "export", "--from", args.checkpoint, "--format", "gguf-model", "--quant", quant,
             "--merge-into", "dequantized", "--out", path, "--modelfile"])
        files[quant] = path
        log(f"exported merged {quant}: {os.path.getsize(path) / 2**20:.1f} MiB in {time.time() - t:.1f} s")
    adapter = os.path.join(args.out, "adapter-f16.gguf")
    run([args.bin, "export", "--from", args.checkpoint, "--format", "gguf", "--dtype", "f16", "--out", adapter])
    log(f"exported GGUF adapter: {os.path.getsize(adapter) / 2**20:.1f} MiB")
    # the base the adapter was trained on (NF4, dequantized) as an F16 GGUF of its own: the same
    # checkpoint with every lora_B zero, merged; with --lora on it, llama.cpp adds the adapter itself
    zero = os.path.join(args.out, "zero-adapter")
    os.makedirs(zero, exist_ok=True)
    for name in ["adapter_config.json", "run.toml"]:
        shutil.copy(os.path.join(args.checkpoint, name), zero)
    tensors = safetensors.numpy.load_file(os.path.join(args.checkpoint, "adapter_model.safetensors"))
    tensors = {k: (np.zeros_like(v) if "lora_B" in k else v) for k, v in tensors.items()}
    safetensors.numpy.save_file(tensors, os.path.join(zero, "adapter_model.safetensors"))
    nf4_base = os.path.join(args.out, "nf4-base-f16.gguf")
    run([args.bin, "export", "--from", zero, "--format", "gguf-model", "--quant", "f16", "--merge-into", "dequantized",
         "--out", nf4_base])
    log("exported the NF4-dequantized base alone as F16")
    requant = os.path.join(args.out, "llama-quantize-q8_0.gguf")
    run([os.path.join(args.llama_bin, "llama-quantize"), files["f16"], requant, "Q8_0"])
    log("llama-quantize made Q8_0 from our F16")
    requant_q4 = os.path.join(args.out, "llama-quantize-q4_k_m.gguf")
    run([os.path.join(args.llama_bin, "llama-quantize"), files["f16"], requant_q4, "Q4_K_M"])
    compare = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare_quant.py")
    for line in subprocess.run([sys.executable, compare, files["q4_k_m"], requant_q4, files["f16"]], check=True,
                               capture_output=True, text=True).stdout.splitlines():
        log(f"our Q4_K_M against llama-quantize's: {line}")
    for path in [files["q4_k_m"]]:
        reader = gguf.GGUFReader(path)
        kinds = {}
        for t in reader.tensors:
            kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
        log(f"tensor types of {os.path.basename(path)}: {kinds}")

    template = chat_template_of(files["f16"])
    questions = prompts_of(args.prompts, args.n)
    variants = {
        "merged F16": lambda p: llama_answer(args.llama_bin, files["f16"], p, args.max_tokens),
        "merged Q8_0": lambda p: llama_answer(args.llama_bin, files["q8_0"], p, args.max_tokens),
        "merged Q4_K_M": lambda p: llama_answer(args.llama_bin, files["q4_k_m"], p, args.max_tokens),
        "llama-quantize Q8_0 of our F16": lambda p: llama_answer(args.llama_bin, requant, p, args.max_tokens),
        "llama-quantize Q4_K_M of our F16": lambda p: llama_answer(args.llama_bin, requant_q4, p, args.max_tokens),
        "NF4 base (F16) + --lora adapter": lambda p: llama_answer(args.llama_bin, nf4_base, p, args.max_tokens, adapter),
        "Q4_1 base GGUF + --lora adapter": lambda p: llama_answer(args.llama_bin, args.base, p, args.max_tokens, adapter),
    }
    same = {k: 0 for k in variants}
    rows = []
    for i, q in enumerate(questions):
        ours = ours_answer(args.bin, args.base, args.checkpoint, q, args.max_tokens)
        prompt = render(template, q)
        row = {"question": q, "qlora-studio": ours}
        for name, answer in variants.items():
            a = answer(prompt)
            row[name] = a
            same[name] += a == ours
        rows.append(row)
        diffs = [k for k in variants if row[k] != ours]
        log(f"[{i + 1}/{len(questions)}] {q!r} -> {ours!r}" + (f"  (differs: {', '.join(diffs)})" if diffs else ""))
    same_file = 0
    for row in rows:
        row["qlora-studio on merged F16"] = ours_answer(args.bin, files["f16"], None, row["question"], args.max_tokens)
        same_file += row["qlora-studio on merged F16"] == row["merged F16"]
    with open(os.path.join(args.out, "answers.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"\n{len(questions)} training prompts, greedy, at most {args.max_tokens} tokens; "
          "answers the same text as qlora-studio's (base + adapter):")
    for name in variants:
        print(f"  {name:36s} {same[name]:3d} / {len(questions)}")
    print(f"  llama.cpp on merged F16 against qlora-studio on the same file: {same_file} / {len(questions)}")
    for row in rows:
        for name in variants:
            if row[name] != row["qlora-studio"]:
                print(f"  differs ({name}): {row['question']!r}: ours {row['qlora-studio']!r}, llama.cpp {row[name]!r}")


if __name__ == "__main__":
    main()
