"""HGRN2 (Qin et al., 2024): gated linear RNNs with state expansion; the key is tied to the forget gate.

S_t = diag(exp(g_t)) S_{t-1} + (1 - exp(g_t)) v_t^T,  o_t = S_t^T (scale q_t),  g a per-channel log forget gate:
the key is a role given as an expression of the gate input (its gradient derived with the rest).

The model ``linattn_hgrn2`` (the layer below: FLA's HGRN2 layout, config fields and parameter names): heads of
``expand_ratio`` key channels and ``hidden_size / num_heads`` value channels; q = swish(W_q x), the forget gate
g = logsigmoid(W_f x), v = W_i x (``use_short_conv``: short convs without activation first); one RMSNorm
``g_norm`` over every head's output together (epsilon 1e-5, as FLA's); the output projection.
``use_lower_bound``: the model's ``lower_bounds [num_hidden_layers, H * K]``, softmax over the layers, cumulative,
minus the first row, lifts the forget gate of every layer after the first to
g = logaddexp(log(lb), log1p(-lb) + g) (its gate in [lb, 1]: deeper layers remember longer). FLA's checkpoints
convert (``linattn convert --from-fla``).
"""
from linattn_dsl.compiler.layer import Derive, Layer, ModelParam, Option, Proj, Size
from linattn_dsl.compiler.spec import Arg, Decay, Recurrence

spec = Recurrence(
    name="hgrn2",
    inputs=dict(q="B T H K", g=Arg("B T H K", sign="nonpositive"), v="B T H V"),
    query="q", key="1 - exp(g)", value="v",
    decay=Decay.vector(log="g"),
    doc=__doc__,
)

conv = Option("use_short_conv", False)
forget = Proj(name="f", conv=conv, activation="identity", transform="logsigmoid")
layer = Layer(
    inputs=dict(q=Proj(conv=conv, activation="identity", transform="silu"),
                g=Option("use_lower_bound", True, {
                    True: Derive("logaddexp(log(lower_bound), log1p(-lower_bound) + g)", base=forget,
                                 params=dict(lower_bound=ModelParam("lower_bounds", rows="cumsoftmax")),
                                 from_layer=1),
                    False: forget}),
                v=Proj(name="i", conv=conv, activation="identity")),
    key_size=Size.fixed(Option("expand_ratio", 128)),
    value_size=Size.of_hidden(1.0),
    output_gate=None,
    output_norm="all",
    norm_name="g_norm",
    norm_eps=1e-5,   # FLA's fused norm-and-projection keeps its default epsilon, whatever norm_eps says
    defaults=dict(num_heads=16),
    name="hgrn2",
    title="HGRN2",
)
