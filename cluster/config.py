"""Recipe section: where work runs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


# What a run placed on spot nodes asks for, per worker (or per trial) of the custom resource
# `spot` that only the spot / preemptible node types declare (cluster/launcher/*.yaml
# `gpu-spot`, cluster/kuberay `gpu-spot`): a sliver, so it never limits how many fit on a node.
SPOT_RESOURCE = "spot"
SPOT_SHARE = 0.001


def spot_resources(spot: bool) -> dict[str, float]:
    """The extra resource request of a run that must land on spot nodes."""
    return {SPOT_RESOURCE: SPOT_SHARE} if spot else {}


@dataclass
class ClusterConfig:
    """Embedded local Ray by default; an existing cluster by address."""

    address: str = field(default="", metadata={"help": "Ray address ('' = RAY_ADDRESS or an embedded local Ray; 'auto'; ray://host:10001)"})
    num_cpus: int = field(default=0, metadata={"help": "CPUs for the embedded local Ray (0 = all)"})
    parquet_reader_v2: bool = field(default=False, metadata={"help": "read parquet with Ray Data's DataSourceV2 (a pool of footer-reader actors per read; its start-up dominates on small shards, measured 8x slower per read here) instead of the classic reader"})
    storage: str = field(default="", metadata={"help": "shared storage for Train/Tune checkpoints ('' = $SLM_STORAGE, else <run_dir>/ray); s3:// or gs:// on multi-node clusters"})


# Set by the cluster (cluster/kuberay/*.yaml: the head pod's env) so that every recipe run there
# checkpoints to the cluster's bucket without repeating --cluster.storage.
STORAGE_ENV = "SLM_STORAGE"


def default_storage(storage: str) -> str:
    """``cluster.storage`` as given, else ``$SLM_STORAGE``, else '' (the run directory)."""
    return storage or os.environ.get(STORAGE_ENV, "")
