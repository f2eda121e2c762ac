#!/usr/bin/env bash
# The GPU check: one command for a lent NVIDIA machine (CUDA 13 driver, PyTorch + PEFT, no Rust),
# printing JSON lines. Two steps:
#
#   here:  scripts/gpu-check.sh prepare     # builds with --features cuda (scripts/build-cuda.sh),
#                                           # fills .gpu-check/ (binary, test executables,
#                                           # fixtures, the PEFT baseline, the bitsandbytes wheel)
#   there: scripts/gpu-check.sh ours        # carry .gpu-check/pack
#          scripts/gpu-check.sh baseline    # carry .gpu-check/whl and .gpu-check/bench
#
# The two parts are separate calls because the binary and the bitsandbytes wheel together exceed
# what one call may carry (64 MiB). `all` runs both where everything is present.
#
# ours:     fixture parity on CUDA (f32, the CPU's tolerances); our kernels against their CPU
#           twins (NF4 bit-exact, dropout masks bit-exact, the frozen linear); a SmolLM2-shaped
#           QLoRA run of 20 steps on the GPU and on the CPU (loss curves side by side); a
#           LLaMA-2-7B-shaped random model, QLoRA r=16 on all linear modules, checkpointing on,
#           sequence 512 and 2048 × batch 1 and 4: tokens/s, MFU, pool peak, card use, estimate.
# baseline: ../shared/bench/peft_baseline.py --device cuda at the same settings (checkpointing
#           at 2048), PyTorch + PEFT + bitsandbytes.
set -u
cd "$(dirname "$0")/.."
G=.gpu-check
part=${1:-all}
PY=${PYTHON:-python3}

json() { printf '%s\n' "$1"; }

# A test executable's outcome as one JSON line (the harness prints "test result: ok. N passed; M failed").
run_tests() {
    local name=$1 exe=$2
    shift 2
    local log
    log=$(mktemp)
    if [ ! -x "$exe" ]; then
        json "{\"check\":\"$name\",\"error\":\"$exe is missing: run scripts/gpu-check.sh prepare here and carry .gpu-check/pack\"}"
        return
    fi
    "$exe" --test-threads=1 "$@" >"$log" 2>&1
    local rc=$?
    local passed failed
    passed=$(grep -o '[0-9]* passed' "$log" | tail -1 | cut -d' ' -f1)
    failed=$(grep -o '[0-9]* failed' "$log" | tail -1 | cut -d' ' -f1)
    json "{\"check\":\"$name\",\"exit\":$rc,\"passed\":${passed:-0},\"failed\":${failed:-0}}"
    # the failures' messages, for the record
    grep -E "panicked at|^---- " "$log" | head -20 | sed 's/^/  # /'
    rm -f "$log"
}

prepare() {
    set -e
    scripts/build-cuda.sh
    scripts/build-cuda.sh --tests cuda_device model_parity
    rm -rf $G/ours && mkdir -p $G/ours/bin $G/ours/fixtures $G/bench $G/whl
    cp dist/cuda/qlora-studio dist/cuda/cuda_device dist/cuda/model_parity $G/ours/bin/
    cp -r tests/fixtures/models tests/fixtures/nf4 tests/fixtures/README.md $G/ours/fixtures/
    # the executables carry candle's PTX as text: xz makes them small enough to travel (64 MiB a call)
    mkdir -p $G/pack && tar -C $G -cf - ours | xz -T0 -6 >$G/pack/ours.tar.xz
    rm -rf $G/ours
    cp ../shared/bench/peft_baseline.py $G/bench/
    # bitsandbytes for the baseline (the GPU image has torch, transformers and peft, not it)
    [ -n "$(ls $G/whl/bitsandbytes-*.whl 2>/dev/null)" ] || $PY -m pip download --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
        -d $G/whl bitsandbytes
    grep -qx "/$G/" .git/info/exclude 2>/dev/null || echo "/$G/" >>.git/info/exclude
    du -sh $G/pack $G/whl $G/bench
    echo "carry [$G/pack] for 'ours', [$G/whl, $G/bench] for 'baseline'"
}

# all linear modules by name: the baseline hands the list to PEFT, which reads "all-linear" only unlisted
ALL_LINEAR=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
SETTINGS="--preset llama2-7b --mode qlora --rank 16 --targets $ALL_LINEAR"

ours() {
    local G=$G
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/# gpu: /'
    if [ -f $G/pack/ours.tar.xz ]; then
        mkdir -p /tmp/qls-gpu && xz -dc $G/pack/ours.tar.xz | tar -C /tmp/qls-gpu -xf - && G=/tmp/qls-gpu
    fi
    G=$G/ours
    export QLS_FIXTURES=$G/fixtures
    # the CUDA libraries the binary links (cuBLAS, cuRAND, the runtime): the toolkit's, or the
    # ones PyTorch's wheels bring; libcuda itself comes from the driver
    local torch_libs
    torch_libs=$($PY -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)
    export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${torch_libs}:${LD_LIBRARY_PATH:-}"
    ldd $G/bin/qlora-studio | grep 'not found' | sed 's/^/# missing library: /'
    run_tests kernels_vs_cpu $G/bin/cuda_device
    QLS_TEST_DEVICE=cuda run_tests fixture_parity_cuda_f32 $G/bin/model_parity
    # the same model and steps on both devices, f32 so that the curves can be compared closely
    for device in cuda cpu; do
        $G/bin/qlora-studio bench step --preset smollm2-135m --mode qlora --rank 16 --seq 256 --batch 1 \
            --steps 18 --dtype f32 --device $device --json | sed 's/^{/{"check":"smollm2_20_steps",/'
    done
    $G/bin/qlora-studio bench step --preset smollm2-135m --mode qlora --rank 16 --seq 256 --batch 1 \
        --steps 18 --device cuda --json | sed 's/^{/{"check":"smollm2_20_steps_bf16",/'
    # shellcheck disable=SC2086
    timeout 300 $G/bin/qlora-studio bench step $SETTINGS --seq 512,2048 --batch 1,4 --steps 4 --checkpointing \
        --device cuda --json | sed 's/^{/{"check":"llama2_7b",/'
}

baseline() {
    if ls $G/whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $G/whl/*.whl &&
            export PYTHONPATH=/tmp/site
    fi
    for seq in 512 2048; do
        ckpt=""
        [ $seq = 2048 ] && ckpt=--checkpointing
        PYTHONUNBUFFERED=1 timeout 240 $PY $G/bench/peft_baseline.py --device cuda --preset llama2-7b --mode qlora \
            --rank 16 --targets $ALL_LINEAR --seq $seq --batch 1 --steps 4 $ckpt 2>/dev/null |
            sed 's/^{/{"check":"peft_baseline",/'
    done
}

case $part in
prepare) prepare ;;
ours) ours ;;
baseline) baseline ;;
all) ours; baseline ;;
*) echo "usage: scripts/gpu-check.sh prepare|ours|baseline|all" >&2; exit 2 ;;
esac
