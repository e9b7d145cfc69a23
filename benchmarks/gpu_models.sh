#!/usr/bin/env bash
# Issues 6 and 8 on one GPU (H100 or H200), in one call with a deadline:
#   * benchmarks/models.py: ~340M models of each family, ours against FLA 0.6.0's models (training
#     tokens/s and peak memory, greedy decode ms/token), and ours' agreement with the fp32 PyTorch backend;
#   * the ~340M GLA (configs/gla_340m.toml) through linattn train's loop on this card, ours and FLA's
#     GLAForCausalLM (benchmarks/train_scaling.py), LOOP_STEPS steps each.
# FLA compiles and autotunes for minutes: its warm-ups start first, in parallel, while ours run.
#
#   run(command="bash benchmarks/gpu_models.sh", carry=[".whl", ".wheels", "third_party"], timeout_s=600)
#
# Carried wheels (ignored folders): .whl = transformers 5.24 (+ regex, for its version check); .wheels =
# flash-linear-attention, fla-core 0.6.0, einops. Installed into /tmp/linattn_site, ahead of the image's
# transformers 5.17 (the image's tokenizers 0.23, huggingface_hub 1.33, safetensors 0.8, accelerate 1.15 fit).
# $OUT gets: summary.txt (the tables, printed last), models.json, logs.tar.gz (every job's log and the loop
# runs' logs/summaries), triton_autotune.tar.gz (FLA's autotuning results: put it at
# .wheels/triton_autotune.tar.gz, carry .wheels, and the next call compiles FLA's chosen configs only).
# Environment knobs: BUDGET (seconds for everything, 560), FAMILIES (gla,retnet,mamba2), LOOP_STEPS (60),
# MODELS_ARGS (more benchmarks.models options, e.g. "--optimizer adamw", "--layers 12",
# "--no-agreement"), LOOP_ARGS (--section.key=value overrides of the loop runs), NO_LOOP=1 (no loop runs),
# SETUP=0 (no wheels/symlinks: the current environment as it is, for checks on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${BUDGET:-560}
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
RUNS=${RUNS:-/tmp/linattn_bench}
rm -rf "$RUNS"
mkdir -p "$RUNS"
export PYTHONUNBUFFERED=1

# --- setup: carried wheels, the package from the checkout (no build backend there: symlinks + PYTHONPATH)
if [ "${SETUP:-1}" != 0 ]; then  # SETUP=0: use the current environment as it is (CPU checks)
    SITE=/tmp/linattn_site
    ls .whl/transformers-*.whl .wheels/flash_linear_attention-*.whl third_party/mamba/mamba_ssm > /dev/null ||
        echo "carry .whl, .wheels and third_party"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl .wheels/*.whl 2>&1 | grep -vi "warning\|notice" | tail -3
    # third_party/mamba: mamba-ssm 2.3.2.post1's sources (its top-level __init__ emptied, GPU.md): FLA's Mamba2
    # runs mamba-ssm's Triton SSD through it, and falls back to a naive PyTorch path without it
    export PYTHONPATH=$PWD:$PWD/third_party/mamba:$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
export TRITON_CACHE_AUTOTUNING=1  # every autotuner (FLA, mamba-ssm) keeps its results on disk
mkdir -p "$TRITON_CACHE_DIR"
if [ -f .wheels/triton_autotune.tar.gz ]; then
    tar -xzf .wheels/triton_autotune.tar.gz -C "$TRITON_CACHE_DIR" &&
        echo "restored $(tar -tzf .wheels/triton_autotune.tar.gz | grep -c autotune.json) autotuning results"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "
import importlib.util, torch, triton, transformers, accelerate, linattn_dsl.models
print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__,
      '| accelerate', accelerate.__version__, '| fla', importlib.util.find_spec('fla') is not None,
      '| GPUs', torch.cuda.device_count())" || { echo "setup failed (carried wheels?)"; exit 1; }

# --- everything else: benchmarks.models schedules it against the deadline (25 s kept for packing up)
LEFT=$((BUDGET - (SECONDS - START) - 25))
LOOP=(--loop-config configs/gla_340m.toml --loop-steps "${LOOP_STEPS:-60}" --loop-args "${LOOP_ARGS:-}")
[ -n "${NO_LOOP:-}" ] && LOOP=()
# shellcheck disable=SC2086
timeout $((LEFT + 20)) python3 -m benchmarks.models --families "${FAMILIES:-gla,retnet,mamba2}" \
    --out "$RUNS/models" --budget "$LEFT" "${LOOP[@]}" ${MODELS_ARGS:-} 2>&1 | tee "$RUNS/models.out"

# --- pack up (at most 8 files come back from $OUT)
cp "$RUNS/models/results.json" "$OUT/models.json" 2> /dev/null
cp "$RUNS/models/table.txt" "$OUT/summary.txt" 2> /dev/null || echo "no table (see logs)" > "$OUT/summary.txt"
tar -czf "$OUT/logs.tar.gz" -C "$RUNS" --exclude='final' --exclude='*.safetensors' --exclude='checkpoint' \
    models.out models 2> /dev/null
(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar -czf "$OUT/triton_autotune.tar.gz" -T -)
echo
echo "=== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $((SECONDS - START)) s) ==="
cat "$OUT/summary.txt"
