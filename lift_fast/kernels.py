"""The trainer's name for the loss package: `lift_fast.kernels` is `lift_fast_kernels` (kernels/, a
distribution of its own that needs only torch and triton).

Its submodules are reachable under this name too (`lift_fast.kernels.slab_ops` is
`lift_fast_kernels.slab_ops`, the same module object), so the torch.library ops register once.
"""

import sys

import lift_fast_kernels
from lift_fast_kernels import (  # noqa: F401 (re-exported: the trainer's name for the package)
    KERNELS_CHOICES,
    KERNELS_ENV_VAR,
    SLAB_BYTES_ENV_VAR,
    ClipLoss,
    GatheredTexts,
    SigLipLoss,
    chunking,
    clip_loss,
    fused_projection_clip_loss,
    loss_implementation,
    reference,
    siglip_loss,
    slab_ops,
    start_text_gather,
)

for _name in ("chunking", "clip_loss", "reference", "siglip_loss", "slab_ops"):
    sys.modules[f"{__name__}.{_name}"] = sys.modules[f"lift_fast_kernels.{_name}"]

__all__ = lift_fast_kernels.__all__
