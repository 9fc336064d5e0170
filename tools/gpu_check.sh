#!/usr/bin/env bash
# One-GPU check for a lent machine, in well under 10 minutes:
#   1. environment (GPU, compute capability, torch / flash-attn / apex versions, TF32 state),
#   2. every CUDA kernel against its reference implementation (pytest -m gpu tests/gpu),
#   3. bf16 training steps of the default model (examples/configs/moe_small.yaml) on this GPU,
#   4. tools/bench_model.py on the GPU (megahet vs plain PyTorch, alternating in one run),
# then a short report. Usage: bash tools/gpu_check.sh [REPORT_DIR]  (default runs/gpu_check).
# Every step has its own timeout; a failing step is reported and the next one still runs.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-runs/gpu_check}"
mkdir -p "$OUT"
REPORT="$OUT/report.md"
export MEGAHET_CACHE_DIR="${MEGAHET_CACHE_DIR:-$OUT/cache}"
cd "$HERE"
declare -a RESULTS=()

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, remember pass/fail and time
    local name="$1" limit="$2"; shift 2
    local start end rc
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    end=$(date +%s)
    RESULTS+=("| $name | $([[ $rc == 0 ]] && echo pass || echo "FAIL (rc $rc)") | $((end - start)) s |")
    echo "[$name] rc=$rc in $((end - start)) s (log: $OUT/$name.log)"
}

step environment 60 python - <<'EOF'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
assert torch.cuda.is_available(), "no CUDA device visible"
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
print("tf32 matmul allowed", torch.backends.cuda.matmul.allow_tf32)
for pkg in ("flash_attn", "apex", "fused_layer_norm_cuda"):
    spec = importlib.util.find_spec(pkg)
    version = getattr(importlib.import_module(pkg), "__version__", "?") if spec else None
    print(pkg, version if spec else "not installed")
from megahet.device import get_backend
b = get_backend("cuda").require_available()
print("kernels", b.kernels.describe())
print("peak bf16 TFLOP/s", b.peak_flops(torch.bfloat16) / 1e12, "fp32", b.peak_flops(torch.float32) / 1e12)
EOF

step kernels 180 python -m pytest -q -m gpu tests/gpu

step train_bf16 180 torchrun --nproc-per-node 1 examples/pretrain_gpt.py --config examples/configs/moe_small.yaml \
    --expert-model-parallel-size 1 --bf16 --train-iters 40 --log-interval 10 --eval-interval 1000 \
    --metrics-file "$OUT/train_metrics.jsonl"

step bench_model 150 python tools/bench_model.py --backend cuda --iters 10 --no-memory

{
    echo "# megahet GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    sed -n '1,6p' "$OUT/environment.log" | sed 's/^/    /'
    echo
    echo "| step | result | time |"
    echo "|---|---|---|"
    printf '%s\n' "${RESULTS[@]}"
    echo
    echo "## kernels"; tail -n 3 "$OUT/kernels.log" | sed 's/^/    /'
    echo "## bf16 training (first and last logged iterations)"
    python - "$OUT/train_metrics.jsonl" <<'EOF' 2>/dev/null || echo "    (no metrics written)"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in (rows[0], rows[-1]):
    print(f"    iteration {r['iteration']}: loss {r['loss']:.4f}, {r['tokens_per_s']:.0f} tokens/s, "
          f"step {r['step_time_s'] * 1e3:.1f} ms")
EOF
    echo "## bench_model"; grep -E "^\|" "$OUT/bench_model.log" | sed 's/^/    /' || tail -n 15 "$OUT/bench_model.log"
} > "$REPORT"
echo "report: $REPORT"
cat "$REPORT"
