#!/usr/bin/env bash
# The handoff check: are the jobs `qlora-studio handoff` writes accepted and trained by the tools
# themselves, and does their result come back? Too heavy for CI (two Python stacks, ~17 GB);
# run it by hand:
#
#   scripts/check-handoff.sh [WORK_DIR]
#
# 1. installs LLaMA-Factory and axolotl from PyPI, each in a throwaway venv of its own under
#    $QLS_HANDOFF_VENVS (default ~/.cache/handoff-venvs; reused when already there), at the
#    versions the configs were written for (LF_VERSION, AXOLOTL_VERSION below; README.md);
# 2. hands a run on the built-in demo model (assets/demo: a tiny LLaMA, 52 Alpaca records, a
#    10% validation split) to each tool for 2 GPUs, with --copy-model;
# 3. runs each job for its 4 steps on the CPU with the job's own config, changed only where a CPU
#    needs it: no DeepSpeed (it needs CUDA), f32 instead of bf16, one process (LLaMA-Factory:
#    `launch.sh use_cpu=true bf16=false deepspeed=null`, the demo job through torchrun with 2
#    processes over gloo (the job's 2 GPUs, the effective batch kept), the others in one process with
#    FORCE_TORCHRUN=0; axolotl:
#    `launch.sh --bf16=False --deepspeed=None` with NPROC_PER_NODE=1); on a machine
#    with a GPU and DeepSpeed (QLS_HANDOFF_GPU=1) the jobs run as written, through launch.sh;
#    then a QLoRA run of SmolLM2-135M-Instruct (from its GGUF file) handed to LLaMA-Factory, 3 steps,
#    and the configs CI compares (tests/data/handoff/*.toml) trained 2 steps by each tool;
# 4. brings each result back: `qlora-studio import-run` (steps and loss curve, as the Runs tab
#    shows them), `eval` with the adapter (a finite loss, beside the base model's), `generate`
#    with the adapter (it loads) and `export` as a merged model and a GGUF adapter.
#
# Prints what each step did; exits non-zero at the first step that fails.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LF_VERSION=0.9.5
AXOLOTL_VERSION=0.19.0
VENVS=${QLS_HANDOFF_VENVS:-$HOME/.cache/handoff-venvs}
WORK=${1:-$(mktemp -d /tmp/check-handoff.XXXXXX)}
GPU=${QLS_HANDOFF_GPU:-0}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/qlora-studio/target}
# nothing of the check may reach the network: the model is local, telemetry off
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DISABLE_VERSION_CHECK=1 DO_NOT_TRACK=1 AXOLOTL_DO_NOT_TRACK=1 \
    WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
[ "$GPU" = 1 ] || export CUDA_VISIBLE_DEVICES=

say() { printf '== %s\n' "$*"; }

mkdir -p "$WORK"
if [ -n "${QLS_BIN:-}" ]; then
    BIN=$QLS_BIN
else
    say "building qlora-studio (release)"
    # another checkout of this package building into the same target folder shares its
    # artifacts (the same names and hashes): ours are rebuilt when our sources are newer
    touch "$ROOT/src/lib.rs" "$ROOT/src/main.rs"
    (cd "$ROOT" && cargo build --release --quiet)
    # a copy, which that other build cannot replace mid-check
    BIN=$WORK/qlora-studio
    cp "$CARGO_TARGET_DIR/release/qlora-studio" "$BIN"
fi
"$BIN" handoff --help > /dev/null || { echo "$BIN has no handoff command (built from another checkout?)"; exit 1; }

venv() { # name, pip spec, executable that shows it is installed
    local dir=$VENVS/$1
    if [ ! -x "$dir/bin/$3" ]; then
        say "installing $2 into $dir"
        python3 -m venv "$dir"
        "$dir/bin/pip" install --quiet --no-cache-dir "$2"
    fi
    printf '%s: ' "$1"
    "$dir/bin/pip" list 2>/dev/null | awk '$1 ~ /^(llamafactory|axolotl|torch|transformers|peft|accelerate|datasets|trl|bitsandbytes|deepspeed)$/ {printf "%s %s  ", $1, $2}'
    echo
}
mkdir -p "$VENVS"
venv llamafactory "llamafactory==$LF_VERSION" llamafactory-cli
venv axolotl "axolotl==$AXOLOTL_VERSION" axolotl

DEMO=$ROOT/assets/demo
cat > "$WORK/run.toml" <<EOF
[model]
source = "$DEMO/model"
mode = "lora"

[lora]
r = 8
alpha = 16.0
dropout = 0.05

