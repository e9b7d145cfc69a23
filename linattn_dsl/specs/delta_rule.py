"""DeltaNet (Yang et al., NeurIPS 2024): the delta rule, no decay.

S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (scale q_t).
"""
from linattn_dsl.compiler.spec import Recurrence, Transition

spec = Recurrence(
    name="delta_rule",
    inputs=dict(q="B T HK K", k="B T HK K", v="B T H V", beta="B T H"),
    switches=dict(use_qk_l2norm_in_kernel=False),
    query="q", key="k", value="v",
    transition=Transition.delta(beta="beta"),
    qk_l2norm="use_qk_l2norm_in_kernel",
    doc=__doc__,
)
