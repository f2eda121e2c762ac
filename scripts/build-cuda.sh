#!/usr/bin/env bash
# Build qlora-studio with candle's CUDA backend (`--features cuda`) on a Linux x86-64 machine that
# has no GPU, no CUDA driver and no CUDA toolkit, for running on a machine that has a CUDA 13.0
# driver and toolkit (H100/H200). See docs §13 (candle-training.md) for the background.
#
#   scripts/build-cuda.sh                  # -> dist/cuda/qlora-studio
#   scripts/build-cuda.sh --tests NAME...  # test executables of tests/NAME.rs -> dist/cuda/NAME
#                                          # (NAME `lib` = the library's unit tests)
#   scripts/build-cuda.sh --tests          # build every test executable and list them
#   scripts/build-cuda.sh --prepare        # only steps 1 and 2 (nvcc venv, .cuda-link)
#
# Environment: CUDA_COMPUTE_CAP (default 80: candle's PTX targets sm_80 and the driver JIT-compiles
# it for newer GPUs, but candle-kernels' libmoe.a (GGUF matmul / MoE kernels) then holds sm_80 SASS
# only, which an H100/H200 cannot run; 90 gives sm_90a code for H100/H200 only), CARGO_TARGET_DIR (default
# ~/.cache/qlora-studio/target-cuda), NICE (default 15), PYTHON (default python3), XZ (default 1:
# also write dist/cuda/NAME.xz; 0: do not).
#
# Steps: (1) nvcc 13.0 from PyPI in the venv .nvcc, (2) link-time stub libraries in .cuda-link/lib,
# (3) cargo build / cargo test --no-run, (4) stripped (and xz-compressed) copies in dist/cuda/.
# Idempotent: every step reuses what an earlier run left when it is still valid.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

MODE=bin
if [ "${1:-}" = "--tests" ]; then
    MODE=tests
    shift
