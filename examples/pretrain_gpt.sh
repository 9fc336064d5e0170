#!/usr/bin/env bash
# Pretrain a small MoE GPT on this machine's CPU ranks (default), or wherever torchrun is pointed.
#
#   bash examples/pretrain_gpt.sh [extra megahet flags]
#
# Environment overrides: NPROC_PER_NODE (2), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1),
# MASTER_PORT (29500), CONFIG (examples/configs/moe_small.yaml), RUN_DIR (runs/pretrain_gpt),
# CLUSTER (a cluster spec: --cluster; the rank count defaults to its devices) and PLAN (--plan), e.g.
#   CLUSTER=examples/configs/cluster_cpu_sim.yaml PLAN=examples/configs/plan_cpu_sim_pipeline.yaml bash examples/pretrain_gpt.sh
# With no --data-path the built-in corpus (Python's own documentation) is tokenized once and cached.
# Extra flags override the config, e.g. --train-iters 50 --tensor-model-parallel-size 2.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HETERO=()
if [[ -n "${CLUSTER:-}" ]]; then
    HETERO+=(--cluster "$CLUSTER")
    if [[ -z "${NPROC_PER_NODE:-}" && "${NNODES:-1}" == 1 ]]; then  # one node: launch every rank the spec lists
        NPROC_PER_NODE="$(python -c 'import sys, yaml; print(sum(g["devices"] for g in yaml.safe_load(open(sys.argv[1]))["groups"]))' "$CLUSTER")"
    fi
fi
if [[ -n "${PLAN:-}" ]]; then HETERO+=(--plan "$PLAN"); fi
NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
CONFIG="${CONFIG:-$HERE/configs/moe_small.yaml}"
RUN_DIR="${RUN_DIR:-runs/pretrain_gpt}"

mkdir -p "$RUN_DIR"
cores="$(nproc 2>/dev/null || echo 2)"
threads=$(( cores / NPROC_PER_NODE ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"
export MEGAHET_ERROR_FILE="$RUN_DIR/.last_error"
rm -f "$MEGAHET_ERROR_FILE"

set +e
torchrun --nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    "$HERE/pretrain_gpt.py" --config "$CONFIG" ${HETERO[@]+"${HETERO[@]}"} \
    --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" \
    --metrics-file "$RUN_DIR/metrics.jsonl" \
    --wandb-project megahet --wandb-save-dir "$RUN_DIR" --tensorboard-dir "$RUN_DIR/tensorboard" \
    "$@" 2> "$RUN_DIR/stderr.log"
status=$?
set -e
if [[ $status -ne 0 ]]; then
    if [[ -s "$MEGAHET_ERROR_FILE" ]]; then
        cat "$MEGAHET_ERROR_FILE" >&2  # an expected error: its one line says what to fix
    else
        tail -n 60 "$RUN_DIR/stderr.log" >&2
    fi
    exit "$status"
fi
echo "done: checkpoints in $RUN_DIR/checkpoints, metrics in $RUN_DIR/metrics.jsonl, wandb (offline) in $RUN_DIR/wandb"
