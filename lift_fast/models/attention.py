"""Multi-head self-attention of the ViT, with a choice of kernels (`model.attention`).

    x [B, N, W] -> qkv [B, N, 3, heads, W/heads] -> attention -> [B, N, heads, W/heads] -> proj -> [B, N, W]

Backends:
- `flash`: flash-attn. FlashAttention-4 (`flash_attn.cute.flash_attn_func`, the `flash-attn-4` package) on
  compute capability 9.x-11.x (Hopper, Blackwell) where it imports; otherwise FlashAttention-2
  (`flash_attn.flash_attn_qkvpacked_func`, compute capability 8.0+), which takes the packed qkv as the
  qkv projection lays it out, with no copy. Needs CUDA tensors in float16 or bfloat16 (bf16 autocast).
  Asking for it where it cannot run is a ConfigError that says why.
- `sdpa`: torch's scaled_dot_product_attention (its own flash/memory-efficient kernels on CUDA).
- `math`: softmax(q k^T / sqrt(d)) v written out; the plain reference, and the one whose matmuls
  torch.utils.flop_counter counts on CPU (it counts nothing for CPU SDPA).
- `auto`: flash where it is installed and the tensors fit it (CUDA, half precision), else sdpa; the
  choice is logged once per device and dtype.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

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
# the flash kernels resolve_backend has chosen, by name: a plain dict that forward reads (and
# torch.compile traces through) without going back through the import machinery
_CHOSEN_KERNELS: dict[str, Callable] = {}


def fa4_qkvpacked(flash_attn_func: Callable) -> Callable:
    """FA4's flash_attn_func(q, k, v) ([B, N, H, Dh] each; returns (out, lse)) as a kernel on packed qkv."""

    def attention(qkv: torch.Tensor) -> torch.Tensor:  # qkv: [B, N, 3, H, Dh] -> [B, N, H, Dh]
        out = flash_attn_func(*qkv.unbind(2))
        return out[0] if isinstance(out, tuple) else out

    return attention


@functools.cache
def flash_kernels() -> tuple[dict[str, Callable], str]:
    """The flash-attn kernels that import here, as {name: fn(qkv [B, N, 3, H, Dh]) -> [B, N, H, Dh]}, and
    why the others do not (one line, empty when both import). Imported on first use: flash_attn.cute
    pulls in the CuTe DSL, which takes seconds."""
    kernels: dict[str, Callable] = {}
    missing = []
    try:
        from flash_attn.cute import flash_attn_func as fa4_func
    except Exception as err:  # noqa: BLE001 - a broken install (CUDA/ABI mismatch) raises more than ImportError
        missing.append(f"flash-attn-4 (flash_attn.cute): {type(err).__name__}: {err}")
    else:
        kernels["flash-attn-4"] = fa4_qkvpacked(fa4_func)
    try:
        from flash_attn import flash_attn_qkvpacked_func
    except Exception as err:  # noqa: BLE001
        missing.append(f"flash-attn 2 (flash_attn.flash_attn_qkvpacked_func): {type(err).__name__}: {err}")
    else:
        kernels["flash-attn-2"] = flash_attn_qkvpacked_func
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


@contextlib.contextmanager
def _autograd_inside_custom_op():
    """Let the ops called here record autograd again: a custom op's implementation runs below the
    autograd dispatch keys (torch.library excludes them), and the flash backward below differentiates
    the kernel's own autograd.Function (FA2's and FA4's are old-style ones, which torch.func refuses)."""
    include, exclude = torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude.remove(torch._C.DispatchKey.AutogradFunctionality)):
        with torch.enable_grad():
            yield


# The flash kernels as torch.library custom ops, so that torch.compile traces a model that calls them
# (flash-attn's Python and CuTe code does not trace): the fake gives the output's shape and dtype, the
# autograd formula calls the backward op. The ops wrap whichever kernel resolve_backend chose, by name.
@torch.library.custom_op("lift_fast::flash_attention", mutates_args=())
def flash_attention(qkv: torch.Tensor, kernel: str) -> torch.Tensor:
    """flash-attn kernel `kernel` ('flash-attn-4' or 'flash-attn-2') on qkv [B, N, 3, H, Dh] -> [B, N, H, Dh]."""
    return _CHOSEN_KERNELS[kernel](qkv).contiguous()


@flash_attention.register_fake
def _flash_attention_fake(qkv: torch.Tensor, kernel: str) -> torch.Tensor:
    batch, tokens, _, heads, head_dim = qkv.shape
    return qkv.new_empty(batch, tokens, heads, head_dim)


@torch.library.custom_op("lift_fast::flash_attention_backward", mutates_args=())
def flash_attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, kernel: str) -> torch.Tensor:
    """The gradient of `flash_attention` for qkv [B, N, 3, H, Dh], given grad_out [B, N, H, Dh].

    Recomputes the kernel's forward and runs its own backward: one more attention forward per block
    than the eager call, which is the price of a kernel seen through its public function only.
    """
    with _autograd_inside_custom_op():
        leaf = qkv.detach().requires_grad_()
        (grad_qkv,) = torch.autograd.grad(_CHOSEN_KERNELS[kernel](leaf), leaf, grad_out)
    return grad_qkv


@flash_attention_backward.register_fake
def _flash_attention_backward_fake(grad_out: torch.Tensor, qkv: torch.Tensor, kernel: str) -> torch.Tensor:
    return torch.empty_like(qkv)


def _flash_setup_context(ctx, inputs, output) -> None:
    qkv, kernel = inputs
    ctx.save_for_backward(qkv)
    ctx.kernel = kernel


def _flash_backward(ctx, grad_out):
    (qkv,) = ctx.saved_tensors
    return flash_attention_backward(grad_out.contiguous(), qkv, ctx.kernel), None


flash_attention.register_autograd(_flash_backward, setup_context=_flash_setup_context)


def run_flash(kernel: str, qkv: torch.Tensor) -> torch.Tensor:
    """The flash kernel on qkv [B, N, 3, H, Dh] -> [B, N, H, Dh]: called directly when eager (its own
    backward, nothing recomputed), through the `flash_attention` custom op under torch.compile."""
    if torch.compiler.is_compiling():
        return flash_attention(qkv, kernel)
    return _CHOSEN_KERNELS[kernel](qkv)


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
            log.info("model.attention=auto: %s for %s %s", kernel, device, str(dtype).removeprefix("torch."))
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
