"""What a training forward keeps for the backward (benchmarks/memory.py's account), held to budgets, and the
chunk ops' two ways of getting their intermediates to the backward (kept, or recomputed: runtime.host.KEEP_STATES)
giving the same gradients.

Both run the Triton kernels and their hosts under TRITON_INTERPRET=1 in a subprocess (what runs on the GPU; the
flag must not leak into this process). The account: tiny models (hidden 64, T = 64, 2 layers, bf16 weights), the
bytes per token of the last layer; the budgets are the account's totals (gla 1824, retnet 2304, delta_net 2076,
rwkv7 4192, kda 1756, mamba2 2545) with less than 128 bytes of margin, so a layer, module or op that starts keeping
one more [tokens, hidden]-sized tensor (128 bytes a token here) fails. The
gradients: fp32 (bf16 tl.dot is wrong under the interpreter), one training step of each tiny model with the
default (recompute) and with keep_states(), compared exactly (gla, delta_net, rwkv7: one of each form).
The families run in two subprocesses at once (one thread each), so the file takes about 25 s on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "gla": dict(hidden_size=64, num_heads=2, intermediate_size=128),
    "retnet": dict(hidden_size=64, num_heads=2, intermediate_size=128),
    "delta_net": dict(hidden_size=64, num_heads=2, intermediate_size=128),
    "rwkv7": dict(hidden_size=64, head_dim=16, decay_low_rank_dim=8, gate_low_rank_dim=8, a_low_rank_dim=8,
                  v_low_rank_dim=4, intermediate_size=128),
    "kda": dict(hidden_size=64, num_heads=2, head_dim=16, intermediate_size=128),
    "mamba2": dict(hidden_size=64, head_dim=16, state_size=16, expand=2, n_groups=1, intermediate_size=128),
}
# bytes per token of a layer (the last of 2), bf16, T = 64
BUDGET = {"gla": 1900, "retnet": 2400, "delta_net": 2150, "rwkv7": 4300, "kda": 1800, "mamba2": 2600}
GRADS = ("gla", "delta_net", "rwkv7")   # the additive, delta and general forms
# the two subprocesses' shares (about equal time)
GROUPS = (("delta_net", "kda", "retnet"), ("rwkv7", "gla", "mamba2"))

SCRIPT = r"""
import json, sys
import torch
from benchmarks import memory
from linattn_dsl.models import FAMILIES
from linattn_dsl.runtime import host

tiny, with_grads = json.loads(sys.argv[1]), json.loads(sys.argv[2])
torch.set_num_threads(1)
out = {"bytes": {}, "grads_equal": {}}
for family, config in tiny.items():
    saved = memory.run(family, 64, layers=2, vocab=64, config=config)
    out["bytes"][family] = sum(s.nbytes for s in saved if s.layer == 1) / 64
    if family not in with_grads:
        continue
    grads = []
    for keep in (False, True):
        model = memory.build(family, 2, 64, torch.float32, config)
        ids = torch.randint(0, 64, (1, 80), generator=torch.Generator().manual_seed(1))
        with host.keep_states(keep):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    out["grads_equal"][family] = sorted(grads[0]) == sorted(grads[1]) and all(
        torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def account():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps({f: TINY[f] for f in group}),
                               json.dumps([f for f in group if f in GRADS])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for group in GROUPS]
    out = {"bytes": {}, "grads_equal": {}}
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
        line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
        result = json.loads(line[len("RESULT "):])
        for key in out:
            out[key].update(result[key])
    return out


@pytest.mark.parametrize("family", list(TINY))
def test_saved_bytes_within_budget(account, family):
    got = account["bytes"][family]
    assert got <= BUDGET[family], f"{family}: {got:.0f} bytes saved per token and layer, budget {BUDGET[family]}"


@pytest.mark.parametrize("family", GRADS)
def test_recomputed_intermediates_give_the_same_gradients(account, family):
    assert account["grads_equal"][family]
