#!/usr/bin/env bash
# Models on one GPU (H100 or H200), everything under one deadline (BUDGET):
#   * benchmarks/models.py: ~340M models of each family, ours against FLA 0.6.0's models (training
#     tokens/s and peak memory, greedy decode ms/token), and ours' agreement with the fp32 PyTorch backend;
#   * the ~340M GLA (configs/gla_340m.toml) through linattn train's loop on this card, ours and FLA's
#     GLAForCausalLM (benchmarks/train_scaling.py), LOOP_STEPS steps each.
# FLA compiles and autotunes for minutes: its warm-ups start first, in parallel, while ours run.
#
# On the GPU machine, from the repository root, with the ignored folders .whl, .wheels and third_party copied
# into the checkout (benchmarks/gpu_env.sh says what each holds), within a 10-minute limit:
#
#   bash benchmarks/gpu_models.sh
#   FAMILIES=delta_net,kda NO_LOOP=1 MODELS_ARGS=--no-agreement bash benchmarks/gpu_models.sh
#
# The wheels go into /tmp/linattn_site, ahead of the image's transformers 5.17 (the image's tokenizers 0.23,
# huggingface_hub 1.33, safetensors 0.8, accelerate 1.15 fit).
# $OUT gets: summary.txt (the tables, printed last), models.json, logs.tar.gz (every job's log and the loop
# runs' logs/summaries), triton_autotune.tar.gz (FLA's autotuning results: put it at
# .wheels/triton_autotune.tar.gz and the next run compiles FLA's chosen configs only).
# Environment knobs: BUDGET (seconds for everything, 560), FAMILIES (gla,retnet,mamba2), LOOP_STEPS (60),
# MODELS_ARGS (more benchmarks.models options, e.g. "--optimizer adamw", "--layers 12",
# "--no-agreement"), LOOP_ARGS (--section.key=value overrides of the loop runs), NO_LOOP=1 (no loop runs),
# SETUP=0 (no wheels/symlinks: the current environment as it is, for checks on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${BUDGET:-560}
RUNS=${RUNS:-/tmp/linattn_bench}   # scratch for the runs, emptied first; results go to OUT

# --- setup: carried wheels, the package from the checkout, Triton's autotuning cache
# shellcheck source=benchmarks/gpu_env.sh
. benchmarks/gpu_env.sh .whl/transformers-*.whl .wheels/flash_linear_attention-*.whl third_party/mamba/mamba_ssm
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

# --- pack up: a few files into OUT
cp "$RUNS/models/results.json" "$OUT/models.json" 2> /dev/null
cp "$RUNS/models/table.txt" "$OUT/summary.txt" 2> /dev/null || echo "no table (see logs)" > "$OUT/summary.txt"
tar -czf "$OUT/logs.tar.gz" -C "$RUNS" --exclude='final' --exclude='*.safetensors' --exclude='checkpoint' \
    models.out models 2> /dev/null
(cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar -czf "$OUT/triton_autotune.tar.gz" -T -)
echo
echo "=== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $((SECONDS - START)) s) ==="
cat "$OUT/summary.txt"
