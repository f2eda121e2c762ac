#!/usr/bin/env python3
"""Answers the held-out questions with any PEFT adapter (qlora-studio's checkpoints are PEFT
adapter folders) in PyTorch, the way torch_finetune.py scores its own adapter: greedy, 16 new
tokens, keyword contained (case-insensitive), on the NF4 base (bitsandbytes, double quant: the
base the adapter was trained on) and on the dense dequantized base (what `qlora-studio
generate` uses). One evaluator for both sides' adapters: the accuracy columns then differ only
by the adapters. Untimed.

    python torch_eval_adapter.py --adapter runs/ours-f32/checkpoint-000120 [--bf16] [--side ours]
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import torch_finetune as tf  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--config", default=os.path.join(tf.HERE, "run-f32.toml"))
    ap.add_argument("--bf16", action="store_true", help="NF4 base with compute dtype bf16, generation under autocast")
    ap.add_argument("--heldout", default=os.path.join(tf.HERE, "data", "heldout.jsonl"))
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/qlora-studio/finetune-compare"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default=None, help="a name for the output line")
    ap.add_argument("--bnb-cpu-packing", action="store_true",
                    help="answer with bitsandbytes' bf16-absmax CPU inference repacking (see torch_finetune.exact_nf4)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cfg = tf.load_recipe(args.config)
    folder, _ = tf.dequantized_folder(cfg["model"]["source"], args.cache)
    tok = AutoTokenizer.from_pretrained(folder)
    heldout = [json.loads(line) for line in open(args.heldout) if line.strip()]
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16 if args.bf16 else torch.float32)
    nf4 = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, device_map="cpu", dtype=torch.float32)
    nf4 = PeftModel.from_pretrained(nf4, args.adapter)
    tf.exact_nf4(nf4, exact=not args.bnb_cpu_packing)
    a_nf4 = tf.answer_heldout(nf4, tok, heldout, args.bf16)
    del nf4
    dense = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), args.adapter)
    a_dense = tf.answer_heldout(dense, tok, heldout, False)
    result = {
        "label": args.label or args.adapter, "adapter": args.adapter, "bf16": args.bf16,
        "nf4_eval": "bnb-cpu-packing" if args.bnb_cpu_packing else "exact",
        "torch_nf4_correct": sum(a["correct"] for a in a_nf4),
        "torch_dense_correct": sum(a["correct"] for a in a_dense), "total": len(heldout),
    }
    for a, d in zip(a_nf4, a_dense):
        a["answer_dense"], a["correct_dense"] = d["answer"], d["correct"]
    with open(os.path.join(args.adapter, "heldout_answers_torch.json"), "w") as f:
        json.dump({"result": result, "answers": a_nf4}, f, indent=1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
