#!/usr/bin/env bash
# llama.cpp loads the merged GGUF of the fixture models of each layout the export writes (LLaMA with
# GQA, tied embeddings, Qwen2 with biases, Mixtral's experts) and continues three prompts greedily
# with the same 16 tokens as qlora-studio's base + adapter. The fixtures ship no tokenizer: each gets
# a byte-level one over its vocabulary (fixture_tokenizer.py). Needs llama.cpp built by run.sh.
#
#   scripts/llama-cpp-check/fixtures.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
QLS_BIN="${QLS_BIN:-$HOME/.cache/qlora-studio/target/release/qlora-studio}"
PY="${PY:-$HOME/.cache/qlora-studio/pyvenv/bin/python}"
L="${LLAMA_DIR:-$HOME/.cache/qlora-studio/llama.cpp}/build/bin/llama-completion"
FX="$HERE/../../tests/fixtures/models"
OUT="${OUT:-/tmp/llama-cpp-check-fixtures}"
mkdir -p "$OUT" && cd "$OUT"
for n in llama_gqa_all_linear llama_tied qwen2 mixtral; do
    "$PY" "$HERE/fixture_tokenizer.py" "$FX/$n" "base-$n"
    "$QLS_BIN" export --from "$FX/$n/adapter" --model "base-$n" --format gguf-model --quant f16 --out "$n.gguf" >/dev/null
    for prompt in "hello world" "The quick brown fox" "Once upon a time"; do
        "$QLS_BIN" generate --model "base-$n" --adapter "$FX/$n/adapter" --prompt "$prompt" --max-tokens 16 \
            2>/dev/null >ours.bin </dev/null
        # llama-completion sometimes exits before its output is flushed on models this small: try again
        for _ in $(seq 12); do
            "$L" -m "$n.gguf" -p "$prompt" -no-cnv --temp 0 -n 16 --no-display-prompt --simple-io -s 0 -t 2 \
                --no-warmup --ignore-eos 2>/dev/null >theirs.bin </dev/null || true
            [ -s theirs.bin ] && break
        done
        python3 -c "
import sys
o = open('ours.bin', 'rb').read().decode('utf-8', 'replace').strip().rstrip('\x00')
t = open('theirs.bin', 'rb').read().decode('utf-8', 'replace').replace('[end of text]', '').strip()
print(f'{sys.argv[1]:22s} {sys.argv[2]!r:22s} {\"SAME\" if o == t else \"DIFF\"}  ours={o!r} llama.cpp={t!r}')
" "$n" "$prompt"
    done
done
