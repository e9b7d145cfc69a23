"""GLA's recurrence with no layer declaration: its model comes from the default derivation (every input a linear
projection of the hidden states, the log-decay through logsigmoid(x) / 16, output RMSNorm, swish output gate and
projection). ``benchmarks/spec_model_speed.py`` trains it beside the hand-declared GLA family."""
from linattn_dsl.compiler.spec import Arg, Decay, Recurrence

spec = Recurrence(
    name="gla_default",
    inputs=dict(q="B T H K", k="B T H K", v="B T H V", g=Arg("B T H K", sign="nonpositive")),
    query="q", key="k", value="v",
    decay=Decay.vector(log="g"),
    doc=__doc__,
)
