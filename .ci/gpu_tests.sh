#!/usr/bin/env bash
# On the GPU machine: make the checkout importable (no build backend there), run the GPU test suites in one
# pytest spread over processes with pytest-xdist (a cold machine spends most of a GPU test compiling Triton
# kernels, one CPU core per compile; 6 workers: more at once exhaust an 80 GB card's memory with the real-shape
# cases), verbose per test; LIMIT interrupts pytest (SIGINT), which still prints its failures' summary
# (addopts' -q cancelled: a timeout still leaves every finished test's verdict in $OUT), alone on the card:
# never beside FLA's autotuning, which made every test 3-4x slower.
# Run from the repository root on the GPU machine: `bash .ci/gpu_tests.sh` (third_party/mamba, when present, for
# the mamba-ssm comparisons); results in $OUT/gpu_tests.txt.
# Knobs: SUITES (test files), WORKERS (6), LIMIT (seconds for the whole pytest, 540).
set -uo pipefail
export PYTHONPATH=$PWD:$PWD/third_party/mamba:${PYTHONPATH:-}
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
SUITES=${SUITES:-tests/test_gpu_spikes.py tests/test_gpu_compile_ahead.py tests/test_gpu_decode.py tests/test_gpu_delta.py tests/test_gpu_general.py tests/test_gpu_additive.py tests/test_gpu_random_specs.py tests/test_modules_conv.py tests/test_modules_cross_entropy.py tests/test_modules_norm.py tests/test_modules_rotary.py tests/test_modules_activations.py}
log="$OUT/gpu_tests.txt"
# shellcheck disable=SC2086
timeout -s INT "${LIMIT:-540}" python3 -m pytest -o addopts="-ra" -v --tb=short -p no:cacheprovider -n "${WORKERS:-6}" \
    -m gpu $SUITES > "$log" 2>&1
rc=$?
echo "$(grep -c " PASSED" "$log") passed, $(grep -c " FAILED" "$log") failed (pytest rc $rc; 2 = interrupted at LIMIT)"
for suite in $SUITES; do
  echo "$suite: $(grep " PASSED" "$log" | grep -c "$suite") passed, $(grep " FAILED" "$log" | grep -c "$suite") failed"
done
grep -E "^FAILED|Error|^E " "$log" | head -30
