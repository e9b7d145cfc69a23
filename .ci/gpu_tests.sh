#!/usr/bin/env bash
# On the GPU machine: make the checkout importable (no build backend there), run the GPU test suites
# one by one with per-test lines (-v: a timeout still leaves every finished test's verdict in $OUT),
# alone on the card: never beside FLA's autotuning, which made every test 3-4x slower.
#   run(command="bash .ci/gpu_tests.sh", carry=[".wheels", "third_party"])
set -uo pipefail
for d in specs generated codegen_templates; do ln -sfn ../$d linattn_dsl/$d; done
export PYTHONPATH=$PWD:$PWD/third_party/mamba:${PYTHONPATH:-}
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
for suite in ${SUITES:-tests/test_gpu_delta.py tests/test_gpu_general.py tests/test_gpu_additive.py}; do
  log="$OUT/$(basename "$suite" .py).txt"
  timeout ${SUITE_TIMEOUT:-170} python3 -m pytest -v --tb=short -p no:cacheprovider "$suite" > "$log" 2>&1
  rc=$?
  echo "$suite: $(grep -c PASSED "$log") passed, $(grep -c FAILED "$log") failed (pytest rc $rc; 124 = timeout)"
done
grep -h -E "FAILED|Error" "$OUT"/test_gpu_*.txt | head -20
