"""Kimi Delta Attention (Kimi Team, 2025): the delta rule with a per-channel decay.

S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (scale q_t);
with use_gate_in_kernel, g_t = -exp(A_log) * softplus(g_raw_t + dt_bias).
"""
from linattn_dsl.compiler.spec import Arg, Decay, If, Recurrence, Transition

spec = Recurrence(
    name="kda",
    inputs=dict(q="B T HK K", k="B T HK K", v="B T H V", g=Arg("B T H K", sign="nonpositive"),
                beta="B T H"),
    optional=dict(A_log="H", dt_bias="H K"),
    switches=dict(use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False),
    query="q", key="k", value="v",
    decay=Decay.vector(log=If("use_gate_in_kernel", "-exp(A_log) * softplus(g + dt_bias)", "g")),
    transition=Transition.delta(beta="beta"),
    qk_l2norm="use_qk_l2norm_in_kernel",
    doc=__doc__,
)
