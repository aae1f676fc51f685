"""LoRA (Hu et al. 2021) through peft: the model-preparation step of a run whose loop config has
a ``lora`` section (models/loop_config.py ``LoraSection``; the recipe's ``specialize.lora``),
and the merge that makes its served model.

``adapt``: before DeepSpeed sees the model, every weight is frozen and low-rank adapters are
added to the ``target_modules`` (checked first: a name the model does not have is refused,
naming the field, the name and the modules it has); only the adapters train and only they get
optimizer state. ``merged``: the served model, a copy with the adapters merged into the base
weights (``merge_and_unload``): a plain HF model that loads without peft. The FLOPs of a LoRA
step are models/flops.py's ``lora_params`` term.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING

import peft
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from slm.configkit import ConfigError

if TYPE_CHECKING:  # loop_config imports families, which imports this module
    from .loop_config import LoraSection

FIELD = "specialize.lora.target_modules"  # where a run's targets come from (tune/finetune.py)


def adaptable_modules(model: nn.Module) -> dict[str, type]:
    """{name: type} of the modules an adapter can go on, by the last part of their name (what
    peft matches a target against): linear layers (GPT-2's are ``Conv1D``), less a tied output
    embedding (an adapter merged into it would change the input embedding too)."""
    tied = model.get_output_embeddings() if getattr(model.config, "tie_word_embeddings", False) else None
    return {name.rsplit(".", 1)[-1]: type(m) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and m is not tied}


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """ConfigError naming the field, the first target the model does not have and the ones it has."""
    have = adaptable_modules(model)
    for name in targets:
        if name not in have:
            raise ConfigError(f"field '{FIELD}' has '{name}', which the model "
                              f"({type(model).__name__}) does not have; its modules that take "
                              f"adapters are: {', '.join(sorted(have))}")


def adapt(model: nn.Module, lora: LoraSection, seed: int) -> peft.PeftModel:
    """``model`` frozen, with trainable LoRA adapters on ``lora.target_modules``; their random
    initialisation is seeded by ``seed`` (peft draws it from torch's global RNG)."""
    check_targets(model, lora.target_modules)
    have = adaptable_modules(model)
    config = peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM",
        # GPT-2's Conv1D stores its weight as (in, out): peft must transpose the update
        fan_in_fan_out=any(issubclass(have[t], Conv1D) for t in lora.target_modules))
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # peft asks transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def trainable_params(model: nn.Module) -> int:
    """Parameters that train (tied ones once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merged(model: nn.Module) -> nn.Module:
    """The served model of ``model``: itself when it has no adapters, else a copy with them
    merged into the base weights (the training model keeps its adapters: a run may go on)."""
    if not isinstance(model, peft.PeftModel):
        return model
    return copy.deepcopy(model).merge_and_unload()
