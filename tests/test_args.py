"""Bad input to an op: a ValueError naming the argument, before anything runs."""

import pytest
import torch

from linattn_dsl import ops


def qkv(B=1, T=8, H=2, K=4, V=4):
    return torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)


@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
def test_bad_inputs(mode):
    op = getattr(ops, f"{mode}_gla")
    q, k, v = qkv()
    g = -torch.rand(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"^k: expected shape \[B, T, H, K\] = \[1, 8, 2, 4\], got \[1, 8, 2, 5\]"):
        op(q, torch.randn(1, 8, 2, 5), v, g)
    with pytest.raises(ValueError, match=r"^q: expected 4 dims"):
        op(q[0], k, v, g)
    with pytest.raises(ValueError, match=r"^v: expected a floating-point tensor"):
        op(q, k, v.long(), g)
    with pytest.raises(ValueError, match=r"^g: expected a torch.Tensor"):
        op(q, k, v, [1.0])
    with pytest.raises(ValueError, match=r"^cu_seqlens: packed sequences need batch size B == 1"):
        op(*qkv(B=2), -torch.rand(2, 8, 2, 4), cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match=r"^cu_seqlens: expected strictly increasing"):
        op(q, k, v, g, cu_seqlens=torch.tensor([0, 5, 3, 8]))
    with pytest.raises(ValueError, match=r"^cu_seqlens: expected strictly increasing offsets from 0 to T = 8"):
        op(q, k, v, g, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"^cu_seqlens: expected an integer"):
        op(q, k, v, g, cu_seqlens=torch.tensor([0.0, 8.0]))
    with pytest.raises(ValueError, match=r"^initial_state: expected shape \[N, H, K, V\] = \[1, 2, 4, 4\]"):
        op(q, k, v, g, initial_state=torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"^scale: expected a positive number"):
        op(q, k, v, g, scale=-1.0)
    with pytest.raises(ValueError, match=r"^output_final_state: expected True or False"):
        op(q, k, v, g, output_final_state="yes")


def test_devices_must_agree():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^k: is on meta but q is on cpu"):
        ops.chunk_retention(q, k.to("meta"), v)


def test_grouped_heads_must_divide():
    q, k, _ = qkv(H=3)
    v = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match="heads must divide"):
        ops.chunk_delta_rule(q, k, v, torch.rand(1, 8, 4))


def test_mamba2_keywords_and_switches():
    x, dt, A = torch.randn(1, 6, 4, 3), torch.randn(1, 6, 4), -torch.rand(4)
    Bm, C = torch.randn(1, 6, 2, 5), torch.randn(1, 6, 2, 5)
    o, s = ops.chunk_mamba2(x, dt, A, Bm, C, D=torch.ones(4), dt_bias=torch.zeros(4), dt_softplus=False,
                            output_final_state=True)
    assert o.shape == (1, 6, 4, 3) and s.shape == (1, 4, 5, 3) and s.dtype == torch.float32
    with pytest.raises(ValueError, match=r"^D: expected shape \[H\] = \[4\], got \[3\]"):
        ops.chunk_mamba2(x, dt, A, Bm, C, D=torch.ones(3))
    with pytest.raises(ValueError, match=r"^dt_softplus: expected True or False"):
        ops.chunk_mamba2(x, dt, A, Bm, C, dt_softplus=1)


def test_output_dtype_follows_v():
    q, k, v = qkv()
    o, s = ops.fused_recurrent_retention(q.double(), k.double(), v.double(), output_final_state=True)
    assert o.dtype == torch.float64 and s is not None
    o, s = ops.chunk_retention(q, k, v)
    assert o.dtype == torch.float32 and s is None


def test_head_dim_the_kernels_cannot_tile():
    q, k, v = qkv(K=320)
    with pytest.raises(ValueError, match=r"^q: head dim K = 320 exceeds 256"):
        ops.chunk_retention(q, k, v)


def test_dtype_policy_accepts_mixed_precision_parameters():
    # per-head parameters in fp32 beside bf16 activations, as mixed-precision training passes them
    x, dt, Bm, C = (t.bfloat16() for t in (torch.randn(1, 6, 4, 3), torch.randn(1, 6, 4), torch.randn(1, 6, 2, 5),
                                           torch.randn(1, 6, 2, 5)))
    o, s = ops.chunk_mamba2(x, dt, -torch.rand(4), Bm, C, D=torch.ones(4), dt_bias=torch.zeros(4),
                            initial_state=torch.zeros(1, 4, 5, 3), output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    q, k, v = (t.bfloat16() for t in qkv())
    g, beta = torch.randn(1, 8, 2, 4).bfloat16(), torch.rand(1, 8, 2).bfloat16()
    o, _ = ops.chunk_kda(q, k, v, g, beta, A_log=torch.zeros(2), dt_bias=torch.zeros(2, 4).bfloat16(),
                         use_gate_in_kernel=True, initial_state=torch.zeros(1, 2, 4, 4).bfloat16())
    assert o.dtype == torch.bfloat16
    # an fp32 initial state beside float64 inputs (the CPU computes float64)
    q, k, v = (t.double() for t in qkv())
    o, _ = ops.chunk_retention(q, k, v, initial_state=torch.zeros(1, 2, 4, 4))
    assert o.dtype == torch.float64


def test_optional_inputs_follow_the_switches():
    from linattn_dsl.compiler import registry

    kda = registry.load("kda")
    assert "A_log" not in kda.uses({"use_gate_in_kernel": False})
    assert {"A_log", "dt_bias", "g"} <= kda.uses({"use_gate_in_kernel": True})
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^A_log: passed, but kda does not use it with use_gate_in_kernel=False"):
        ops.chunk_kda(q, k, v, -torch.rand(1, 8, 2, 4), torch.rand(1, 8, 2), A_log=torch.zeros(2))
