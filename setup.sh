#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 (jax 0.11 refuses older ones) and installs the project.
#   ./setup.sh          the project and the test tools, for CPU
#   ./setup.sh gpu      the same plus jax[cuda13] (for a CUDA 13 machine)
#   ./setup.sh --which-python   only print the Python a new .venv would be made with
set -euo pipefail
cd "$(dirname "$0")"

# Python 3.12 is the tested version, so it wins over newer ones wherever it is (PATH or pyenv);
# then 3.13, then any python3 >= 3.12.
find_python() {
  local candidates=("${PYTHON:-}")
  for minor in 12 13; do
    candidates+=("python3.$minor")
    if command -v pyenv >/dev/null 2>&1; then
      for version in $(pyenv versions --bare 2>/dev/null | grep -E "^3\.$minor(\.|$)" | sort -rV); do
        candidates+=("$(pyenv root)/versions/$version/bin/python")
      done
    fi
  done
  candidates+=(python3)
  for candidate in "${candidates[@]}"; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$candidate"
      return
    fi
  done
  echo "setup.sh: no Python >= 3.12 found (jax 0.11 needs it). Install one, e.g." \
    "'pyenv install 3.12', or point PYTHON=/path/to/python3.12 at it." >&2
  exit 1
}

if [ "${1:-}" = "--which-python" ]; then  # print the interpreter a new .venv would use
  find_python
  exit 0
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  python=$(find_python)
  echo "setup.sh: creating .venv with $python ($("$python" --version))"
  rm -rf .venv
  "$python" -m venv .venv
fi
extras="test"
[ "${1:-}" = "gpu" ] && extras="test,gpu"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$extras]"
echo "setup.sh: ready ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__, jax.default_backend())'))"
