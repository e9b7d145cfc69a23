"""Comba (Hu et al., 2025): a scalar decay and a closed-loop correction through a second key p.

S_t = e^{g_t} S_{t-1} + beta_t k_t (v_t - p_t^T S_{t-1})^T,  o_t = S_t^T (scale q_t):
the general transition with a = p, b = -beta k and the key beta k (the correction reads the state before its
decay, as FLA's chunk_comba and fused_recurrent_comba kernels do). FLA's chunk_comba(q, k, v, p, g, beta, ...,
use_qk_l2norm_in_kernel), whose switch L2-normalises q, k and p.

The model ``linattn_comba`` (the layer below: FLA's Comba layout, config fields and parameter names): ``head_dim``
key channels and ``head_dim * expand_v`` value channels per head; q, k, v through short convs with silu
(``use_short_conv``; silu without them); ``use_inner_decay``: p = k * sigmoid(decay), ``decay`` a learned per-head
parameter (ones at init; else p = k); ``use_output_correction``: q = q - D * p, ``D`` per head (``correction_factor``
at init); Mamba's gate g = -exp(A_log) * softplus(a_proj(x) + dt_bias), computed in the layer; beta = sigmoid(W_b x);
q, k, p L2-normalised in the op; per-head RMSNorm ``o_norm`` with a sigmoid output gate (``use_output_gate``) or
without a gate; the output projection. FLA's checkpoints convert (``linattn convert --from-fla``).
"""
from linattn_dsl.compiler.layer import Derive, Layer, Option, Param, Proj, Size
from linattn_dsl.compiler.spec import Arg, Decay, Recurrence, Transition

spec = Recurrence(
    name="comba",
    inputs=dict(q="B T H K", k="B T H K", v="B T H V", p="B T H K", g=Arg("B T H", sign="nonpositive"),
                beta="B T H"),
    switches=dict(use_qk_l2norm_in_kernel=False),
    query="q", key="beta * k", value="v",
    decay=Decay.scalar(log="g"),
    transition=Transition.general(a="p", b="-beta * k"),
    qk_l2norm="use_qk_l2norm_in_kernel",
    l2norm_inputs=("q", "k", "p"),
    doc=__doc__,
)

qkv = Proj(conv=Option("use_short_conv", True), activation="identity", transform="silu")
layer = Layer(
    inputs=dict(
        q=Option("use_output_correction", True, {
            True: Derive("q - D * p", base=qkv, params=dict(D=Param(init=Option("correction_factor", 1.0), dims="H"))),
            False: qkv}),
        k=qkv,
        v=qkv,
        p=Option("use_inner_decay", True, {
            True: Derive("k * sigmoid(decay)", params=dict(decay=Param(init="ones", dims="H"))),
            False: Derive("k")}),
        g=Derive("-exp(A_log) * softplus(g + dt_bias)", base=Proj(name="a"),
                 params=dict(A_log=Param(init="a_log", dims="H"), dt_bias=Param(init="dt_bias", dims="H"))),
        beta=Proj(name="b", transform="sigmoid"),
    ),
    key_size=Size.fixed(Option("head_dim", 256)),
    value_size=Size.of_key(Option("expand_v", 2.0)),
    output_gate=Option("use_output_gate", True, {True: "sigmoid", False: None}),
    defaults=dict(num_heads=6),
)
