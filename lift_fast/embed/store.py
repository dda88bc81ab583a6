"""The embedding store's old import path: the store moved to lift_fast.store (below both data and
embed); every name it had is re-exported here so that `lift_fast.embed.store.X` keeps working."""

from lift_fast.store import *  # noqa: F401,F403
from lift_fast.store import __all__  # noqa: F401
from lift_fast.store.writer import _npy_bytes  # noqa: F401
