"""The token-mixing layer of any spec, built from the plan ``linattn regen`` wrote into its generated module
(``LAYER``, from the spec file's layer declaration or the default derived from the spec:
:mod:`linattn_dsl.compiler.layer`).

    per op input:  proj  W x (full or low rank, bias) [-> short conv -> activation] -> transform * scale
                   param a learned tensor of the input's shape -> transform
                   normkey  kk = l2norm(W_kk x) per head; a = -kk, b = kk * sigmoid(W_b x)
    o, S = <spec op>(inputs..., initial_state=S)       (chunk to train or for long inputs, else fused_recurrent)
    out = W_o (rms_norm(o) * gate(W_g x))              (per head; the gate and the norm as declared)

Sizes: ``num_heads`` value heads H, ``num_qk_heads`` q/k heads (default H), key and value head dims
``hidden_size * expand_k / num_heads`` and ``hidden_size * expand_v / num_heads``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from linattn_dsl.modules import FusedRMSNormGated, RMSNorm, ShortConvolution, l2_norm

from ._checks import POSITIVE, POSITIVE_INT, check_all, head_dims
from ._utils import FUSED_RECURRENT_MAX_LEN, LowRank, MultiHeadLayer, check_mode, init_values, run_conv, state_of

_TRANSFORMS = {
    None: lambda x: x,
    "sigmoid": torch.sigmoid,
    "logsigmoid": F.logsigmoid,
    "softplus": F.softplus,
    "-softplus": lambda x: -F.softplus(x),
    "exp": torch.exp,
    "-exp": lambda x: -torch.exp(x),
    "silu": F.silu,
    "relu": F.relu,
    "elu+1": lambda x: F.elu(x) + 1.0,
    "tanh": torch.tanh,
    "l2norm": l2_norm,
}


class SpecLayer(MultiHeadLayer):
    """``[B, T, hidden] -> [B, T, hidden]`` through the op of a generated module ``module`` (its ``LAYER`` plan, see
    the module docstring)."""

    def __init__(self, module, hidden_size: int = 1024, num_heads: int = 4, expand_k: float = 0.5,
                 expand_v: float = 1.0, num_qk_heads: int | None = None, conv_size: int = 4, norm_eps: float = 1e-5,
                 mode: str | None = None) -> None:
        check_all({"hidden_size": POSITIVE_INT, "num_heads": POSITIVE_INT, "expand_k": POSITIVE,
                   "expand_v": POSITIVE, "conv_size": POSITIVE_INT, "norm_eps": POSITIVE}, locals())
        super().__init__()
        plan = module.LAYER
        self.plan = plan
        self.spec_name = module.SIGNATURE.name
        self._ops = {m: getattr(module, f"{m}_{self.spec_name}") for m in ("chunk", "fused_recurrent")}
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_qk_heads = num_heads if num_qk_heads is None else num_qk_heads
        if not isinstance(self.num_qk_heads, int) or self.num_qk_heads < 1 or num_heads % self.num_qk_heads:
            raise ValueError(f"num_qk_heads: expected None or a positive divisor of num_heads={num_heads}, got "
                             f"{num_qk_heads!r}")
        self.head_k_dim, self.head_v_dim = head_dims(hidden_size, num_heads, expand_k, expand_v)
        self.sizes = {"H": num_heads, "HQ": self.num_qk_heads, "K": self.head_k_dim, "V": self.head_v_dim}
        if module.SIGNATURE.head_dims["K"] == module.SIGNATURE.head_dims["V"]:   # one symbol: the same size
            self.sizes["V"] = self.head_v_dim = self.head_k_dim
        self.value_dim = num_heads * self.head_v_dim
        self.mode = check_mode(mode)
        self.proj, self.conv = nn.ModuleDict(), nn.ModuleDict()
        self.param = nn.ParameterDict()
        for name, src in plan["inputs"].items():
            shape = [self.sizes[d] for d in src["dims"] if d not in ("B", "T")]
            width = math.prod(shape)
            if src["kind"] == "param":
                self.param[name] = nn.Parameter(torch.zeros(shape))
            elif src["kind"] == "zeros":
                continue
            elif src["kind"] == "proj":
                self.proj[name] = (nn.Linear(hidden_size, width, bias=src["bias"]) if src["rank"] is None
                                   else LowRank(hidden_size, width, src["rank"], bias=src["bias"]))
                if src["conv"]:
                    act = None if src["activation"] == "identity" else src["activation"]
                    self.conv[name] = ShortConvolution(width, conv_size, activation=act)
            else:   # normkey: one shared kk projection, and b's gate
                if "kk" not in self.proj:
                    self.proj["kk"] = nn.Linear(hidden_size, width, bias=False)
                if src["sign"] > 0:
                    self.proj[name] = nn.Linear(hidden_size, width, bias=False)
        gate = plan["output_gate"]
        if gate is not None:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
            self.o_norm = FusedRMSNormGated(self.head_v_dim, eps=norm_eps, activation=gate)
        elif plan["output_norm"]:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        init_values(self)

    def special_init(self) -> dict:
        """The parameters' declared initialisers (zeros are the default): ones, normal(0, 0.02), log U(0.5, 4),
        Mamba's ``A_log`` (log U(1, 16)) and ``dt_bias`` (softplus^-1 of dt log-uniform in [0.001, 0.1], floored
        at 1e-4)."""
        out = {}
        for name, src in self.plan["inputs"].items():
            if src["kind"] != "param" or src["init"] == "zeros":
                continue
            p = self.param[name]
            if src["init"] == "ones":
                out[f"param.{name}"] = torch.ones_like(p)
            elif src["init"] == "normal":
                out[f"param.{name}"] = torch.randn_like(p) * 0.02
            elif src["init"] == "a_log":
                out[f"param.{name}"] = torch.empty_like(p).uniform_(1.0, 16.0).log()
            elif src["init"] == "dt_bias":
                dt = torch.exp(torch.rand_like(p) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
                dt = dt.clamp_min(1e-4)
                out[f"param.{name}"] = dt + torch.log(-torch.expm1(-dt))
            else:
                out[f"param.{name}"] = torch.empty_like(p).uniform_(0.5, 4.0).log()
        return out

    def _input(self, name: str, src: dict, x: torch.Tensor, cache, use_cache: bool, new_state: dict,
               kk: list, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        B, T = x.shape[:2]
        shape = [self.sizes[d] for d in src["dims"] if d not in ("B", "T")]
        if src["kind"] == "param":
            return _TRANSFORMS[src["transform"]](self.param[name])
        if src["kind"] == "zeros":   # an input no role reads under the layer's switches
            return x.new_zeros(B, T, *shape)
        if src["kind"] == "normkey":
            if not kk:
                kk.append(l2_norm(self.proj["kk"](x).reshape(B, T, *shape)))
            if src["sign"] < 0:
                return -kk[0]
            return kk[0] * torch.sigmoid(self.proj[name](x).reshape(B, T, *shape))
        y = self.proj[name](x)
        if name in self.conv:
            y = run_conv(self.conv[name], y, cache, name, use_cache, new_state, cu_seqlens)
        y = _TRANSFORMS[src["transform"]](y.reshape(B, T, *shape))
        return y * src["scale"] if src["scale"] != 1.0 else y

    def mix(self, x: torch.Tensor, attention_mask: torch.Tensor | None, cache: dict | None, use_cache: bool,
            cu_seqlens: torch.Tensor | None = None, **_) -> tuple[torch.Tensor, dict | None]:
        new_state: dict = {}
        kk: list = []
        inputs = {n: self._input(n, src, x, cache, use_cache, new_state, kk, cu_seqlens)
                  for n, src in self.plan["inputs"].items()}
        if self.plan["qk_l2norm"]:
            for n in {self.plan["query"], self.plan["key"]} - {None}:
                inputs[n] = l2_norm(inputs[n])
        mode = self.mode or ("fused_recurrent" if not self.training and x.shape[1] <= FUSED_RECURRENT_MAX_LEN
                             else "chunk")
        required = [inputs.get(n) for n in self.plan["required"]]
        optional = {n: t for n, t in inputs.items() if n not in self.plan["required"]}
        o, recurrent_state = self._ops[mode](*required, **optional, **self.plan["switches"],
                                             initial_state=state_of(cache, "recurrent_state"),
                                             output_final_state=use_cache, cu_seqlens=cu_seqlens)
        if self.plan["output_gate"] is not None:
            o = self.o_norm(o, self.g_proj(x).reshape(*o.shape))
        elif self.plan["output_norm"]:
            o = self.o_norm(o)
        out = self.o_proj(o.reshape(*o.shape[:-2], self.value_dim))
        return out, ({**new_state, "recurrent_state": recurrent_state} if use_cache else None)
