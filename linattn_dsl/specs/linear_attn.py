"""Linear attention (Katharopoulos et al., 2020), FLA's chunk_linear_attn(q, k, v, ..., normalize=True).

S_t = S_{t-1} + k_t v_t^T,  z_t = z_{t-1} + k_t;  o_t = q_t^T S_t / (q_t^T z_t + 1e-10)  (normalize; without it
o_t = q_t^T S_t), with the scale on q in both. q and k arrive feature-mapped (positive for the normalised
output); the normaliser z rides in the state as one more value column: states are [N, H, K, V + 1] with
``normalize``, [N, H, K, V] without. A spec may also map q and k itself, e.g. ``query="elu(q) + 1"``.

The model ``linattn_linear_attn`` (the layer below): q, k = elu(W x) + 1 (positive features), v = W_v x, the
normalised output, per-head RMSNorm, the output projection.
"""
from linattn_dsl.compiler.layer import Layer, Proj
from linattn_dsl.compiler.spec import Recurrence

spec = Recurrence(
    name="linear_attn",
    inputs=dict(q="B T H K", k="B T H K", v="B T H V"),
    switches=dict(normalize=True),
    query="q", key="k", value="v",
    normalize="normalize",
    doc=__doc__,
)

layer = Layer(
    inputs=dict(q=Proj(transform="elu+1"), k=Proj(transform="elu+1")),
    output_gate=None,
    name="linear_attn",
)
