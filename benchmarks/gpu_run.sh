#!/usr/bin/env bash
# On a GPU machine with no build backend: make the checkout importable, install the wheels of the ignored
# .wheels/ folder (FLA and its dependencies) into /tmp/linattn_site, restore FLA's autotuning cache, then run
# each argument as one command line, in order, each under its own `timeout` of STEP_LIMIT seconds (default
# 300), printing elapsed seconds. From the repository root, with .wheels and third_party copied there:
#
#   bash benchmarks/gpu_run.sh 'python3 -m benchmarks.launch_sweep --ops delta_rule,kda --out out/sweep' \
#       'python3 -m benchmarks.ops --ops delta_rule,kda --out out/ops'
set -uo pipefail
cd "$(dirname "$0")/.."
S=$SECONDS
python3 -m pip install -q --no-index --no-deps --target /tmp/linattn_site .wheels/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD:$PWD/third_party/mamba:/tmp/linattn_site
export TRITON_CACHE_AUTOTUNING=1
mkdir -p ~/.triton/cache
[ -f .wheels/triton_autotune.tar.gz ] && tar -xzf .wheels/triton_autotune.tar.gz -C ~/.triton/cache
nvidia-smi --query-gpu=name --format=csv,noheader
for cmd in "$@"; do
    echo "=== [$((SECONDS - S)) s] $cmd"
    timeout "${STEP_LIMIT:-300}" bash -c "$cmd"
    echo "=== rc $? at $((SECONDS - S)) s"
done
