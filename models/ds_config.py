"""The DeepSpeed config of a training run: what slm sets (batch sizes, clipping, ZeRO stage,
precision) and the user's own settings (``pretrain.train.deepspeed``, a JSON file: offload,
bucket sizes, ...) merged in. The user's file may add keys, never contradict slm's
(models/config.py ``DEEPSPEED_OWNED`` names them and the recipe field that sets each).
"""

from __future__ import annotations

import copy
from typing import Any

from slm.configkit import ConfigError

from .config import DEEPSPEED_OWNED
from .loop_config import TrainLoopConfig


def generated_config(cfg: TrainLoopConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    """What slm sets: global batch = micro_batch × grad_accum × world_size."""
    d = cfg.data
    return {
        "train_micro_batch_size_per_gpu": d.micro_batch,
        "gradient_accumulation_steps": d.grad_accum,
        "train_batch_size": d.micro_batch * d.grad_accum * world_size,
        "gradient_clipping": cfg.optim.clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**12,  # our own progress lines instead
        "wall_clock_breakdown": False,
    }


def merge(base: dict[str, Any], user: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``user`` merged into a copy of ``base`` (nested dicts merged key by key); a key slm owns
    is refused, naming it and the field to set instead."""
    out = copy.deepcopy(base)
    for key, value in user.items():
        path = f"{where}{key}"
        if path in DEEPSPEED_OWNED:
            raise ConfigError(f"the DeepSpeed JSON (pretrain.train.deepspeed) sets '{path}', which slm "
                              f"sets from {DEEPSPEED_OWNED[path]}; remove it from the JSON")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, f"{path}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(cfg: TrainLoopConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    """The config handed to ``deepspeed.initialize``."""
    return merge(generated_config(cfg, world_size, bf16), cfg.engine.deepspeed)


def offloads(config: dict[str, Any]) -> tuple[bool, bool]:
    """(optimizer offloaded, parameters offloaded) in a DeepSpeed config."""
    zero = config.get("zero_optimization", {})

    def on(key: str) -> bool:
        return str(zero.get(key, {}).get("device", "none")) in ("cpu", "nvme")

    return on("offload_optimizer"), on("offload_param")
