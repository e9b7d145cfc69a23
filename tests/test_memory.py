"""What a training forward keeps for the backward (benchmarks/memory.py's account), held to budgets, and the
chunk ops' two ways of getting their intermediates to the backward (kept, or recomputed: runtime.host.KEEP_STATES)
giving the same gradients.

Both run the Triton kernels and their hosts under TRITON_INTERPRET=1 in a subprocess (what runs on the GPU; the
flag must not leak into this process). The account: tiny models (hidden 64, T = 64, 2 layers, bf16 weights), the
bytes per token of the last layer; the budgets are the account's totals (gla 1824, retnet 2304, delta_net 2316,
rwkv7 4304) with less than 128 bytes of margin, so a layer, module or op that starts keeping one more
[tokens, hidden]-sized tensor (128 bytes a token here) fails. The
gradients: fp32 (bf16 tl.dot is wrong under the interpreter), one training step of each tiny model with the
default (recompute) and with keep_states(), compared exactly.
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
}
# bytes per token of a layer (the last of 2), bf16, T = 64
BUDGET = {"gla": 1900, "retnet": 2400, "delta_net": 2400, "rwkv7": 4400}

SCRIPT = r"""
import json, sys
import torch
from benchmarks import memory
from linattn_dsl.models import FAMILIES
from linattn_dsl.runtime import host

tiny = json.loads(sys.argv[1])
torch.set_num_threads(1)
out = {"bytes": {}, "grads_equal": {}}
for family, config in tiny.items():
    saved = memory.run(family, 64, layers=2, vocab=64, config=config)
    out["bytes"][family] = sum(s.nbytes for s in saved if s.layer == 1) / 64
    if family == "retnet":   # the additive form, as gla's
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
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(TINY)], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("family", list(TINY))
def test_saved_bytes_within_budget(account, family):
    got = account["bytes"][family]
    assert got <= BUDGET[family], f"{family}: {got:.0f} bytes saved per token and layer, budget {BUDGET[family]}"


@pytest.mark.parametrize("family", ["gla", "delta_net", "rwkv7"])   # the additive, delta and general forms
def test_recomputed_intermediates_give_the_same_gradients(account, family):
    assert account["grads_equal"][family]
