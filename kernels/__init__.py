"""lift_fast.kernels: contrastive losses for image-text training (CLIP InfoNCE and SigLIP).

Importable on its own (torch only), so other trainers can use the loss:

    from lift_fast.kernels import ClipLoss, clip_loss, siglip_loss, fused_projection_clip_loss

`ClipLoss` and `SigLipLoss` take open_clip's constructor and forward arguments and give its values;
`logit_scale` is the already-exponentiated scale and the features are used as given.
`LIFT_FAST_KERNELS=auto|triton|torch` (read at every call) chooses the implementation; this build
has the plain-torch one only, so `triton` is an error and `auto` uses torch.
"""

from . import chunking, slab_ops
from .clip_loss import ClipLoss, clip_loss, fused_projection_clip_loss
from .reference import KERNELS_CHOICES, KERNELS_ENV_VAR, loss_implementation
from .siglip_loss import SigLipLoss, siglip_loss

__all__ = [
    "KERNELS_CHOICES",
    "KERNELS_ENV_VAR",
    "ClipLoss",
    "SigLipLoss",
    "clip_loss",
    "fused_projection_clip_loss",
    "loss_implementation",
    "siglip_loss",
]
