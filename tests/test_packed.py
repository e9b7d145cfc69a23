"""Packed documents (``cu_seqlens``): every family, and hybrids with softmax attention, run documents packed into
one row exactly as they run them one at a time; the loss leaves out the targets across a boundary; bad packings
are refused with the argument named; ``data.packed_documents`` trains through the trainer and resumes.

Tolerances (fp32, ``initializer_range=0.3`` so that a state leaking across a boundary moves logits of size ~10 by
whole units): logits agree to ``LOGIT_ATOL`` absolute; each parameter's gradient agrees with the sum of the
separate ones to ``GRAD_RTOL`` of that gradient's largest entry (gradients reach ~1e3 at this init, and the
packed and separate runs add the same products in other orders, or through the chunk instead of the step form).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import linattn_dsl
import linattn_dsl.models as M
from linattn_dsl.layers import Attention, GatedLinearAttention, RWKV7Attention
from linattn_dsl.layers._utils import FUSED_RECURRENT_MAX_LEN
from linattn_dsl.train import checkpoint, data, trainer
from linattn_dsl.train.config import ConfigError, load_config

VOCAB = 64
LOGIT_ATOL = 2e-5
GRAD_RTOL = 1e-4

RWKV7_TINY = dict(head_dim=8, decay_low_rank_dim=8, gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=4)
TINY = {
    "retnet": (M.RetNetConfig, dict(num_heads=2)),  # RoPE positions restart in each document
    "gla": (M.GLAConfig, dict(num_heads=2, use_short_conv=True)),
    "mamba": (M.MambaConfig, dict(state_size=8)),
    "mamba2": (M.Mamba2Config, dict(head_dim=16, state_size=8, n_groups=2)),
    "rwkv6": (M.RWKV6Config, dict(num_heads=2, proj_low_rank_dim=4, gate_low_rank_dim=8)),  # read before, token shifts
    "rwkv7": (M.RWKV7Config, RWKV7_TINY),  # token shifts in the mixer and the FFN
    "kda": (M.KDAConfig, dict(num_heads=2, head_dim=16)),
    "delta_net": (M.DeltaNetConfig, dict(num_heads=2)),
    "gated_deltanet": (M.FAMILIES["gated_deltanet"][0], dict(num_heads=2, num_qk_heads=1)),
    "gla_hybrid": (M.GLAConfig, dict(num_heads=2, attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2})),
    # a sliding window shorter than the documents, before RWKV7's first layer
    "rwkv7_hybrid": (M.RWKV7Config, dict(RWKV7_TINY, num_hidden_layers=3,
                                         attn={"layers": [0], "num_heads": 4, "num_kv_heads": 1, "window_size": 4})),
}
# document lengths: all short (the step form outside training), and a total past FUSED_RECURRENT_MAX_LEN with a
# document across a chunk boundary (the chunk form, packed, while two of the separate runs take the step form)
PACKINGS = {"short": [7, 1, 13], "long": [1, 70, 9]}
assert sum(PACKINGS["short"]) <= FUSED_RECURRENT_MAX_LEN < sum(PACKINGS["long"])

pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(family: str, seed: int = 0):
    config_class, extra = TINY[family]
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                  initializer_range=0.3, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    kwargs.update(extra)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config_class(**kwargs)).eval()


def offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def tokens(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def spans(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    return list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))


# ---------------------------------------------------------------- packed == separate


@pytest.mark.parametrize("packing", list(PACKINGS))
@pytest.mark.parametrize("family", list(TINY))
def test_packed_logits_equal_separate(family, packing):
    model = make_model(family)
    cu = offsets(PACKINGS[packing])
    ids = tokens(int(cu[-1]))
    for training in (False, True):  # the op each picks by length: step or chunk form
        model.train(training)
        with torch.no_grad():
            packed = model(ids, cu_seqlens=cu).logits
            separate = torch.cat([model(ids[:, a:b]).logits for a, b in spans(cu)], dim=1)
            leaking = model(ids).logits  # the same row without boundaries
        torch.testing.assert_close(packed, separate, atol=LOGIT_ATOL, rtol=0)
        # the comparison can tell: without cu_seqlens the later documents come out far off
        assert (leaking - separate).abs().max() > 1000 * LOGIT_ATOL


@pytest.mark.parametrize("packing", list(PACKINGS))
@pytest.mark.parametrize("family", list(TINY))
def test_packed_gradients_equal_sum_of_separate(family, packing):
    model = make_model(family).train()
    cu = offsets(PACKINGS[packing])
    ids = tokens(int(cu[-1]))
    weights = torch.randn(1, ids.shape[1], VOCAB, generator=torch.Generator().manual_seed(2))
    (model(ids, cu_seqlens=cu).logits * weights).sum().backward()
    packed = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    for a, b in spans(cu):
        (model(ids[:, a:b]).logits * weights[:, a:b]).sum().backward()
    for name, p in model.named_parameters():
        bound = GRAD_RTOL * p.grad.abs().max().item() + 1e-6
        assert (packed[name] - p.grad).abs().max().item() <= bound, name


@pytest.mark.parametrize("training", [False, True])  # plain cross entropy / fused linear cross entropy
@pytest.mark.parametrize("family", ["gla", "rwkv7_hybrid"])
def test_loss_leaves_out_cross_document_targets(family, training):
    """The packed loss is the mean over each document's own next-token targets: the target of a document's last
    token (the next document's first token) is not one; a one-token document has none."""
    model = make_model(family).train(training)
    cu = offsets([6, 1, 9])
    ids = tokens(int(cu[-1]))
    loss = model(ids, labels=ids, cu_seqlens=cu).loss
    with torch.no_grad():
        model.eval()
        logits = [model(ids[:, a:b]).logits[0, :-1] for a, b in spans(cu)]
    targets = [ids[0, a + 1:b] for a, b in spans(cu)]
    expected = F.cross_entropy(torch.cat(logits), torch.cat(targets))
    assert len(torch.cat(targets)) == int(cu[-1]) - 3
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


def test_positions_and_cache_defaults():
    """Default positions restart in each document (explicit ones are used as given); no cache is made."""
    model = make_model("gla_hybrid")
    cu = offsets([5, 8])
    ids = tokens(13)
    out = model(ids, cu_seqlens=cu)
    assert out.cache is None
    positions = torch.cat([torch.arange(5), torch.arange(8)])[None]
    torch.testing.assert_close(model(ids, cu_seqlens=cu, position_ids=positions).logits, out.logits, atol=0, rtol=0)
    spread = model(ids, cu_seqlens=cu, position_ids=2 * positions).logits  # RoPE is relative: scale, not shift
    assert (spread[:, 1:] - out.logits[:, 1:]).abs().max() > 1e-3


def test_layers_take_cu_seqlens():
    """The layers on their own: packed == separate (a window, token shifts, a short conv)."""
    torch.manual_seed(0)
    cu = offsets([3, 1, 6])
    x = torch.randn(1, 10, 32)
    first = RWKV7Attention(32, head_dim=8, decay_low_rank_dim=8, gate_low_rank_dim=8, a_low_rank_dim=8,
                           v_low_rank_dim=4)
    for layer in (Attention(32, num_heads=4, num_kv_heads=2, window_size=2),
                  GatedLinearAttention(32, num_heads=2, use_short_conv=True), first):
        packed = layer(x, cu_seqlens=cu)[0]
        separate = torch.cat([layer(x[:, a:b])[0] for a, b in spans(cu)], dim=1)
        torch.testing.assert_close(packed, separate, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- bad input


BAD_CU_SEQLENS = [
    (torch.tensor([0.0, 4.0, 10.0]), "int32 / int64 tensor"),
    (torch.tensor([[0, 4, 10]]), "int32 / int64 tensor"),
    (torch.tensor([0]), "int32 / int64 tensor"),
    ([0, 4, 10], "int32 / int64 tensor"),
    (torch.tensor([1, 4, 10]), "from 0 to seq_len=10"),
    (torch.tensor([0, 4, 9]), "from 0 to seq_len=10"),
    (torch.tensor([0, 6, 4, 10]), "strictly increasing"),
    (torch.tensor([0, 4, 4, 10]), "no empty document"),
]


@pytest.mark.parametrize("cu_seqlens, message", BAD_CU_SEQLENS)
def test_bad_cu_seqlens(cu_seqlens, message):
    model = make_model("gla_hybrid")
    with pytest.raises(ValueError, match=f"^cu_seqlens: .*{message}.*got"):
        model(tokens(10), cu_seqlens=cu_seqlens)


def test_packed_documents_refuse_batches_padding_and_caches():
    model = make_model("gla_hybrid")
    cu = offsets([4, 6])
    ids = tokens(10)
    with pytest.raises(ValueError, match=r"^cu_seqlens: .*batch size 1.*got batch size 2"):
        model(ids.expand(2, -1), cu_seqlens=cu)
    padded = torch.ones(1, 10, dtype=torch.long)
    padded[0, 0] = 0
    with pytest.raises(ValueError, match=r"^attention_mask: .*no padding.*got 1 padded"):
        model(ids, attention_mask=padded, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"^cache / use_cache: .*use_cache=False.*got cache=None, use_cache=True"):
        model(ids, cu_seqlens=cu, use_cache=True)
    cache = model(ids[:, :4], use_cache=True).cache
    with pytest.raises(ValueError, match=r"^cache / use_cache: .*got cache=LinAttnCache"):
        model(ids, cu_seqlens=cu, cache=cache, use_cache=False)
    with pytest.raises(ValueError, match=r"^cu_seqlens: .*batch size 1"):  # a layer called on its own
        GatedLinearAttention(32, num_heads=2)(torch.randn(2, 10, 32), cu_seqlens=cu)
    # a mask of ones is no padding
    torch.testing.assert_close(model(ids, attention_mask=torch.ones(1, 10, dtype=torch.long), cu_seqlens=cu).logits,
                               model(ids, cu_seqlens=cu).logits, atol=0, rtol=0)


# ---------------------------------------------------------------- data and trainer


def test_pack_rows_ends_documents_after_eos_and_at_block_ends():
    eos = 9
    rows = torch.tensor([[1, eos, 2, 3], [eos, 4, 5, eos], [6, 7, 8, 1]])
    input_ids, cu_seqlens = data.pack_rows(rows, eos)
    assert input_ids.shape == (1, 12) and input_ids.flatten().tolist() == rows.flatten().tolist()
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 2, 4, 5, 8, 12]
    assert data.model_inputs(rows) == {"input_ids": rows}
    assert data.model_inputs(rows, eos)["cu_seqlens"].tolist() == [0, 2, 4, 5, 8, 12]


CORPUS = Path(linattn_dsl.__file__).parent / "data" / "shakespeare.jsonl"


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory) -> Path:
    """Hamlet's speeches as separate documents of a jsonl file (about 40 kB): several per 64-token block."""
    hamlet = json.loads(CORPUS.read_text().splitlines()[0])["text"][:40_000]
    speeches = [s.strip() for s in hamlet.split("\n\n") if s.strip()]
    path = tmp_path_factory.mktemp("corpus") / "speeches.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches))
    return path


