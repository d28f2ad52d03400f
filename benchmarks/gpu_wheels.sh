#!/usr/bin/env bash
# The wheels that benchmarks/gpu_check.py needs on a GPU machine with JAX but no Keras and no internet.
#
#   bash benchmarks/gpu_wheels.sh        # on a machine with PyPI: writes .whl/ at the repository root
#
# Then on the GPU machine (Python 3.12, jax with CUDA, numpy, h5py, rich, ml-dtypes, absl-py, packaging):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD && KERAS_BACKEND=jax python3 benchmarks/gpu_check.py
#
# keras 3.15.1 and those of its requirements the GPU machine lacks (namex, optree, and optree's typing_extensions),
# at the versions of .venv, for CPython 3.12 on manylinux x86_64. Fails if .whl/ grows past 64 MiB (the most that
# travels with the working tree). .whl/ is git-ignored.
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=.whl
LIMIT_MIB=64
PYTHON=${PYTHON:-python3}
WHEELS=(keras==3.15.1 namex==0.1.0 optree==0.20.0 typing_extensions==4.16.0)

mkdir -p "$DEST"
for wheel in "${WHEELS[@]}"; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$wheel"
done

echo "keras and optree require (the GPU machine must have the rest):"
for name in keras-3.15.1 optree-0.20.0; do
    unzip -p "$DEST"/$name-*.whl '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed "s/^/  $name: /"
done
ls -l "$DEST"
size_kib=$(du -sk "$DEST" | cut -f1)
if (( size_kib > LIMIT_MIB * 1024 )); then
    echo "error: $DEST is $((size_kib / 1024)) MiB, over the $LIMIT_MIB MiB that travel with the tree" >&2
    exit 1
fi
echo "$DEST: $size_kib KiB"
