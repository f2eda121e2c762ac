#!/usr/bin/env python3
"""The fine-tune of run-f32.toml in PyTorch + PEFT + bitsandbytes (QLoRA, NF4, double quant).

Reads the recipe from the same TOML file qlora-studio trains with ([lora], [data], [train]), and
does what qlora-studio's trainer does:
  - the GGUF dequantized by transformers (cached once as a safetensors folder, as qlora-studio
    caches its own import), reloaded with BitsAndBytesConfig(nf4, double quant);
  - LoRA on the same modules, r, alpha, dropout; PEFT's init;
  - each chat record rendered with the tokenizer's own chat template, tokenized once, and the
    tokens overlapping the assistant reply (the text after the add_generation_prompt prefix:
    the answer, "<|im_end|>" and "\\n") trained, the rest -100, cut to max_length;
  - per epoch a seeded shuffle, batches of batch_size (the last one partial), right padding;
    steps = ceil(epochs * ceil(records / batch));
  - loss = mean over the trained tokens of the step; AdamW (0.9, 0.999, 1e-8, weight_decay);
    lr warmup + cosine as transformers' get_cosine_schedule_with_warmup; global-norm clipping;
  - torch.set_num_threads(2).
Then answers every held-out question greedily (16 new tokens) and counts the answers that
contain the keyword (case-insensitive), with the NF4 base the adapter was trained on and (as
`qlora-studio generate` does) with the dense dequantized base + the saved adapter.

Prints one JSON line: wall_s (process start -> adapter saved), train_s (the training loop),
load_s, steps, first and final loss, heldout_correct/total, peak_rss_mib (at adapter saved).

    python torch_finetune.py --config run-f32.toml [--bf16] [--max-steps N] [--out DIR]
"""

import os
import time

