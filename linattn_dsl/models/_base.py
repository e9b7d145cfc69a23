"""What every family shares: the config base (with the hybrid ``attn`` field), the pre-norm block, the
backbone and the causal LM head. A family file only adds its config fields and its mixer.

Packed documents: ``forward(input_ids [1, T], cu_seqlens=[N + 1] offsets)`` runs ``N`` documents laid end to end
as separate sequences (FlashAttention's and FLA's convention): every layer restarts its state, convs, token
shifts and attention at each offset, default positions restart at 0 in each document, and with ``labels`` the
target of each document's last token (the next document's first token) is ignored. Packed documents are for
training and scoring: no padding mask, no cache (``use_cache`` defaults to False with them; True is an error).

Context parallelism: ``forward(input_ids [B, T_local], cp_context=ctx)`` (:func:`linattn_dsl.distributed.cp_context`)
runs this rank's contiguous slice of sequences split across the ranks of ``ctx``'s group (with ``ctx``'s global
``cu_seqlens``: of packed documents, ``B == 1``, which may cross rank boundaries); every layer passes the context on
(:mod:`linattn_dsl.layers._utils`) and default positions are global. ``labels`` are this rank's slice of the global
labels (the input ids, as without the split): the target of the rank's last token is the next rank's first label
(one exchanged token), and ``loss`` is this rank's share, the sum of its tokens' losses over the whole sequence's
count of targets (or over ``num_items_in_batch``), so the sum of the ranks' losses is the loss of the unsplit batch
and the sum of their gradients its gradient. For training and scoring: no cache, no padding.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from linattn_dsl import distributed
from linattn_dsl.layers import Attention
from linattn_dsl.layers._checks import (
    BOOL, NON_NEGATIVE, POSITIVE, POSITIVE_INT, POSITIVE_INT_OR_NONE, check_all, check_attention_mask, check_cp,
    check_cu_seqlens, check_hidden_states, check_input_ids, check_packed, check_position_ids, describe,
)
from linattn_dsl.layers._utils import GatedMLP, default_position_ids, document_positions
from linattn_dsl.modules import FusedLinearCrossEntropyLoss, RMSNorm, ShortConvolution

from .cache import LinAttnCache

ATTN_KEYS = ("layers", "num_heads", "num_kv_heads", "window_size", "rope_theta")
NORM_TYPES = ("rms", "layer")


def validate_attn(attn: dict | None, num_hidden_layers: int, hidden_size: int, num_heads: int) -> dict | None:
    """Fill the defaults of a hybrid ``attn`` config and check it; ``None`` means no attention layers."""
    if attn is None:
        return None
    if not isinstance(attn, dict):
        raise ValueError(f"attn: expected None or a dict with keys {ATTN_KEYS}, got {attn!r}")
    unknown = set(attn) - set(ATTN_KEYS)
    if unknown:
        raise ValueError(f"attn: unknown keys {sorted(unknown)}; expected a subset of {ATTN_KEYS}")
    layers = attn.get("layers")
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                        for i in layers):
        raise ValueError(f"attn.layers: expected a list of layer indices, got {layers!r}")
    bad = [i for i in layers if not 0 <= i < num_hidden_layers]
    if bad:
        raise ValueError(
            f"attn.layers: indices {bad} out of range; expected 0 <= index < num_hidden_layers={num_hidden_layers}"
        )
    repeated = sorted({i for i in layers if list(layers).count(i) > 1})
    if repeated:
        raise ValueError(f"attn.layers: layers {repeated} listed more than once (overlapping entries)")
    heads = attn.get("num_heads", num_heads)
    kv_heads = attn.get("num_kv_heads") or heads
    if not isinstance(heads, int) or heads < 1 or hidden_size % heads:
        raise ValueError(f"attn.num_heads: expected a positive divisor of hidden_size={hidden_size}, got {heads!r}")
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"attn.num_kv_heads: expected a positive divisor of attn.num_heads={heads}, got {kv_heads!r}")
    window = attn.get("window_size")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"attn.window_size: expected None or a positive int, got {window!r}")
    theta = attn.get("rope_theta", 10000.0)
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"attn.rope_theta: expected a positive number, got {theta!r}")
    return {"layers": sorted(layers), "num_heads": heads, "num_kv_heads": kv_heads, "window_size": window,
            "rope_theta": float(theta)}


def check_token_ids(config: PreTrainedConfig) -> None:
    """``pad_token_id``, ``bos_token_id``, ``eos_token_id`` (an id or a list of ids): None or in the vocabulary."""
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, name)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.vocab_size
                                         for i in ids):
            raise ValueError(f"{name}: expected None or a token id in [0, vocab_size={config.vocab_size}), "
                             f"got {value!r}")


class LinAttnConfig(PreTrainedConfig):
    """Fields every family shares (names as in HF and FLA configs).

    Checked at construction (and so by ``from_pretrained`` / ``from_dict``), each failure a ``ValueError``
    naming the field: every entry of ``field_rules`` of the class and its bases (a family adds its own),
    ``norm_type`` (one of :data:`NORM_TYPES`), then the family's cross-field sizes (:meth:`check_sizes`), the
    hybrid ``attn`` field and the token ids.
    """

    model_type: ClassVar[str] = ""
    field_rules: ClassVar[dict[str, str]] = {
        "vocab_size": POSITIVE_INT, "hidden_size": POSITIVE_INT, "num_hidden_layers": POSITIVE_INT,
        "num_heads": POSITIVE_INT, "intermediate_size": POSITIVE_INT_OR_NONE, "hidden_ratio": POSITIVE_INT,
        "norm_eps": POSITIVE, "initializer_range": NON_NEGATIVE, "tie_word_embeddings": BOOL, "use_cache": BOOL,
        "fuse_linear_cross_entropy": BOOL, "pre_norm": BOOL, "decode_cuda_graph": BOOL,
    }
    vocab_size: int = 32000
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_heads: int = 4
    intermediate_size: int | None = None
    hidden_ratio: int = 4
    norm_eps: float = 1e-6
    # the blocks' and the final norm: "rms" (RMSNorm, a weight) or "layer" (LayerNorm, a weight and a bias)
    norm_type: str = "rms"
    # an extra norm (of norm_type) on the embeddings' output inside layer 0, before its attn_norm; it also feeds
    # layer 0's residual (RWKV's ln0, FLA's norm_first)
    pre_norm: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    fuse_linear_cross_entropy: bool = True
    # on CUDA, decode one token at a time through a CUDA graph over fixed state buffers (models/decode.py)
    decode_cuda_graph: bool = True
    attn: dict | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        rules = {}
        for cls in reversed(type(self).__mro__):  # a family's rule for a field replaces the base's
            rules.update(cls.__dict__.get("field_rules", {}))
        check_all(rules, {name: getattr(self, name) for name in rules})
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type: expected one of {NORM_TYPES}, got {self.norm_type!r}")
        self.check_sizes()
        if self.intermediate_size is None:
            # SwiGLU's 2/3 of hidden_ratio * hidden, rounded up to a multiple of 256
            self.intermediate_size = 256 * math.ceil(int(self.hidden_size * self.hidden_ratio * 2 / 3) / 256)
        self.attn = validate_attn(self.attn, self.num_hidden_layers, self.hidden_size, self.num_heads)
        check_token_ids(self)
        super().__post_init__(**kwargs)

    def check_sizes(self) -> None:
        """A family's checks across fields (heads that must divide a width...), run after the per-field rules;
        it may fill derived fields (``num_heads=None`` in Mamba2)."""

    def is_attention_layer(self, layer_idx: int) -> bool:
        return self.attn is not None and layer_idx in self.attn["layers"]


class LayerNorm(nn.LayerNorm):
    """LayerNorm (weight and bias) called as :class:`~linattn_dsl.modules.RMSNorm` is: ``forward(x, residual=None,
    prenorm=False)`` normalises ``x + residual`` (summed in fp32) and, with ``prenorm``, also returns that sum (in
    residual's dtype; ``x`` when no residual is given). Statistics in fp32; the output has x's dtype."""

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        summed = x if residual is None else x.float() + residual.float()
        y = nn.functional.layer_norm(summed.float(), self.normalized_shape, self.weight.float(),
                                     None if self.bias is None else self.bias.float(), self.eps).to(x.dtype)
        if not prenorm:
            return y
        return y, (x if residual is None else summed.to(residual.dtype))


def block_norm(config: LinAttnConfig) -> nn.Module:
    """A norm of the blocks and the final one, of ``config.norm_type``."""
    if config.norm_type == "layer":
        return LayerNorm(config.hidden_size, eps=config.norm_eps)
    return RMSNorm(config.hidden_size, eps=config.norm_eps)


class LinAttnBlock(GradientCheckpointingLayer):
    """Pre-norm block: ``h = x + mixer(norm(x))``, ``out = h + mlp(norm(h))``.

    ``mixer`` and ``mlp`` both return ``(out, state dict or None)``; the block's state is their union
    (keys do not collide). ``v_first`` carries RWKV7's first-layer value to later layers. ``mlp=None``: a
    mixer-only block, ``out = x + mixer(norm(x))``. ``cu_seqlens`` (packed documents) and ``cp_context`` (a
    sequence split across ranks) reach both.
    ``pre_norm`` (layer 0 of a ``config.pre_norm`` model): ``x`` is replaced by ``pre_norm(x)`` first, so the
    residual stream starts from the normed embeddings. The norms are of ``config.norm_type``.
    """

    def __init__(self, config: LinAttnConfig, mixer: nn.Module, mlp: nn.Module | None, pre_norm: bool = False) -> None:
        super().__init__()
        self.pre_norm = block_norm(config) if pre_norm else None
        self.attn_norm = block_norm(config)
        self.mixer = mixer
        if mlp is not None:
            self.mlp_norm = block_norm(config)
        self.mlp = mlp

    def forward(
        self,
        hidden_states: torch.Tensor,
        v_first: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: dict | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cp_context=None,
    ) -> tuple[torch.Tensor, dict | None, torch.Tensor | None]:
        if self.pre_norm is not None:
            hidden_states = self.pre_norm(hidden_states)
        mixed = self.mixer(
            self.attn_norm(hidden_states), attention_mask=attention_mask, cache=cache, use_cache=use_cache,
            position_ids=position_ids, v_first=v_first, cu_seqlens=cu_seqlens, cp_context=cp_context,
        )
        if getattr(self.mixer, "returns_v_first", False):
            out, mixer_state, v_first = mixed
        else:
            out, mixer_state = mixed
        if self.mlp is None:
            return hidden_states + out, (mixer_state if use_cache else None), v_first
        normed, residual = self.mlp_norm(out, hidden_states, prenorm=True)
        out, mlp_state = self.mlp(normed, attention_mask=attention_mask, cache=cache, use_cache=use_cache,
                                  cu_seqlens=cu_seqlens, cp_context=cp_context)
        if not use_cache:
            return residual + out, None, v_first
        return residual + out, {**(mixer_state or {}), **(mlp_state or {})}, v_first


def next_token_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                       cp_context=None) -> torch.Tensor:
    """The target of each position with one, from ``labels [B, T]`` (the input ids): ``labels[:, 1:]``, ``[B, T - 1]``
    (the last position has none), with -100 where a packed document starts (its first token is not predicted from
    the document before). Under ``cp_context`` (this rank's slice of the labels): ``[B, T]``, the last position's
    target the next rank's first label (-100 on the last rank), document starts from the context's packing."""
    if cp_context is None:
        targets = labels[:, 1:]
        if cu_seqlens is not None:
            # labels[c_i] (a document's first token) is the target of the previous document's last token
            starts = cu_seqlens[1:-1].to(device=labels.device, dtype=torch.int64)
            targets = targets.index_fill(1, starts - 1, -100)
        return targets
    T = labels.shape[1]
    targets = torch.cat([labels[:, 1:], distributed.from_next(labels, cp_context, -100)], 1)
    if cp_context.cu_seqlens is not None:
        lo = cp_context.rank * T
        starts = [c - lo - 1 for c in cp_context.cu_seqlens[1:-1] if lo < c <= lo + T]
        if starts:
            targets = targets.index_fill(1, torch.tensor(starts, device=labels.device), -100)
    return targets


class LinAttnPreTrainedModel(PreTrainedModel):
    config_class = LinAttnConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["LinAttnBlock"]
    _skip_keys_device_placement: ClassVar[list[str]] = ["cache"]
    # transformers' get/set_input_embeddings find ``embeddings`` here or on ``model``; the output ones ``lm_head``
    _input_embed_layer = "embeddings"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, ShortConvolution):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)) or "RMSNorm" in type(module).__name__:
            if getattr(module, "weight", None) is not None:
                init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        # Parameters with a family-specific initialisation (decays, dt biases, token-shift mixes...).
        # Children are initialised first, so these override the generic Linear init above.
        if hasattr(module, "special_init"):
            for name, value in module.special_init().items():
                init.copy_(module.get_parameter(name), value)


class LinAttnModel(LinAttnPreTrainedModel):
    """Embeddings, ``num_hidden_layers`` blocks, final norm (of ``config.norm_type``). A family sets
    ``build_mixer`` (and may set ``build_mlp``): ``(config, layer_idx) -> nn.Module``; ``build_mlp`` may return
    None for mixer-only blocks."""

    build_mixer: ClassVar[Any] = None
    build_mlp: ClassVar[Any] = None

    def __init__(self, config: LinAttnConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            LinAttnBlock(config, self._mixer(config, i), self._mlp(config, i), pre_norm=config.pre_norm and i == 0)
            for i in range(config.num_hidden_layers)
        )
        self.norm = block_norm(config)
        self.post_init()

    def _mixer(self, config: LinAttnConfig, layer_idx: int) -> nn.Module:
        if config.is_attention_layer(layer_idx):
            attn = config.attn
            return Attention(config.hidden_size, attn["num_heads"], attn["num_kv_heads"], attn["window_size"],
                             attn["rope_theta"])
        return type(self).build_mixer(config, layer_idx)

    def _mlp(self, config: LinAttnConfig, layer_idx: int) -> nn.Module:
        if type(self).build_mlp is not None:
            return type(self).build_mlp(config, layer_idx)
        return GatedMLP(config.hidden_size, config.intermediate_size)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: LinAttnCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cp_context=None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """``input_ids [B, T]`` (or ``inputs_embeds [B, T, hidden]``); ``attention_mask [B, S]`` over the
        cached and new tokens (0 = left pad); ``cache`` from an earlier call continues the sequences.
        ``cu_seqlens [N + 1]`` (int32 / int64, with ``B == 1``): offsets of packed documents; ``cp_context``: this
        rank's slice of sequences split across ranks (module docstring)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids / inputs_embeds: expected exactly one of them")
        if input_ids is not None:
            check_input_ids(input_ids)
        if inputs_embeds is not None:
            check_hidden_states(inputs_embeds, self.config.hidden_size, "inputs_embeds")
        if cache is not None and not isinstance(cache, LinAttnCache):
            raise ValueError(f"cache: expected a LinAttnCache (or None), got {type(cache).__name__}")
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and cu_seqlens is None and cp_context is None
        batch, seq_len = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        check_cu_seqlens(cu_seqlens, batch, seq_len)
        check_packed(cu_seqlens, attention_mask, cache, use_cache)
        check_cp(cp_context, batch, seq_len, cu_seqlens, attention_mask, cache, use_cache)
        hidden_states = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None:
            static = self.config.decode_cuda_graph and hidden_states.device.type == "cuda"
            cache = LinAttnCache(len(self.layers), static=static)
        if cache is not None:
            cache.release_step()   # this call runs on the per-layer dicts
        past_len = cache.get_seq_length() if cache is not None else 0
        check_attention_mask(attention_mask, batch, seq_len, past_len)
        check_position_ids(position_ids, batch, seq_len)
        if attention_mask is not None and not torch.compiler.is_compiling() and bool(attention_mask.all()):
            attention_mask = None  # no padding: skip the masking work (a host sync; traced, the mask is kept)
        elif attention_mask is not None and attention_mask.shape[1] < past_len + seq_len:
            # a mask of the new tokens only: the cached ones were real tokens as far as it says
            missing = past_len + seq_len - attention_mask.shape[1]
            attention_mask = torch.cat([attention_mask.new_ones(batch, missing), attention_mask], dim=1)
        if position_ids is None and cp_context is not None:
            position_ids = distributed.positions(cp_context, batch, seq_len, hidden_states.device)
        elif position_ids is None and cu_seqlens is not None:
            position_ids = document_positions(cu_seqlens, seq_len)
        elif position_ids is None:
            position_ids = default_position_ids(batch, seq_len, past_len, attention_mask, hidden_states.device)

        all_hidden_states = () if output_hidden_states else None
        v_first = None
        for layer_idx, block in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, state, v_first = block(
                hidden_states, v_first, attention_mask=attention_mask,
                cache=cache[layer_idx] if cache is not None else None, use_cache=use_cache,
                position_ids=position_ids, cu_seqlens=cu_seqlens, cp_context=cp_context,
            )
            if use_cache:
                cache[layer_idx] = state
        if use_cache:
            cache.seen_tokens += seq_len
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        cache = cache if use_cache else None
        if not return_dict:
            return tuple(x for x in (hidden_states, cache, all_hidden_states) if x is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache,
                                       hidden_states=all_hidden_states)


class LinAttnForCausalLM(LinAttnPreTrainedModel, GenerationMixin):
    """``model`` + ``lm_head``. With ``labels`` while training (and ``fuse_linear_cross_entropy``),
    the loss comes from FusedLinearCrossEntropyLoss and no logits are built; otherwise logits and the
    plain cross entropy. A family sets ``model_class``; ``config_class`` is that model's."""

    model_class: ClassVar[type] = LinAttnModel
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embeddings.weight"}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.config_class = cls.model_class.config_class

    def __init__(self, config: LinAttnConfig) -> None:
        super().__init__(config)
        self.model = type(self).model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own LinAttnCache

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: LinAttnCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cp_context=None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """``labels [B, T]`` are the input ids (shifted inside; -100 ignored). ``logits_to_keep=n`` keeps
        the logits of the last ``n`` positions only (0: all). ``num_items_in_batch`` (HF Trainer, gradient
        accumulation): the loss is summed and divided by it. ``cu_seqlens``: packed documents (module docstring);
        the loss then leaves out the targets that cross a document boundary. ``cp_context``: this rank's slice of
        split sequences; ``labels`` its slice of the labels and ``loss`` its share (module docstring)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        inputs = input_ids if input_ids is not None else inputs_embeds
        if labels is not None and isinstance(inputs, torch.Tensor) and \
                (not isinstance(labels, torch.Tensor) or labels.shape != inputs.shape[:2]):
            raise ValueError(f"labels: expected the shape of the input ids, {list(inputs.shape[:2])}, "
                             f"got {describe(labels)}")
        if self._static_step_applies(cache, input_ids, inputs_embeds, labels, use_cache, output_hidden_states,
                                     cu_seqlens, cp_context):
            logits = self._static_step(cache, input_ids, attention_mask, position_ids)
            if not return_dict:
                return logits, cache
            return CausalLMOutputWithPast(logits=logits, cache=cache)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, cache=cache, inputs_embeds=inputs_embeds,
            use_cache=use_cache, position_ids=position_ids, output_hidden_states=output_hidden_states,
            return_dict=True, cu_seqlens=cu_seqlens, cp_context=cp_context,
        )
        hidden_states = outputs.last_hidden_state
        targets = None if labels is None else next_token_targets(labels, cu_seqlens, cp_context)
        # the positions with a target: every one but the last (the last rank's last, under a split)
        scored = targets.shape[1] if targets is not None else 0
        # a split's mean divides by the whole sequence's count of targets, summed over the group
        reduction = "mean" if num_items_in_batch is None and cp_context is None else "sum"
        loss, logits = None, None
        fused = labels is not None and self.training and self.config.fuse_linear_cross_entropy
        if fused:
            loss_fn = FusedLinearCrossEntropyLoss(reduction=reduction)
            loss = loss_fn(hidden_states[:, :scored], targets.to(hidden_states.device), self.lm_head.weight)
        else:
            keep = logits_to_keep if labels is None else 0  # the loss needs every position
            logits = self.lm_head(hidden_states[:, -keep:] if keep else hidden_states)
            if labels is not None:
                loss = nn.functional.cross_entropy(
                    logits[:, :scored].flatten(0, 1).float(), targets.flatten().to(logits.device),
                    ignore_index=-100, reduction=reduction,
                )
        if loss is not None and num_items_in_batch is not None:
            loss = loss / num_items_in_batch
        elif loss is not None and cp_context is not None:
            loss = loss / distributed.group_sum((targets != -100).sum(), cp_context).to(loss.device)
        if not return_dict:
            out = (logits, outputs.cache, outputs.hidden_states)
            out = tuple(x for x in out if x is not None)
            return ((loss,) + out) if loss is not None else out
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states)

    def _static_step_applies(self, cache, input_ids, inputs_embeds, labels, use_cache, output_hidden_states,
                             cu_seqlens, cp_context) -> bool:
        """Whether a call is a one-token decoding step of a static cache after its prompt, with no gradient."""
        return (isinstance(cache, LinAttnCache) and cache.static and cache.seen_tokens > 0
                and inputs_embeds is None and isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2
                and input_ids.shape[1] == 1 and labels is None and use_cache is not False and not output_hidden_states
                and cu_seqlens is None and cp_context is None and not self.training and not torch.is_grad_enabled())

    def _static_step(self, cache: LinAttnCache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[B, 1, vocab]`` of one new token through the cache's static step (built, and on CUDA captured,
        at the first such call, again when the batch or the attention buffers' capacity changes; without attention
        layers an earlier cache's step of the same shapes is reused: models.decode.step_for)."""
        from .decode import step_for

        check_input_ids(input_ids)
        seen, batch = cache.seen_tokens, input_ids.shape[0]
        check_attention_mask(attention_mask, batch, 1, seen)
        check_position_ids(position_ids, batch, 1)
        if cache.step is not None and not cache.step.fits(seen):
            cache.release_step()
        if cache.batch_size != batch:
            raise ValueError(f"input_ids: batch size {batch}, but the cache holds {cache.batch_size} rows")
        if cache.step is None:
            cache.step = step_for(self, cache, graphs=input_ids.device.type == "cuda")
        logits = cache.step(input_ids, seen, attention_mask, position_ids)
        cache.seen_tokens += 1
        return logits
