"""Shared fixtures. Tests use the real things: a real local Ray, real Ray Data/Train/Tune,
real DeepSpeed, the real embedding model and real parquet files."""

from __future__ import annotations

import os

import pytest

from slm.cluster.config import ClusterConfig
from slm.cluster.ray_env import ray_session

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole test session (starting Ray costs ~10 s)."""
    with ray_session(ClusterConfig(num_cpus=2)):
        yield
