#!/usr/bin/env bash
# Every GPU check of issue 20 in one command, for a fresh GPU machine with torch + CUDA and no internet,
# within about 8 minutes (BUDGET_S, default 455 s, after the installs of about 20 s; each step has its own timeout,
# cut to what is left, and a step is skipped with a line once the budget is spent). Fails soft: a failing
# step is reported and the next one still runs; the exit code is 1 if any step failed.
#   0. installs .whl/ (scripts/gpu_wheels.sh builds it: Ray 2.60 without its jars, jsonschema, referencing,
#      jsonschema-specifications, rpds-py, hydra-core, omegaconf, antlr4) into a temp --target unless Ray,
#      Hydra and jsonschema are importable already, and minratio itself from this tree (non-editable, so
#      that the CLI and the Hydra configs, package pipeline.conf, are there as a user's install has them;
#      built by the setuptools wheel in .whl/, since the machine's own may be too old or absent);
#   1. the GPU tests through Ray: tests/test_cluster.py's fractional-GPU sweep and tests/test_gpu_sweep.py
#      (the default sweep with hessian.num_gpus=0.25 via the CLI: points on cuda, counts = the CPU's);
#   2. every other GPU test (CUDA against CPU: Hessian build, eigh, LDLᵀ inertia with cuSOLVER's pivots and
#      the blocked LDLᵀ, multi-point path, Newton-MR, estimator, the pipeline's Hessian job, models);
#   3. scripts/bench_counts_inplace.py: exact counts at N ≈ 29k and 100k in H's own memory (closed-form
#      build + blocked LDLᵀ), peak memory, counts checked by a second factorisation order; 100k needs the
#      H200's memory — on a smaller GPU the largest N that fits runs in its place;
#   4. scripts/bench_sweep_gpu.py: +experiment=lecture_digits for about 3 minutes with training, Hessian and
#      refinement tasks sharing the GPU: the Hessian and refinement tasks on 0.25 GPU each, the training tasks
#      on TRAIN_FRACTION each (default 1/CPUs: every core's training task fits on the card; 0 trains on the
#      CPU cores): runs/min, checkpoints/min, nvidia-smi utilisation;
#   5. the generic-module Hessian (a tanh MLP as an nn.Module, built from HVPs by parameter tensor) next to
#      the closed-form build of the same MLP at N ≈ 19k (scripts/bench_hessian.py $GENERIC_ARGS);
#   6. the older benchmarks (bench_hessian, bench_cusolver_eigh, bench_label, bench_refine; about 6 minutes)
#      and 7. bench_estimate --parts gpu (about 3 minutes): only when PARTS names them.
# PARTS (default "tests inplace sweep generic") picks the steps: e.g. PARTS="more" in a second call, or
# PARTS="inplace" alone.
# Without CUDA every GPU part says it is skipped, on a line of its own, and the script exits 0.
# Output goes to $OUT (default ./gpu_out), at most 8 files as the device tool returns: summary.txt,
# gpu_tests.txt, bench_inplace.txt, bench_sweep_gpu.txt, nvidia_smi.csv, bench_generic.txt, bench_more.txt.
#   bash scripts/gpu_checks.sh          # docs/gpu.md: how to run it on the device machine
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore  # commands run as root there
BUDGET_S=${BUDGET_S:-455}
PARTS=" ${PARTS:-tests inplace sweep generic} "
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
status=0

note() { echo "$*" | tee -a "$SUMMARY"; }
want() { [[ "$PARTS" == *" $1 "* ]]; }

# step NAME TIMEOUT LOG CMD...: CMD with its own timeout (at most what is left of BUDGET_S), its output to the
# terminal and appended to LOG; one line in the summary with its exit code, time and last line of output.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((BUDGET_S - (SECONDS - T0)))
  if [ "$left" -lt 20 ]; then
    note "SKIP  $name: the budget of ${BUDGET_S}s is spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t=$SECONDS
  echo "== $name ($(date -u +%FT%TZ), timeout ${limit}s): $*" >>"$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]} last
  last=$(grep -v '^\s*$' "$log" | tail -1 | cut -c1-160)
  if [ "$rc" -eq 0 ]; then
    note "ok    $name ($((SECONDS - t))s): $last"
  else
    [ "$rc" -eq 124 ] && last="timed out after ${limit}s; $last"
    note "FAIL  $name: exit $rc ($((SECONDS - t))s): $last"
    status=1
  fi
}

