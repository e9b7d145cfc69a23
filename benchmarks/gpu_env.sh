# Sourced (from the repository root) by gpu_models.sh and train_scaling.sh: the environment of a GPU machine
# that has no build backend. Unless SETUP=0 (the current environment as it is, for checks on a CPU machine),
# the wheels in the ignored folders .whl (transformers 5.24, regex) and .wheels (flash-linear-attention,
# fla-core 0.6.0, einops) go into /tmp/linattn_site, and the checkout, third_party/mamba and that folder lead
# PYTHONPATH. Arguments: paths that must exist (a line says so when one is missing). Then Triton's cache keeps
# every autotuner's results on disk, and FLA's earlier results are restored from .wheels/triton_autotune.tar.gz.
# Also: OUT (default ./out) is created and RUNS (the caller's scratch folder) emptied.
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
rm -rf "$RUNS"
mkdir -p "$RUNS"
export PYTHONUNBUFFERED=1
if [ "${SETUP:-1}" != 0 ]; then
    SITE=/tmp/linattn_site
    ls "$@" > /dev/null || echo "missing from the checkout (ignored folders to copy there): $*"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl .wheels/*.whl 2>&1 | grep -vi "warning\|notice" | tail -3
    # third_party/mamba: mamba-ssm 2.3.2.post1's sources (its top-level __init__ emptied): FLA's Mamba2 runs
    # mamba-ssm's Triton SSD through it, and falls back to a naive PyTorch path without it
    export PYTHONPATH=$PWD:$PWD/third_party/mamba:$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
export TRITON_CACHE_AUTOTUNING=1  # every autotuner (FLA, mamba-ssm) keeps its results on disk
mkdir -p "$TRITON_CACHE_DIR"
if [ -f .wheels/triton_autotune.tar.gz ]; then
    tar -xzf .wheels/triton_autotune.tar.gz -C "$TRITON_CACHE_DIR" &&
        echo "restored $(tar -tzf .wheels/triton_autotune.tar.gz | grep -c autotune.json) autotuning results"
fi
