#!/usr/bin/env bash
# DDP throughput scaling on a 2-GPU machine of `linattn train` on the ~340M GLA (configs/gla_340m.toml:
# batch 8 x 2048 tokens per process, bf16 autocast, AdamW). One card, then `torchrun --nproc_per_node 2`
# (DDP through accelerate), STEPS steps each; prints tokens/s (all processes), tokens/s per GPU, peak memory
# of rank 0 and the scaling ratio (target >= 1.8x). About 3 minutes.
#
# On a machine with 2 GPUs, from the repository root, with the ignored folders .whl, .wheels (and third_party for
# FLA=1) copied into the checkout (benchmarks/gpu_env.sh):
#
#   bash benchmarks/train_scaling.sh
#   STEPS=300 FLA=1 bash benchmarks/train_scaling.sh
#
# FLA=1: also FLA's GLAForCausalLM through the same loop on one card (its first step compiles and autotunes for
# minutes unless .wheels/triton_autotune.tar.gz from benchmarks/gpu_models.sh is there). Knobs: STEPS (200),
# TRAIN_ARGS (more --section.key=value overrides), FLA_TIMEOUT (420), BF16_REDUCE (1: a third run, DDP
# with the gradient all-reduce in bf16), DDP=1 (the torchrun run even without 2
# GPUs: CPU processes over gloo, for checks), SETUP=0 (the current environment as it is).
# $OUT gets train_scaling.txt (the table, printed last) and train_runs.tar.gz (logs and summaries of the runs).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
RUNS=${RUNS:-/tmp/linattn_scaling}   # scratch for the runs, emptied first; results go to OUT
# NVLink multicast stays off (the machine's own setting, repeated for the processes started here)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# --- setup: carried wheels, the package from the checkout, Triton's autotuning cache
# shellcheck source=benchmarks/gpu_env.sh
. benchmarks/gpu_env.sh .whl/transformers-*.whl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
NGPU=$(python3 -c "
import torch, transformers, accelerate, linattn_dsl.models
print(torch.cuda.device_count())") || { echo "setup failed (carried wheels?)"; exit 1; }
echo "GPUs: $NGPU"

STEPS=${STEPS:-200}
# shellcheck disable=SC2206
ARGS=(--config configs/gla_340m.toml "--training.steps=$STEPS" --no-progress ${TRAIN_ARGS:-})
runs=()
echo "--- one card: linattn train, $STEPS steps"
timeout 300 python3 -m linattn_dsl.cli train "${ARGS[@]}" "--job.dump_folder=$RUNS/ours_1gpu" 2>&1 |
    grep -v "Writing model shards" | tail -6
runs+=("$RUNS/ours_1gpu")
if [ "$NGPU" -ge 2 ] || [ -n "${DDP:-}" ]; then
    echo "--- two cards: torchrun --nproc_per_node 2 linattn train (DDP), $STEPS steps"
    timeout 300 python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m linattn_dsl.cli train "${ARGS[@]}" \
        "--job.dump_folder=$RUNS/ours_2gpu" 2>&1 | grep -v "Writing model shards" | tail -6
    runs+=("$RUNS/ours_2gpu")
    if [ "${BF16_REDUCE:-1}" != 0 ] && [ "$NGPU" -ge 2 ]; then   # NCCL only
        echo "--- two cards, gradients all-reduced in bf16 (--training.mixed_precision_reduce=bfloat16), $STEPS steps"
        timeout 300 python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m linattn_dsl.cli train \
            "${ARGS[@]}" --training.mixed_precision_reduce=bfloat16 "--job.dump_folder=$RUNS/ours_2gpu_bf16reduce" 2>&1 |
            grep -v "Writing model shards" | tail -6
        runs+=("$RUNS/ours_2gpu_bf16reduce")
    fi
else
    echo "only $NGPU GPU: no DDP run"
fi
if [ -n "${FLA:-}" ]; then
    echo "--- one card: FLA's GLAForCausalLM through the same loop, $STEPS steps"
    timeout "${FLA_TIMEOUT:-420}" python3 -m benchmarks.train_scaling run --impl fla --no-export "${ARGS[@]}" \
        "--job.dump_folder=$RUNS/fla_1gpu" 2>&1 | grep -v "^RESULT" | tail -4
    runs+=("$RUNS/fla_1gpu")
fi
tar -czf "$OUT/train_runs.tar.gz" -C "$RUNS" --exclude='final' --exclude='checkpoint' . 2> /dev/null
echo
echo "=== DDP scaling, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $((SECONDS - START)) s ==="
python3 -m benchmarks.train_scaling summary "${runs[@]}" | tee "$OUT/train_scaling.txt"
