#!/usr/bin/env python3
"""The comparison table from the JSON lines of ours_run.py and torch_finetune.py (and, optionally,
torch_eval_adapter.py's scores of our adapters).

    python table.py runs/results.jsonl [runs/cross.jsonl]
"""

import json
import os
import sys


def read(path):
    if not path or not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip().startswith("{")]


def main():
    rows = read(sys.argv[1])
    cross = {c["label"]: c for c in read(sys.argv[2] if len(sys.argv) > 2 else None)}
    torch_by_dtype = {r["dtype"]: r for r in rows if r["side"] == "torch"}
    cols = ["run", "steps", "wall s", "train s", "s/step", "wall ours/torch", "train ours/torch",
            "loss: first → final (mean of last 10)", "held-out: own CLI eval", "held-out: NF4 base (torch eval)",
            "held-out: dense base", "peak RSS MiB: process (training loop)", "other CPU s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        name = f"{r['side']}-{r['dtype']}"
        t = torch_by_dtype.get(r["dtype"])

        def ratio(k):
            if t and r["side"] == "ours" and r.get(k) and t.get(k):
                return f"{r[k] / t[k]:.2f}"
            return ""

        total = r.get("heldout_total", 40)
        if r["side"] == "ours":
            own = f"{r.get('heldout_correct', '-')}/{total} (generate)"
            c = cross.get(name, {})
            nf4 = f"{c['torch_nf4_correct']}/{total}" if c else "-"
            dense = f"{c['torch_dense_correct']}/{total}" if c else "-"
        else:
            own = f"{r.get('heldout_correct', '-')}/{total} (NF4 base)"
            nf4 = f"{r.get('heldout_correct', '-')}/{total}"
            dense = f"{r.get('heldout_correct_dense', '-')}/{total}"
        print(f"| {name} | {r['steps']} | {r['wall_s']:.1f} | {r['train_s']:.1f} | {r['s_per_step']:.2f} | "
              f"{ratio('wall_s')} | {ratio('train_s')} | {r['first_loss']:.3f} → {r['final_loss']:.3f} "
              f"({r['mean_loss_last10']:.3f}) | {own} | {nf4} | {dense} | {r['peak_rss_mib']:.0f} ({r.get('train_peak_rss_mib') or 0:.0f}) | "
              f"{r.get('foreign_cpu_s', 0):.1f} |")
    print()
    print("wall s: process start to adapter saved (ours: /usr/bin/time of `qlora-studio train`; torch: from the")
    print("process's start time in /proc to save_pretrained). train s: the training loop (first step to last).")
    print("held-out: answers (greedy, 16 tokens) containing the fact's keyword; 'NF4 base (torch eval)' and")
    print("'dense base' score every adapter with PyTorch + PEFT on the NF4 base it was trained on and on the")
    print("dense dequantized GGUF base. other CPU s: CPU time other")
    print("processes used during the timed part (0 = the run had the machine to itself).")


if __name__ == "__main__":
    main()
