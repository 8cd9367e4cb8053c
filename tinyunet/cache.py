"""Where tinyunet keeps what it computed once: the decoded datasets (data/pets.py) and the compiled
kernels' source files (accel/direct_kernels.py). Its own module, on the ground floor, so that both can
find it without one importing the other."""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$TINYUNET_CACHE`` if set, else ``~/.cache/tinyunet/cache``."""
    env = os.environ.get("TINYUNET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tinyunet" / "cache"
