"""Stand-ins for flash-attn's low-level functions, with their exact signatures, for a machine without
flash-attn or a GPU: torch's CPU flash-attention kernel (`aten::_scaled_dot_product_flash_attention_for_cpu`
and its backward, which also return and take the softmax's log-sum-exp) in flash-attn's [B, N, H, Dh]
layout. Calls count forwards and backwards, so a test sees whether a forward ran again."""

from __future__ import annotations

from collections import Counter

import torch

from lift_fast.models import attention

CALLS: Counter = Counter()


def _heads_first(*tensors):
    return [t.transpose(1, 2) for t in tensors]  # [B, N, H, Dh] <-> [B, H, N, Dh]


def _cpu_flash_forward(q, k, v, scale):
    CALLS["forward"] += 1
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*_heads_first(q, k, v), 0.0, False,
                                                                         scale=scale)
    return out.transpose(1, 2), lse


def _cpu_flash_backward(dout, q, k, v, out, lse, scale):
    CALLS["backward"] += 1
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *_heads_first(dout, q, k, v, out), lse, 0.0, False, scale=scale)
    return [g.transpose(1, 2) for g in grads]


# flash-attn 2.7+ declares these two as torch.library ops (called with keywords, dq/dk/dv mutated): so are the stand-ins
@torch.library.custom_op("flash_stand_ins::fa2_forward", mutates_args=())
def fa2_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float, causal: bool,
                window_size_left: int, window_size_right: int, softcap: float, alibi_slopes: torch.Tensor | None,
                return_softmax: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """flash_attn.flash_attn_interface._flash_attn_forward (2.7+): (out, softmax_lse, S_dmask, rng_state)."""
    assert q.shape[-1] % 8 == 0, "flash-attn 2 takes head dims that are multiples of 8"
    assert dropout_p == 0.0 and not causal and (window_size_left, window_size_right) == (-1, -1)
    out, lse = _cpu_flash_forward(q, k, v, softmax_scale)
    return out, lse, torch.empty(0), torch.empty(2, dtype=torch.int64)


@torch.library.custom_op("flash_stand_ins::fa2_backward", mutates_args=("dq", "dk", "dv"))
def fa2_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 softmax_lse: torch.Tensor, dq: torch.Tensor | None, dk: torch.Tensor | None, dv: torch.Tensor | None,
                 dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int, window_size_right: int,
                 softcap: float, alibi_slopes: torch.Tensor | None, deterministic: bool,
                 rng_state: torch.Tensor | None = None) -> torch.Tensor:
    """flash_attn.flash_attn_interface._flash_attn_backward (2.7+): writes dq, dk, dv; returns softmax_d."""
    assert q.shape[-1] % 8 == 0 and dq.shape == q.shape
    for target, grad in zip((dq, dk, dv), _cpu_flash_backward(dout, q, k, v, out, softmax_lse, softmax_scale),
                            strict=True):
        target.copy_(grad)
    return torch.empty(0)


def fa4_forward(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None, max_seqlen_q=None,
                max_seqlen_k=None, page_table=None, softmax_scale=None, causal=False, softcap=None,
                window_size_left=None, window_size_right=None, learnable_sink=None, return_lse=False, out=None,
                lse=None):
    """flash_attn.cute.interface._flash_attn_fwd (its leading arguments): (out, lse)."""
    assert return_lse and not causal
    return _cpu_flash_forward(q, k, v, softmax_scale)


def fa4_backward(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0):
    """flash_attn.cute.interface._flash_attn_bwd (its leading arguments): (dq, dk, dv)."""
    assert not causal
    return tuple(_cpu_flash_backward(dout, q, k, v, out, lse, softmax_scale))


KERNELS = {"flash-attn-2": attention.fa2_kernel(fa2_forward, fa2_backward),
           "flash-attn-4": attention.fa4_kernel(fa4_forward, fa4_backward)}