# 0. Installs.
SITE=$(mktemp -d /tmp/minratio-site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT
pip_target() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$@"; }
if python3 -c "import ray, hydra, omegaconf, jsonschema" 2>/dev/null; then
  note "wheels: ray, hydra, omegaconf and jsonschema are importable already: .whl/ not installed"
elif ls .whl/*.whl >/dev/null 2>&1; then
  if pip_target "$SITE/deps" $(ls .whl/*.whl | grep -v /setuptools-) >>"$SUMMARY" 2>&1; then
    note "wheels: installed $(ls .whl/*.whl | grep -vc /setuptools-) wheels from .whl/ into $SITE/deps"
  else
    note "FAIL  wheels: pip could not install .whl/ (above); the Ray and sweep steps will fail"
    status=1
  fi
else
  note "FAIL  wheels: Ray is not importable and there is no .whl/: run scripts/gpu_wheels.sh and carry .whl"
  status=1
fi
# The build backend: pyproject's setuptools>=77 from .whl/ in an isolated build (the machine's own setuptools
# may be older, and older ones refuse pyproject's license = "MIT"); without one in .whl/, the machine's own.
if ls .whl/setuptools-*.whl >/dev/null 2>&1; then build=(--find-links .whl); else build=(--no-build-isolation); fi
if pip_target "$SITE/minratio" "${build[@]}" . >>"$SUMMARY" 2>&1; then
  export PYTHONPATH="$SITE/minratio:$SITE/deps" PATH="$SITE/minratio/bin:$PATH"
  note "minratio: installed from this tree into $SITE/minratio"
else
  export PYTHONPATH="$PWD:$SITE/deps"
  note "FAIL  minratio: could not install this tree (above); on PYTHONPATH instead (the CLI's configs may be missing)"
  status=1
fi
T0=$SECONDS

{
  date -u
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no git here)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
              torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  # from outside the tree, as the CLI runs in tests/test_gpu_sweep.py: the installed package and its configs
  (cd /tmp && python3 -c "import ray, hydra, pipeline.conf; print('ray', ray.__version__, 'hydra', hydra.__version__,
              'pipeline and its configs from', pipeline.conf.__file__)" 2>&1 | tail -1)
  echo "cpus $(nproc)"
} 2>&1 | tee -a "$SUMMARY"
cuda=$(python3 -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
[ "$cuda" = 1 ] || note "no CUDA: the GPU tests will report themselves skipped; the benchmarks say so and exit 0"

# 1-2. Tests (they skip themselves without CUDA).
PYTEST=(python3 -m pytest -q -rs -m gpu -p no:cacheprovider --continue-on-collection-errors)
if want tests; then
  step "GPU tests through Ray" 150 "$OUT/gpu_tests.txt" "${PYTEST[@]}" tests/test_cluster.py tests/test_gpu_sweep.py
  # every other file with a test marked gpu (test_e2e.py and test_tables.py need duckdb, which is not there)
  mapfile -t tests < <(grep -l "mark.gpu" tests/test_*.py | grep -v -e test_cluster.py -e test_gpu_sweep.py)
  step "GPU tests" 120 "$OUT/gpu_tests.txt" "${PYTEST[@]}" "${tests[@]}"
fi

# 3-4. Benchmarks of issue 20 (each prints one line and exits 0 without CUDA).
if want inplace; then
  step "exact counts in H's memory, N ≈ 29k and 100k" 180 "$OUT/bench_inplace.txt" \
    python3 scripts/bench_counts_inplace.py --sizes 29124,100000 --fit-largest
fi
if want sweep; then
  sweep_s=$((BUDGET_S - (SECONDS - T0) - 40))  # its two sweeps, sized to end before the step's timeout
  [ "$sweep_s" -gt 170 ] && sweep_s=170
  step "lecture_digits sweep throughput" 210 "$OUT/bench_sweep_gpu.txt" \
    python3 scripts/bench_sweep_gpu.py --seconds "$sweep_s" --smi-log "$OUT/nvidia_smi.csv" \
    ${TRAIN_FRACTION:+--train-fraction "$TRAIN_FRACTION"}
fi

# 5. The generic-module Hessian next to the closed form (bench_hessian.py --generic).
if ! want generic; then
  :
elif [ "$cuda" != 1 ]; then
  note "SKIP  generic-module Hessian at N ≈ 19k: no CUDA"
else
  read -r -a generic <<<"${GENERIC_ARGS:---device cuda --generic mlp --sizes 19204 --max-baseline-s 1}"
  step "generic-module Hessian at N ≈ 19k" 90 "$OUT/bench_generic.txt" python3 scripts/bench_hessian.py "${generic[@]}"
fi

# 6-7. The older benchmarks, when PARTS names them.
if want more || want estimate; then
  if [ "$cuda" != 1 ]; then
    note "SKIP  older benchmarks: no CUDA"
  else
    if want more; then
      step "bench_hessian" 400 "$OUT/bench_more.txt" python3 scripts/bench_hessian.py --device cuda --max-baseline-s 40
      step "bench_cusolver_eigh" 120 "$OUT/bench_more.txt" python3 scripts/bench_cusolver_eigh.py
      step "bench_label" 60 "$OUT/bench_more.txt" python3 scripts/bench_label.py --device cuda
      step "bench_refine" 75 "$OUT/bench_more.txt" python3 scripts/bench_refine.py --mode operators --device cuda
    fi
    if want estimate; then
      step "bench_estimate" 200 "$OUT/bench_more.txt" \
        python3 scripts/bench_estimate.py --device cuda --parts gpu --gpu-budget 150
    fi
  fi
else
  note "SKIP  older benchmarks (bench_hessian, bench_cusolver_eigh, bench_label, bench_refine, bench_estimate): PARTS=\"more estimate\" runs them"
fi
note "gpu_checks: exit $status after $((SECONDS - T0))s of steps (budget ${BUDGET_S}s); logs in $OUT"
exit $status
