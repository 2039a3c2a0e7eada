#!/usr/bin/env bash
# Run HERE (not on the device), in the repository root, before calling the device tool with bench/gpu/run.sh:
# downloads the wheels the device lacks (its image has torch, transformers, accelerate but no diffusers,
# bitsandbytes or torchao) into .gpu_wheels/ (git-ignored through .git/info/exclude), with bitsandbytes cut down
# to its CUDA 13 library so that the tree + wheels stay under the device's 64 MiB transfer limit.
# Then: run(command="bash bench/gpu/run.sh", carry=[".gpu_wheels"], timeout_s=540)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.gpu_wheels/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null \
  || echo '/.gpu_wheels/' >> "$(git rev-parse --git-common-dir)/info/exclude"
rm -rf .gpu_wheels && mkdir -p .gpu_wheels
PIP=(python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
     --platform manylinux2014_x86_64 --platform any -d .gpu_wheels)
"${PIP[@]}" diffusers==0.42.1 peft==0.21.2 torchao==0.18.0 bitsandbytes==0.50.2
python3 - <<'PY'
import glob, os, zipfile
src = glob.glob(".gpu_wheels/bitsandbytes-*.whl")[0]
dst = src.replace(".whl", ".slim")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        name = os.path.basename(item.filename)
        if name.startswith("libbitsandbytes_") and name not in ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so"):
            continue  # the device's torch is built for CUDA 13.0
        zout.writestr(item, zin.read(item.filename))
os.replace(dst, src)
PY
du -ch .gpu_wheels/* | tail -1
