#!/usr/bin/env bash
# On a GPU machine with no build backend: make the checkout importable, install the wheels of the ignored
# .wheels/ folder (FLA and its dependencies) into /tmp/linattn_site, restore this card's autotuning results
# (.wheels/triton_autotune_<card>.tar.gz), then run each argument as one command line, in order, each under its
# own `timeout` of STEP_LIMIT seconds (default 300), printing elapsed seconds; after every step, the autotuning
# results so far go to $OUT/triton_autotune_<card>.tar.gz (put it in .wheels: the next call's FLA skips its
# tuning). From the repository root, with .wheels and third_party copied there:
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
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "$CARD"
TUNED=triton_autotune_$(echo "$CARD" | tr -c 'A-Za-z0-9\n' '_').tar.gz   # autotuning results are per card
[ -f ".wheels/$TUNED" ] && tar -xzf ".wheels/$TUNED" -C ~/.triton/cache
for cmd in "$@"; do
    echo "=== [$((SECONDS - S)) s] $cmd"
    timeout "${STEP_LIMIT:-300}" bash -c "$cmd"
    echo "=== rc $? at $((SECONDS - S)) s"
    if [ -n "${OUT:-}" ]; then   # every autotuner's results so far, for the next call on this card
        (cd ~/.triton/cache && find . -name '*.autotune.json' | tar -czf "$OUT/$TUNED" -T -)
    fi
done
