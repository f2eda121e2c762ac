#!/usr/bin/env python3
"""qlora-studio's side of the comparison: `qlora-studio train` under /usr/bin/time -v, then
every held-out question answered with `qlora-studio generate --adapter ... --chat
--temperature 0 --max-tokens 16` (greedy), counting the answers that contain the keyword
(case-insensitive), as torch_finetune.py counts them.

Prints one JSON line with the fields torch_finetune.py prints: wall_s (the train process, start
to exit: the adapter is its last write), train_s (the log line of the run's start to that of its
last step), steps, first/final loss, heldout_correct/total, peak_rss_mib (/usr/bin/time's
maximum resident set), and foreign_cpu_s (CPU time other processes used during the run).

    python ours_run.py --config run-f32.toml [--max-steps N] [--out DIR] [--bin PATH] [--baseline]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib

import cpuwatch
import make_facts

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BIN = os.environ.get("QLS_BIN", "/root/.cache/qlora-studio/target/release/qlora-studio")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def write_config(cfg, path):
    with open(path, "w") as f:
        for table, keys in cfg.items():
            f.write(f"[{table}]\n")
            for k, v in keys.items():
                f.write(f"{k} = {toml_value(v)}\n")
            f.write("\n")


def generate(binary, model, adapter, question, max_tokens=16):
    cmd = [binary, "generate", "--model", model, "--prompt", question, "--chat",
           "--max-tokens", str(max_tokens), "--temperature", "0"]
    if adapter:
        cmd += ["--adapter", adapter]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return p.stdout.strip()


def answer_heldout(binary, model, adapter, heldout):
    answers = []
    for h in heldout:
        text = generate(binary, model, adapter, h["question"])
        answers.append(make_facts.scored(h, text))
    return answers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(HERE, "run-f32.toml"))
    ap.add_argument("--max-steps", type=int, default=0, help="override train.max_steps (a short check)")
    ap.add_argument("--out", default=None, help="train.output_dir (default: the config's); emptied first")
    ap.add_argument("--bin", default=DEFAULT_BIN)
    ap.add_argument("--heldout", default=os.path.join(HERE, "data", "heldout.jsonl"))
    ap.add_argument("--baseline", action="store_true", help="also answer with the base model (no adapter)")
    ap.add_argument("--no-eval", action="store_true")
    args = ap.parse_args()

    config_path = os.path.abspath(args.config)
    base = os.path.dirname(config_path)
    with open(config_path, "rb") as f:
        cfg = tomllib.load(f)
    absolute = lambda p: p if os.path.isabs(p) else os.path.join(base, p)  # noqa: E731
    cfg["data"]["path"] = absolute(cfg["data"]["path"])
    src = cfg["model"]["source"]
    if not os.path.isabs(src) and os.path.exists(os.path.join(base, src)):
        cfg["model"]["source"] = os.path.join(base, src)
    out = os.path.abspath(args.out) if args.out else absolute(cfg["train"]["output_dir"])
    cfg["train"]["output_dir"] = out
    if args.max_steps:
        cfg["train"]["max_steps"] = args.max_steps
    if os.path.exists(out):
        shutil.rmtree(out)  # a new run refuses a folder with an earlier run's checkpoints
    os.makedirs(out)
    run_toml = os.path.join(out, "run-config.toml")
    write_config(cfg, run_toml)
    tag = cfg["model"].get("dtype", "auto")

    # which build ran (the binary may be rebuilt between runs)
    import hashlib
    with open(args.bin, "rb") as f:
        bin_sha = hashlib.file_digest(f, "sha256").hexdigest()[:12]
    bin_mtime = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.stat(args.bin).st_mtime))

    # ---- train, timed
    cmd = ["/usr/bin/time", "-v", args.bin, "train", "--config", run_toml]
    log(" ".join(cmd))
    busy0 = cpuwatch.busy_seconds()
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    train_rss, child = None, None
    for line in p.stdout:
        lines.append((time.time() - t0, line.rstrip("\n")))
        # the training loop's own peak resident set: VmHWM reset when the run starts, read at its last step
        if line.startswith("training ") and " parameters " in line:
            child = next(iter(cpuwatch.child_pids(p.pid)), None)
            if child is not None and not cpuwatch.reset_peak_rss(child):
                child = None
        elif child is not None and re.match(r"step (\d+)/\1:", line):
            train_rss = cpuwatch.peak_rss_mib(child)
        if not line.startswith("\t"):
            log(f"[{lines[-1][0]:7.2f}] {line.rstrip()}")
    rc = p.wait()
    wall_outer = time.time() - t0
    busy = cpuwatch.busy_seconds() - busy0
    if rc != 0:
        log("\n".join(l for _, l in lines[-40:]))
        sys.exit(f"qlora-studio train failed ({rc})")
    text = "\n".join(l for _, l in lines)

    def time_field(name):
        m = re.search(re.escape(name) + r":\s*(.+)", text)
        return m.group(1).strip() if m else None

    h_m_s = time_field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")
    wall_s = sum(float(x) * 60 ** i for i, x in enumerate(reversed(h_m_s)))
    own_cpu = float(time_field("User time (seconds)")) + float(time_field("System time (seconds)"))
    peak_rss_mib = int(time_field("Maximum resident set size (kbytes)")) / 1024.0
    t_start = next((t for t, l in lines if l.startswith("training ") and " parameters " in l), None)
    last_step = [(t, l) for t, l in lines if re.match(r"step (\d+)/\1:", l)]
    train_s = last_step[-1][0] - t_start if (t_start is not None and last_step) else None
    started = next((l for _, l in lines if l.startswith("training ") and " parameters " in l), "")
    m = re.search(r"on (\d+) examples \((\d+) tokens\)", started)

    checkpoints = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-"))
    ckpt = os.path.join(out, checkpoints[-1])
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        state = json.load(f)
    losses = [l for _, l in state["losses"]]
    result = {
        "side": "ours", "dtype": tag, "wall_s": round(wall_s, 2), "train_s": round(train_s, 2) if train_s else None,
        "steps": state["step"], "s_per_step": round(train_s / state["step"], 3) if train_s else None,
        "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4),
        "mean_loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "peak_rss_mib": round(peak_rss_mib, 1),
        "train_peak_rss_mib": round(train_rss, 1) if train_rss else None, "cpu_s": round(own_cpu, 2),
        "foreign_cpu_s": round(max(busy - own_cpu, 0.0), 2),
        "train_tokens": int(m.group(2)) if m else None, "adapter": ckpt,
        "bin_sha256": bin_sha, "bin_mtime": bin_mtime,
    }

    # ---- held-out questions with `qlora-studio generate`
    if not args.no_eval:
        heldout = [json.loads(line) for line in open(args.heldout) if line.strip()]
        t_eval = time.time()
        answers = answer_heldout(args.bin, cfg["model"]["source"], ckpt, heldout)
        result["heldout_correct"] = sum(a["correct"] for a in answers)
        result["heldout_total"] = len(heldout)
        if args.baseline:
            base_answers = answer_heldout(args.bin, cfg["model"]["source"], None, heldout)
            result["heldout_correct_base_model"] = sum(a["correct"] for a in base_answers)
            for a, b in zip(answers, base_answers):
                a["answer_base_model"] = b["answer"]
        result["eval_s"] = round(time.time() - t_eval, 2)
        with open(os.path.join(out, "heldout_answers.json"), "w") as f:
            json.dump({"result": result, "losses": losses, "answers": answers}, f, indent=1)
    with open(os.path.join(out, "train.log"), "w") as f:
        f.write("\n".join(f"[{t:8.2f}] {l}" for t, l in lines) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
