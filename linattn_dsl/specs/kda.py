"""Kimi Delta Attention (Kimi Team, 2025): the delta rule with a per-channel decay.

S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (scale q_t);
with use_gate_in_kernel, g_t = -exp(A_log) * softplus(g_raw_t + dt_bias).

The model ``linattn_kda`` (the layer below, FLA's KimiDeltaAttention layout): ``head_dim`` key channels and
``head_dim * expand_v`` value channels per head; short convs with silu on q, k, v; the gate from a low-rank
``f_proj`` (rank: the value head dim) with ``A_log`` and ``dt_bias`` (stored flat, one per key channel) inside
the op; beta = sigmoid(W_b x); q / k L2-normalised in the op; per-head RMSNorm ``o_norm`` with a sigmoid output
gate from a low-rank ``g_proj`` with bias; the output projection.
"""
from linattn_dsl.compiler.layer import Gate, Layer, Option, Param, Proj, Size
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

layer = Layer(
    inputs=dict(q=Proj(conv=True), k=Proj(conv=True), v=Proj(conv=True), g=Proj(name="f", rank="V"),
                beta=Proj(name="b", transform="sigmoid"), A_log=Param(init="a_log"),
                dt_bias=Param(init="dt_bias", flat=True)),
    switches=dict(use_gate_in_kernel=True),
    key_size=Size.fixed(Option("head_dim", 128)),
    value_size=Size.of_key(Option("expand_v", 1.0)),
    qk_heads=None,
    output_gate=Gate("sigmoid", rank="V", bias=True),
    defaults=dict(num_heads=16),
    name="kda",
    title="KDA",
)
