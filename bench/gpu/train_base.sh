#!/usr/bin/env bash
# Issue 17's device run: the embedded base trained as an open world at a larger width, on one GPU, in one call.
#
#   here:        bash bench/gpu/prepare.sh          # diffusers etc. -> .gpu_wheels/ (the device lacks them)
#   device tool: run(command="bash bench/gpu/train_base.sh", carry=[".gpu_wheels"], timeout_s=560)
#   anywhere:    PYTHON=.venv/bin/python bash bench/gpu/train_base.sh --dry-run   # a few steps on the CPU
#
# Runs train_scripts/train_base_model.py --device cuda with the open-world plan measured on the CPU in issue 17
# (--open-vae-steps 1500 --open-vae2-steps 1500 --open-unet-steps 3000 --reword-steps 0) at VAE and UNet
# width 48 (the shipped model: 32; 48 + 48 stays under the 25 MB folder budget). scikit-image (the photo
# family) is not on the device: without it the plan runs with --photos false. Results under $OUT: the model folder as model.tar split into
# <= 15 MiB parts (join: cat model.tar.* > model.tar), log.txt with the held-out prompt-following score.
set -u
source "$(dirname "$0")/common.sh" "$@"
PHOTOS=true
$PY -c "import skimage" 2>/dev/null || PHOTOS=false
if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  STEPS=(--vae-steps 2 --vae-batch 2 --sharpen-steps 2 --polish-steps 2 --images 16 --unet-steps 3 --unet-batch 4
         --warmup 1 --checkpoint-every 2 --open-vae-steps 2 --open-vae2-steps 2 --open-images 16 --open-unet-steps 3
         --open-warmup 1 --open-decay-from 2 --reword-steps 0)
else
  DEVICE=cuda
  STEPS=(--open-vae-steps 1500 --open-vae2-steps 1500 --open-unet-steps 3000 --reword-steps 0)
fi
WORK=$(mktemp -d)
timeout 520 $PY train_scripts/train_base_model.py --out "$WORK/model" --work "$WORK/work" --device $DEVICE \
  --threads 8 --photos $PHOTOS --vae-width 48 --unet-width 48 "${STEPS[@]}" 2>&1 | tr '\r' '\n' \
  | grep -v 'it/s\]$' | tail -40 >> "$OUT/log.txt"
echo "train rc=${PIPESTATUS[0]} photos=$PHOTOS" >> "$OUT/log.txt"
if [ -d "$WORK/model" ]; then
  du -sh "$WORK/model" >> "$OUT/log.txt"
  tar -C "$WORK" -cf "$OUT/model.tar" model && split -b 15M -d "$OUT/model.tar" "$OUT/model.tar." && rm "$OUT/model.tar"
fi
rm -rf "$WORK"
cat "$OUT/log.txt"
