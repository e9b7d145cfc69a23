"""Comba (Hu et al., 2025): a scalar decay and a closed-loop correction through a second key p.

S_t = e^{g_t} S_{t-1} + beta_t k_t (v_t - p_t^T e^{g_t} S_{t-1})^T,  o_t = S_t^T (scale q_t):
the general transition with a = e^{g} p, b = -beta k and the key beta k. FLA's
chunk_comba(q, k, v, p, g, beta, ..., use_qk_l2norm_in_kernel), whose switch L2-normalises q, k and p.

The model ``linattn_comba`` (the layer below): short convolutions with silu on q, k, v; p from its own
projection; q, k, p L2-normalised in the op; beta = sigmoid(W_b x) (bounded: beta enters b and the key); the
log-decay logsigmoid(W_a x) / 16; per-head RMSNorm with a sigmoid output gate; the output projection. FLA's Comba
layer differs: p = k * sigmoid(d) per head (p . k >= 0 keeps I - beta k p^T contractive; an independent p does not
guarantee it), an output correction term and Mamba's A_log / dt_bias gate.
"""
from linattn_dsl.compiler.layer import Layer, Proj
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

layer = Layer(
    inputs=dict(q=Proj(conv=True), k=Proj(conv=True), v=Proj(conv=True), p=Proj(),
                g=Proj(name="a", transform="logsigmoid", scale=1 / 16), beta=Proj(name="b", transform="sigmoid")),
    output_gate="sigmoid",
)
