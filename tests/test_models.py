"""Hugging Face models of every family (and a hybrid with softmax attention layers): generation with
the project's cache, padding, save/load, Trainer, activation checkpointing.

Tiny configs with ``initializer_range=0.3``: large enough weights that a lost or misplaced state
changes the generated tokens. Token comparisons are exact. Logit comparisons: the same path twice
(save/load) must be bit-identical; a different path (chunk vs step form, padded vs unpadded, cached vs
one full forward) agrees to 1e-4 absolute on logits of size ~10 in fp32 (sums of a few dozen products
per op, accumulated over 2 layers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

import linattn_dsl.layers._utils as layer_utils
import linattn_dsl.models as M

VOCAB = 64
LOGIT_ATOL = 1e-4

# family name -> (config class, tiny family-specific kwargs)
RWKV7_TINY = dict(head_dim=8, decay_low_rank_dim=8, gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=4)
TINY = {
    "retnet": (M.RetNetConfig, dict(num_heads=2)),
    "gla": (M.GLAConfig, dict(num_heads=2)),
    "mamba": (M.MambaConfig, dict(state_size=8)),
    "mamba2": (M.Mamba2Config, dict(head_dim=16, state_size=8, n_groups=2)),
    "rwkv6": (M.RWKV6Config, dict(num_heads=2, proj_low_rank_dim=4, gate_low_rank_dim=8)),
    "rwkv7": (M.RWKV7Config, RWKV7_TINY),
    "kda": (M.KDAConfig, dict(num_heads=2, head_dim=16)),
    "delta_net": (M.DeltaNetConfig, dict(num_heads=2)),
    # declared in its spec file, built by SpecLayer; grouped q/k heads
    "gated_deltanet": (M.FAMILIES["gated_deltanet"][0], dict(num_heads=2, num_qk_heads=1)),
    # hybrids: softmax attention with grouped KV heads; a sliding window before RWKV7's first layer
    "gla_hybrid": (M.GLAConfig, dict(num_heads=2, use_short_conv=True,
                                     attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2})),
    "rwkv7_hybrid": (M.RWKV7Config, dict(RWKV7_TINY, num_hidden_layers=3,
                                         attn={"layers": [0], "num_heads": 4, "num_kv_heads": 1, "window_size": 4})),
}
FAMILIES = list(TINY)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(family: str, **overrides):
    config_class, extra = TINY[family]
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                  initializer_range=0.3, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    kwargs.update(extra)
    kwargs.update(overrides)
    return config_class(**kwargs)


def make_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(make_config(family, **overrides)).eval()


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


def greedy(model, input_ids, new_tokens=6, **kwargs):
    return model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, **kwargs)


# ---------------------------------------------------------------- config


def test_registered_with_auto_classes():
    for config_class, model_class, lm_class in M.FAMILIES.values():
        assert config_class.model_type.startswith("linattn_")
        config = AutoConfig.for_model(config_class.model_type)
        assert type(config) is config_class
        assert model_class.config_class is config_class and lm_class.config_class is config_class


@pytest.mark.parametrize("attn, message", [
    ({"layers": [2]}, "attn.layers"),
    ({"layers": [0, 0]}, "attn.layers"),
    ({"layers": [-1]}, "attn.layers"),
    ({"layers": "0"}, "attn.layers"),
    ({"layers": [0], "num_heads": 3}, "attn.num_heads"),
    ({"layers": [0], "num_heads": 4, "num_kv_heads": 3}, "attn.num_kv_heads"),
    ({"layers": [0], "window_size": 0}, "attn.window_size"),
    ({"layers": [0], "heads": 4}, "attn"),
])
def test_bad_attn_config_raises(attn, message):
    with pytest.raises(ValueError, match=message):
        make_config("gla", attn=attn)


def test_attn_config_defaults_and_round_trip():
    config = make_config("gla", attn={"layers": [1, 0]})
    assert config.attn == {"layers": [0, 1], "num_heads": 2, "num_kv_heads": 2, "window_size": None,
                           "rope_theta": 10000.0}
    again = type(config).from_dict(config.to_dict())
    assert again.attn == config.attn


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_full_forward(family):
    model = make_model(family)
    ids = prompt(2, 7)
    out = greedy(model, ids, new_tokens=6)
    with torch.no_grad():
        logits = model(out, use_cache=False).logits
    expected = logits[:, ids.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(out[:, ids.shape[1]:], expected)
    # the weights are large enough that the tokens vary (a constant stream would hide lost state)
    assert len(set(out[:, ids.shape[1]:].flatten().tolist())) > 2


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_chunk_ops_only(family, monkeypatch):
    """Prefill and one-token steps through the chunk form (with initial and final states)."""
    model = make_model(family)
    ids = prompt(2, 7)
    expected = greedy(model, ids)
    monkeypatch.setattr(layer_utils, "FUSED_RECURRENT_MAX_LEN", 0)
    assert torch.equal(greedy(model, ids), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_equals_uncached_generate(family):
    model = make_model(family)
    ids = prompt(2, 6)
    assert torch.equal(greedy(model, ids, use_cache=True), greedy(model, ids, use_cache=False))


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_step_logits_match_full_forward(family):
    model = make_model(family)
    ids = prompt(2, 10)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :6], use_cache=True)
        cache = first.cache
        steps = [first.logits]
        for t in range(6, 10):
            step = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = step.cache
            steps.append(step.logits)
    assert cache.get_seq_length() == 10
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search(family):
    model = make_model(family)
    ids = prompt(2, 5)
    kwargs = dict(num_beams=3, do_sample=False, max_new_tokens=5)
    cached = model.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kwargs))
    # trivial cases: one new token is the argmax; one beam is greedy search
    one = model.generate(ids, num_beams=3, do_sample=False, max_new_tokens=1)
    with torch.no_grad():
        assert torch.equal(one[:, -1], model(ids).logits[:, -1].argmax(-1))
    assert torch.equal(model.generate(ids, num_beams=1, do_sample=False, max_new_tokens=5), greedy(model, ids, 5))


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_runs_and_is_seeded(family):
    model = make_model(family)
    ids = prompt(2, 4)
    torch.manual_seed(3)
    a = model.generate(ids, do_sample=True, max_new_tokens=4, top_k=10, num_return_sequences=2)
    torch.manual_seed(3)
    b = model.generate(ids, do_sample=True, max_new_tokens=4, top_k=10, num_return_sequences=2)
    assert a.shape == (4, 8) and torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_one_prompt_at_a_time(family):
    model = make_model(family)
    prompts = [prompt(1, 4, seed=5)[0], prompt(1, 9, seed=6)[0]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    batched = greedy(model, ids, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = greedy(model, p[None])
        assert torch.equal(batched[row, width:], alone[0, len(p):]), f"prompt {row}"
    # the padded forward gives the unpadded logits at real positions
    with torch.no_grad():
        padded_logits = model(ids, attention_mask=mask).logits
        for row, p in enumerate(prompts):
            alone = model(p[None]).logits[0]
            torch.testing.assert_close(padded_logits[row, width - len(p):], alone, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_continue_from_returned_cache(family):
    model = make_model(family)
    ids = prompt(2, 6)
    first = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert isinstance(first.cache, M.LinAttnCache)
    assert first.cache.get_seq_length() == ids.shape[1] + 2  # the last token is not fed yet
    resumed = model.generate(first.sequences, cache=first.cache, max_new_tokens=3, do_sample=False)
    assert torch.equal(resumed, greedy(model, ids, new_tokens=6))


@pytest.mark.parametrize("family", ["gla_hybrid"])
def test_old_cache_name_inputs_embeds_and_hidden_states(family):
    model = make_model(family)
    ids = prompt(2, 6)
    with torch.no_grad():
        first = model(ids[:, :4], use_cache=True)
        # the pre-5.24 spelling past_key_values still reaches the cache argument
        with pytest.warns(FutureWarning, match="past_key_values"):
            old = model(ids[:, 4:], past_key_values=first.cache, use_cache=True)
        assert old.cache.get_seq_length() == 6
        embeds = model.get_input_embeddings()(ids)
        by_embeds = model(inputs_embeds=embeds, output_hidden_states=True)
        torch.testing.assert_close(by_embeds.logits, model(ids).logits, atol=0, rtol=0)
        assert len(by_embeds.hidden_states) == model.config.num_hidden_layers + 1
    generated = model.generate(inputs_embeds=embeds, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, greedy(model, ids, new_tokens=4)[:, ids.shape[1]:])


def test_cache_batch_editing():
    model = make_model("gla_hybrid")
    ids = prompt(3, 5)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        assert cache.batch_size == 3
        cache.batch_select_indices(torch.tensor([2, 0]))
        step = model(ids[[2, 0], -1:], cache=cache).logits
        cache2 = model(ids, use_cache=True).cache
        cache2.reorder_cache(torch.tensor([2, 0, 1]))
        step2 = model(ids[[2, 0, 1], -1:], cache=cache2).logits
        cache3 = model(ids[:1], use_cache=True).cache
        cache3.batch_repeat_interleave(2)
        step3 = model(ids[[0, 0], -1:], cache=cache3).logits
    # batches of 2 and 3 rows: the CPU's matmul kernels may block them differently, so fp32 round-off, not exact
    # equality, between the two batch sizes
    torch.testing.assert_close(step, step2[:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step3[0], step3[1], atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="crop"):
        cache.crop(1)


# ---------------------------------------------------------------- save / load, training


def test_save_pretrained_from_pretrained_in_fresh_process(tmp_path):
    ids = prompt(2, 6)
    expected = {}
    for family in FAMILIES:
        model = make_model(family, seed=7, tie_word_embeddings=family == "gla")
        model.save_pretrained(tmp_path / family)
        with torch.no_grad():
            expected[family] = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import json, torch
import linattn_dsl.models
from transformers import AutoModelForCausalLM
ids = torch.load({str(tmp_path / 'ids.pt')!r})
for family in {FAMILIES!r}:
    model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + '/' + family).eval()
    with torch.no_grad():
        torch.save(model(ids).logits, {str(tmp_path)!r} + '/' + family + '.pt')
print(json.dumps("ok"))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == "ok"
    for family in FAMILIES:
        loaded = torch.load(tmp_path / f"{family}.pt")
        assert torch.equal(loaded, expected[family]), family


def test_tied_embeddings():
    model = make_model("gla", tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()
    untied = make_model("gla")
    assert untied.lm_head.weight.data_ptr() != untied.model.embeddings.weight.data_ptr()


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_loss_equals_plain_loss_and_gradients(family):
    model = make_model(family).train()
    ids = prompt(2, 12)
    labels = ids.clone()
    labels[0, :3] = -100
    grads = {}
    losses = {}
    for fused in (True, False):
        model.config.fuse_linear_cross_entropy = fused
        model.zero_grad()
        out = model(ids, labels=labels)
        assert (out.logits is None) == fused
        out.loss.backward()
        losses[fused] = out.loss.detach()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(losses[True], losses[False], atol=1e-5, rtol=1e-5)
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing_same_gradients(family):
    model = make_model(family).train()
    ids = prompt(2, 12)

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.model.layers)
    checkpointed = grads()
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, f"{name} gets no gradient"
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-6, msg=name)


class _TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int) -> None:
        self.ids = prompt(n, length, seed=11)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_trains_and_resumes(family, tmp_path):
    def run(output_dir, max_steps, resume=None):
        model = make_model(family, initializer_range=0.1).train()
        args = TrainingArguments(
            output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=1e-2, save_steps=2, logging_steps=1,
            report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=_TokenData(4, 12))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full", 4)  # every step sees the same 4 sequences: the loss must fall
    losses = [e["loss"] for e in full.state.log_history if "loss" in e]
    assert len(losses) == 4 and losses[-1] < losses[0]
    resumed = run(tmp_path / "full", 4, resume=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_under_bf16_autocast(family):
    """Mixed precision as a training loop runs it: bf16 autocast around fp32 parameters. The ops take one dtype
    for their per-token inputs, so each layer hands them over in one; the loss is finite and every parameter
    that takes part gets a finite gradient."""
    model = make_model(family).train()
    ids = prompt(2, 70)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- block layouts: mixer-only, LayerNorm, pre-norm

# name -> (family, config overrides): Mamba2 as in the paper and FLA (mixer-only blocks); RWKV7 as in RWKV-7 and
# FLA (LayerNorms and a pre-norm on the embeddings in layer 0), also with softmax attention at layer 0
LAYOUTS = {
    "mamba2_mixer_only": ("mamba2", dict(use_mlp=False)),
    "rwkv7_layer_norms": ("rwkv7", dict(norm_type="layer", pre_norm=True)),
    "rwkv7_hybrid_layer_norms": ("rwkv7_hybrid", dict(norm_type="layer", pre_norm=True)),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_block_layouts_generate_and_cache(name):
    family, overrides = LAYOUTS[name]
    model = make_model(family, **overrides)
    ids = prompt(2, 7)
    out = greedy(model, ids, new_tokens=6)
    with torch.no_grad():
        full = model(out, use_cache=False).logits
        # the prompt in one call, then one token per call with the returned cache
        first = model(out[:, :7], use_cache=True)
        steps, cache = [first.logits], first.cache
        for t in range(7, out.shape[1]):
            step = model(out[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(step.logits)
            cache = step.cache
    assert torch.equal(out[:, 7:], full[:, 6:-1].argmax(-1))
    assert len(set(out[:, 7:].flatten().tolist())) > 2
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=LOGIT_ATOL, rtol=0)


def test_block_layout_parameters():
    # defaults keep the state dict names of earlier checkpoints: RMSNorm weights, an MLP per block, no pre-norm
    for family in ("mamba2", "rwkv7"):
        names = set(make_model(family).state_dict())
        assert "model.layers.0.mlp_norm.weight" in names and "model.norm.weight" in names
        assert not any(".pre_norm." in n or n.endswith(("attn_norm.bias", "mlp_norm.bias")) for n in names), family
        assert "model.norm.bias" not in names
    mixer_only = make_model("mamba2", use_mlp=False)
    assert all(block.mlp is None and not hasattr(block, "mlp_norm") for block in mixer_only.model.layers)
    assert not any(".mlp" in n for n in mixer_only.state_dict())
    layer_norms = make_model("rwkv7", norm_type="layer", pre_norm=True)
    names = set(layer_norms.state_dict())
    for norm in ("layers.0.pre_norm", "layers.0.attn_norm", "layers.1.mlp_norm", "norm"):
        assert {f"model.{norm}.weight", f"model.{norm}.bias"} <= names, norm
    assert "model.layers.1.pre_norm.weight" not in names   # layer 0 only
    assert isinstance(layer_norms.model.norm, torch.nn.LayerNorm)
    assert layer_norms.model.norm.eps == layer_norms.config.norm_eps


def test_pre_norm_feeds_the_residual():
    # layer 0 sees pre_norm(embeddings) as its input and its residual: with the mixer's and the channel mix's output
    # projections zeroed (both add nothing), the hidden state after layer 0 is exactly the pre-normed embeddings
    model = make_model("rwkv7", norm_type="layer", pre_norm=True)
    block = model.model.layers[0]
    with torch.no_grad():
        block.mixer.o_proj.weight.zero_()
        block.mlp.value.weight.zero_()
        ids = prompt(1, 5)
        hidden = model.model(ids, output_hidden_states=True, use_cache=False).hidden_states
        torch.testing.assert_close(hidden[1], block.pre_norm(model.model.embeddings(ids)), atol=0, rtol=0)
        assert not torch.equal(hidden[0], hidden[1])


@pytest.mark.parametrize("family, field, value", [
    ("rwkv7", "norm_type", "batch"),
    ("gla", "norm_type", None),
    ("rwkv7", "pre_norm", 1),
    ("mamba2", "use_mlp", "no"),
])
def test_bad_block_layout_fields_raise(family, field, value):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        make_config(family, **{field: value})


def test_block_layout_fields_round_trip(tmp_path):
    model = make_model("mamba2", use_mlp=False)
    model.save_pretrained(tmp_path / "mamba2")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "mamba2").eval()
    assert again.config.use_mlp is False and again.model.layers[0].mlp is None
    config = make_config("rwkv7", norm_type="layer", pre_norm=True)
    assert type(config).from_dict(config.to_dict()).norm_type == "layer"
    assert type(config).from_dict(config.to_dict()).pre_norm is True
