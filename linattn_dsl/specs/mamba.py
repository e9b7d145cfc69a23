"""Mamba's selective SSM (Gu and Dao, 2023): a state of d_state N values per channel.

delta_t = softplus(dt_t + dt_bias),  h_t[d] = exp(delta_t[d] A[d, :]) * h_{t-1}[d] + B_t x_t[d] delta_t[d],
y_t[d] = C_t^T h_t[d] + D[d] x_t[d]. Each channel d is a head whose state is [N, P] with P = 1 value channel:
x [B, T, D, 1], dt [B, T, D], A [D, N] (per channel and state index: a per-channel decay), B, C [B, T, G, N]
shared by groups of channels (Mamba: one group).
"""
from linattn_dsl.compiler.spec import Arg, Decay, If, Recurrence

spec = Recurrence(
    name="mamba",
    inputs=dict(x="B T H P", dt="B T H", A=Arg("H N", sign="nonpositive"), B="B T G N", C="B T G N"),
    optional=dict(D="H", dt_bias="H"),
    switches=dict(dt_softplus=True),
    let=dict(delta=If("dt_softplus", "softplus(dt + dt_bias)", "relu(dt + dt_bias)")),
    query="C", key="B", value="x * delta",
    decay=Decay.vector(log="A * delta"),
    skip="D * x",
    scale=1.0,
    doc=__doc__,
)
