"""lift_fast_kernels: contrastive losses for image-text training (CLIP InfoNCE and SigLIP).

A distribution of its own (`pip install ./kernels`: torch and triton only), so any trainer can take
the loss without the trainer; lift-fast imports it as `lift_fast.kernels`:

    from lift_fast_kernels import ClipLoss, clip_loss, siglip_loss, fused_projection_clip_loss

`ClipLoss` and `SigLipLoss` take open_clip's constructor and forward arguments and give its values;
`logit_scale` is the already-exponentiated scale and the features are used as given.
Both losses run in row slabs without the [B, B] logits (docs/loss.md); `LIFT_FAST_KERNELS=auto|triton|torch`
(read at every call) chooses the element-wise kernels: Triton on CUDA by default, torch elsewhere.
"""

from . import chunking, slab_ops
from .chunking import SLAB_BYTES_ENV_VAR, GatheredTexts, start_text_gather
from .clip_loss import ClipLoss, clip_loss, fused_projection_clip_loss
from .reference import KERNELS_CHOICES, KERNELS_ENV_VAR, loss_implementation
from .siglip_loss import SigLipLoss, siglip_loss

__version__ = "0.1.0"

__all__ = [
    "KERNELS_CHOICES",
    "KERNELS_ENV_VAR",
    "SLAB_BYTES_ENV_VAR",
    "ClipLoss",
    "GatheredTexts",
    "SigLipLoss",
    "chunking",
    "clip_loss",
    "fused_projection_clip_loss",
    "loss_implementation",
    "siglip_loss",
    "slab_ops",
    "start_text_gather",
]