elif [ "${1:-}" = "--prepare" ] && [ $# -eq 1 ]; then
    MODE=prepare
    shift
elif [ $# -gt 0 ]; then
    echo "usage: $0 [--prepare | --tests [NAME...]]" >&2
    exit 2
fi

# Check the requested test names before a build that can take half an hour.
for name in "$@"; do
    if [ "$name" != lib ] && [ ! -f "tests/$name.rs" ]; then
        echo "error: tests/$name.rs does not exist, so there is no test executable '$name'." >&2
        echo "       test files here: $(cd tests && ls -- *.rs 2>/dev/null | sed 's/\.rs$//' | tr '\n' ' ')" >&2
        exit 1
    fi
done

export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/qlora-studio/target-cuda}
NICE=${NICE:-15}
PYTHON=${PYTHON:-python3}
VENV=$ROOT/.nvcc
LINK=$ROOT/.cuda-link
DIST=$ROOT/dist/cuda

# ---- 1. nvcc 13.0 from PyPI. All five packages pinned: an unpinned nvidia-nvvm pulls a newer cicc
# whose PTX ISA the 13.0 ptxas (and a 13.0 driver) rejects.
PKGS="nvidia-cuda-nvcc nvidia-cuda-crt nvidia-cuda-cccl nvidia-cuda-runtime nvidia-nvvm"
venv_ok() {
    [ -x "$VENV/bin/python" ] || return 1
    frozen=$("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null) || return 1
    for p in $PKGS; do
        printf '%s\n' "$frozen" | grep -qx "$p==13\.0\.[0-9.]*" || return 1
    done
}
if ! venv_ok; then
    echo "== installing nvcc 13.0 into $VENV"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    pins=""
    for p in $PKGS; do pins="$pins $p==13.0.*"; done
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $pins
fi
CU13=$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$CU13/bin/nvcc" ] || { echo "error: no nvcc at $CU13/bin/nvcc" >&2; exit 1; }
export PATH="$CU13/bin:$PATH"
# cudarc reads the CUDA version from `nvcc --version` ("..., release 13.0, V13.0.88").
CUDA_REL=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\),.*/\1 \2/p')
CUDA_MAJOR=${CUDA_REL% *}
CUDA_MINOR=${CUDA_REL#* }
CUDA_FEAT="cuda-${CUDA_MAJOR}0${CUDA_MINOR}0"
echo "== nvcc $CUDA_MAJOR.$CUDA_MINOR ($CUDA_FEAT), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"

# ---- 2. Link libraries in .cuda-link/lib (found by cudarc's build script through CUDA_PATH, which
# searches $CUDA_PATH/lib among others). cudarc's `dynamic-linking` asks for -lcuda -lnvrtc -lcurand
# -lcublas -lcublasLt, candle-kernels for -lcudart -lstdc++ and its own libmoe.a.
#  * cudart: the real libcudart.so.13 that nvidia-cuda-runtime installed in the venv.
#  * the others: stubs that export every function cudarc's bindings declare for this CUDA version
#    and carry the real library's soname, which the binary records as NEEDED and the GPU machine's
#    loader looks up. Each stub function aborts with a message, should a stub ever be loaded.
#    Symbols are unversioned: an unversioned reference binds to the real (versioned) definitions.
CUDARC_VER=$(awk '/^name = "cudarc"$/ {getline; gsub(/[^0-9.]/, ""); print; exit}' Cargo.lock)
[ -n "$CUDARC_VER" ] || { echo "error: cudarc not in Cargo.lock" >&2; exit 1; }
CUDARC_SRC=""
for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$CUDARC_VER"; do
    [ -d "$d" ] && CUDARC_SRC=$d
done
if [ -z "$CUDARC_SRC" ]; then
    cargo fetch --quiet
    for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$CUDARC_VER"; do
        [ -d "$d" ] && CUDARC_SRC=$d
    done
fi
[ -n "$CUDARC_SRC" ] || { echo "error: cudarc-$CUDARC_VER sources not found" >&2; exit 1; }

# stub soname : cudarc sys module. Sonames of CUDA 13.0 (checked on the 13.0 wheels):
# libcuda.so.1 is the driver's, stable across CUDA versions; cuRAND stays at .so.10.
STUBS="libcuda.so.1:driver libnvrtc.so.$CUDA_MAJOR:nvrtc libcurand.so.10:curand"
STUBS="$STUBS libcublas.so.$CUDA_MAJOR:cublas libcublasLt.so.$CUDA_MAJOR:cublaslt"
# Declared in cudarc's 13.0 bindings but not exported by cuBLASLt 13.0.0/13.0.2 (newer additions):
# leaving them out makes any use of them a link error here instead of a load error on the GPU box.
EXCLUDE="cublasLtEmulationDescCreate cublasLtEmulationDescDestroy cublasLtEmulationDescGetAttribute
    cublasLtEmulationDescInit_internal cublasLtEmulationDescSetAttribute"

STAMP="cudarc=$CUDARC_VER feature=$CUDA_FEAT cudart=$CU13 script=$(cksum < "$0")"
if [ "$(cat "$LINK/stamp" 2>/dev/null)" != "$STAMP" ]; then
    echo "== generating link stubs in $LINK/lib"
    mkdir -p "$LINK/lib" "$LINK/src"     # emptied, not removed: a running build may search lib
    rm -rf "$LINK"/lib/* "$LINK"/src/* "$LINK/include"
    printf '%s\n' $EXCLUDE > "$LINK/src/exclude.txt"
    for entry in $STUBS; do
        soname=${entry%%:*}
        module=${entry#*:}
        base=${soname%%.so*}            # libcublasLt
        c="$LINK/src/$base.c"
        {
            echo "/* Link-time stub of $soname, generated by scripts/build-cuda.sh from"
            echo "   $CUDARC_SRC/src/$module/sys/mod.rs ($CUDA_FEAT). Never load it. */"
            echo "#include <stdio.h>"
            echo "#include <stdlib.h>"
            echo "static void stub(const char *f) {"
            echo "    fprintf(stderr, \"%s: called the link-time stub of $soname in .cuda-link;\""
            echo "            \" put the real CUDA libraries on LD_LIBRARY_PATH\\n\", f);"
            echo "    abort();"
            echo "}"
            echo "#define S(f) void f(void); void f(void) { stub(#f); }"
            # A function counts when it has no #[cfg] or its #[cfg(any(...))] names this version.
            awk -v feat="\"$CUDA_FEAT\"" '
                /^#\[cfg\(/ { cfg = $0; next }
                /^pub unsafe fn / { n = $4; sub(/[(<].*/, "", n)
                                    if (cfg == "" || index(cfg, feat)) print n; cfg = ""; next }
                { cfg = "" }' "$CUDARC_SRC/src/$module/sys/mod.rs" | sort -u |
                grep -vxFf "$LINK/src/exclude.txt" | sed 's/.*/S(&)/'
        } > "$c"
        n=$(grep -c '^S(' "$c")
        cc -shared -fPIC -O1 -Wl,-soname,"$soname" -o "$LINK/lib/$soname" "$c"
        ln -sf "$soname" "$LINK/lib/$base.so"
        echo "   $soname: $n functions"
    done
    ln -sf "$CU13/lib/libcudart.so.$CUDA_MAJOR" "$LINK/lib/libcudart.so"
    ln -sf "$CU13/include" "$LINK/include"
    printf '%s\n' "$STAMP" > "$LINK/stamp"
fi

[ "$MODE" != prepare ] || { echo "== prepared $VENV and $LINK"; exit 0; }

# ---- 3. cargo. CUDA_PATH is the only CUDA root cudarc may see (it searches every one that is set);
# nvcc comes from PATH (cudaforge, for candle-kernels). No rpath: nothing of .cuda-link is recorded.
run_cargo() {
    env -u CUDA_HOME -u CUDA_ROOT -u CUDA_TOOLKIT_ROOT_DIR -u CUDNN_LIB CUDA_PATH="$LINK" \
        nice -n "$NICE" cargo "$@"
}
mkdir -p "$DIST"
copy_out() { # copy_out SRC NAME: stripped copy in dist/cuda/NAME (debug info and symtab removed)
    strip --strip-all -o "$DIST/$2" "$1"
    echo "== $DIST/$2: $(du -h "$DIST/$2" | cut -f1) ($(stat -c %s "$DIST/$2") bytes; unstripped $(du -h "$1" | cut -f1))"
    readelf -d "$DIST/$2" | sed -n 's/.*(NEEDED) *Shared library: /   NEEDED /p'
    if [ "${XZ:-1}" != 0 ] && command -v xz > /dev/null; then
        # a compressed copy too: the device runner carries at most 64 MiB (unxz there)
        nice -n "$NICE" xz -T0 -6 -c "$DIST/$2" > "$DIST/$2.xz.tmp"
        mv "$DIST/$2.xz.tmp" "$DIST/$2.xz"
        echo "   $DIST/$2.xz: $(du -h "$DIST/$2.xz" | cut -f1)"
    fi
}

if [ "$MODE" = bin ]; then
    echo "== cargo build --release --features cuda --bin qlora-studio (target $CARGO_TARGET_DIR)"
    run_cargo build --release --features cuda --bin qlora-studio
    copy_out "$CARGO_TARGET_DIR/release/qlora-studio" qlora-studio
else
    sel=""
    for name in "$@"; do
        if [ "$name" = lib ]; then sel="$sel --lib"; else sel="$sel --test $name"; fi
    done
    log="$CARGO_TARGET_DIR/build-cuda-tests.log"
    mkdir -p "$CARGO_TARGET_DIR"
    echo "== cargo test --release --features cuda --no-run$sel (target $CARGO_TARGET_DIR)"
    # shellcheck disable=SC2086
    run_cargo test --release --features cuda --no-run $sel 2>&1 | tee "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
    # cargo prints "  Executable tests/NAME.rs (PATH)" and "  Executable unittests src/lib.rs (PATH)".
    if [ $# -eq 0 ]; then
        echo "== test executables (name them after --tests to copy them into $DIST):"
        sed -n 's/^ *Executable //p' "$log"
    fi
    for name in "$@"; do
        if [ "$name" = lib ]; then pat='unittests src/lib\.rs'; else pat="tests/$name\\.rs"; fi
        exe=$(sed -n "s|^ *Executable $pat (\\(.*\\))\$|\\1|p" "$log" | tail -n 1)
        [ -n "$exe" ] && [ -f "$exe" ] || { echo "error: no executable for '$name' in cargo's output" >&2; exit 1; }
        copy_out "$exe" "$name"
    done
fi

cat <<EOF
== On the GPU machine the loader must find the NEEDED CUDA libraries listed above: libcuda.so.1
   from the driver (never the toolkit's lib64/stubs one), the others from the CUDA $CUDA_MAJOR.x toolkit,
   which also supplies libcublasLt.so.$CUDA_MAJOR (needed by libcublas), e.g.
   LD_LIBRARY_PATH=/usr/local/cuda/lib64 or LD_LIBRARY_PATH=<site-packages>/nvidia/cu$CUDA_MAJOR/lib (pip wheels).
   Check there with: ldd qlora-studio | grep 'not found'   (needs glibc >= 2.35, as built here)
EOF
