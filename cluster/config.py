"""Recipe section: where work runs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ClusterConfig:
    """Embedded local Ray by default; an existing cluster by address."""

    address: str = field(default="", metadata={"help": "Ray address ('' = RAY_ADDRESS or an embedded local Ray; 'auto'; ray://host:10001)"})
    num_cpus: int = field(default=0, metadata={"help": "CPUs for the embedded local Ray (0 = all)"})
    parquet_reader_v2: bool = field(default=False, metadata={"help": "read parquet with Ray Data's DataSourceV2 (a pool of footer-reader actors per read; its start-up dominates on small shards, measured 8x slower per read here) instead of the classic reader"})
    storage: str = field(default="", metadata={"help": "shared storage for Train/Tune checkpoints ('' = <run_dir>/ray); s3:// or gs:// on multi-node clusters"})
