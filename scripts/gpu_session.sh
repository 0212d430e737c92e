#!/usr/bin/env bash
# The GPU check in one call, on a machine with a CUDA GPU (docs/gpu.md, "Running the GPU checks
# in one call"), from the repository root:
#
#   DEADLINE=510 scripts/gpu_session.sh [gpu_check options, e.g. --shapes smollm2]
#
# 1. installs what the machine lacks from the wheels carried beside the checkout (.whl/*.whl,
#    ignored by git) into /tmp/site, put first on PYTHONPATH; a wheel whose version the machine
#    already has is left out;
# 2. runs `python -m pipelines.gpu_check` one item at a time (ITEMS, default every item), each
#    with what is left of DEADLINE seconds (default 510), so an item cut by the deadline loses
#    only itself and every finished item's JSON is kept;
# 3. copies every JSON and log it wrote to benchmarks/results/gpu-session-<gpu>-<UTC time>/, and
#    to $OUT when that variable is set.
#
# Exit 0 when every item passed, 1 when one failed, 124 when the deadline left an item unrun,
# 3 when the machine has no CUDA GPU (one line, nothing installed or run).
set -uo pipefail

cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
deadline=${DEADLINE:-510}
end=$(( $(date +%s) + deadline ))

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
if [ -z "$gpu" ]; then
    echo "gpu_session: no CUDA GPU on this machine (nvidia-smi lists none); run it on a GPU machine" >&2
    exit 3
fi

site=/tmp/site
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    # A wheel's file name is DIST-VERSION-...; the machine's own DIST at VERSION is kept.
    mapfile -t lacking < <("$python" - "${wheels[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

for wheel in sys.argv[1:]:
    name, wanted = Path(wheel).name.split("-")[:2]
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have != wanted:
        print(wheel)
EOF
)
    if [ ${#lacking[@]} -gt 0 ]; then
        echo "[gpu-session] installing ${#lacking[@]} of ${#wheels[@]} carried wheels into $site"
        "$python" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "${lacking[@]}" \
            || { echo "gpu_session: installing the wheels of .whl/ failed" >&2; exit 1; }
    fi
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

slug=$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/-$//')
name="gpu-session-$slug-$(date -u +%Y%m%dT%H%M%SZ)"
work=reports/$name
mkdir -p "$work"
items=${ITEMS:-$("$python" -c 'from pipelines.gpu_check.report import CHECKS; print(",".join(CHECKS))')}

status=0
for item in ${items//,/ }; do
    left=$(( end - $(date +%s) ))
    if [ "$left" -lt 30 ]; then
        echo "[gpu-session] $item not run: the deadline ($deadline s) is spent"
        status=124
        continue
    fi
    echo "[gpu-session] $item (${left} s left)"
    timeout -k 5 "$left" "$python" -m pipelines.gpu_check --items "$item" --timeout $(( left - 15 )) \
        --out "$work/gpu_check-$item.json" "$@" 2>&1 | tee -a "$work/session.log"
    code=${PIPESTATUS[0]}
    if [ "$code" -eq 3 ]; then          # torch sees no CUDA device: the check's own line said so
        status=3
        break
    fi
    if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
        echo "[gpu-session] $item cut by the deadline" | tee -a "$work/session.log"
        status=124
    elif [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=1
    fi
done

for dest in "benchmarks/results/$name" ${OUT:+"$OUT/$name"}; do
    mkdir -p "$dest" && cp -r "$work"/. "$dest"/
    echo "[gpu-session] results: $dest"
done
exit "$status"
