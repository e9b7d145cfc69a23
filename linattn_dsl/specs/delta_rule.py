"""DeltaNet (Yang et al., NeurIPS 2024): the delta rule, no decay.

S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (scale q_t).

The model ``linattn_delta_net`` (the layer below, FLA's DeltaNet layout): q, k, v projections through silu, with
``use_short_conv`` after short convs; q / k L2-normalised in the op; beta = sigmoid(W_b x) (``use_beta``; else 1);
per-head RMSNorm ``o_norm``, with ``use_gate`` a swish output gate; the output projection.
"""
from linattn_dsl.compiler.layer import Const, Layer, Option, Proj, Size
from linattn_dsl.compiler.spec import Recurrence, Transition

spec = Recurrence(
    name="delta_rule",
    inputs=dict(q="B T HK K", k="B T HK K", v="B T H V", beta="B T H"),
    switches=dict(use_qk_l2norm_in_kernel=False),
    query="q", key="k", value="v",
    transition=Transition.delta(beta="beta"),
    qk_l2norm="use_qk_l2norm_in_kernel",
    doc=__doc__,
)

# silu with or without the short conv (FLA's qk_activation): the conv itself is linear
qkv = Proj(conv=Option("use_short_conv", True), activation="identity", transform="silu")
layer = Layer(
    inputs=dict(q=qkv, k=qkv, v=qkv,
                beta=Option("use_beta", True, {True: Proj(name="b", transform="sigmoid"), False: Const(1.0)})),
    key_size=Size.of_hidden(Option("expand_k", 1.0)),
    qk_heads=None,
    output_gate=Option("use_gate", False, {True: "swish", False: None}),
    defaults=dict(num_heads=16),
    name="delta_net",
    title="DeltaNet",
)
