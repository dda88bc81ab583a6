"""Multi-head self-attention of the ViT, with a choice of kernels (`model.attention`).

    x [B, N, W] -> qkv [B, N, 3, heads, W/heads] -> attention -> [B, N, heads, W/heads] -> proj -> [B, N, W]

Backends:
- `flash`: flash-attn. FlashAttention-4 (`flash_attn.cute.interface`, the `flash-attn-4` package) on
  compute capability 9.x-11.x (Hopper, Blackwell) where it imports; otherwise FlashAttention-2
  (`flash_attn.flash_attn_interface`, >= 2.7, compute capability 8.0+), which reads q, k and v as views
  of the packed qkv the projection lays out, with no copy. Their low-level forward (returning out and
  the softmax log-sum-exp) and backward run behind two torch.library custom ops, eager and compiled
  alike, so the backward uses the saved out and lse and never runs the forward again. Needs CUDA
  tensors in float16 or bfloat16 (bf16 autocast). Asking for it where it cannot run is a ConfigError
  that says why.
- `sdpa`: torch's scaled_dot_product_attention (its own flash/memory-efficient kernels on CUDA).
- `math`: softmax(q k^T / sqrt(d)) v written out; the plain reference, and the one whose matmuls
  torch.utils.flop_counter counts on CPU (it counts nothing for CPU SDPA).
- `auto`: flash where it is installed and the tensors fit it (CUDA, half precision), else sdpa; the
  choice is logged once per device and dtype.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lift_fast.config import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flash", "sdpa", "math")
FLASH_DTYPES = (torch.float16, torch.bfloat16)
# compute capability majors each flash-attn generation runs on (FA4: Hopper and Blackwell; FA2: Ampere+)
FA4_MAJORS = (9, 10, 11)
FA2_MIN_MAJOR = 8
# flash-attn 2.7 made _flash_attn_forward/_backward torch ops with window_size_left/right, as fa2_kernel calls them
FA2_MIN_VERSION = (2, 7)
# the flash kernels resolve_backend has chosen, by name: a plain dict that the custom ops read
# without going back through the import machinery
_CHOSEN_KERNELS: dict[str, FlashKernel] = {}


@dataclass(frozen=True)
class FlashKernel:
    """One flash-attn generation's forward and backward kernels, without autograd of their own.

    forward(q, k, v) -> (out [B, N, H, Dh], lse [B, H, N] float32, each row's softmax log-sum-exp);
    backward(grad_out, q, k, v, out, lse, grads) writes dq, dk, dv into `grads` (three [B, N, H, Dh]
    views of one packed gradient). q, k, v [B, N, H, Dh] are views of the packed qkv (last dim
    contiguous), the scale is Dh ** -0.5, nothing is masked. Saving out and lse is what lets the
    backward run without the forward again (flash-attn's own autograd.Functions save the same).
    """

    forward: Callable
    backward: Callable


def _pad_head_dim(tensor: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last dim to a multiple of 8, as flash-attn 2's kernels need (its Python API does the same)."""
    return F.pad(tensor, (0, -tensor.shape[-1] % 8)) if tensor.shape[-1] % 8 else tensor


def fa2_kernel(forward_op: Callable, backward_op: Callable) -> FlashKernel:
    """flash-attn 2's low-level ops (`flash_attn.flash_attn_interface._flash_attn_forward` and
    `_flash_attn_backward`, the `flashattn::` torch ops of flash-attn >= 2.7) as a FlashKernel."""
    options = dict(dropout_p=0.0, causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0,
                   alibi_slopes=None)

    def forward(q, k, v):
        head_dim = q.shape[-1]
        out, lse, _, _ = forward_op(*map(_pad_head_dim, (q, k, v)), softmax_scale=head_dim ** -0.5,
                                    return_softmax=False, **options)
        return out[..., :head_dim], lse

    def backward(grad_out, q, k, v, out, lse, grads):
        head_dim = q.shape[-1]
        padded = [_pad_head_dim(t) for t in (grad_out, q, k, v, out)]  # out's padding is zeros, as the kernel's was
        targets = list(grads) if not head_dim % 8 else [torch.empty_like(t) for t in padded[1:4]]
        backward_op(*padded, lse, *targets, softmax_scale=head_dim ** -0.5, deterministic=False, rng_state=None,
                    **options)
        if head_dim % 8:
            for grad, target in zip(grads, targets, strict=True):
                grad.copy_(target[..., :head_dim])

    return FlashKernel(forward, backward)


def fa4_kernel(forward_fn: Callable, backward_fn: Callable) -> FlashKernel:
    """FlashAttention-4's `flash_attn.cute.interface._flash_attn_fwd` (return_lse=True) and
    `_flash_attn_bwd` as a FlashKernel."""

    def forward(q, k, v):
        return forward_fn(q, k, v, softmax_scale=q.shape[-1] ** -0.5, causal=False, return_lse=True)

    def backward(grad_out, q, k, v, out, lse, grads):
        computed = backward_fn(q, k, v, out, grad_out, lse, softmax_scale=q.shape[-1] ** -0.5, causal=False)
        for grad, value in zip(grads, computed, strict=True):
            grad.copy_(value)

    return FlashKernel(forward, backward)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The lse's dtype: float32 for the half-precision inputs the kernels take (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _reference_forward(q, k, v):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, Dh]
    scores = (q @ k.transpose(-2, -1)).to(_lse_dtype(q.dtype)) * q.shape[-1] ** -0.5  # [B, H, N, N]
    lse = scores.logsumexp(dim=-1)  # [B, H, N]
    out = (scores - lse.unsqueeze(-1)).exp().to(v.dtype) @ v
    return out.transpose(1, 2), lse


def _reference_backward(grad_out, q, k, v, out, lse, grads):
    scale = q.shape[-1] ** -0.5
    q, k, v, out, grad_out = (t.transpose(1, 2) for t in (q, k, v, out, grad_out))  # [B, H, N, Dh]
    probs = ((q @ k.transpose(-2, -1)).to(lse.dtype) * scale - lse.unsqueeze(-1)).exp()  # P, from the saved lse
    grad_probs = (grad_out @ v.transpose(-2, -1)).to(lse.dtype)  # dP = dO V^T
    row_dot = (grad_out.to(lse.dtype) * out.to(lse.dtype)).sum(-1, keepdim=True)  # D = rowsum(dO O) = rowsum(P dP)
    grad_scores = (probs * (grad_probs - row_dot)).to(q.dtype)  # dS = P (dP - D)
    computed = (grad_scores @ k * scale, grad_scores.transpose(-2, -1) @ q * scale,
                probs.to(v.dtype).transpose(-2, -1) @ grad_out)  # dQ, dK, dV
    for grad, value in zip(grads, computed, strict=True):
        grad.copy_(value.transpose(1, 2))


# The flash contract written out in plain torch (the backward takes the softmax from the saved lse,
# as the kernels do): the CPU stand-in that tests put where the chosen kernel goes.
REFERENCE_KERNEL = FlashKernel(_reference_forward, _reference_backward)


@functools.cache
def flash_kernels() -> tuple[dict[str, FlashKernel], str]:
    """The flash-attn kernels that import here, as {name: FlashKernel}, and why the others do not
    (one line, empty when both import). Imported on first use: flash_attn.cute pulls in the CuTe
    DSL, which takes seconds."""
    kernels: dict[str, FlashKernel] = {}
    missing = []
    try:
        from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
    except Exception as err:  # noqa: BLE001 - a broken install (CUDA/ABI mismatch) raises more than ImportError
        missing.append(f"flash-attn-4 (flash_attn.cute): {type(err).__name__}: {err}")
    else:
        kernels["flash-attn-4"] = fa4_kernel(_flash_attn_fwd, _flash_attn_bwd)
    try:
        import flash_attn
        from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward
    except Exception as err:  # noqa: BLE001
        missing.append(f"flash-attn 2 (flash_attn.flash_attn_interface): {type(err).__name__}: {err}")
    else:
        # the version, not the signature: from 2.7 these are torch.library ops, whose signature is (*args, **kwargs)
        if tuple(int(part) for part in re.findall(r"\d+", flash_attn.__version__)[:2]) >= FA2_MIN_VERSION:
            kernels["flash-attn-2"] = fa2_kernel(_flash_attn_forward, _flash_attn_backward)
        else:  # before 2.7 the low-level functions took other arguments
            missing.append(f"flash-attn {flash_attn.__version__} is older than 2.7, whose low-level forward and "
                           "backward this calls (pip install 'flash-attn>=2.7')")
    return kernels, "; ".join(missing)


def flash_import_error() -> str | None:
    """Why no flash-attn kernel can be used on this install (one line), or None when one imports."""
    kernels, missing = flash_kernels()
    return None if kernels else f"flash-attn does not import ({missing})"


def _flash_kernel_for(device: torch.device, dtype: torch.dtype) -> tuple[str | None, str]:
    """(kernel name, "") when a flash-attn kernel runs on tensors of this device and dtype, else (None, why)."""
    if (reason := flash_import_error()) is not None:
        return None, reason
    if device.type != "cuda" or dtype not in FLASH_DTYPES:
        return None, (f"flash-attn needs CUDA tensors in float16 or bfloat16, and these are "
                      f"{device.type} {str(dtype).removeprefix('torch.')} (train with bf16 autocast on a GPU)")
    kernels, _ = flash_kernels()
    major, minor = torch.cuda.get_device_capability(device)
    if "flash-attn-4" in kernels and major in FA4_MAJORS:
        return "flash-attn-4", ""
    if "flash-attn-2" in kernels and major >= FA2_MIN_MAJOR:
        return "flash-attn-2", ""
    return None, (f"the GPU's compute capability {major}.{minor} is one no installed flash-attn supports "
                  f"(installed: {', '.join(kernels)}; FA2 needs 8.0+, FA4 9.x-11.x)")


# The flash kernels as a pair of torch.library custom ops, called eagerly and under torch.compile
# alike: the forward returns out and lse, autograd saves qkv, out and lse, and the backward op runs
# the kernel's backward on them. torch.compile traces the ops through their fakes (flash-attn's
# Python and CuTe code does not trace), and its partitioners save a custom op's outputs rather than
# recompute it: one attention forward per block and step, compiled or not. The ops call the kernel
# resolve_backend chose, by name.
@torch.library.custom_op("lift_fast::flash_attention", mutates_args=())
def flash_attention(qkv: torch.Tensor, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn kernel `kernel` on qkv [B, N, 3, H, Dh] -> (out [B, N, H, Dh], lse [B, H, N] float32)."""
    out, lse = _CHOSEN_KERNELS[kernel].forward(*qkv.unbind(2))
    return out.contiguous(), lse.contiguous()


@flash_attention.register_fake
def _flash_attention_fake(qkv: torch.Tensor, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch, tokens, _, heads, head_dim = qkv.shape
    return qkv.new_empty(batch, tokens, heads, head_dim), qkv.new_empty(batch, heads, tokens, dtype=_lse_dtype(qkv.dtype))


@torch.library.custom_op("lift_fast::flash_attention_backward", mutates_args=())
def flash_attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                             kernel: str) -> torch.Tensor:
    """The gradient of `flash_attention` for qkv [B, N, 3, H, Dh], given grad_out [B, N, H, Dh] and the
    forward's out [B, N, H, Dh] and lse [B, H, N]: the kernel's backward, with no forward run again."""
    grad_qkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    _CHOSEN_KERNELS[kernel].backward(grad_out, *qkv.unbind(2), out, lse, grad_qkv.unbind(2))
    return grad_qkv


@flash_attention_backward.register_fake
def _flash_attention_backward_fake(grad_out, qkv, out, lse, kernel: str) -> torch.Tensor:
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _flash_setup_context(ctx, inputs, output) -> None:
    qkv, kernel = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)  # out is also the proj Linear's saved input: the same storage
    ctx.mark_non_differentiable(lse)
    ctx.kernel = kernel


def _flash_backward(ctx, grad_out, grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return flash_attention_backward(grad_out.contiguous(), qkv, out, lse, ctx.kernel), None


flash_attention.register_autograd(_flash_backward, setup_context=_flash_setup_context)


def run_flash(kernel: str, qkv: torch.Tensor) -> torch.Tensor:
    """The flash kernel `kernel` on qkv [B, N, 3, H, Dh] -> [B, N, H, Dh], through the custom ops."""
    return flash_attention(qkv, kernel)[0]


@torch.compiler.assume_constant_result  # torch.compile: run once while tracing, a constant in the graph
def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel that `model.attention=requested` runs for qkv on `device` in `dtype`: one of
    'flash-attn-4', 'flash-attn-2', 'sdpa', 'math'. `auto` logs its choice (once per device and dtype).

    Raises ConfigError naming model.attention when `flash` is asked for and cannot run, saying why.
    """
    return _resolve_backend(requested, device, dtype)


@functools.cache
def _resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    if requested in ("sdpa", "math"):
        return requested
    if requested not in ("flash", "auto"):
        raise ConfigError(f"model.attention={requested!r} is not one of {', '.join(BACKENDS)}")
    kernel, why_not = _flash_kernel_for(device, dtype)
    if kernel is not None:
        _CHOSEN_KERNELS[kernel] = flash_kernels()[0][kernel]
        if requested == "auto":
            log.info("model.attention=auto: %s for %s %s (out and lse saved for the backward, compiled or not; "
                     "model.attention=sdpa for torch's own kernels)", kernel, device, str(dtype).removeprefix("torch."))
        return kernel
    if requested == "flash":
        raise ConfigError(f"model.attention=flash cannot run: {why_not}. Install the GPU extra "
                          "(pip install 'lift-fast[gpu]') and train on a GPU in bf16, or use model.attention=auto "
                          "(sdpa where flash cannot run)")
    log.info("model.attention=auto: sdpa for %s %s (%s)", device, str(dtype).removeprefix("torch."), why_not)
    return "sdpa"


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (`qkv`, `proj`); `backend` is model.attention."""

    def __init__(self, width: int, heads: int, backend: str = "sdpa"):
        super().__init__()
        if width % heads:
            raise ValueError(f"ViT width {width} is not divisible by its {heads} heads")
        if backend not in BACKENDS:
            raise ConfigError(f"model.attention={backend!r} is not one of {', '.join(BACKENDS)}")
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape  # x: [B, N, W]
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads)  # [B, N, 3, H, Dh]
        backend = resolve_backend(self.backend, qkv.device, qkv.dtype)
        if backend.startswith("flash-attn"):
            out = run_flash(backend, qkv)  # [B, N, H, Dh]
            return self.proj(out.reshape(batch, tokens, width))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, Dh]
        if backend == "math":
            weights = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)  # [B, H, N, N]
            out = weights.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))  # [B, H, N, Dh] -> [B, N, W]