[data]
path = "$DEMO/dataset.jsonl"
max_length = 128
validation = 0.1

[train]
batch_size = 2
grad_accum = 2
max_steps = 4
learning_rate = 1e-3
warmup_steps = 1
eval_every = 2
output_dir = "runs/demo"
EOF
say "the run: $WORK/run.toml (demo model, LoRA r 8 on q_proj,v_proj, 4 steps, batch 2 x 2)"

check_tool() { # tool, run config, job folder, base model for eval, mode, merged export (yes/no)
    local tool=$1 config=$2 job=$3 base=$4 mode=$5 merged=$6
    rm -rf "$job"
    say "$tool: qlora-studio handoff --config $(basename "$config") --to $tool --gpus 2 --copy-model"
    "$BIN" handoff --config "$config" --to "$tool" --gpus 2 --copy-model --out "$job"
    say "$tool: training ($([ "$GPU" = 1 ] && echo "GPU, as written" || echo CPU))"
    local start=$SECONDS
    case $tool in
        llamafactory)
            if [ "$GPU" = 1 ]; then
                PATH=$VENVS/llamafactory/bin:$PATH "$job/launch.sh" > "$job/train.log" 2>&1
            elif [ "${LF_PROCS:-1}" -gt 1 ]; then
                # torchrun as launch.sh starts it, $LF_PROCS processes talking over gloo
                PATH=$VENVS/llamafactory/bin:$PATH NPROC_PER_NODE=$LF_PROCS "$job/launch.sh" use_cpu=true bf16=false \
                    deepspeed=null ddp_backend=gloo > "$job/train.log" 2>&1
            else
                PATH=$VENVS/llamafactory/bin:$PATH FORCE_TORCHRUN=0 "$job/launch.sh" use_cpu=true bf16=false \
                    deepspeed=null > "$job/train.log" 2>&1
            fi ;;
        axolotl)
            if [ "$GPU" = 1 ]; then
                PATH=$VENVS/axolotl/bin:$PATH "$job/launch.sh" > "$job/train.log" 2>&1
            else
                PATH=$VENVS/axolotl/bin:$PATH NPROC_PER_NODE=1 "$job/launch.sh" --bf16=False --deepspeed=None \
                    > "$job/train.log" 2>&1
            fi ;;
    esac || { tail -40 "$job/train.log"; echo "$tool: training failed (log: $job/train.log)"; exit 1; }
    echo "trained in $((SECONDS - start)) s; output/: $(ls "$job/output" | tr '\n' ' ')"
    grep -o 'world size: [0-9]*' "$job/train.log" | sort -u | sed 's/^/LLaMA-Factory: /' || true
    grep -o 'Total train batch size (w. parallel, distributed & accumulation) = [0-9]*' "$job/train.log" | head -1 || true
    say "$tool: qlora-studio import-run"
    local summary
    summary=$("$BIN" import-run "$job")
    echo "$summary"
    local adapter
    adapter=$(printf '%s\n' "$summary" | awk '/^adapter:/ {print $2}')
    say "$tool: qlora-studio eval with the adapter (the base model alone: $("$BIN" eval --model "$base" --mode "$mode" \
        --data "$job/data/validation.jsonl"))"
    local eval_line
    eval_line=$("$BIN" eval --model "$base" --mode "$mode" --adapter "$adapter" --data "$job/data/validation.jsonl")
    echo "$eval_line"
    printf '%s\n' "$eval_line" | awk '{ if ($3 != $3 + 0 || $3 == "NaN" || $3 == "inf") exit 1 }' \
        || { echo "$tool: the loss is not finite"; exit 1; }
    say "$tool: qlora-studio generate with the adapter"
    "$BIN" generate --model "$base" --adapter "$adapter" --prompt "What is the capital of Velmora?" --chat \
        --max-tokens 8 > "$job/generate.txt"
    echo "generated $(wc -c < "$job/generate.txt") bytes"
    say "$tool: qlora-studio export ($([ "$merged" = yes ] && echo "merged model, ")GGUF adapter)"
    if [ "$merged" = yes ]; then
        "$BIN" export --from "$adapter" --format merged --out "$job/export-merged" | tail -1
    fi
    "$BIN" export --from "$adapter" --format gguf --out "$job/export.gguf" | tail -1
}

LF_PROCS=2 check_tool llamafactory "$WORK/run.toml" "$WORK/llamafactory" "$DEMO/model" lora yes
check_tool axolotl "$WORK/run.toml" "$WORK/axolotl" "$DEMO/model" lora yes

