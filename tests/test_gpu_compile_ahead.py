"""The compile-ahead walk on a GPU (skipped without CUDA; run on the GPU machine): a first fwd+bwd at a real-ish
shape in a fresh process with an empty Triton cache, walk on (the default) and off (LINATTN_PARALLEL_COMPILE=0).
With the walk, every walk finished (no walk fell back to compiling at launch), and outputs, final state and every
gradient are bit-identical to the run without it. The first-call times of both runs go to
``$OUT/compile_ahead.json`` (a benchmark, not a test condition)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import hashlib, json, sys, time
import torch
from linattn_dsl import ops
from linattn_dsl.compiler import registry
from linattn_dsl.reference import drawing
from linattn_dsl.runtime import host

name = sys.argv[1]
case = drawing.draw_case(registry.load(name), B=2, T=300, heads=4, K=64, V=64, seed=0)
leaves = {k: (v.to("cuda", torch.bfloat16 if v.dim() >= 3 else torch.float32).requires_grad_(v.is_floating_point())
              if v is not None else None) for k, v in case.tensors.items()}
h0 = case.initial_state.cuda().requires_grad_() if case.initial_state is not None else None
torch.cuda.synchronize()
start = time.perf_counter()
o, ht = case.call(getattr(ops, f"chunk_{name}"), tensors=leaves, initial_state=h0)
((o.float() ** 2).sum() + (ht ** 2).sum()).backward()
torch.cuda.synchronize()
first = time.perf_counter() - start
digest = hashlib.sha256()
for t in [o, ht, h0.grad if h0 is not None else None] + [x.grad for x in leaves.values() if x is not None]:
    if t is not None:
        digest.update(t.detach().float().cpu().numpy().tobytes())
print(json.dumps(dict(first=first, walks=len(host._WARMED), failed=[e for _, e in host.AHEAD_FAILED],
                      digest=digest.hexdigest())))
'''


@pytest.mark.parametrize("name", ["gla", "delta_rule", "rwkv7"])
def test_compile_ahead_first_call(name, tmp_path):
    runs = {}
    for on in ("1", "0"):
        cache = tmp_path / f"triton_{on}"
        env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(cache), LINATTN_PARALLEL_COMPILE=on)
        r = subprocess.run([sys.executable, "-c", SCRIPT, name], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[on] = json.loads(r.stdout.strip().splitlines()[-1])
    assert runs["1"]["walks"] >= 1 and runs["1"]["failed"] == [], runs["1"]
    assert runs["0"]["walks"] == 0
    assert runs["1"]["digest"] == runs["0"]["digest"]
    out = Path(os.environ.get("OUT", tmp_path)) / "compile_ahead.json"
    rows = json.loads(out.read_text()) if out.exists() else []
    rows.append(dict(op=name, first_s_parallel=runs["1"]["first"], first_s_serial=runs["0"]["first"],
                     card=torch.cuda.get_device_name()))
    out.write_text(json.dumps(rows, indent=1))
