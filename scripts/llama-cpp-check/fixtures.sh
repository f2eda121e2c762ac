#!/usr/bin/env bash
# llama.cpp loads the merged GGUF of a fixture model of every family and layout the export writes
# and (1) scores a text with the same mean next-token loss as `qlora-studio eval` on the base +
# adapter, every position and the whole vocabulary counted (nll.c, built here against llama.cpp's
# library), and (2) continues three prompts greedily with the same 16 tokens as `qlora-studio
# generate` (on 40-layer random models near-ties may flip a late token).
# The fixtures ship no tokenizer: each gets a byte-level one over its vocabulary
# (fixture_tokenizer.py). llama.cpp tells Baichuan's RoPE and ALiBi models apart by depth alone (32
# and 40 layers), so those fixtures are first made that deep by repeating their layers (deepen.py).
# Mistral's fixture is left out: its 12-token sliding window is shorter than a prompt and its
# continuation, and llama.cpp's llama graph has no sliding window (the export caps the GGUF's
# context at the window instead). Needs llama.cpp built by run.sh.
#
#   scripts/llama-cpp-check/fixtures.sh [FIXTURE...]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
QLS_BIN="${QLS_BIN:-$HOME/.cache/qlora-studio/target/release/qlora-studio}"
PY="${PY:-$HOME/.cache/qlora-studio/pyvenv/bin/python}"
LLAMA_DIR="${LLAMA_DIR:-$HOME/.cache/qlora-studio/llama.cpp}"
L="$LLAMA_DIR/build/bin/llama-completion"
FX="$HERE/../../tests/fixtures/models"
OUT="${OUT:-/tmp/llama-cpp-check-fixtures}"
LIB="$LLAMA_DIR/build/bin"
SRC="$(ls -d "$LLAMA_DIR"/llama_cpp_python-*/vendor/llama.cpp | head -1)"
NLL="$LIB/nll"
if [ ! -x "$NLL" ] || [ "$HERE/nll.c" -nt "$NLL" ]; then
    gcc -O2 -o "$NLL" "$HERE/nll.c" -I"$SRC/include" -I"$SRC/ggml/include" -L"$LIB" -lllama -lggml -lggml-base -lm \
        -Wl,-rpath,"$LIB"
fi
TEXT="The quick brown fox jumps over the lazy dog, and then it runs far away into the green hills."
mkdir -p "$OUT" && cd "$OUT"
printf '%s' "$TEXT" > text.txt
ALL="llama_gqa_all_linear llama_tied qwen2 mixtral internlm xverse qwen falcon_7b_style falcon_40b_style bloom phi
     phi_msft chatglm3 baichuan_7b baichuan2_7b baichuan_13b baichuan2_13b"
