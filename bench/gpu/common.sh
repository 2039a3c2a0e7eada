# Sourced by the device scripts (run.sh, train_base.sh) with their arguments: moves to the repository root,
# sets DRY (1 for --dry-run), OUT (results, default /tmp/diffusion_lora_gpu), PY (python3 or $PYTHON), and
# on the device installs the wheels bench/gpu/prepare.sh put in .gpu_wheels/ (the device lacks diffusers).
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/diffusion_lora_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .gpu_wheels ] && [ "$DRY" = 0 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_wheels/*.whl \
    >> "$OUT/log.txt" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