# QLoRA on a real model: SmolLM2-135M-Instruct from its GGUF file (imported by qlora-studio and
# copied into the job), 4-bit NF4 with double quantization through bitsandbytes. LLaMA-Factory
# only: axolotl 0.19's QLoRA on the CPU trains with zero gradients (grad_norm 0 at every step,
# with or without gradient checkpointing; bitsandbytes 0.50.2's CPU path), so its CPU run proves
# nothing about the config.
GGUF=${QLS_SMOLLM2_GGUF:-$HOME/.cache/qlora-studio/real/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ -f "$GGUF" ]; then
    "$VENVS/llamafactory/bin/python" -c "import bitsandbytes" 2> /dev/null \
        || "$VENVS/llamafactory/bin/pip" install --quiet --no-cache-dir "bitsandbytes==0.50.2"
    cat > "$WORK/smollm2-qlora.toml" <<EOF
[model]
source = "$GGUF"
mode = "qlora"

[lora]
r = 8
alpha = 16.0

[data]
path = "$DEMO/dataset.jsonl"
max_length = 128
validation = 0.1

[train]
batch_size = 2
grad_accum = 1
max_steps = 3
learning_rate = 1e-3
output_dir = "runs/smollm2"
EOF
    say "QLoRA: $WORK/smollm2-qlora.toml (SmolLM2-135M-Instruct from $GGUF, NF4, 3 steps)"
    # (no merged export: 0.5 GB more on the disk, and the demo runs above export merged models)
    check_tool llamafactory "$WORK/smollm2-qlora.toml" "$WORK/llamafactory-qlora" "$GGUF" qlora no
else
    say "QLoRA check skipped: no SmolLM2 GGUF at $GGUF (set QLS_SMOLLM2_GGUF)"
fi
# The configs CI compares with tests/data/handoff/expected (a QLoRA chat run with a named
# template, rsLoRA and save/eval intervals for 4 GPUs × 2 nodes; packed plain text on all linear
# modules in f16): each tool trains them 2 steps. On the CPU with the overrides above, and LoRA
# instead of QLoRA (bitsandbytes' CPU kernels refuse the demo model's 32-wide projections).
say "the configs of tests/data/handoff: 2 steps each"
python3 -c "
import random
random.seed(1)
w = 'the island of velmora has rivers hills towns and a capital called quillhaven where people trade glints'.split()
print('\n\n'.join(' '.join(random.choice(w) for _ in range(60)) for _ in range(300)))" > "$WORK/text.txt"
for name in chat text; do
    sed -e "s#^source = .*#source = \"$DEMO/model\"#" \
        -e "s#^path = \"chat.jsonl\"#path = \"$ROOT/tests/data/handoff/chat.jsonl\"#" \
        -e "s#^path = \"../text.txt\"#path = \"$WORK/text.txt\"#" "$ROOT/tests/data/handoff/$name.toml" > "$WORK/$name.toml"
    for tool in llamafactory axolotl; do
        job=$WORK/$name-$tool
        rm -rf "$job"
        "$BIN" handoff --config "$WORK/$name.toml" --to "$tool" --gpus 4 --nodes 2 --copy-model --out "$job" > /dev/null
        case $tool in
            llamafactory)
                PATH=$VENVS/llamafactory/bin:$PATH FORCE_TORCHRUN=0 "$job/launch.sh" use_cpu=true bf16=false fp16=false \
                    deepspeed=null quantization_bit=null max_steps=2 > "$job/train.log" 2>&1 ;;
            axolotl)
                sed -e 's/^bf16: true/bf16: false/' -e 's/^fp16: true/fp16: false/' -e '/^deepspeed:/d' \
                    -e 's/^adapter: "qlora"/adapter: "lora"/' -e '/^load_in_4bit/d' -e '/^bnb_config_kwargs/d' \
                    -e 's/^num_epochs: .*/max_steps: 2/' -e 's/^max_steps: .*/max_steps: 2/' "$job/axolotl.yaml" > "$job/axolotl-cpu.yaml"
                (cd "$job" && "$VENVS/axolotl/bin/python" -m axolotl.cli.train axolotl-cpu.yaml) > "$job/train.log" 2>&1 ;;
        esac || { tail -40 "$job/train.log"; echo "$name-$tool: training failed (log: $job/train.log)"; exit 1; }
        printf '%s-%s: ' "$name" "$tool"
        "$BIN" import-run "$job" | awk '/^steps:|^training loss:/ {printf "%s  ", $0} END {print ""}'
    done
done

say "all done: $WORK"