# process start, read before the heavy imports: /proc/self/stat field 22 (clock ticks since boot)
def _process_start_wall():
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start_ticks = int(fields[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


T_PROCESS = _process_start_wall()
import cpuwatch as _cpuwatch  # noqa: E402  (stdlib only: cheap)

BUSY_AT_START = _cpuwatch.busy_seconds()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network: bitsandbytes would look for a hub kernel
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tomllib  # noqa: E402

import torch  # noqa: E402

import cpuwatch  # noqa: E402
import make_facts  # noqa: E402
import qls_rng  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_recipe(path):
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    base = os.path.dirname(os.path.abspath(path))
    rel = lambda p: p if os.path.isabs(p) else os.path.join(base, p)  # noqa: E731
    cfg["data"]["path"] = rel(cfg["data"]["path"])
    cfg["model"]["source"] = rel(cfg["model"]["source"])
    return cfg


def dequantized_folder(gguf_path, cache_root):
    """The GGUF dequantized to f32 by transformers, saved once as a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    name = os.path.basename(gguf_path)
    st = os.stat(gguf_path)
    out = os.path.join(cache_root, f"{name}-{st.st_size}-{int(st.st_mtime)}")
    if os.path.exists(os.path.join(out, "done")):
        return out, 0.0
    t = time.time()
    folder = os.path.dirname(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    for n, m in model.named_modules():  # every weight must now be a plain dense tensor
        assert type(m).__name__ != "GgufLinear", n
    # transformers 5 keeps the GGUF quantizer attached (and then refuses save_pretrained) even
    # when it dequantized everything: detach it, the weights are plain float32 tensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.rename(tmp, out) if not os.path.exists(out) else None
    open(os.path.join(out, "done"), "w").close()
    return out, time.time() - t


def encode_record(tok, messages, max_length):
    """input_ids and labels exactly as qlora-studio's data::tokenize_record (template 'model')."""
    full = tok.apply_chat_template(messages, tokenize=False)
    assert messages[-1]["role"] == "assistant"
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = full if i + 1 == len(messages) else tok.apply_chat_template(messages[: i + 1], tokenize=False)
        assert through.startswith(before) and full.startswith(through), "template is not prefix-stable"
        spans.append((len(before), len(through)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    # offsets are in characters; the texts here are ASCII, so they equal qlora-studio's byte offsets
    assert full.isascii()
    ids, labels = enc["input_ids"], []
    for tid, (s, e) in zip(ids, enc["offset_mapping"]):
        if e > s:
            inside = any(e > a and s < b for a, b in spans)
        else:
            inside = any(s > a and s <= b for a, b in spans)
        labels.append(tid if inside else -100)
    # the reply holds <|im_end|> (a stop token), so no EOS is appended; add_bos_token is false
    return ids[:max_length], labels[:max_length], full


def lr_at(base, warmup, step, total, schedule):
    """qlora-studio's train::schedule::learning_rate (= transformers' schedules with warmup)."""
    if step < warmup:
        return base * step / max(warmup, 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if schedule == "constant":
        return base
    if schedule == "linear":
        return base * max(1.0 - progress, 0.0)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def exact_nf4(model, exact=True):
    """Keep bitsandbytes' NF4 weights as they are in eval mode too. On a CPU with AVX512-BF16,
    bitsandbytes 0.50 repacks a Linear4bit the first time it runs in eval mode without grad
    (nn.Linear4bit.forward -> _convert_weight_packed_for_cpu): the double-quantized absmax is
    dequantized and rounded to bf16 and a separate kernel multiplies. The base then differs from
    the one the adapter was trained on (about 1e-3 in the loss). With exact=True the held-out
    answers use the training-time NF4 path (dequantize_4bit + matmul)."""
    n = 0
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = not exact and m.support_avx512bf16_for_cpu
            n += 1
    return n


def chat_prompt(tok, question):
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def answer_heldout(model, tok, heldout, autocast_bf16, max_new_tokens=16):
    model.eval()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    answers = []
    for h in heldout:
        ids = tok(chat_prompt(tok, h["question"]), add_special_tokens=False, return_tensors="pt")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            out = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        answers.append(make_facts.scored(h, text))
    return answers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(HERE, "run-f32.toml"))
    ap.add_argument("--bf16", action="store_true",
                    help="bnb_4bit_compute_dtype=bfloat16 and training under torch.autocast('cpu', bfloat16)")
    ap.add_argument("--max-steps", type=int, default=0, help="override train.max_steps (a short check)")
    ap.add_argument("--heldout", default=os.path.join(HERE, "data", "heldout.jsonl"))
    ap.add_argument("--out", default=None, help="adapter folder (default runs/torch-f32 or runs/torch-bf16)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/qlora-studio/finetune-compare"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--same-init", choices=["yes", "no"], default="yes",
                    help="yes: LoRA A drawn as qlora-studio draws it (bit-identical start); no: PEFT's own init")
    ap.add_argument("--same-order", choices=["yes", "no"], default="yes",
                    help="yes: qlora-studio's example order per epoch (the same batches at every step)")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out questions")
    ap.add_argument("--bnb-cpu-packing", action="store_true",
                    help="answer with bitsandbytes' bf16-absmax CPU inference repacking (see exact_nf4)")
    ap.add_argument("--no-dense-eval", action="store_true", help="skip the held-out answers on the dense base")
    ap.add_argument("--prepare-only", action="store_true", help="only write the dequantized folder (cache)")
    ap.add_argument("--dump", default=None, help="write the tokenized training set (ids, labels) as JSON here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_recipe(args.config)
    mc, lc, dc, tc = cfg["model"], cfg["lora"], cfg["data"], cfg["train"]
    tag = "bf16" if args.bf16 else "f32"
    out_dir = args.out or os.path.join(HERE, "runs", f"torch-{tag}")

    import peft
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    transformers.logging.set_verbosity_error()
    folder, prep_s = dequantized_folder(mc["source"], args.cache)
    if args.prepare_only:
        print(json.dumps({"dequantized": folder, "prep_s": round(prep_s, 2)}))
        return

    # ---- the recipe's checks: the same keys qlora-studio reads, nothing this script ignores
    assert mc.get("mode", "qlora") == "qlora"
    assert dc.get("format") in ("sharegpt", "chat", "auto") and dc.get("template") in ("model", "auto")
    assert not dc.get("packing", False) and not dc.get("train_on_prompt", False)
    assert float(dc.get("validation", 0.0)) == 0.0
    assert tc.get("grad_accum", 1) == 1, "this script runs grad_accum = 1"
    assert not lc.get("rslora", False)
    targets = lc["targets"]
    if targets == ["all-linear"]:
        targets = TARGET_NAMES

    seed = int(tc.get("seed", 42))
    random.seed(seed)
    torch.manual_seed(seed)

    t_load = time.time()
    tok = AutoTokenizer.from_pretrained(folder)
    compute = torch.bfloat16 if args.bf16 else torch.float32
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, device_map="cpu",
                                                 dtype=torch.float32)
    model.config.use_cache = False
    lora = LoraConfig(r=int(lc["r"]), lora_alpha=float(lc["alpha"]), lora_dropout=float(lc["dropout"]),
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if args.same_init == "yes":
        n_init = 0
        with torch.no_grad():
            for name, module in model.named_modules():
                if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                    path = name[len("base_model.model."):]
                    w = module.lora_A["default"].weight
                    w.copy_(torch.from_numpy(qls_rng.lora_a_init(seed, path, w.shape[0], w.shape[1])))
                    assert not module.lora_B["default"].weight.any()
                    n_init += 1
        assert n_init > 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # ---- data
    records = [json.loads(line) for line in open(dc["path"]) if line.strip()]
    max_length = int(dc.get("max_length", 1024))
    examples = [encode_record(tok, r["messages"], max_length) for r in records]
    total_tokens = sum(len(e[0]) for e in examples)
    trained_tokens = sum(sum(1 for l in e[1][1:] if l != -100) for e in examples)
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump({"examples": [{"input_ids": e[0], "labels": e[1]} for e in examples]}, f)
    load_s = time.time() - t_load

    batch = int(tc["batch_size"])
    steps_per_epoch = math.ceil(len(examples) / batch)
    max_steps = args.max_steps or int(tc.get("max_steps", 0))
    total = max_steps if max_steps > 0 else max(1, math.ceil(float(tc["epochs"]) * steps_per_epoch))
    base_lr, warmup = float(tc["learning_rate"]), int(tc.get("warmup_steps", 0))
    schedule = tc.get("schedule", "cosine")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=base_lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=float(tc.get("weight_decay", 0.0)))
    clip = float(tc.get("max_grad_norm", 1.0))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    log(f"torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__}; "
        f"{len(examples)} examples ({total_tokens} tokens, {trained_tokens} trained), {trainable} trainable, "
        f"{total} steps of {batch}, compute {tag}; first example {len(examples[0][0])} tokens, "
        f"{sum(1 for l in examples[0][1] if l != -100)} trained")

    # ---- train
    model.train()
    losses = []
    order, pos, epoch = [], 0, -1
    cpuwatch.reset_peak_rss()  # VmHWM from here: the training loop's own peak
    t_train = time.time()
    for step in range(total):
        if pos >= len(order):
            epoch += 1
            if args.same_order == "yes":
                order = qls_rng.epoch_order(len(examples), seed, epoch)
            else:
                order = list(range(len(examples)))
                random.Random(f"{seed} epoch {epoch}").shuffle(order)
            pos = 0
        idx = order[pos: pos + batch]
        pos += len(idx)
        length = max(len(examples[i][0]) for i in idx)
        ids = torch.full((len(idx), length), pad, dtype=torch.long)
        labels = torch.full((len(idx), length), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(examples[i][0])
            ids[r, :n] = torch.tensor(examples[i][0])
            labels[r, :n] = torch.tensor(examples[i][1])
            mask[r, :n] = 1
        lr = lr_at(base_lr, warmup, step, total, schedule)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        loss = out.loss.float()
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 10 == 0 or step + 1 == total:
            el = time.time() - t_train
            log(f"step {step + 1}/{total}: loss {losses[-1]:.4f} lr {lr:.2e} |g| {float(gnorm):.3f} "
                f"{el / (step + 1):.2f} s/step")
    train_s = time.time() - t_train
    train_rss = cpuwatch.peak_rss_mib()
    model.save_pretrained(out_dir)
    wall_s = time.time() - T_PROCESS
    rss = peak_rss_mib()
    own_cpu = cpuwatch.own_cpu_seconds()
    foreign_cpu = max(cpuwatch.busy_seconds() - BUSY_AT_START - own_cpu, 0.0)

    result = {
        "side": "torch", "dtype": tag, "wall_s": round(wall_s, 2), "train_s": round(train_s, 2),
        "load_s": round(load_s, 2), "prep_s": round(prep_s, 2), "steps": total,
        "s_per_step": round(train_s / total, 3),
        "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4),
        "mean_loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "peak_rss_mib": round(rss, 1), "train_peak_rss_mib": round(train_rss, 1), "cpu_s": round(own_cpu, 2), "foreign_cpu_s": round(foreign_cpu, 2),
        "nf4_eval": "bnb-cpu-packing" if args.bnb_cpu_packing else "exact", "same_init": args.same_init, "same_order": args.same_order, "train_tokens": total_tokens, "trained_tokens": trained_tokens,
        "adapter": out_dir,
    }
    answers = []
    if not args.no_eval:
        # ---- held-out questions
        heldout = [json.loads(line) for line in open(args.heldout) if line.strip()]
        t_eval = time.time()
        exact_nf4(model, exact=not args.bnb_cpu_packing)
        answers = answer_heldout(model, tok, heldout, args.bf16)
        result["heldout_correct"] = sum(a["correct"] for a in answers)
        result["heldout_total"] = len(heldout)
    if not args.no_eval and not args.no_dense_eval:
        # what `qlora-studio generate --adapter` does: the dense (dequantized GGUF) base + the adapter
        del model
        dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        dense = PeftModel.from_pretrained(dense, out_dir)
        dense_answers = answer_heldout(dense, tok, heldout, False)
        result["heldout_correct_dense"] = sum(a["correct"] for a in dense_answers)
        for a, d in zip(answers, dense_answers):
            a["answer_dense"] = d["answer"]
            a["correct_dense"] = d["correct"]
    if not args.no_eval:
        result["eval_s"] = round(time.time() - t_eval, 2)
    with open(os.path.join(out_dir, "heldout_answers.json"), "w") as f:
        json.dump({"result": result, "losses": losses, "answers": answers}, f, indent=1)
    result["losses_first5"] = [round(l, 6) for l in losses[:5]]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
