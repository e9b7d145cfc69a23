"""RWKV-7 "Goose" (Peng et al., 2025): time mixing with a diagonal-plus-low-rank transition, and its
channel-mixing feed-forward.

Time mixing, with the token shift ``x_prev`` (the previous token's input) and ``mix_c = x + (x_prev - x) * x_c``:

    r, k, v = W_r mix_r, W_k mix_k, W_v mix_v
    log_decay = -exp(-0.5) * sigmoid(lora_w(mix_w))            (per key channel)
    v       = v + (v_first - v) * sigmoid(lora_v(mix_v))      (value residual; layer 0 sets v_first = v)
    a_rate  = sigmoid(lora_a(mix_a)),   g = lora_g(mix_g)       (in-context rate, output gate)
    kk      = l2norm(k * k_k),   k = k * (1 + (a_rate - 1) * k_a)
    S_t = diag(exp(log_decay_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T,  a = -kk, b = kk * a_rate
    o_t = S_t^T r_t
    out = W_o ((group_norm_per_head(o) + (r * k * r_k).sum() * v) * g)

Channel mixing:  ``out = W_value relu(W_key mix_k)^2``.
"""

from __future__ import annotations

import torch
from torch import nn

from linattn_dsl.modules import l2_norm, sqrelu_linear

from ._checks import NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, POSITIVE_INT_OR_NONE, check, check_all
from linattn_dsl import distributed

from ._utils import LowRank, SequenceLayer, check_mode, init_values, pick_op, split_heads, state_of

LOG_DECAY_SCALE = 0.6065306597126334  # exp(-0.5): the largest per-step log-decay magnitude


def token_shift(x: torch.Tensor, previous: torch.Tensor | None,
                cu_seqlens: torch.Tensor | None = None, cp_context=None) -> torch.Tensor:
    """``x [B, T, D]`` shifted one step right: row ``t`` holds ``x[t - 1]`` (``previous [B, D]`` or 0 at t = 0).
    With ``cu_seqlens [N + 1]`` (``B == 1``) the first token of each later packed document sees 0. With
    ``cp_context`` (this rank's slice of a split sequence) ``previous`` is the previous rank's last token, or 0 where
    a sequence starts here (:func:`linattn_dsl.distributed.past`), and the context's packing gives ``cu_seqlens``."""
    if cp_context is not None:
        previous = distributed.past(x, 1, cp_context)[:, 0]
        cu_seqlens = distributed.local_cu_seqlens(cp_context, x.shape[1], x.device)
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if previous is None else previous[:, None].to(x.dtype)
    shifted = torch.cat([first, x[:, :-1]], dim=1)
    if cu_seqlens is not None and len(cu_seqlens) > 2:
        shifted = shifted.index_fill(1, cu_seqlens[1:-1].to(torch.int64), 0.0)
    return shifted


def rwkv7_num_heads(hidden_size: int, head_dim: int) -> int:
    if hidden_size % head_dim:
        raise ValueError(f"head_dim: expected a divisor of hidden_size={hidden_size}, got {head_dim}")
    return hidden_size // head_dim


