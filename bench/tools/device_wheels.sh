#!/usr/bin/env bash
# Wheels for what bench/throughput/device.py needs and the lent GPU machine lacks (it has torch, torchvision,
# timm, pyarrow, pillow, click, tqdm; not webdataset or polars; faiss is imported only where dedup runs, which
# the bench does not, and would break the 64 MiB carry limit), at the versions .venv holds, into .whl/ (git-ignored). Then, in the device tool's `run` with carry [".whl"]:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 bench/throughput/device.py
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
for pkg in webdataset braceexpand polars polars-runtime-32; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d .whl "$pkg==$(version "$pkg")"
done
du -sh .whl
