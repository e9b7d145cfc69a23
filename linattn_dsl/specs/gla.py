"""Gated Linear Attention (Yang et al., ICML 2024).

S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,  o_t = S_t^T (scale q_t),  g a per-channel log-decay <= 0.

The model ``linattn_gla`` (the layer below, FLA's GatedLinearAttention layout): q, k, v projections (with
``use_short_conv``, short convs ending in silu); the log-decay ``logsigmoid(W_up W_down x) / 16`` from a low-rank
``gk_proj``; per-head RMSNorm ``g_norm`` with a swish output gate (``use_output_gate``); the output projection.
"""
from linattn_dsl.compiler.layer import Layer, Option, Proj
from linattn_dsl.compiler.spec import Arg, Decay, Recurrence

spec = Recurrence(
    name="gla",
    inputs=dict(q="B T H K", k="B T H K", v="B T H V", g=Arg("B T H K", sign="nonpositive")),
    query="q", key="k", value="v",
    decay=Decay.vector(log="g"),
    doc=__doc__,
)

qkv = Proj(conv=Option("use_short_conv", False))   # silu after the conv; none without it
layer = Layer(
    inputs=dict(q=qkv, k=qkv, v=qkv,
                g=Proj(name="gk", rank=Option("gate_low_rank_dim", 16), bias=True, transform="logsigmoid",
                       scale=1 / Option("gate_logit_normalizer", 16.0))),
    output_gate=Option("use_output_gate", True, {True: "swish", False: None}),
    norm_name="g_norm",
    name="gla",
    title="GLA",
)
