"""RetNet's multi-scale retention (Sun et al., 2023).

S_t = gamma_h S_{t-1} + k_t v_t^T,  o_t = S_t^T (q_t / sqrt(K)),  gamma_h = 1 - 2^(-5 - h).
"""
from linattn_dsl.compiler.spec import Decay, Recurrence

spec = Recurrence(
    name="retention",
    inputs=dict(q="B T H K", k="B T H K", v="B T H V"),
    query="q", key="k", value="v",
    decay=Decay.constant(log="log(1 - 2**(-5 - h))"),   # h: the head index
    doc=__doc__,
)
