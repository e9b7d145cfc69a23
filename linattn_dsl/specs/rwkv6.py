"""RWKV6 (Finch, Peng et al., 2024): the output reads the state before the token's update, plus a per-channel
bonus u for the token's own write.

o_t = scale r_t^T (S_{t-1} + diag(u) k_t v_t^T),  S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T,  w <= 0 per channel:
FLA's chunk_rwkv6(r, k, v, w, u, scale, ...), u [H, K].
"""
from linattn_dsl.compiler.spec import Arg, Decay, Recurrence

spec = Recurrence(
    name="rwkv6",
    inputs=dict(r="B T H K", k="B T H K", v="B T H V", w=Arg("B T H K", sign="nonpositive"), u="H K"),
    query="r", key="k", value="v",
    decay=Decay.vector(log="w"),
    read="before",
    bonus="u",
    doc=__doc__,
)
