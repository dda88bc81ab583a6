"""lift_fast.kernels: contrastive losses for image-text training (CLIP InfoNCE and SigLIP).

Importable on its own (torch and triton only), so other trainers can use the loss:

    from lift_fast.kernels import ClipLoss, clip_loss, siglip_loss, fused_projection_clip_loss

`ClipLoss` and `SigLipLoss` take open_clip's constructor and forward arguments and give its values;
`logit_scale` is the already-exponentiated scale and the features are used as given.
Both losses run in row slabs without the [B, B] logits (docs/loss.md); `LIFT_FAST_KERNELS=auto|triton|torch`
(read at every call) chooses the element-wise kernels: Triton on CUDA by default, torch elsewhere.
"""

# This folder is installed as lift_fast.kernels. With the repository root on sys.path (python -c or
# python -m from the checkout) it is also reachable as a top-level `kernels`, which transformers
# imports when it finds one (the Hugging Face hub package of that name): that copy stays empty, so
# the torch.library ops are registered once, by lift_fast.kernels, and transformers sees no version.
if __name__ == "lift_fast.kernels":
    from . import chunking, slab_ops
    from .clip_loss import ClipLoss, clip_loss, fused_projection_clip_loss
    from .reference import KERNELS_CHOICES, KERNELS_ENV_VAR, loss_implementation
    from .siglip_loss import SigLipLoss, siglip_loss

__all__ = [
    "KERNELS_CHOICES",
    "chunking",
    "slab_ops",
    "KERNELS_ENV_VAR",
    "ClipLoss",
    "SigLipLoss",
    "clip_loss",
    "fused_projection_clip_loss",
    "loss_implementation",
    "siglip_loss",
]