def packed_config(corpus: Path, dump: Path, **overrides) -> dict:
    """A 2-layer hybrid (GLA, then softmax attention; hidden 64) on bytes, seq_len 64, packed documents."""
    base = {
        "job.dump_folder": str(dump), "data.files": [str(corpus)], "tokenizer.kind": "byte",
        "data.packed_documents": True, "model.hidden_size": 64, "model.num_hidden_layers": 2, "model.num_heads": 2,
        "model.attn": {"layers": [1]}, "training.seq_len": 64, "training.batch_size": 4, "training.steps": 12,
        "optimizer.lr": 3e-3, "lr_scheduler.warmup_steps": 2, "metrics.plot": False, "training.eval_batches": 2,
    }
    base.update(overrides)
    return load_config(None, list(base.items()))


class Interrupt(Exception):
    pass


def test_trainer_with_packed_documents_learns_and_resumes(short_documents, tmp_path, monkeypatch):
    seen = []
    real_pack_rows = data.pack_rows

    def recording_pack_rows(rows, eos):
        input_ids, cu_seqlens = real_pack_rows(rows, eos)
        seen.append(len(cu_seqlens) - 1)
        return input_ids, cu_seqlens

    monkeypatch.setattr(data, "pack_rows", recording_pack_rows)
    overrides = {"checkpoint.interval": 4, "training.eval_interval": 6}
    ref = trainer.train(packed_config(short_documents, tmp_path / "ref", **overrides), progress=False)
    losses = [ref.losses[s] for s in sorted(ref.losses)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 5.0 and last < first - 1.0, losses
    assert ref.val_loss is not None and ref.val_loss < first
    assert sum(seen) > 4 * len(seen)  # more documents than blocks: EOS boundaries inside blocks

    def stop_at_6(step, record):
        if step == 6:
            raise Interrupt
    with pytest.raises(Interrupt):
        trainer.train(packed_config(short_documents, tmp_path / "run", **overrides), on_step=stop_at_6,
                      progress=False)
    assert checkpoint.latest(tmp_path / "run" / "checkpoint").name == "step-4"
    resumed = trainer.train(packed_config(short_documents, tmp_path / "run", **overrides), resume=True,
                            progress=False)
    assert sorted(resumed.losses) == list(range(5, 13))
    for step, loss in resumed.losses.items():
        assert abs(loss - ref.losses[step]) <= 1e-6, (step, loss, ref.losses[step])


def test_packed_documents_config_and_custom_models(short_documents, tmp_path):
    assert load_config(None, [("data.files", [str(short_documents)])])["data"]["packed_documents"] is False
    with pytest.raises(ConfigError, match="data.packed_documents: expected bool"):
        packed_config(short_documents, tmp_path / "bad", **{"data.packed_documents": "yes"})

    class NoPacking(torch.nn.Module):  # a model_factory model that would swallow cu_seqlens unnoticed
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids, labels=None, use_cache=False, **kwargs):
            raise AssertionError("not reached")

    with pytest.raises(ConfigError, match="data.packed_documents: the model from model_factory .* cu_seqlens"):
        trainer.train(packed_config(short_documents, tmp_path / "custom"), progress=False,
                      model_factory=lambda cfg, tok: NoPacking())
