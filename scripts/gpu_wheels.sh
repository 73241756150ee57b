#!/usr/bin/env bash
# Build .whl/ (git-ignored): the cp312 manylinux wheels that the GPU machine (Python 3.12, no internet, at
# most 64 MiB of files sent with each command) lacks for minratio — Ray without its Java jars, jsonschema
# and its three dependencies, hydra-core, omegaconf, antlr4 (a wheel built here from its source archive), and
# setuptools to build minratio there. Run it here, on a machine with pip's index;
# scripts/gpu_checks.sh installs the folder there (pip install --no-index --no-deps --target /tmp/site).
#
# The GPU image already has (docs/gpu.md): torch, numpy, scipy, scikit-learn, matplotlib (contourpy, cycler,
# fonttools, kiwisolver, pillow, pyparsing, python-dateutil), pandas, pyarrow, joblib, threadpoolctl, attrs,
# typing-extensions, packaging, and Ray's click, filelock, msgpack, protobuf, pyyaml, requests, grpcio,
# aiohttp — so none of those travel. Versions are the ones this project's CPU environment runs (2026-12).
#
# Ray's wheel is 79 MB, 32 MB of it ray/jars/ray_dist.jar (Java workers, unused from Python): the jars and
# their RECORD lines are left out and the rest re-zipped (a wheel whose RECORD lists a missing file would
# fail pip's check). Prints each wheel's size and what a device call would send (tracked and untracked,
# not ignored files + .whl), and fails if that passes 64 MiB.
#   bash scripts/gpu_wheels.sh            # then: device run with carry [".whl"], command bash scripts/gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=.whl
LIMIT=$((64 * 1024 * 1024))
PY=${PYTHON:-python3}
WHEELS=(
  ray==2.60.0
  jsonschema==4.26.0 referencing==0.37.0 jsonschema-specifications==2025.9.1 rpds-py==0.30.0
  hydra-core==1.3.8 omegaconf==2.3.1
  # not needed at run time: it builds minratio there (pyproject's license = "MIT" needs setuptools>=77,
  # and the GPU machine's own may be older)
  setuptools==80.9.0
)
# Pure Python, published as a source archive only (omegaconf 2.3 needs antlr4 4.9.*): built into a wheel here.
FROM_SOURCE=(antlr4-python3-runtime==4.9.3)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

mkdir -p "$WHL"
rm -f "$WHL"/*.whl "$WHL"/*.tar.gz
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
# One at a time: a pure-Python wheel (py3-none-any) matches any platform, and pip reports which one is missing.
for spec in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_args[@]}" -d "$WHL" "$spec"
done
for spec in "${FROM_SOURCE[@]}"; do
  "$PY" -m pip wheel -q --no-deps -w "$WHL" "$spec"
done

"$PY" - "$WHL" <<'EOF'
"""Rewrite ray-*.whl without ray/jars/ (and without their RECORD lines), in place."""
import glob, os, sys, zipfile

folder = sys.argv[1]
(path,) = glob.glob(os.path.join(folder, "ray-*.whl"))
slim = path + ".slim"
dropped = 0
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
    for info in src.infolist():
        if info.filename.startswith("ray/jars/"):
            dropped += info.file_size
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(l for l in lines if not l.startswith("ray/jars/")).encode()
        dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
before = os.path.getsize(path)
os.replace(slim, path)
print(f"ray wheel: {before / 2**20:.1f} MiB -> {os.path.getsize(path) / 2**20:.1f} MiB "
      f"(left out ray/jars/, {dropped / 2**20:.1f} MiB unpacked)")
EOF

echo "wheels in $WHL/:"
ls -l "$WHL"/*.whl | awk '{printf "  %7.1f MiB  %s\n", $5 / 1048576, $NF}'
whl_bytes=$(cat "$WHL"/*.whl | wc -c)
tree_bytes=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((whl_bytes + tree_bytes))
awk -v t="$tree_bytes" -v w="$whl_bytes" 'BEGIN {m = 1048576
  printf "sent with a device call: tree %.1f MiB + .whl %.1f MiB = %.1f MiB (limit 64 MiB)\n", t / m, w / m, (t + w) / m}'
if [ "$total" -gt "$LIMIT" ]; then
  echo "too large: over 64 MiB would not travel" >&2
  exit 1
fi
git check-ignore -q "$WHL/x.whl" || echo "warning: $WHL/ is not ignored by git; add '/.whl/' to .gitignore" >&2
