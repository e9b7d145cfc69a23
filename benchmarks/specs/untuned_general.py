"""A spec no launch choice was tuned for (issue 28), general form: a per-head scalar decay ``logsigmoid(x)``, the
transition's a and b from two raw inputs (``a = -kk``, ``b = kk * sigmoid(s)`` per head), scale 1.
``benchmarks/untuned.py`` times it against the shipped RWKV7."""
from linattn_dsl.compiler.spec import Decay, Recurrence, Transition

spec = Recurrence(
    name="untuned_general",
    inputs=dict(q="B T H K", k="B T H K", v="B T H V", x="B T H", kk="B T H K", s="B T H"),
    query="q", key="k", value="v",
    decay=Decay.scalar(log="logsigmoid(x)"),
    transition=Transition.general(a="-kk", b="kk * sigmoid(s)"),
    scale=1.0,
    doc=__doc__,
)
