#!/usr/bin/env bash
# Download what tests/gpu/run.sh installs on a GPU machine that has no network, into .gpu-wheels/ (git-ignored).
#   scripts/fetch_gpu_wheels.sh [PYTHON_VERSION, default 3.11]
# exllamav2 and exllamav3 come as source (their CUDA extensions compile on the device, JIT, for its GPU only);
# Parley's own pure-Python dependencies and the test tools come as wheels for that Python. torch and
# transformers are expected on the device already.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.11}
OUT=.gpu-wheels
mkdir -p "$OUT"
PIP="${PIP:-python3 -m pip}"
# The two libraries, as source distributions (small; compiled on the device).
$PIP download --no-deps --no-binary :all: -d "$OUT" "exllamav2==0.3.2" "exllamav3>=1.0"
# Their dependencies and Parley's, as wheels for the device's Python (manylinux x86_64).
$PIP download -d "$OUT" --only-binary :all: --python-version "$PYV" --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any --implementation cp \
  pandas fastparquet pygments websockets regex rich pillow safetensors ninja pyyaml marisa_trie pydantic \
  "llguidance>=1.9" "flash-linear-attention>=0.5" tokenizers \
  loguru numpy "pytest>=8" "pytest-asyncio>=0.24" "ruamel.yaml>=0.18" httpx jinja2 "fastapi>=0.115" \
  "pydantic-settings>=2.3" gguf "prometheus-client<1" sse-starlette
du -sh "$OUT"
echo "Carry $OUT to the GPU machine with the working tree, then run: tests/gpu/run.sh REPORT.md"
