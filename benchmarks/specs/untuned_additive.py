"""A spec no launch choice was tuned for (issue 28), additive form: a per-head scalar decay from two raw inputs,
``-softplus(a) * exp(c)`` (a per token, c per head), grouped query / key heads (4 q/k heads for every 16 value
heads). ``benchmarks/untuned.py`` times it against the shipped GLA."""
from linattn_dsl.compiler.spec import Decay, Recurrence

spec = Recurrence(
    name="untuned_additive",
    inputs=dict(q="B T HQ K", k="B T HQ K", v="B T H V", a="B T H", c="H"),
    query="q", key="k", value="v",
    decay=Decay.scalar(log="-softplus(a) * exp(c)"),
    doc=__doc__,
)
