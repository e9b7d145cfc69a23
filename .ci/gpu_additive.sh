#!/usr/bin/env bash
# On the GPU machine: install carried wheels and the package, run the GPU tests and the op benchmarks.
set -uo pipefail
python3 -m pip install -q --no-deps .wheels/*.whl 2>&1 | tail -2
# no build backend download on the GPU machine: make the package importable from the checkout instead
export PYTHONPATH=$PWD:$PWD/third_party/mamba:${PYTHONPATH:-}
OUT=${OUT:-out}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -v --tb=short ${TESTS:-tests/test_gpu_additive.py} -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1; grep -E "Error|error|passed|failed|assert" $OUT/gpu_tests.txt | head -40
timeout ${BENCH_TIMEOUT:-330} python3 -m benchmarks.ops --out $OUT ${BENCH_ARGS:-} 2>&1 | tail -30 | tee $OUT/bench.txt
