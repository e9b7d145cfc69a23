"""Every kernel launch of the widest shipped shapes fits an H100/H200's shared memory (227 KiB a block).

Compiled for sm_90 on the CPU with the installed Triton's ptxas (benchmarks/sm90_fit.py), specialised as a
real launch is: the check that would have caught KDA's state kernels at head dim 256 in bf16 (328 KiB at
pipelining depth 3), which only failed on the GPU. Head dim 256 (the largest the ops accept) in bf16 and
fp32, for one spec of each form and decay kind that has its own kernels.
"""

from __future__ import annotations

import pytest

from benchmarks.sm90_fit import LIMIT, fit


@pytest.mark.parametrize("spec", ["gla", "kda", "rwkv7"])
def test_launches_fit_sm90_shared_memory(spec):
    rows = fit([spec], [256], ["bfloat16", "float32"])
    kernels = {launch["kernel"] for launch, _ in rows}
    assert len(kernels) >= 5, kernels  # the forward and backward stages were all recorded
    over = [(launch["kernel"], launch["dtype"], launch["opts"], need) for launch, need in rows if need > LIMIT]
    assert not over, over
