#!/usr/bin/env bash
# Pack what `python -m pipelines.gpu_check` needs on top of a GPU machine's own Python 3.12 and
# torch (docs/gpu.md, "On a GPU machine that cannot reach PyPI") into one archive, built where
# PyPI is reachable:
#
#   scripts/gpu_offline_site.sh [ARCHIVE] [CUDA...]     # default .gpu/site.tar.xz, cuda126-cuda132
#
# On the GPU machine, with no network:
#   mkdir -p /tmp/s && tar -C /tmp/s -xJf .gpu/site.tar.xz
#   PYTHONPATH=/tmp/s/site python3 -m pipelines.gpu_check
#
# The wheels are unpacked for CPython 3.12 on manylinux x86_64 (whatever this host runs), and
# two things the check never loads are left out, which makes the archive about 21 MiB instead
# of 80: bitsandbytes' libraries for CUDA versions other than the ones named, and Unsloth's
# `studio` web UI.
set -euo pipefail

archive=${1:-.gpu/site.tar.xz}
shift || true
cudas=("$@")
[ ${#cudas[@]} -gt 0 ] || cudas=(cuda126 cuda128 cuda130 cuda132)

# What `import unsloth` and the check's modules load on top of such an image (docs/gpu.md).
wheels=(unsloth==2026.10.9 unsloth_zoo==2026.10.9 bitsandbytes==0.50.2 trl==1.15.0 peft==0.21.2
        torchao==0.18.0 cut-cross-entropy==25.1.1 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19
        pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 pydot==4.0.1)
target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "[gpu-site] downloading ${#wheels[@]} wheels ..."
python3 -m pip download --quiet --no-deps "${target[@]}" -d "$work/wheels" "${wheels[@]}"
python3 -m pip install --quiet --no-index --no-deps --no-compile "${target[@]}" --target "$work/site" \
    "$work"/wheels/*.whl
rm -rf "$work/site/studio"
keep=$(printf '%s\n' "${cudas[@]}")
for lib in "$work"/site/bitsandbytes/libbitsandbytes_*.so; do
    name=$(basename "$lib" .so); name=${name#libbitsandbytes_}
    grep -qx "$name" <<<"$keep" || [ "$name" = cpu ] || rm "$lib"
done
mkdir -p "$(dirname "$archive")"
tar -C "$work" -cJf "$archive" site
echo "[gpu-site] $archive: $(du -h "$archive" | cut -f1) (bitsandbytes for ${cudas[*]} and CPU)"
