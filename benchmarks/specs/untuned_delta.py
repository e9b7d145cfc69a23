"""A spec no launch choice was tuned for (issue 28), delta-rule form: a per-head constant decay ``-softplus(c)``,
beta from a raw logit through a sigmoid, grouped query / key heads (4 for every 16 value heads).
``benchmarks/untuned.py`` times it against the shipped gated delta rule."""
from linattn_dsl.compiler.spec import Decay, Recurrence, Transition

spec = Recurrence(
    name="untuned_delta",
    inputs=dict(q="B T HQ K", k="B T HQ K", v="B T H V", bl="B T H", c="H"),
    query="q", key="k", value="v",
    decay=Decay.constant(log="-softplus(c)"),
    transition=Transition.delta(beta="sigmoid(bl)"),
    doc=__doc__,
)
