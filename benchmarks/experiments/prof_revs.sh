#!/usr/bin/env bash
# Per-kernel profiles of several git revisions on one GPU machine: the A/B of a kernel change, each revision's
# stage kernels timed by `benchmarks.profile_op --brief` on the same card, one after another.
#
# In a git checkout, pack each revision as an importable tree into the ignored .wheels/ folder:
#     bash benchmarks/experiments/prof_revs.sh pack main exp/my-change
# On the GPU machine (a copy of the checkout with .wheels/; benchmarks/gpu_run.sh sets PYTHONPATH and the FLA
# wheels up):
#     bash benchmarks/gpu_run.sh 'bash benchmarks/experiments/prof_revs.sh run rwkv7,kda main exp/my-change . main'
# `run OPS REV...` profiles each op (comma-separated) at T (env, default 16384) for each revision in order;
# "." is the working tree. Listing the baseline first and last shows the card's drift.
# LINATTN_LAUNCH passes through (launch overrides of a sweep).
set -uo pipefail
cd "$(dirname "$0")/../.."
tree_of() { [ "$1" = "." ] && echo "$PWD" || echo "/tmp/rev_${1//\//_}"; }
case "${1:-}" in
  pack)
    shift
    mkdir -p .wheels
    for rev in "$@"; do
      git archive -o ".wheels/rev_${rev//\//_}.tar" "$rev" && echo "packed $rev ($(git rev-parse --short "$rev"))"
    done ;;
  run)
    ops=$2; shift 2
    for rev in "$@"; do
      root=$(tree_of "$rev")
      if [ "$rev" != "." ] && [ ! -d "$root" ]; then
        mkdir -p "$root" && tar -xf ".wheels/rev_${rev//\//_}.tar" -C "$root"
      fi
      if [ -d "$root/specs" ]; then   # a revision from before specs/, generated/ moved into the package
        for d in specs generated codegen_templates; do ln -sfn "../$d" "$root/linattn_dsl/$d"; done
      fi
      for op in ${ops//,/ }; do
        echo -n "$rev: "
        (cd "$root" && PYTHONPATH="$root:${PYTHONPATH:-}" python3 -m benchmarks.profile_op "$op" --T "${T:-16384}" \
          --brief 2>&1 | grep -v Warn | tail -1)
      done
    done ;;
  *)
    echo "usage: $0 pack REV... | $0 run OPS REV..." >&2
    exit 2 ;;
esac
