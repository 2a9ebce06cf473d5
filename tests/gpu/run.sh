#!/usr/bin/env bash
# The GPU proof, for an NVIDIA machine without network (torch, transformers, nvcc and ninja present):
#   tests/gpu/run.sh REPORT.md
# 1. installs exllamav2 and exllamav3 (and test tools) from .gpu-wheels/ (scripts/fetch_gpu_wheels.sh);
# 2. compiles both CUDA extensions at once (JIT, this GPU's architecture only);
# 3. tests/gpu/gpu_check.py: builds a tiny Llama on the GPU, fits it to one sentence, quantizes it with
#    exllamav3's and exllamav2's converters, and runs the engine contract tests (tests/api/test_engines.py)
#    against the real libraries and against the transformers engine on CUDA;
# 4. writes everything to the report named on the command line.
# Sized for one run under 10 minutes; each phase has its own timeout.
set -uo pipefail
REPORT=${1:?usage: tests/gpu/run.sh REPORT_FILE}
cd "$(dirname "$0")/../.."
ROOT=$PWD
REPORT=$(realpath -m "$REPORT")
WHEELS=${PARLEY_GPU_WHEELS:-$ROOT/.gpu-wheels}
WORK=${PARLEY_GPU_WORK:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS" PIP_DISABLE_PIP_VERSION_CHECK=1
export EXLLAMA_NOCOMPILE=1 MAX_JOBS=${MAX_JOBS:-8}
ARCH=$($PY -c "import torch; m,n=torch.cuda.get_device_capability(); print(f'{m}.{n}')" 2>/dev/null || echo "9.0")
export TORCH_CUDA_ARCH_LIST="$ARCH"
START=$(date +%s)
{
  echo "# Parley GPU check"
  echo
  echo "- date: $(date -u +%FT%TZ)"
  echo "- machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
  echo "- python: $($PY -V 2>&1); torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1)"
  echo "- transformers: $($PY -c 'import transformers; print(transformers.__version__)' 2>&1)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
} > "$REPORT"
section() { echo -e "\n## $1 ($(( $(date +%s) - START ))s)\n" >> "$REPORT"; }

section "install"
$PY -m pip install --quiet --no-build-isolation exllamav2 exllamav3 pytest pytest-asyncio loguru llguidance \
  ruamel.yaml gguf >> "$REPORT" 2>&1 && echo "installed from $WHEELS" >> "$REPORT" || echo "INSTALL FAILED" >> "$REPORT"

section "compile the CUDA extensions (both at once)"
( timeout 420 $PY -c "import exllamav2, exllamav2.ext; print('exllamav2', exllamav2.__version__)" > "$WORK/v2.log" 2>&1; echo "rc=$?" >> "$WORK/v2.log" ) &
( timeout 420 $PY -c "import exllamav3; print('exllamav3 imported')" > "$WORK/v3.log" 2>&1; echo "rc=$?" >> "$WORK/v3.log" ) &
wait
tail -n 5 "$WORK/v2.log" "$WORK/v3.log" >> "$REPORT"

section "build, fit, quantize, test"
timeout $(( 560 - ($(date +%s) - START) )) $PY tests/gpu/gpu_check.py --work "$WORK" --report "$REPORT"
echo "gpu_check exit code: $?" >> "$REPORT"
section "done"
cat "$REPORT"
