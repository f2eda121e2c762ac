#!/usr/bin/env bash
# Builds llama.cpp from PyPI's llama-cpp-python sdist (once, ~15 minutes on two cores; not in CI)
# and runs check.py: qlora-studio's merged GGUF (F16, Q8_0, Q4_K_M) and GGUF adapter exports of
# one fine-tune, answered greedily by llama.cpp and compared with qlora-studio's own answers.
#
#   scripts/llama-cpp-check/run.sh [CHECKPOINT] [-n N]
#
# CHECKPOINT defaults to the finetune-compare run (scripts/finetune-compare: SmolLM2-135M-Instruct
# from its Q4_1 GGUF, QLoRA r16 on all linear modules, 120 steps of made-up facts).
# Environment: QLS_BIN (the qlora-studio binary), PY (a Python with gguf and jinja2),
# LLAMA_DIR (where llama.cpp is built; default ~/.cache/qlora-studio/llama.cpp).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
QLS_BIN="${QLS_BIN:-$HOME/.cache/qlora-studio/target/release/qlora-studio}"
PY="${PY:-$HOME/.cache/qlora-studio/pyvenv/bin/python}"
LLAMA_DIR="${LLAMA_DIR:-$HOME/.cache/qlora-studio/llama.cpp}"
BASE="${BASE:-$HOME/.cache/qlora-studio/real/SmolLM2-135M-Instruct.Q4_1.gguf}"
CHECKPOINT="$HERE/../finetune-compare/runs/ours-bf16/checkpoint-000120"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then CHECKPOINT="$1"; shift; fi

if [ ! -x "$LLAMA_DIR/build/bin/llama-completion" ] || [ ! -x "$LLAMA_DIR/build/bin/llama-quantize" ]; then
    echo "== building llama.cpp in $LLAMA_DIR (once)" >&2
    mkdir -p "$LLAMA_DIR" && cd "$LLAMA_DIR"
    [ -x venv/bin/cmake ] || { python3 -m venv venv && venv/bin/pip -q install cmake ninja; }
    ls llama_cpp_python-*.tar.gz >/dev/null 2>&1 \
        || venv/bin/pip download -q --no-deps --no-binary llama-cpp-python llama-cpp-python -d .
    src=$(ls -d llama_cpp_python-*/ 2>/dev/null | head -1)
    [ -n "$src" ] || { tar xzf llama_cpp_python-*.tar.gz; src=$(ls -d llama_cpp_python-*/ | head -1); }
    export PATH="$LLAMA_DIR/venv/bin:$PATH"
    # GGML_NATIVE=OFF: a native build dies with "Illegal instruction" on this project's machine
    cmake -S "$src/vendor/llama.cpp" -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
        -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF >&2
    ninja -C build llama-completion llama-quantize >&2
    cd - >/dev/null
fi
echo "== llama.cpp: $(ls -d "$LLAMA_DIR"/llama_cpp_python-*/ | xargs -n1 basename)" >&2
cd "$HERE"
"$PY" check.py --bin "$QLS_BIN" --llama-bin "$LLAMA_DIR/build/bin" --checkpoint "$CHECKPOINT" --base "$BASE" \
    --prompts "$HERE/../finetune-compare/data/train.jsonl" --out "${OUT:-/tmp/llama-cpp-check}" "$@"
