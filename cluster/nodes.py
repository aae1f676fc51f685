"""GPU node types slm's cluster configs use (cluster/launcher, cluster/kuberay), and the GPU
models they carry: what `slm estimate` turns FLOPs into device-hours with, and what the configs'
sizing comments refer to. No prices: they change by region and contract; pass yours
(`slm estimate --price-per-hour`)."""

from __future__ import annotations

from dataclasses import dataclass

from slm.errors import InputError


@dataclass(frozen=True)
class NodeType:
    name: str
    gpu: str           # GPU model: a key of slm.models.flops.DEVICE_PEAK_FLOPS
    gpus: int          # GPUs per node
    gpu_memory_gb: int
    note: str = ""


NODE_TYPES: dict[str, NodeType] = {n.name: n for n in (
    # AWS
    NodeType("p5.48xlarge", "H100", 8, 80, "the 771M LLM with ZeRO; multi-node pretraining"),
    NodeType("p4de.24xlarge", "A100", 8, 80, "the 771M LLM with ZeRO, cheaper than H100"),
    NodeType("p4d.24xlarge", "A100", 8, 40),
    NodeType("g6e.xlarge", "L40S", 1, 48, "126M trials and SLM-mix experts"),
    NodeType("g6.xlarge", "L4", 1, 24, "126M trials (small micro-batch)"),
    # GCP
    NodeType("a3-highgpu-8g", "H100", 8, 80, "the 771M LLM with ZeRO"),
    NodeType("a2-ultragpu-8g", "A100", 8, 80, "the 771M LLM with ZeRO"),
    NodeType("a2-highgpu-1g", "A100", 1, 40, "126M trials and SLM-mix experts"),
    NodeType("g2-standard-8", "L4", 1, 24, "126M trials (small micro-batch)"),
)}


def node_type(name: str, gpus_per_node: int = 0) -> NodeType:
    """A known node type, or a bare GPU model (H100, A100, ...) with ``gpus_per_node``."""
    from slm.models.flops import DEVICE_PEAK_FLOPS  # torch-free callers list names only

    if name in NODE_TYPES:
        n = NODE_TYPES[name]
        return NodeType(n.name, n.gpu, gpus_per_node or n.gpus, n.gpu_memory_gb, n.note)
    if name in DEVICE_PEAK_FLOPS:
        return NodeType(name, name, gpus_per_node or 1, 0)
    raise InputError(f"unknown node type '{name}'; use one of {', '.join(NODE_TYPES)} or a GPU "
                     f"model ({', '.join(DEVICE_PEAK_FLOPS)}) with --gpus-per-node")
