"""The shipped families keep their config fields and defaults, parameter names and shapes, and numbers: fixtures
written by ``scripts/make_family_fixtures.py`` (tiny models of RetNet, GLA, DeltaNet, KDA and Gated DeltaNet with
noisy weights, their configs, state dicts and logits) load into the models the current code builds, with every
field, name and shape in place, and give the same logits.

Tolerance: 1e-5 absolute and relative on fp32 logits of size ~2, on the CPU. The weights, the input and the ops
are the same; only the order of a few elementwise steps around the ops (where a gate's scale is applied, a view or
a reshape) may differ in how a layer is assembled, which moves a logit by a few ulps (~1e-6), far less than a
misplaced gate, norm, scale or position would (the noise on every weight makes each of them count).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import linattn_dsl.models as M

FIXTURES = Path(__file__).parent / "fixtures" / "families"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
TOL = 1e-5
# config entries that describe the install or the saving, not the model
VOLATILE = ("transformers_version",)
# Gated DeltaNet's deliberate changes since its fixture was written: its modules took FLA's names, and its config (a
# shipped spec's, registered on import) no longer records the spec's source
RENAMED = {"gated_deltanet": {"proj.q.": "q_proj.", "proj.k.": "k_proj.", "proj.v.": "v_proj.",
                              "proj.g.": "a_proj.", "proj.beta.": "b_proj.", "conv.q.": "q_conv1d.",
                              "conv.k.": "k_conv1d.", "conv.v.": "v_conv1d.", "param.A_log": "A_log",
                              "param.dt_bias": "dt_bias"}}
DROPPED = {"gated_deltanet": ("spec_source",)}
# fields every family gained since the fixtures were written, with their defaults (a saved config without them
# loads with these)
ADDED = {"decode_cuda_graph": True}

pytestmark = pytest.mark.usefixtures("one_thread")


def family_of(model_type: str) -> str:
    return next(f for f, (cfg, _, _) in M.FAMILIES.items() if cfg.model_type == model_type)


def config_dict(config) -> dict:
    """The config as its JSON file reads back (int keys of id2label become strings)."""
    return json.loads(json.dumps({k: v for k, v in config.to_dict().items() if k not in VOLATILE}))


def test_default_configs_unchanged():
    """Every family's config class: the same fields with the same defaults."""
    saved = json.loads((FIXTURES / "defaults.json").read_text())
    for family, fields in saved.items():
        fields = {k: v for k, v in fields.items() if k not in DROPPED.get(family, ())}
        assert config_dict(M.FAMILIES[family][0]()) == {**fields, **ADDED}, family


def _renamed(key: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        key = key.replace(f".mixer.{old}", f".mixer.{new}")
    return key


@pytest.mark.parametrize("case", CASES)
def test_fixture_loads_strictly_with_equal_logits(case):
    folder = FIXTURES / case
    fields = json.loads((folder / "config.json").read_text())
    model_type = fields.pop("model_type")
    family = family_of(model_type)
    fields = {k: v for k, v in fields.items() if k not in DROPPED.get(family, ())}
    config = AutoConfig.for_model(model_type, **fields)
    assert type(config) is M.FAMILIES[family][0]
    assert config_dict(config) == dict(fields, model_type=model_type, **ADDED)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model) is M.FAMILIES[family][2]
    state = {_renamed(key, RENAMED.get(family, {})): t for key, t in load_file(folder / "model.safetensors").items()}
    model.load_state_dict(state, strict=True)
    expected = load_file(folder / "expected.safetensors")
    with torch.no_grad():
        model.eval()
        recurrent = model(expected["input_ids"], use_cache=False).logits
        model.train()
        chunk = model(expected["input_ids"], use_cache=False).logits
    torch.testing.assert_close(recurrent, expected["logits"], atol=TOL, rtol=TOL)
    torch.testing.assert_close(chunk, expected["logits_chunk"], atol=TOL, rtol=TOL)
