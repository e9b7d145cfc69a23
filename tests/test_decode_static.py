"""The one-token decoding step on fixed buffers (models/decode.py), on the CPU: the same buffers and code the
CUDA graph captures, run eagerly. Every family (and the attention hybrids: grouped KV heads, a sliding window)
generates the same tokens with a static cache as with the dynamic one: greedy and beam search, a left-padded
batch, past the attention buffers' capacity (rebuilt at twice the size), and continuing with several tokens from
a static cache. Token comparisons are exact; logits 1e-4 absolute (the attention layers' masked columns change
the summation order only).
"""

from __future__ import annotations

import gc

import pytest
import torch

import linattn_dsl.models.decode as decode
from linattn_dsl.models.cache import LinAttnCache

from test_models import FAMILIES, VOCAB, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompt(batch=2, T=7, seed=0):
    ids = torch.randint(1, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0   # a left-padded row
    return ids, mask


def _generate(model, ids, mask, cache=None, **kw):
    extra = {} if cache is None else {"cache": cache}
    return model.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, do_sample=False,
                          output_scores=True, return_dict_in_generate=True, **extra, **kw)


def _static(model):
    return LinAttnCache(len(model.model.layers), static=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_step_generates_the_same(family):
    model = make_model(family).eval()
    ids, mask = _prompt()
    plain = _generate(model, ids, mask)
    cache = _static(model)
    static = _generate(model, ids, mask, cache)
    assert cache.step is not None   # the steps ran on the buffers
    assert torch.equal(plain.sequences, static.sequences)
    for a, b in zip(plain.scores, static.scores):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gla", "rwkv7", "gla_hybrid", "rwkv7_hybrid"])
def test_static_step_beam_search(family):
    model = make_model(family).eval()
    ids, mask = _prompt(seed=1)
    plain = _generate(model, ids, mask, num_beams=3, num_return_sequences=2)
    static = _generate(model, ids, mask, _static(model), num_beams=3, num_return_sequences=2)
    assert torch.equal(plain.sequences, static.sequences)


@pytest.mark.parametrize("family", ["gla_hybrid", "rwkv7_hybrid"])
def test_attention_buffers_grow(family, monkeypatch):
    """Buffers of twice the tokens so far, in multiples of 4 columns: 16 after a 7-token prompt, 32 at 16 tokens
    (rebuilt, and on CUDA captured again); the tokens do not change."""
    monkeypatch.setattr(decode, "CAPACITY_STEP", 4)
    built = []
    init = decode.StaticStep.__init__
    monkeypatch.setattr(decode.StaticStep, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    model = make_model(family).eval()
    ids, mask = _prompt(seed=2)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0, do_sample=False)
    cache = _static(model)
    static = model.generate(ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0, do_sample=False,
                            cache=cache)
    assert torch.equal(plain, static)
    assert len(built) == 2 and cache.step.capacity == 32


@pytest.mark.parametrize("family", ["gla_hybrid", "mamba2"])
def test_static_cache_continues_with_several_tokens(family):
    """Steps on the buffers, then a call of 5 tokens (back on per-layer dicts), then steps again: the logits of
    one full forward."""
    model = make_model(family).eval()
    ids = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = _static(model)
        pieces = [model(ids[:, :6], cache=cache, use_cache=True).logits]
        for t in range(6, 9):
            pieces.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
        assert cache.step is not None
        pieces.append(model(ids[:, 9:14], cache=cache, use_cache=True).logits)
        assert cache.step is None
        for t in range(14, 16):
            pieces.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=0)


def _count_steps(monkeypatch) -> list:
    built = []
    init = decode.StaticStep.__init__
    monkeypatch.setattr(decode.StaticStep, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    return built


def _greedy(model, ids, mask, cache=None):
    extra = {} if cache is None else {"cache": cache}
    return model.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, do_sample=False, **extra)


@pytest.mark.parametrize("family", ["gla", "rwkv7"])
def test_next_cache_reuses_a_free_step(family, monkeypatch):
    """Without attention layers a later cache of the same batch and shapes takes the step of a cache that is gone
    (its states loaded into the buffers, on CUDA the graph replayed): same tokens as the dynamic cache for each
    prompt. A step whose cache lives on, or whose buffers were handed out as dicts, is not taken."""
    built = _count_steps(monkeypatch)
    model = make_model(family).eval()
    steps = []
    for seed in (4, 5):
        ids, mask = _prompt(seed=seed)
        cache = _static(model)
        assert torch.equal(_greedy(model, ids, mask, cache), _greedy(model, ids, mask))
        steps.append(cache.step)
        del cache
        gc.collect()
    assert len(built) == 1 and steps[0] is steps[1]
    kept = _static(model)
    _greedy(model, ids, mask, kept)
    other = _static(model)
    _greedy(model, ids, mask, other)
    assert len(built) == 2 and other.step is not kept.step
    released = other.step
    other.release_step()
    del kept, other
    gc.collect()
    again = _static(model)
    _greedy(model, ids, mask, again)
    assert again.step is not released and len(built) == 2   # the step kept alive above was free again
    ids3, mask3 = _prompt(batch=3, seed=6)
    third = _static(model)
    assert torch.equal(_greedy(model, ids3, mask3, third), _greedy(model, ids3, mask3))
    assert len(built) == 3   # another batch: another step
    del again, third
    gc.collect()
    for p in model.parameters():   # the weights move (same dtype): a captured graph would read the old ones
        p.data = p.data.clone()
    ids, mask = _prompt(seed=8)
    assert torch.equal(_greedy(model, ids, mask, _static(model)), _greedy(model, ids, mask))
    assert len(built) == 4


def test_attention_models_build_a_step_per_cache(monkeypatch):
    built = _count_steps(monkeypatch)
    model = make_model("gla_hybrid").eval()
    ids, mask = _prompt(seed=7)
    for _ in range(2):
        _greedy(model, ids, mask, _static(model))
        gc.collect()
    assert len(built) == 2


def test_static_step_checks_its_inputs():
    model = make_model("gla_hybrid").eval()
    ids = torch.randint(1, VOCAB, (2, 5))
    with torch.no_grad():
        cache = _static(model)
        model(ids, cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="input_ids: batch size 3, but the cache holds 2 rows"):
            model(ids[:1, :1].expand(3, 1), cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="attention_mask: expected shape"):
            model(ids[:, :1], cache=cache, use_cache=True, attention_mask=torch.ones(2, 9, dtype=torch.long))


def test_with_gradients_the_dynamic_path_runs():
    """A one-token call that records gradients does not use the buffers (the step runs without autograd)."""
    model = make_model("gla").eval()
    ids = torch.randint(1, VOCAB, (1, 5))
    cache = _static(model)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    out = model(ids[:, :1], cache=cache, use_cache=True)
    assert cache.step is None and out.logits.requires_grad
