"""What every bench's JSON records about the machine it measured on."""

from __future__ import annotations

import datetime
import os
import platform


def machine() -> dict:
    """CPU count, platform, and the versions of python, ray, pyarrow and torch, with the date."""
    import pyarrow
    import ray
    import torch

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "ray": ray.__version__,
            "pyarrow": pyarrow.__version__, "torch": torch.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
