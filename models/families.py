"""What makes one model family differ inside the one training loop (OLMo-core's train-module
idea): how to build the model, which shard column routes a batch, the loss, the FLOPs of a
micro-step, and the export of the small served model(s).

A ``FamilySpec`` is plain data (it travels to every Ray Train worker inside the loop config);
``build_family(spec)`` turns it into the behaviour object on the worker.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slm.configkit import ConfigError

from . import lora as lora_adapters
from .config import FAMILIES, FAMILY_INFO
from .flops import train_flops, train_flops_per_token
from .lm import count_params, lm_config, make_lm
from .losses import lm_loss
from .projected import ProjectedLM

if TYPE_CHECKING:  # loop_config imports this module (FamilySpec)
    from .loop_config import LoraSection


@dataclass(frozen=True)
class FamilySpec:
    """The data that defines a family's model (JSON-able)."""

    family: str = field(metadata={"help": "pretraining family (models.config.FAMILY_INFO)"})
    size: str | tuple[int, int, int, int] = field(metadata={"help": "preset in models.config.SIZES, or (layers, d_model, heads, d_ff)"})
    vocab_size: int = field(metadata={"help": "tokenizer vocabulary size"})
    seq_len: int = field(metadata={"help": "tokens per training window"})
    n_experts: int = field(default=0, metadata={"help": "routed families: clusters the rows are routed by (k_pn; column cluster_k<k>)"})
    pn_h: int = field(default=0, metadata={"help": "SLM-pn capacity multiplier h"})
    pn_m: int = field(default=0, metadata={"help": "SLM-pn expert-embedding size m"})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def route_column(self) -> str | None:
        """Shard column that routes each row (routed families: every row goes to its cluster's expert)."""
        info = FAMILY_INFO.get(self.family)
        return f"cluster_k{self.n_experts}" if info is not None and info.routed else None


