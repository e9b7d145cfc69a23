"""Gated DeltaNet (Yang, Kautz, Hatamizadeh, ICLR 2025): the delta rule with a scalar decay.

S_t = (I - beta_t k_t k_t^T) exp(g_t) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (scale q_t).
"""
from linattn_dsl.compiler.spec import Arg, Decay, Recurrence, Transition

spec = Recurrence(
    name="gated_delta_rule",
    inputs=dict(q="B T HK K", k="B T HK K", v="B T H V", g=Arg("B T H", sign="nonpositive"),
                beta="B T H"),
    switches=dict(use_qk_l2norm_in_kernel=False),
    query="q", key="k", value="v",
    decay=Decay.scalar(log="g"),
    transition=Transition.delta(beta="beta"),
    qk_l2norm="use_qk_l2norm_in_kernel",
    doc=__doc__,
)
