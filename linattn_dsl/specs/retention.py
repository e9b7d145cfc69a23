"""RetNet's multi-scale retention (Sun et al., 2023).

S_t = gamma_h S_{t-1} + k_t v_t^T,  o_t = S_t^T (q_t / sqrt(K)),  gamma_h = 1 - 2^(-5 - h).

The model ``linattn_retnet`` (the layer below, FLA's MultiScaleRetention layout): q, k, v projections, RoPE on q and
k; per-head RMSNorm ``g_norm`` with a swish output gate (``use_output_gate``); the output projection.
"""
from linattn_dsl.compiler.layer import Layer, Option, Size
from linattn_dsl.compiler.spec import Decay, Recurrence

spec = Recurrence(
    name="retention",
    inputs=dict(q="B T H K", k="B T H K", v="B T H V"),
    query="q", key="k", value="v",
    decay=Decay.constant(log="log(1 - 2**(-5 - h))"),   # h: the head index
    doc=__doc__,
)

layer = Layer(
    rope=Option("rope_theta", 10000.0),
    key_size=Size.of_hidden(Option("expand_k", 1.0)),
    value_size=Size.of_hidden(Option("expand_v", 2.0)),
    output_gate=Option("use_output_gate", True, {True: "swish", False: None}),
    norm_name="g_norm",
    defaults=dict(num_heads=8),
    name="retnet",
    title="RetNet",
)
