"""The chunk forms as stages: the stage templates a form's generated module is made of (``linattn regen`` reads
this table) and the host module that launches them (``runtime.dispatch`` reads it). Each stage template holds the
kernels of one stage, forward and backward (``linattn_dsl/compiler/templates/<stage>.py.j2``); the twin templates
hold the same stages in torch for the CPU."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FormStages:
    host: str                      # the runtime module launching the stages: linattn_dsl.runtime.<host>
    stages: tuple                  # Triton stage templates, in the generated module's order
    twin: tuple                    # the PyTorch twin's templates


FORMS = {
    "additive": FormStages("additive", ("gate", "state", "scores", "output", "dqk", "intra", "step"),
                           ("torch_common", "torch_additive")),
    "delta": FormStages("delta", ("gate", "state", "scores", "ut", "output", "dqk", "intra", "delta_step"),
                        ("torch_common", "torch_additive", "torch_delta")),
    "general": FormStages("general", ("gate", "general_common", "general_scores", "general_solve", "general_state",
                                      "general_output", "general_dqk", "general_intra", "general_step"),
                          ("torch_common", "torch_general")),
}
# stages only per-channel (vector) decays launch: a spec with one decay per head carries none of their kernels
VECTOR_ONLY = frozenset({"scores", "intra", "general_intra"})


def stages_of(form: str, vector: bool) -> list[str]:
    """The stage templates of a spec of ``form`` whose decay is per channel (``vector``) or per head."""
    return [s for s in FORMS[form].stages if vector or s not in VECTOR_ONLY]
