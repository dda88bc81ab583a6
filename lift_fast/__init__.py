"""lift-fast: a fast trainer for language-image alignment with a fixed text encoder (LIFT)."""

__version__ = "0.1.0"
