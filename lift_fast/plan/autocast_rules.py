"""CUDA's autocast rules on CPU tensors, so that a whole training step (backward included) can run
under them on a machine without a GPU.

Fake CUDA tensors run a forward under the real CUDA autocast, but not a backward on a CUDA build
without a driver: the autograd engine asks the driver about streams of device 0 and fails
(`hasPrimaryContext expects a valid device index`). So the planner runs the step on (fake) CPU
tensors with CPU autocast switched on, and this module swaps the CPU autocast kernels of the ops
CUDA's policy lists (aten/src/ATen/autocast_mode.cpp) for kernels that do what CUDA's do:

- lower precision: GEMMs, convolutions and attention cast their floating inputs to the autocast dtype
  (CUDA caches the casts of weights for the autocast region; here each use casts again, which keeps
  the same bytes alive for a model that uses each weight once, as the ViT does, and keeps a
  checkpoint's recompute running the very ops its forward ran);
- float32: norms, softmax, exp/log, sums and losses cast half-precision inputs to float32 (softmax,
  log_softmax, sum, cumsum, prod and the vector/matrix norms as CUDA's `fp32_set_opt_dtype`: the
  result dtype is set to float32 unless the call gave one).

Ops off the lists keep the CPU autocast's behaviour, which for the ops a ViT step uses is none
(plain type promotion, as on CUDA). tests/test_plan.py checks the result against the real CUDA
autocast on fake CUDA tensors: the same tensors, by shape and dtype, are saved for the backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._pytree import tree_map_only

# CUDA's lists (autocast_mode.cpp, AT_FORALL_LOWER_PRECISION_FP / AT_FORALL_FP32 / AT_FORALL_FP32_SET_OPT_DTYPE),
# as aten operator names with the overloads this trainer's step calls; "" is the default overload.
LOWER_PRECISION = ("_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc",
                   "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu",
                   "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm",
                   "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot", "scaled_dot_product_attention")
FLOAT32 = ("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
           "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
           "native_layer_norm", "group_norm", "norm.Scalar", "norm.ScalarOpt_dim", "frobenius_norm.dim",
           "nuclear_norm", "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss",
           "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss",
           "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
           "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp")
FLOAT32_SET_DTYPE = ("prod", "prod.dim_int", "prod.dim_Dimname", "softmax.int", "softmax.Dimname", "log_softmax.int",
                     "log_softmax.Dimname", "cumprod", "cumprod.dimname", "cumsum", "cumsum.dimname",
                     "linalg_vector_norm", "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum",
                     "sum.dim_IntList", "sum.dim_DimnameList")
HALF = (torch.float16, torch.bfloat16)
_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _overloads(names: tuple[str, ...]) -> list[tuple[str, torch._ops.OpOverload]]:
    """(name, aten overload) of each name this torch has (lists and overloads move between versions)."""
    found = []
    for name in names:
        base, _, overload = name.partition(".")
        try:
            found.append((name, getattr(getattr(torch.ops.aten, base), overload or "default")))
        except AttributeError:
            continue
    return found


class _Rules:
    """The kernels registered at the AutocastCPU key while `cuda_autocast_rules` is open."""

    def lower(self, op):
        def kernel(*args, **kwargs):
            dtype = torch.get_autocast_dtype("cpu")
            args, kwargs = tree_map_only(torch.Tensor, lambda t: self._cast(t, dtype), (args, kwargs))
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
                return op(*args, **kwargs)
        return kernel

    def _cast(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not tensor.is_floating_point() or tensor.dtype in (dtype, torch.float64):
            return tensor
        return tensor.to(dtype)

    def float32(self, op, set_dtype: bool = False):
        def kernel(*args, **kwargs):
            if set_dtype:
                if kwargs.get("dtype") is None and not any(isinstance(a, torch.dtype) for a in args):
                    kwargs = {**kwargs, "dtype": torch.float32}
            else:
                args, kwargs = tree_map_only(torch.Tensor, lambda t: t.float() if t.dtype in HALF else t, (args, kwargs))
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
                return op(*args, **kwargs)
        return kernel


@contextlib.contextmanager
def cuda_autocast_rules() -> Iterator[_Rules]:
    """CUDA's policy for CPU autocast while open (the kernels are removed on exit); the caller opens
    torch.autocast("cpu", dtype=...) where the trainer opens CUDA's. Not thread-safe: the kernels
    are process-wide while open."""
    rules = _Rules()
    library = torch.library.Library("aten", "IMPL")
    try:
        for name, op in _overloads(LOWER_PRECISION):
            library.impl(name, rules.lower(op), "AutocastCPU")
        for name, op in _overloads(FLOAT32):
            library.impl(name, rules.float32(op), "AutocastCPU")
        for name, op in _overloads(FLOAT32_SET_DTYPE):
            library.impl(name, rules.float32(op, set_dtype=True), "AutocastCPU")
        yield rules
    finally:
        library._destroy()
