"""Comba (Hu et al., 2025): a scalar decay and a closed-loop correction through a second key p.

S_t = e^{g_t} S_{t-1} + beta_t k_t (v_t - p_t^T e^{g_t} S_{t-1})^T,  o_t = S_t^T (scale q_t):
the general transition with a = e^{g} p, b = -beta k and the key beta k. FLA's
chunk_comba(q, k, v, p, g, beta, ..., use_qk_l2norm_in_kernel), whose switch L2-normalises q, k and p.
"""
from linattn_dsl.compiler.spec import Arg, Decay, Recurrence, Transition

spec = Recurrence(
    name="comba",
    inputs=dict(q="B T H K", k="B T H K", v="B T H V", p="B T H K", g=Arg("B T H", sign="nonpositive"),
                beta="B T H"),
    switches=dict(use_qk_l2norm_in_kernel=False),
    query="q", key="beta * k", value="v",
    decay=Decay.scalar(log="g"),
    transition=Transition.general(a="exp(g) * p", b="-beta * k"),
    qk_l2norm="use_qk_l2norm_in_kernel",
    l2norm_inputs=("q", "k", "p"),
    doc=__doc__,
)
