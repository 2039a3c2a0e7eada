#!/usr/bin/env bash
# The prepared device check of issue 15 (one H200, <= 10 min per command, 15 min of device time in all).
#
#   here:        bash bench/gpu/prepare.sh          # wheels the device lacks -> .gpu_wheels/
#   device tool: run(command="bash bench/gpu/run.sh", carry=[".gpu_wheels"], timeout_s=540)
#   anywhere:    PYTHON=.venv/bin/python bash bench/gpu/run.sh --dry-run   # tiny widths on the CPU: checks the script
#
# Measures CUDA peak memory (torch.cuda.max_memory_allocated / max_memory_reserved) of one LoRA r16 "attn"
# training step (fwd + bwd + AdamW) at FULL size (published configs on meta -> to_empty("cuda"), random bf16
# weights; nf4 = bitsandbytes Linear4bit, int8/fp8 = torchao weight-only, both through the library's
# quantize_denoiser) and prints each beside `train --estimate`'s number for the same model. Every measurement
# runs in its own process with a timeout, so one OOM or failure loses only its own row.
# Results: $OUT/gpu_memory.jsonl (one JSON object per row), $OUT/log.txt, a table on stdout.
set -u
source "$(dirname "$0")/common.sh" "$@"
export MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072
ROWS="$OUT/gpu_memory.jsonl"
: > "$ROWS"
if [ "$DRY" = 1 ]; then DEV="--dry-run"; LIMIT=300; else DEV="--cuda"; LIMIT=150; fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" >> "$OUT/log.txt" 2>&1

probe() {  # probe NAME ARGS...: one measurement in its own process; a failure is recorded as a row
  local name=$1; shift
  local line rc
  timeout "$LIMIT" $PY bench/memory_probe.py $DEV "$@" > "$OUT/probe.out" 2>>"$OUT/log.txt"
  rc=$?
  line=$(grep '^{' "$OUT/probe.out" | tail -1)
  if [ -n "$line" ]; then
    echo "$line" | $PY -c "import json,sys; r=json.load(sys.stdin); r['name']='$name'; print(json.dumps(r))" >> "$ROWS"
  else
    echo "{\"name\": \"$name\", \"failed\": true, \"rc\": $rc}" >> "$ROWS"
  fi
  echo "done $name" >> "$OUT/log.txt"
}

FULL_FLUX=""      # full depth: the published 19 double + 38 single blocks
FULL_KLEIN=""
FULL_SDXL=""
if [ "$DRY" = 1 ]; then  # dry run: 1+1 blocks, tiny width (memory_probe --dry-run), small images
  FULL_FLUX="num_layers=1;num_single_layers=1"; FULL_KLEIN=$FULL_FLUX; FULL_SDXL="transformer_layers_per_block=(1,1,1)"
  P512=128; P1024=128
else
  P512=512; P1024=1024
fi
probe flux1-512-nf4-ckpt    --variant flux1 --depth "$FULL_FLUX" --px $P512 --quant nf4 --ckpt
probe flux1-512-int8-ckpt   --variant flux1 --depth "$FULL_FLUX" --px $P512 --quant int8 --ckpt
probe flux1-512-bf16-ckpt   --variant flux1 --depth "$FULL_FLUX" --px $P512 --ckpt
probe flux1-1024-nf4-ckpt   --variant flux1 --depth "$FULL_FLUX" --px $P1024 --quant nf4 --ckpt
probe flux1-1024-bf16-ckpt  --variant flux1 --depth "$FULL_FLUX" --px $P1024 --ckpt
probe flux1-512-nf4         --variant flux1 --depth "$FULL_FLUX" --px $P512 --quant nf4
probe flux1-512-int8        --variant flux1 --depth "$FULL_FLUX" --px $P512 --quant int8  # torchao keeps dequantized weights
probe sdxl-1024-bf16-ckpt   --variant sdxl --depth "$FULL_SDXL" --px $P1024 --ckpt
probe sdxl-1024-nf4-ckpt    --variant sdxl --depth "$FULL_SDXL" --px $P1024 --quant nf4 --ckpt
probe sdxl-1024-bf16        --variant sdxl --depth "$FULL_SDXL" --px $P1024
probe klein4b-1024-bf16-ckpt --variant flux2-klein --family flux2 --depth "$FULL_KLEIN" --px $P1024 --ckpt
probe klein4b-1024-nf4-ckpt  --variant flux2-klein --family flux2 --depth "$FULL_KLEIN" --px $P1024 --quant nf4 --ckpt
probe flux1-512-fp8-ckpt    --variant flux1 --depth "$FULL_FLUX" --px $P512 --quant fp8 --ckpt
# the CPU calibration's shape on the GPU: 2+2 Flux.1-width blocks, no checkpointing
probe flux1-2+2-512-bf16    --variant flux1 --depth "num_layers=2;num_single_layers=2" --px $P512

if [ -f bench/gpu/offload_check.py ]; then  # another part of issue 15 (offloading), if present
  args=(); [ "$DRY" = 1 ] && args=(--dry-run)
  timeout "$LIMIT" $PY bench/gpu/offload_check.py "${args[@]}" > "$OUT/offload_check.txt" 2>&1
  echo "offload_check rc=$?" >> "$OUT/log.txt"
fi

$PY - "$ROWS" <<'PY'
import json, sys
print(f"{'row':26} {'weights GB meas/est':>20} {'step GB meas/est':>18} {'err':>6} {'peak alloc':>10} {'reserved':>9}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("failed"):
        print(f"{r['name']:26} failed (rc {r['rc']}; see log.txt)")
        continue
    g = 1e9
    err = (r["estimated_step"] - r["measured_step"]) / max(r["measured_step"], 1)
    peak = r["measured_weights"] + r["measured_step"] + r["estimated_resident_training_state"]
    res = r["cuda_max_reserved"] / g if r.get("cuda_max_reserved") else float("nan")
    print(f"{r['name']:26} {r['measured_weights']/g:9.2f}/{r['estimated_weights']/g:<9.2f} "
          f"{r['measured_step']/g:8.2f}/{r['estimated_step']/g:<8.2f} {err:+6.0%} {peak/g:10.2f} {res:9.2f}")
PY
