"""Gated DeltaNet (Yang, Kautz, Hatamizadeh, ICLR 2025): the delta rule with a scalar decay.

S_t = (I - beta_t k_t k_t^T) exp(g_t) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (scale q_t);
with use_gate_in_kernel, g_t = -exp(A_log) * softplus(g_raw_t + dt_bias) per head.

The model ``linattn_gated_deltanet`` (the layer below: FLA's GatedDeltaNet layout and names): short convolutions
with silu on q, k, v; the gate from a projection ``a_proj`` with ``A_log`` and ``dt_bias`` inside the op;
beta = sigmoid(W_b x); q / k L2-normalised in the op; per-head RMSNorm ``o_norm`` with a swish output gate; the
output projection.
"""
from linattn_dsl.compiler.layer import Layer, Param, Proj
from linattn_dsl.compiler.spec import Arg, Decay, If, Recurrence, Transition

spec = Recurrence(
    name="gated_delta_rule",
    inputs=dict(q="B T HK K", k="B T HK K", v="B T H V", g=Arg("B T H", sign="nonpositive"),
                beta="B T H"),
    optional=dict(A_log="H", dt_bias="H"),
    switches=dict(use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False),
    query="q", key="k", value="v",
    decay=Decay.scalar(log=If("use_gate_in_kernel", "-exp(A_log) * softplus(g + dt_bias)", "g")),
    transition=Transition.delta(beta="beta"),
    qk_l2norm="use_qk_l2norm_in_kernel",
    doc=__doc__,
)

layer = Layer(
    inputs=dict(q=Proj(conv=True), k=Proj(conv=True), v=Proj(conv=True), g=Proj(name="a"),
                beta=Proj(name="b", transform="sigmoid"), A_log=Param(init="a_log"), dt_bias=Param(init="dt_bias")),
    switches=dict(use_gate_in_kernel=True),
    output_gate="swish",
    name="gated_deltanet",
)
