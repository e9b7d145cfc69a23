"""Mamba2's selective state space, SSD form (Dao and Gu, ICML 2024).

delta_t = softplus(dt_t + dt_bias),  S_t = exp(A delta_t) S_{t-1} + B_t (x_t delta_t)^T,
y_t = S_t^T C_t + D x_t.  State [d_state N, head dim P] per head; B, C shared by groups of heads.
"""
from linattn_dsl.compiler.spec import Arg, Decay, If, Recurrence

spec = Recurrence(
    name="mamba2",
    inputs=dict(x="B T H P", dt="B T H", A=Arg("H", sign="nonpositive"), B="B T G N", C="B T G N"),
    optional=dict(D="H", dt_bias="H"),
    switches=dict(dt_softplus=True),
    # Without softplus, delta is clamped at 0 as in mamba's kernels (dt_limit = (0, inf)).
    let=dict(delta=If("dt_softplus", "softplus(dt + dt_bias)", "relu(dt + dt_bias)")),
    query="C", key="B", value="x * delta",
    decay=Decay.scalar(log="A * delta"),
    skip="D * x",
    scale=1.0,
    doc=__doc__,
)
