#!/usr/bin/env bash
# Developer build: compiles dsmath_kernels._C into build/dev and copies it next to the Python sources, so
# `PYTHONPATH=python` (or a .pth pointing there) imports the fresh module. Serialised with flock so parallel
# workers never run two builds in one tree. CUDA archs: DSMATH_CUDA_ARCHS (default 90a here, to stay quick);
# DSMATH_DISABLE_CUDA=1 for a CPU-only module.
set -euo pipefail
cd "$(dirname "$0")/.."
exec 9>/tmp/dsmath_dev_build.lock
flock 9
ARCHS="${DSMATH_CUDA_ARCHS:-90a}"
if [ ! -f build/dev/build.ninja ]; then
  cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" \
    -DPython_EXECUTABLE="$(command -v python)" -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" >/dev/null
fi
cmake --build build/dev
# copy then rename: overwriting the .so in place would corrupt it under processes that have it mapped
for so in build/dev/_C*.so; do
  cp -f "$so" "python/dsmath_kernels/.$(basename "$so").tmp"
  mv -f "python/dsmath_kernels/.$(basename "$so").tmp" "python/dsmath_kernels/$(basename "$so")"
done
echo "built $(ls build/dev/_C*.so)"
