#!/usr/bin/env bash
# A real fine-tune, qlora-studio against PyTorch + PEFT + bitsandbytes, one recipe (run-f32.toml /
# run-bf16.toml: SmolLM2-135M-Instruct from its Q4_1 GGUF, QLoRA NF4 double quant, LoRA r 16 on
# all seven linear modules, 160 chat records of made-up facts, 120 steps of batch 8), then the 40
# held-out questions answered greedily by each adapter. The runs go one after another, each
# when the CPU is idle, never two at once (2-core machine).
#
#   scripts/finetune-compare/compare.sh [--steps N] [--only ours-f32,torch-f32,...]
#
#   --steps N   override train.max_steps on both sides (e.g. 5 for a quick correctness check)
#   --only L    the runs to do, of ours-f32, ours-bf16, torch-f32, torch-bf16 (default: all four)
#   --verify    afterwards, check that both sides see the same weights, tokens and loss masks
#               (verify_same_inputs.py, about 6 minutes)
#
# Environment: QLS_BIN (default /root/.cache/qlora-studio/target/release/qlora-studio), PY (the
# venv with torch, transformers, peft, bitsandbytes, gguf). Results: runs/results.jsonl, the
# table on stdout and in runs/table.md, each run's answers in its folder's heldout_answers.json.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PY:-/root/.cache/qlora-studio/pyvenv/bin/python}"
export QLS_BIN="${QLS_BIN:-/root/.cache/qlora-studio/target/release/qlora-studio}"
STEPS=()
ONLY="ours-f32,ours-bf16,torch-f32,torch-bf16"
VERIFY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --steps) STEPS=(--max-steps "$2"); shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --verify) VERIFY=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

cd "$HERE"
mkdir -p runs
# runs/result-NAME.json: the kept result of each run (a run not selected with --only keeps its
# earlier one); runs/attempts.jsonl: every try.

echo "== versions" >&2
"$QLS_BIN" --version >&2 || true
"$PY" -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" 2>/dev/null >&2

echo "== data" >&2
"$PY" make_facts.py >&2

# One-time preparation, not timed (each side caches its conversion of the GGUF): qlora-studio's
# import into ~/.cache/qlora-studio/gguf, transformers' dequantized folder. Both sides then load
# a float32 safetensors folder from the page cache.
echo "== preparing (untimed)" >&2
"$QLS_BIN" preview --config run-f32.toml -n 1 >&2
"$PY" torch_finetune.py --prepare-only >&2
cat "$(ls -d ~/.cache/qlora-studio/finetune-compare/*/ | head -1)model.safetensors" > /dev/null

wait_idle() {
    "$PY" -c "import cpuwatch, sys; cpuwatch.wait_idle(window=5.0, quiet_windows=6, log=lambda m: print(m, file=sys.stderr, flush=True))"
}

# A timed run is kept when other processes used at most 3% of its wall time in CPU (or 2 s);
# else it is run again, up to TRIES times (the last try is kept, its other-CPU figure shown).
TRIES="${TRIES:-3}"
run() {
    local name="$1"; shift
    case ",$ONLY," in *",$name,"*) ;; *) return 0 ;; esac
    local try line
    for try in $(seq 1 "$TRIES"); do
        wait_idle
        echo "== $name (try $try): $*" >&2
        line="$("$@" | tail -n 1)"
        echo "$line" >> runs/attempts.jsonl
        echo "$line" >&2
        if echo "$line" | "$PY" -c "import json, sys; r = json.loads(sys.stdin.read()); sys.exit(0 if r['foreign_cpu_s'] <= max(2.0, 0.03 * r['wall_s']) else 1)"; then
            break
        fi
        echo "   other processes used the CPU during $name: timing not kept" >&2
    done
    echo "$line" > "runs/result-$name.json"
    rm -f "runs/cross-$name.json"
}

run ours-f32 "$PY" ours_run.py --config run-f32.toml "${STEPS[@]}"
run ours-bf16 "$PY" ours_run.py --config run-bf16.toml "${STEPS[@]}"
run torch-f32 env HF_HUB_OFFLINE=1 "$PY" torch_finetune.py --config run-f32.toml "${STEPS[@]}"
run torch-bf16 env HF_HUB_OFFLINE=1 "$PY" torch_finetune.py --config run-bf16.toml --bf16 "${STEPS[@]}"

# Untimed: our adapters answered by the PyTorch evaluator too (NF4 base as trained, and the dense
# base), so that one evaluator scores both sides' adapters.
echo "== our adapters through the PyTorch evaluator (untimed)" >&2
for dtype in f32 bf16; do
    [ -f "runs/result-ours-$dtype.json" ] && [ ! -f "runs/cross-ours-$dtype.json" ] || continue
    ckpt="$(ls -d "runs/ours-$dtype"/checkpoint-* | tail -n 1)"
    extra=(); [ "$dtype" = bf16 ] && extra=(--bf16)
    "$PY" torch_eval_adapter.py --adapter "$HERE/$ckpt" --config "run-$dtype.toml" "${extra[@]}" \
        --label "ours-$dtype" | tail -n 1 > "runs/cross-ours-$dtype.json"
    cat "runs/cross-ours-$dtype.json" >&2
done

echo >&2
cat runs/result-{ours-f32,ours-bf16,torch-f32,torch-bf16}.json 2>/dev/null > runs/results.jsonl || true
cat runs/cross-ours-*.json 2>/dev/null > runs/cross.jsonl || true
"$PY" table.py runs/results.jsonl runs/cross.jsonl | tee runs/table.md

if [ "$VERIFY" = 1 ] && [ -d runs/ours-f32 ]; then
    echo "== same inputs on both sides (untimed)" >&2
    "$PY" verify_same_inputs.py 2>/dev/null | tee runs/verify.txt
fi