class RWKV7Attention(SequenceLayer):
    """RWKV7 time mixing, ``[B, T, hidden] -> [B, T, hidden]``.

    ``forward`` also takes and returns ``v_first [B, T, value_dim]``, the first layer's values
    (``first_layer=True`` produces them, later layers read them).
    """

    returns_v_first = True

    def __init__(
        self,
        hidden_size: int = 1024,
        head_dim: int = 64,
        decay_low_rank_dim: int = 64,
        gate_low_rank_dim: int = 128,
        a_low_rank_dim: int = 64,
        v_low_rank_dim: int = 16,
        first_layer: bool = True,
        layer_idx: int = 0,
        num_hidden_layers: int = 1,
        norm_eps: float = 1e-5,
        mode: str | None = None,
    ) -> None:
        check_all({"hidden_size": POSITIVE_INT, "head_dim": POSITIVE_INT, "decay_low_rank_dim": POSITIVE_INT,
                   "gate_low_rank_dim": POSITIVE_INT, "a_low_rank_dim": POSITIVE_INT, "v_low_rank_dim": POSITIVE_INT,
                   "num_hidden_layers": POSITIVE_INT, "norm_eps": POSITIVE}, locals())
        if not 0 <= check("layer_idx", layer_idx, NON_NEGATIVE_INT) < num_hidden_layers:
            raise ValueError(f"layer_idx: expected 0 <= layer_idx < num_hidden_layers={num_hidden_layers}, "
                             f"got {layer_idx}")
        super().__init__()
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        self.num_heads = rwkv7_num_heads(hidden_size, head_dim)
        self.key_dim = self.value_dim = hidden_size
        self.first_layer = first_layer
        self.depth_ratio = layer_idx / (num_hidden_layers - 1) if num_hidden_layers > 1 else 0.0
        self.mode = check_mode(mode)

        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, nn.Parameter(torch.empty(hidden_size)))
        self.k_k = nn.Parameter(torch.empty(self.key_dim))
        self.k_a = nn.Parameter(torch.empty(self.key_dim))
        self.r_k = nn.Parameter(torch.empty(self.num_heads, head_dim))
        self.r_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.w_lora = LowRank(hidden_size, self.key_dim, decay_low_rank_dim, activation="tanh")
        if not first_layer:
            self.v_lora = LowRank(hidden_size, self.value_dim, v_low_rank_dim)
        self.a_lora = LowRank(hidden_size, self.key_dim, a_low_rank_dim)
        self.g_lora = LowRank(hidden_size, self.value_dim, gate_low_rank_dim, activation="sigmoid", bias=False)
        self.g_norm = nn.GroupNorm(self.num_heads, self.value_dim, eps=head_dim * norm_eps, affine=True)
        init_values(self)

    def special_init(self) -> dict[str, torch.Tensor]:
        """RWKV7's depth-dependent token-shift mixes and decay speeds; ``k_k = 0.85``, ``k_a = 1``."""
        device = self.x_r.device
        depth = 1.0 - self.depth_ratio  # 1 at the first layer, towards 0 at the last
        ramp = torch.arange(self.hidden_size, device=device, dtype=torch.float32) / self.hidden_size
        channel = torch.arange(self.key_dim, device=device, dtype=torch.float32) / max(1, self.key_dim - 1)
        values = {
            "x_r": 1 - ramp ** (0.2 * depth), "x_w": 1 - ramp ** (0.9 * depth), "x_k": 1 - ramp ** (0.7 * depth),
            "x_v": 1 - ramp ** (0.7 * depth), "x_a": 1 - ramp ** (0.9 * depth), "x_g": 1 - ramp ** (0.2 * depth),
            "k_k": torch.full((self.key_dim,), 0.85, device=device),
            "k_a": torch.ones(self.key_dim, device=device),
            "r_k": torch.full((self.num_heads, self.head_dim), -0.04, device=device),
        }
        # decay speeds from fast (channel 0) to slow, then +0.5 as in RWKV7's w0
        values["w_lora.up.bias"] = -6 + 6 * channel ** (1 + (1 - depth) ** 0.3) + 0.5
        values["a_lora.up.bias"] = torch.zeros(self.key_dim, device=device)
        if not self.first_layer:
            values["v_lora.up.bias"] = torch.ones(self.value_dim, device=device)
        return values

    def mix(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: dict | None, use_cache: bool,
        v_first: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, cp_context=None, **_,
    ) -> tuple[torch.Tensor, dict | None, torch.Tensor]:
        delta = token_shift(x, state_of(cache, "shift_state"), cu_seqlens, cp_context) - x
        mix_r, mix_w, mix_k, mix_v, mix_a, mix_g = (
            x + delta * mix for mix in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)
        )
        r = self.r_proj(mix_r)
        log_decay = -LOG_DECAY_SCALE * torch.sigmoid(self.w_lora(mix_w))
        k = self.k_proj(mix_k)
        v = self.v_proj(mix_v)
        if self.first_layer:
            v_first = v
        else:
            if v_first is None:
                raise ValueError("v_first: a layer with first_layer=False needs the first layer's values")
            v = v + (v_first - v) * torch.sigmoid(self.v_lora(mix_v))
        a_rate = torch.sigmoid(self.a_lora(mix_a))
        g = self.g_lora(mix_g)
        kk = l2_norm(split_heads(k * self.k_k, self.head_dim))
        k = k * (1 + (a_rate - 1) * self.k_a)

        r, k, v, a_rate = (split_heads(t, self.head_dim) for t in (r, k, v, a_rate))
        rwkv7 = pick_op("rwkv7", x.shape[1], self.training, self.mode, cp_context)
        # the op takes its per-token inputs in one dtype: under autocast the projections give half while the
        # products with fp32 parameters (k_a, the value mix, kk * a_rate) give fp32
        r, log_decay, k, v, kk, a_rate = (t.to(r.dtype) for t in (r, log_decay, k, v, kk, a_rate))
        o, recurrent_state = rwkv7(
            r, split_heads(log_decay, self.head_dim), k, v, -kk, kk * a_rate,
            initial_state=state_of(cache, "recurrent_state"), output_final_state=use_cache, cu_seqlens=cu_seqlens,
            cp_context=cp_context,
        )
        o = self.g_norm(o.reshape(-1, self.value_dim)).reshape(o.shape)
        bonus = (r * k * self.r_k).sum(-1, keepdim=True) * v
        out = self.o_proj(((o + bonus).flatten(-2)) * g)
        if not use_cache:
            return out, None, v_first
        return out, {"recurrent_state": recurrent_state, "shift_state": x[:, -1]}, v_first


class RWKV7FeedForward(SequenceLayer):
    """RWKV7 channel mixing: ``W_value relu(W_key (x + (x_prev - x) * x_k))^2``; state ``ffn_shift_state``."""

    def __init__(self, hidden_size: int = 1024, intermediate_size: int | None = None) -> None:
        check_all({"hidden_size": POSITIVE_INT, "intermediate_size": POSITIVE_INT_OR_NONE}, locals())
        super().__init__()
        intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        self.hidden_size = hidden_size
        self.x_k = nn.Parameter(torch.empty(hidden_size))
        self.key = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.value = nn.Linear(intermediate_size, hidden_size, bias=False)
        init_values(self)

    def special_init(self) -> dict[str, torch.Tensor]:
        ramp = torch.arange(self.hidden_size, device=self.x_k.device, dtype=torch.float32) / self.hidden_size
        return {"x_k": 1 - ramp**4}

    def mix(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: dict | None, use_cache: bool,
        cu_seqlens: torch.Tensor | None = None, cp_context=None, **_,
    ) -> tuple[torch.Tensor, dict | None]:
        mix_k = x + (token_shift(x, state_of(cache, "ffn_shift_state"), cu_seqlens, cp_context) - x) * self.x_k
        # relu(.)^2 recomputed in the backward: the key projection's output is the only [tokens, intermediate] tensor
        # kept (eager autograd keeps relu's output and the square too)
        out = sqrelu_linear(self.key(mix_k), self.value.weight)
        return out, ({"ffn_shift_state": x[:, -1]} if use_cache else None)
