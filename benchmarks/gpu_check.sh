#!/usr/bin/env bash
# The one command for the GPU machine: environment, in-place build, tests (LINFLOW_POISON=1), delta rule benchmark.
#
#   bash benchmarks/gpu_check.sh            (run from anywhere; carry .fla for the fla rows)
#
# Environment switches:
#   SKIP_BUILD=1   reuse python/linflow/_C*.so        SKIP_TESTS=1   no pytest         SKIP_BENCH=1   no benchmark
#   TESTS="tests/test_delta_rule.py"   test files (default: tests/test_*.py, one pytest process each)
#   PYTEST_ARGS="-k cuda"   extra pytest arguments (default: -k cuda; PYTEST_ARGS=" " runs the CPU cases too)
#   BENCHES="delta_rule lion"   benchmarks/bench_<name>.py to run (default: delta_rule), sharing the budget left
#   BENCH_ARGS="--quick"   extra arguments of every benchmark (each takes --budget-s)
#   BUDGET_S=480   wall-clock budget of the whole script; the benchmark gets what build and tests leave
#   BUILD_TIMEOUT=330  TEST_TIMEOUT=240   per-stage limits (s)
# Logs and results land in $OUT (default benchmarks/results/gpu_check): build.log, tests.log, bench.log,
# delta_rule.json, delta_rule.png. The benchmark's tables are the last thing printed.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
export OUT=${OUT:-$ROOT/benchmarks/results/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi

BUDGET_S=${BUDGET_S:-480}
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
stage() { echo; echo "== [$(elapsed) s] $*"; }
SUMMARY=()
STATUS=0

stage "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 || echo "nvidia-smi failed"
python - <<'EOF' 2>&1
import platform, torch
try:
    import triton; tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"unavailable ({e})"
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()})  triton {tv}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
else:
    print("torch sees no CUDA device")
EOF
nvcc --version 2>&1 | tail -n 2 || echo "nvcc not found"
[ -d "$ROOT/.fla/fla" ] && echo "fla: $ROOT/.fla ($(cat "$ROOT/.fla/COMMIT" 2>/dev/null || echo 'commit unknown'))" \
  || echo "fla: no .fla/fla here (carry .fla for the fla rows)"

# The GPU machine's default CC/CXX (/opt/gcc) builds an extension whose C++ exceptions crash the process (every
# TORCH_CHECK that fires segfaults, seen there with torch 2.11); the system compiler, whose C++ runtime is the one
# loaded at run time, does not. LINFLOW_CXX overrides.
if [ -n "${LINFLOW_CXX:-}" ]; then export CXX=$LINFLOW_CXX
elif [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
echo "host compiler: ${CXX:-c++} ($(${CXX:-c++} --version 2>/dev/null | head -n 1))"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  stage "build: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} python setup.py build_ext --inplace"
  t=$(date +%s)
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    timeout -k 10 "${BUILD_TIMEOUT:-330}" python setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  rc=$?
  echo "build: rc $rc, $(( $(date +%s) - t )) s (log: $OUT/build.log)"
  SUMMARY+=("build rc $rc $(( $(date +%s) - t ))s")
  if [ $rc -ne 0 ]; then
    grep -n -m 20 -E "error|Error" "$OUT/build.log" | cut -c1-300
    echo "--- last lines of build.log"
    tail -n 30 "$OUT/build.log" | cut -c1-300
    echo "== gpu_check: build failed (rc $rc) after $(elapsed) s"
    exit 1
  fi
  grep -c -i "warning" "$OUT/build.log" | sed 's/^/build warnings: /'
fi
python -c "import linflow; from linflow import _C_loader as L; print('linflow', linflow.__version__, 'CUDA kernels:', L.HAS_CUDA_KERNELS)" 2>&1 \
  || { echo "== gpu_check: import linflow failed"; STATUS=1; }

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # One pytest process per test file: a crash in one file (seen: a segfault in an error path on this machine's
  # toolchain) must not hide the results of the others. Default: -k cuda (the CPU cases run in CI).
  stage "tests: LINFLOW_POISON=1 python -m pytest <each of ${TESTS:-tests/test_*.py}> ${PYTEST_ARGS:--k cuda}"
  t=$(date +%s)
  : >"$OUT/tests.log"
  failed_files=()
  for f in ${TESTS:-tests/test_*.py}; do
    # shellcheck disable=SC2086
    LINFLOW_POISON=1 timeout -k 10 "${TEST_TIMEOUT:-240}" \
      python -m pytest "$f" ${PYTEST_ARGS:--k cuda} -rfE -p no:cacheprovider >"$OUT/tests_file.log" 2>&1
    rc=$?
    cat "$OUT/tests_file.log" >>"$OUT/tests.log"
    line=$(grep -E '(passed|failed|error|no tests ran|deselected)' "$OUT/tests_file.log" | tail -n 1 | cut -c1-120)
    case $rc in
      0|5) echo "  $f: ${line:-ok}" ;;
      124|137) echo "  $f: stopped by TEST_TIMEOUT=${TEST_TIMEOUT:-240} s"; failed_files+=("$f"); STATUS=1 ;;
      *) echo "  $f: rc $rc ${line:-(no summary: crashed?)}"; grep -E "^FAILED|^ERROR|Fatal" "$OUT/tests_file.log" | head -5 | cut -c1-200
         failed_files+=("$f"); STATUS=1 ;;
    esac
  done
  rm -f "$OUT/tests_file.log"
  SUMMARY+=("tests $(( $(date +%s) - t ))s: ${#failed_files[@]} file(s) failed ${failed_files[*]}")
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # BENCHES: which benchmarks/bench_<name>.py to run, in order; each gets an equal share of the budget left.
  benches=(${BENCHES:-delta_rule})
  for i in "${!benches[@]}"; do
    name=${benches[$i]}
    left=$(( BUDGET_S - $(elapsed) ))
    share=$(( left / (${#benches[@]} - i) ))
    if [ $share -lt 90 ]; then
      echo "== benchmark $name skipped: only $share s of BUDGET_S=$BUDGET_S for it (raise BUDGET_S, or SKIP_TESTS=1)"
      SUMMARY+=("bench $name skipped (budget)")
      continue
    fi
    # shellcheck disable=SC2086
    stage "benchmark: python benchmarks/bench_$name.py --budget-s $(( share - 60 )) ${BENCH_ARGS:-}"
    t=$(date +%s)
    timeout -k 20 -s TERM $(( share - 5 )) \
      python "benchmarks/bench_$name.py" --budget-s $(( share - 60 )) ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_$name.log"
    rc=$?
    [ $rc -ne 0 ] && STATUS=1
    SUMMARY+=("bench $name rc $rc $(( $(date +%s) - t ))s")
  done
fi

echo
echo "== gpu_check done in $(elapsed) s: $(IFS=';'; echo "${SUMMARY[*]}") — files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $STATUS
