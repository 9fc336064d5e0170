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
# Extra flags override the config and every flag this script passes, e.g. --train-iters 50
# --tensor-model-parallel-size 2, or --save DIR (which also resumes from DIR unless --load is given).
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

# The value the user gave for flag $1 (--flag VALUE or --flag=VALUE), if any.
user_value() {
    local flag="$1"; shift
    while [[ $# -gt 0 ]]; do
        case "$1" in
            "$flag") echo "${2:-}"; return 0 ;;
            "$flag="*) echo "${1#*=}"; return 0 ;;
        esac
        shift
    done
    return 1
}
given() { user_value "$@" > /dev/null; }

if tokenizer_model="$(user_value --tokenizer-model "$@")" && [[ ! -e "$tokenizer_model" ]]; then
    echo "megahet error: --tokenizer-model $tokenizer_model does not exist; pass an existing file or directory" >&2
    exit 2
fi
# This script's defaults, each only where the user did not give the flag (extra flags win).
defaults=()
save="$(user_value --save "$@" || echo "$RUN_DIR/checkpoints")"
given --save "$@" || defaults+=(--save "$save")
given --load "$@" || defaults+=(--load "$save")
given --config "$@" || defaults+=(--config "$CONFIG")
given --metrics-file "$@" || defaults+=(--metrics-file "$RUN_DIR/metrics.jsonl")
given --wandb-project "$@" || defaults+=(--wandb-project megahet)
given --wandb-save-dir "$@" || defaults+=(--wandb-save-dir "$RUN_DIR")
given --tensorboard-dir "$@" || defaults+=(--tensorboard-dir "$RUN_DIR/tensorboard")
for ((i = 0; i < ${#HETERO[@]}; i += 2)); do  # CLUSTER / PLAN, unless --cluster / --plan are given
    given "${HETERO[i]}" "$@" || defaults+=("${HETERO[i]}" "${HETERO[i + 1]}")
done

mkdir -p "$RUN_DIR"
cores="$(nproc 2>/dev/null || echo 2)"
threads=$(( cores / NPROC_PER_NODE ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"
export MEGAHET_ERROR_FILE="$RUN_DIR/.last_error"
rm -f "$MEGAHET_ERROR_FILE"

set +e
torchrun --nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    "$HERE/pretrain_gpt.py" "${defaults[@]}" "$@" 2> "$RUN_DIR/stderr.log"
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
echo "done: checkpoints in $save, metrics in $RUN_DIR/metrics.jsonl, wandb (offline) in $RUN_DIR/wandb"
