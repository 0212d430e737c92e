#!/usr/bin/env bash
# Re-resolve requirements/lock.txt into a complete, consistent set of pins: pip's resolver runs on
# the current pins in a throwaway venv with an empty pip config (no find-links, no extra index),
# so the lock holds what a fresh host gets from PyPI, every transitive package included (PyPI's
# torch brings triton and the nvidia-*/cuda-* libraries). To move a pin: edit or delete its line,
# run this, review `git diff requirements/lock.txt`, then `make setup` (which checks the result).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
export PIP_CONFIG_FILE=/dev/null
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$(grep -o 'pip==[0-9.]*' scripts/setup.sh)"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check --dry-run --ignore-installed \
  --report "$work/report.json" -r requirements/lock.txt
"$work/venv/bin/python" - "$work/report.json" requirements/lock.txt <<'PY'
import json, sys
report, lock = sys.argv[1], sys.argv[2]
header = [line for line in open(lock).read().splitlines() if line.startswith("#")]
pins = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.load(open(report))["install"])
open(lock, "w").write("\n".join(header + sorted(pins, key=str.lower)) + "\n")
print(f"requirements/lock.txt: {len(pins)} pins")
PY
