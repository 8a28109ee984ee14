#!/usr/bin/env bash
# One prepared GPU check (H100/H200), about 8 minutes. From the repository root, after
# `pip install -e .[test]` (and building the CUDA extension if the cuda backend is wanted):
#
#     bash benchmarks/gpu_check.sh
#
# 1. the op tests on CUDA tensors, real kernels (no Triton interpreter), failing if a
#    required backend cannot run;
# 2. the op benchmarks (every backend, eager and torch.compile reference, copy baseline)
#    and the head-level class_logits benchmark (fused head against the unfused model, its
#    torch.compile, peak memory), saved as JSON;
# 3. a Markdown table: op, shape, dtype, backend, ms, GB/s, TFLOP/s, ratio to eager and
#    to torch.compile.
#
# Environment (defaults in brackets):
#   PYTHON              interpreter [python3]
#   GPU_CHECK_DEVICE    device for tests and benchmarks [cuda]; "cpu" dry-runs the flow
#   GPU_CHECK_BACKENDS  backends that must run [reference,triton,cuda]
#   GPU_CHECK_OUT       output folder [gpu_check_out]
#   GPU_CHECK_MODEL     1: also benchmark ViT-B/16 end to end and run `mpfast report`
#                       on it (bfloat16, 8 and 16 frames; +2-3 min) [0]
#   GPU_CHECK_WORKERS   parallel test processes when pytest-xdist is installed [8]
#   GPU_CHECK_TEST_TIMEOUT / GPU_CHECK_BENCH_TIMEOUT  seconds per stage [240 / 360]
set -u -o pipefail

PY="${PYTHON:-python3}"  # the GPU images have python3 (their venv), not always python
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
BACKENDS="${GPU_CHECK_BACKENDS:-reference,triton,cuda}"
OUT="${GPU_CHECK_OUT:-gpu_check_out}"
TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-240}"
BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-360}"
mkdir -p "$OUT"
status=0
start=$(date +%s)

echo "== mpfast gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), device $DEVICE, required backends $BACKENDS"
if [ "$DEVICE" = "cuda" ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || status=1
    unset TRITON_INTERPRET  # real kernels only
fi
# A first, short step: a machine that cannot even import mpfast (a stalled file system was
# seen once) fails here in two minutes instead of at every stage's timeout.
if ! timeout 120 "$PY" -m mpfast.info | tee "$OUT/info.txt"; then
    echo "gpu_check: python -m mpfast.info failed or hung (120 s); stopping"
    exit 1
fi

if [[ ",$BACKENDS," == *",cuda,"* ]]; then
    echo "== 0/3 building the CUDA extension (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0})"
    timeout 300 "$PY" -m mpfast build --kind cuda 2>&1 | tail -n 5 || status=1
    echo "build: done ($(( $(date +%s) - start ))s so far)"
fi

# Every op test compiles its own Triton variants (about 0.3 s each): on a GPU machine run them in
# parallel processes when pytest-xdist is there (it is on the H200 image), or the stage takes minutes.
PARALLEL=""
if [ "$DEVICE" = "cuda" ] && "$PY" -c "import xdist" 2>/dev/null; then
    PARALLEL="-n ${GPU_CHECK_WORKERS:-8}"
fi
echo "== 1/3 op tests on $DEVICE (required: $BACKENDS; ${PARALLEL:-one process})"
TRITON_TESTS=""
[ "$DEVICE" = "cuda" ] && TRITON_TESTS="tests/test_triton.py"
# shellcheck disable=SC2086
MPFAST_TEST_DEVICE="$DEVICE" MPFAST_REQUIRE_BACKENDS="$BACKENDS" timeout "$TEST_TIMEOUT" \
    "$PY" -m pytest tests/test_temporal_diff.py tests/test_motion_mix.py tests/test_prompt_attention.py \
    tests/test_class_logits.py $TRITON_TESTS \
    $PARALLEL -v -p no:randomly -p no:cacheprovider -p no:benchmark -rfE --junitxml="$OUT/op_tests.xml" 2>&1 \
    > "$OUT/op_tests.log"
rc=$?
# One line per test went to op_tests.log as it finished, so a stage cut by its time limit (the
# junit file and pytest's summary are written only at the end) still names every failure.
grep -E "(FAILED|ERROR)( |$)" "$OUT/op_tests.log" | grep -v "^FAILED\|^ERROR" | sed 's/^\[gw[0-9]*\] *//' | head -n 40
tail -n 15 "$OUT/op_tests.log"
echo "op tests: $(grep -cE ' PASSED' "$OUT/op_tests.log") passed, $(grep -cE ' FAILED' "$OUT/op_tests.log") failed," \
    "$(grep -cE ' SKIPPED' "$OUT/op_tests.log") skipped, $(grep -cE ' ERROR' "$OUT/op_tests.log") errors (log: $OUT/op_tests.log)"
[ $rc -eq 124 ] && echo "op tests: TIMED OUT after ${TEST_TIMEOUT}s"
[ $rc -ne 0 ] && status=1
echo "op tests: exit $rc ($(( $(date +%s) - start ))s so far)"

echo "== 2/3 op benchmarks on $DEVICE"
BENCHES="benchmarks/test_temporal_diff.py benchmarks/test_motion_mix.py benchmarks/test_prompt_attention.py"
BENCHES="$BENCHES benchmarks/test_class_logits.py"  # the head, fused against unfused (about a minute on a GPU)
[ "${GPU_CHECK_MODEL:-0}" = "1" ] && BENCHES="$BENCHES benchmarks/test_model.py"
# shellcheck disable=SC2086
MPFAST_BENCH_DEVICE="$DEVICE" timeout "$BENCH_TIMEOUT" "$PY" -m pytest $BENCHES -q -p no:randomly -p no:cacheprovider \
    --benchmark-disable-gc --benchmark-json="$OUT/benchmarks.json" --benchmark-columns=median,rounds 2>&1 \
    | grep -E "passed|failed|error|Error|SKIPPED|TIMED" | tail -n 20
rc=$?
[ $rc -ne 0 ] && [ ! -s "$OUT/benchmarks.json" ] && { echo "benchmarks: no results (timed out or failed)"; status=1; }
echo "benchmarks: done ($(( $(date +%s) - start ))s so far)"

echo "== 3/3 results"
if [ -s "$OUT/benchmarks.json" ]; then
    "$PY" benchmarks/compare.py "$OUT/benchmarks.json" --output "$OUT/benchmarks.md" && cat "$OUT/benchmarks.md"
else
    status=1
fi
if [ "${GPU_CHECK_MODEL:-0}" = "1" ]; then
    echo "== report: ViT-B-16, bfloat16, 8 and 16 frames on $DEVICE"
    timeout 240 "$PY" -m mpfast report --device "$DEVICE" --dtype bfloat16 --frames 8 16 --no-sweep --no-progress \
        --out "$OUT/report" 2>&1 | tail -n 40 || status=1
fi
echo "== gpu_check finished in $(( $(date +%s) - start ))s, status $status; files in $OUT/"
exit $status
