"""Gated DeltaProduct (Siems et al., 2025): several delta-rule steps per token, one decay.

S_t = (prod_{j<n} (I - beta_{t,j} k_{t,j} k_{t,j}^T)) exp(g_t) S_{t-1} + (the n writes beta_{t,j} k_{t,j} v_{t,j}^T,
each after its own step), o_t = S_t^T (scale q_t): FLA's chunk_gated_delta_product(q, k, v, g, beta,
num_householder, ...), with k, v, beta carrying num_householder rows per token ([B, T * n, ...]) and q, g one.
"""
from linattn_dsl.compiler.spec import Arg, Decay, Recurrence, Substeps, Transition

spec = Recurrence(
    name="gated_delta_product",
    inputs=dict(q="B T H K", k="B T H K", v="B T H V", g=Arg("B T H", sign="nonpositive"), beta="B T H"),
    switches=dict(use_qk_l2norm_in_kernel=False),
    query="q", key="k", value="v",
    decay=Decay.scalar(log="g"),
    transition=Transition.delta(beta="beta"),
    qk_l2norm="use_qk_l2norm_in_kernel",
    substeps=Substeps(inputs=("k", "v", "beta"), count="num_householder"),
    doc=__doc__,
)
