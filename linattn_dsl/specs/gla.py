"""Gated Linear Attention (Yang et al., ICML 2024).

S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,  o_t = S_t^T (scale q_t),  g a per-channel log-decay <= 0.
"""
from linattn_dsl.compiler.spec import Arg, Decay, Recurrence

spec = Recurrence(
    name="gla",
    inputs=dict(q="B T H K", k="B T H K", v="B T H V", g=Arg("B T H K", sign="nonpositive")),
    query="q", key="k", value="v",
    decay=Decay.vector(log="g"),
    doc=__doc__,
)
