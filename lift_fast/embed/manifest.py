"""The store manifest's old import path (now lift_fast.store.manifest); re-exported for importers."""

from lift_fast.store.manifest import *  # noqa: F401,F403
