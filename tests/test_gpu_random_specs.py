"""Issue 5's drawn-spec test run longer, on a GPU (skipped without CUDA; run on the GPU machine).

The same spec language as tests/test_random_specs.py (every decay kind x none / delta / general
transitions, gate expressions, value gates, beta from logits, free a/b, q/k L2 norm, grouped heads, scale,
skip terms): for each of the 3 x 4 transition and decay kinds, LINATTN_GPU_SPECS_PER_KIND (2) distinct specs
drawn by hypothesis (derandomized: the same ones every run). Each test writes one as a spec file,
regenerates it into a temporary folder through the public API, imports the result and checks the compiled
Triton kernels (chunk and fused_recurrent) on CUDA against the float64 oracle, output, final state and
every gradient, fp32 at 1e-4 relative, on longer sequences and wider heads than the interpreter affords
(T up to 200: several chunks, varlen; head dims 16 to 64).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from _helpers import regen
from test_random_specs import spec_sources

from linattn_dsl.reference import verify

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PER_KIND = int(os.environ.get("LINATTN_GPU_SPECS_PER_KIND", "2"))
KINDS = [(t, d) for t in ("none", "delta", "general") for d in ("none", "constant", "scalar", "vector")]


def _draw(transition: str, decay: str, n: int) -> list[str]:
    """n distinct drawn spec sources of one transition and decay kind, the same on every run."""
    sources = []

    @settings(max_examples=8 * n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(spec_sources().filter(lambda s: f"transition=Transition.{transition}(" in s
                                 and f"decay=Decay.{decay}(" in s))
    def draw(source):
        if source not in sources:
            sources.append(source)

    draw()
    return sources[:n]


CASES = [(t, d, i) for t, d in KINDS for i in range(PER_KIND)]


@pytest.mark.parametrize("transition,decay,index", CASES)
def test_drawn_spec_on_gpu(transition, decay, index, tmp_path):
    sources = _draw(transition, decay, PER_KIND)
    assert index < len(sources), f"drew {len(sources)} distinct {transition}/{decay} specs, fewer than {PER_KIND}"
    source = sources[index]
    spec, mod = regen(tmp_path, "drawn", source)
    res = verify.verify(spec, mod, examples=4, max_T=200, device="cuda", dims=(16, 32, 64))
    print(source, verify.table(res, 1e-4), sep="\n")
    assert all(r.ok for r in res), source + "\n" + verify.table(res, 1e-4)
