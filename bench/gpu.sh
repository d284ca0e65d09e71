#!/usr/bin/env bash
# One prepared run for a CUDA machine (a few minutes): the CUDA tests, then the svd
# and exact-composition benchmarks on the GPU. Run from the repository root:
#
#     bash bench/gpu.sh            # writes under $OUT if set, else ./gpu-out
#
# Installs nothing from the network: `pip install -e . --no-deps`, plus wheels from
# a local folder ($WHEELS, default ./wheels) when one is present. torch, peft,
# transformers (and lark, pydantic, PyYAML, rich, safetensors) must already be there.
set -u
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu.log"
MD="$OUT/benchmarks-gpu.md"
: > "$LOG"; : > "$MD"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0

step() {  # step NAME TIMEOUT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}

WHEELS="${WHEELS:-./wheels}"
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  step "local wheels" 120 python -m pip install --no-index --no-deps "$WHEELS"/*.whl
fi
step "install peftdsl" 120 python -m pip install -e . --no-deps --no-build-isolation -q
step "environment" 60 python -c "
import torch, peft, transformers, safetensors
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'peft', peft.__version__,
      'transformers', transformers.__version__, 'safetensors', safetensors.__version__)
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')
import lark, pydantic, yaml, rich  # the front end's dependencies
"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"

{ echo "# GPU benchmarks ($(date -u +%F))"; echo; } >> "$MD"
step "cuda tests" 180 python -m pytest -q -m cuda tests/ -p no:cacheprovider
step "svd benchmark" 240 python bench/svd_compose.py --device cuda --md "$MD"
step "exact benchmark" 180 python bench/exact_compose.py --device cuda --md "$MD"

echo "results: $MD, log: $LOG (overall status $status)" | tee -a "$LOG"
exit $status
