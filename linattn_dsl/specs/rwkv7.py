"""RWKV-7 "Goose" time mixing (Peng et al., 2025): a diagonal-plus-low-rank transition.

S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T,  o_t = S_t^T r_t.
"""
from linattn_dsl.compiler.spec import Arg, Decay, Recurrence, Transition

spec = Recurrence(
    name="rwkv7",
    inputs=dict(r="B T H K", w=Arg("B T H K", sign="nonpositive"), k="B T H K", v="B T H V",
                a="B T H K", b="B T H K"),
    query="r", key="k", value="v",
    decay=Decay.vector(log="w"),
    transition=Transition.general(a="a", b="b"),
    scale=1.0,
    doc=__doc__,
)