same=0; total=0; : > losses.txt
for n in ${*:-$ALL}; do
    "$PY" "$HERE/fixture_tokenizer.py" "$FX/$n" "base-$n"
    case "$n" in
        baichuan*_7b) "$PY" "$HERE/deepen.py" "base-$n" 32 ;;
        baichuan*_13b) "$PY" "$HERE/deepen.py" "base-$n" 40 ;;
    esac
    "$QLS_BIN" export --from "$FX/$n/adapter" --model "base-$n" --format gguf-model --quant f16 --out "$n.gguf" >/dev/null
    # our text records end with the EOS where the tokenizer names one: here generation_config.json
    eos=$(python3 -c "
import json, os, sys
ids = [json.load(open(os.path.join(sys.argv[1], f))).get('eos_token_id') for f in ['generation_config.json']
       if os.path.exists(os.path.join(sys.argv[1], f))]
print('eos' if any(isinstance(i, (int, list)) for i in ids) else '')" "base-$n")
    ours=$("$QLS_BIN" eval --model "base-$n" --adapter "$FX/$n/adapter" --data text.txt 2>/dev/null | awk '{print $3}')
    theirs=$("$NLL" "$n.gguf" "$TEXT" $eos | awk '{print $1}')
    python3 -c "
import sys
o, t = float(sys.argv[2]), float(sys.argv[3])
print(f'{\"SAME\" if abs(o - t) <= 1e-3 * abs(o) else \"DIFF\"} {sys.argv[1]:22s} mean loss: ours {o:.6f}, llama.cpp {t:.6f} (relative difference {abs(o - t) / abs(o):.1e})')
" "$n" "$ours" "$theirs" | tee -a losses.txt
    for prompt in "hello world" "The quick brown fox" "Once upon a time"; do
        "$QLS_BIN" generate --model "base-$n" --adapter "$FX/$n/adapter" --prompt "$prompt" --max-tokens 16 \
            2>/dev/null >ours.bin </dev/null
        # llama-completion sometimes exits before its output is flushed on models this small: try again
        for _ in $(seq 12); do
            "$L" -m "$n.gguf" -p "$prompt" -no-cnv --temp 0 -n 16 --no-display-prompt --simple-io -s 0 -t 2 \
                --no-warmup --ignore-eos -ctk f32 -ctv f32 2>/dev/null >theirs.bin </dev/null || true
            [ -s theirs.bin ] && break
        done
        # llama.cpp prints a NUL byte as nothing
        verdict=$(python3 -c "
import sys
o = open('ours.bin', 'rb').read().decode('utf-8', 'replace').replace('\x00', '').strip()
t = open('theirs.bin', 'rb').read().decode('utf-8', 'replace').replace('\x00', '').replace('[end of text]', '').strip()
v = 'SAME' if o == t else 'DIFF'
print(f'{v} {sys.argv[1]:22s} {sys.argv[2]!r:22s} ours={o!r} llama.cpp={t!r}')
" "$n" "$prompt")
        echo "$verdict"
        total=$((total + 1)); [ "${verdict%% *}" = SAME ] && same=$((same + 1))
    done
done
# the tokenizers written as something other than a byte-level BPE: a SentencePiece-style
# tokenizer.json without tokenizer.model (XVERSE's, many LLaMA fine-tunes'), and ChatGLM3's
# tokenizer.model with its specials after the pieces. llama.cpp splits texts into the ids the
# tokenizers library or SentencePiece give, and scores a text as we do
# (needs sentencepiece and protobuf in $PY)
if [ $# -eq 0 ]; then
    # the tokenizer.json is trained on these words and has no byte fallback: no other characters
    printf '%s\n' "the quick brown fox jumps over the lazy dog" "once upon a time there was a girl" \
        "hello world the the the" > tok-texts-xverse.txt
    printf '%s\n' "Hello world! The island of Vell" "In 1872 the lighthouse was painted red" \
        "Le phare de Vell est rouge et blanc. 维尔岛有三个港口" > tok-texts-chatglm3.txt
    for case in "xverse sp_json_tokenizer.py" "chatglm3 chatglm_sp_tokenizer.py"; do
        set -- $case
        n="$1-tok"
        cp "tok-texts-$1.txt" tok-texts.txt
        "$PY" "$HERE/$2" "$FX/$1" "base-$n" tok-texts.txt > ids-ours.txt
        "$QLS_BIN" export --from "$FX/$1/adapter" --model "base-$n" --format gguf-model --quant f16 --out "$n.gguf" >/dev/null
        while read -r line; do "$NLL" "$n.gguf" "$line" tokens | tail -1; done < tok-texts.txt > ids-llama.txt
        if cmp -s ids-ours.txt ids-llama.txt; then verdict=SAME; else verdict=DIFF; diff ids-ours.txt ids-llama.txt || true; fi
        echo "$verdict $n: token ids of $(wc -l < tok-texts.txt) texts ($2)"
        head -1 tok-texts.txt | tr -d '\n' > tok-text.txt
        ours=$("$QLS_BIN" eval --model "base-$n" --adapter "$FX/$1/adapter" --data tok-text.txt 2>/dev/null | awk '{print $3}')
        theirs=$("$NLL" "$n.gguf" "$(cat tok-text.txt)" eos | awk '{print $1}')
        echo "     $n: mean loss ours $ours, llama.cpp $theirs"
    done
fi
echo "$(grep -c ^SAME losses.txt) of $(wc -l < losses.txt) mean losses the same to 1e-3; $same of $total continuations the same"
