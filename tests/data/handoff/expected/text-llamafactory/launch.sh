#!/bin/sh
# Trains this job with LLaMA-Factory on 4 GPU(s) per node × 1 node(s). On several nodes run it on
# every node with NODE_RANK=0..0 and MASTER_ADDR set to node 0's address. Extra arguments are
# passed on to the trainer (key=value overrides of the config).
set -eu
cd "$(dirname "$0")"
if [ ! -f model/config.json ]; then
    echo "model/config.json is missing: copy the base model folder to $(pwd)/model" >&2
    exit 1
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-4}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
# FORCE_TORCHRUN=0 runs one process without torchrun (a CPU check)
export FORCE_TORCHRUN=${FORCE_TORCHRUN:-1} NPROC_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT
exec llamafactory-cli train llamafactory.yaml "$@"