class LMFamily:
    """Every family that is not routed (slm, llm, is, mix): a plain GPT-2 LM on next-token loss."""

    def __init__(self, spec: FamilySpec, loss_chunk: int = 0):
        self.spec = spec
        self.config = lm_config(spec.size, spec.vocab_size, spec.seq_len)
        self.loss_chunk = loss_chunk  # positions per float32 loss chunk (models/losses.py)

    route_column: str | None = None
    lora_params: int = 0  # LoRA adapter weights trained on the frozen model (``adapt``); 0: every weight trains

    def build(self, seed: int) -> nn.Module:
        return make_lm(self.config, seed=seed)

    def adapt(self, model: nn.Module, lora: LoraSection | None, seed: int) -> nn.Module:
        """The model-preparation step: with a ``lora`` section, the model frozen and LoRA
        adapters added, seeded by ``seed`` (models/lora.py); the FLOPs count them from here on
        (``lora_params``)."""
        if lora is None:
            return model
        model = lora_adapters.adapt(model, lora, seed)
        self.lora_params = lora_adapters.trainable_params(model)
        return model

    def checkpoint_activations(self, model: nn.Module) -> None:
        """Recompute each block's activations in the backward (HF's gradient checkpointing)."""
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def loss(self, model: nn.Module, input_ids: torch.Tensor,
             cluster: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        return lm_loss(model(input_ids=input_ids).logits, input_ids, self.loss_chunk)

    def micro_flops(self, input_ids: torch.Tensor, cluster: torch.Tensor | None) -> float:
        """Model FLOPs of one forward+backward on this micro-batch (flops.py formula)."""
        return train_flops("lm", self.config, int(input_ids.numel()), seq_len=self.spec.seq_len,
                           lora_params=self.lora_params)

    def flops_per_token(self) -> float:
        return train_flops_per_token(self.config, self.spec.seq_len, lora_params=self.lora_params)

    def params(self, model: nn.Module) -> int:
        return count_params(model)

    def export(self, model: nn.Module, out_dir: str) -> None:
        """The served model: a plain HF directory (safetensors + config.json); LoRA adapters
        merged into it."""
        lora_adapters.merged(model).save_pretrained(out_dir, safe_serialization=True)

    def shape(self) -> dict[str, Any]:
        """What a checkpoint must match (model shape), for the resume signature."""
        c = self.config
        return {"family": self.spec.family, "n_layer": c.n_layer, "n_embd": c.n_embd,
                "n_head": c.n_head, "n_inner": c.n_inner, "vocab_size": c.vocab_size,
                "n_positions": c.n_positions}


class PNFamily(LMFamily):
    """A routed family (SLM-pn): a ProjectedLM over ``n_experts`` clusters, each row routed by
    its cluster id. Exported whole (``ProjectedLM.save_pretrained``); ``materialize(i)`` gives
    expert i."""

    def __init__(self, spec: FamilySpec, loss_chunk: int = 0):
        super().__init__(spec, loss_chunk)
        if spec.n_experts <= 0 or spec.pn_h <= 0 or spec.pn_m <= 0:
            raise ConfigError(f"family pn needs n_experts, pn_h, pn_m > 0, got {spec.n_experts}, "
                              f"{spec.pn_h}, {spec.pn_m}; set kmeans.k_pn, pretrain.pn_h, pretrain.pn_m")
        self.route_column = spec.route_column

    def build(self, seed: int) -> nn.Module:
        return ProjectedLM(self.config, self.spec.n_experts, self.spec.pn_h, self.spec.pn_m, seed=seed)

    def checkpoint_activations(self, model: nn.Module) -> None:
        raise ConfigError("pretrain.train.activation_checkpointing is available for the plain LM "
                          "families (slm, llm, is, mix), not pn; lower micro_batch for pn instead")

    def adapt(self, model: nn.Module, lora: LoraSection | None, seed: int) -> nn.Module:
        if lora is not None:  # its export is the whole ProjectedLM, which peft cannot merge into
            raise ConfigError("LoRA adapts a plain LM; family pn trains a projected network "
                              "(its trials fine-tune the materialised expert, a plain LM)")
        return model

    def loss(self, model: nn.Module, input_ids: torch.Tensor,
             cluster: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        if cluster is None:
            raise ConfigError("family pn needs a cluster column in the batch")
        return lm_loss(model(input_ids=input_ids, cluster=cluster).logits, input_ids, self.loss_chunk)

    def micro_flops(self, input_ids: torch.Tensor, cluster: torch.Tensor | None) -> float:
        """Dense FLOPs + materialising the experts present in this micro-batch (measured)."""
        present = int(torch.unique(cluster).numel()) if cluster is not None else 1
        return train_flops("pn", self.config, int(input_ids.numel()), seq_len=self.spec.seq_len,
                           pn_h=self.spec.pn_h, pn_m=self.spec.pn_m, steps=1,
                           experts_per_step=present)

    def params(self, model: nn.Module) -> int:
        return int(model.param_counts()["total"])

    def export(self, model: nn.Module, out_dir: str) -> None:
        """Saved from a fresh copy: DeepSpeed's ZeRO keeps parameters as views of one flat
        buffer, which safetensors refuses to save as separate tensors."""
        copy = ProjectedLM(model.config, model.n_experts, model.h, model.m)
        copy.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
        copy.save_pretrained(Path(out_dir))

    def shape(self) -> dict[str, Any]:
        return {**super().shape(), "n_experts": self.spec.n_experts, "pn_h": self.spec.pn_h,
                "pn_m": self.spec.pn_m}


def build_family(spec: FamilySpec | dict[str, Any], loss_chunk: int = 0) -> LMFamily:
    """The behaviour object for a family spec (on the worker): a routed family trains a
    projected network, every other one a plain LM."""
    if isinstance(spec, dict):
        spec = FamilySpec(**spec)
    if spec.family not in FAMILIES:
        raise ConfigError(f"unknown family '{spec.family}'; known: {', '.join(FAMILIES)}")
    return (PNFamily if FAMILY_INFO[spec.family].routed else LMFamily)(spec, loss_chunk)
