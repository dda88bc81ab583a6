"""Data: webdataset shards, the synthetic set, and loaders that join images with caption embeddings."""

__all__ = ["build_loader"]


def __getattr__(name: str):
    # `lift_fast.data.build_loader` is the documented entry point; imported on first use so that
    # reading shards or writing the synthetic set does not pull in torch.
    if name == "build_loader":
        from lift_fast.data.loader import build_loader

        return build_loader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
