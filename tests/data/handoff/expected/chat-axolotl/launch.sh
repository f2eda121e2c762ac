#!/bin/sh
# Trains this job with axolotl on 4 GPU(s) per node × 2 node(s). On several nodes run it on
# every node with NODE_RANK=0..1 and MASTER_ADDR set to node 0's address. Extra arguments are
# passed on to the trainer (key=value overrides of the config).
set -eu
cd "$(dirname "$0")"
if [ ! -f model/config.json ]; then
    echo "model/config.json is missing: copy the base model folder to $(pwd)/model" >&2
    exit 1
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-4}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
exec accelerate launch --num_processes "$((NPROC_PER_NODE * NNODES))" --num_machines "$NNODES" \
    --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    -m axolotl.cli.train axolotl.yaml "$@"
