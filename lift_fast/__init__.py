"""lift-fast: a fast trainer for language-image alignment with a fixed text encoder (LIFT).

    model, preprocess = lift_fast.load_image_encoder("exports/run-lift")   # see lift_fast.export
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_image_encoder"]


def __getattr__(name: str):
    # Imported on first use: `import lift_fast` (the command line, the error classes) stays free of torch.
    if name == "load_image_encoder":
        from lift_fast.export import load_image_encoder

        return load_image_encoder
    raise AttributeError(f"module 'lift_fast' has no attribute {name!r}")
