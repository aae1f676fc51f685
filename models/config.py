"""Recipe sections owned by the model families and the training loop (no torch import here)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from slm.configkit import ConfigError, check_seeds, positive
from slm.layout import domain_run, expert_name



@dataclass(frozen=True)
class FamilyInfo:
    """How a pretraining family is laid out and trained (data only; the behaviour inside the
    training loop is models/families.py). Code asks these fields, never the family's name."""

    name: str
    size: str          # "slm" | "llm": the preset it trains (pretrain.slm_size / llm_size)
    runs: str          # "one" (pretrain/<f>) | "per_expert" (pretrain/<f>/expert-<i>, k_mix) |
                       # "per_domain" (pretrain/<f>/<domain>-<tokens>: one run per domain and
                       # domain train size, on generic data resampled to that train subset)
    routed: bool = False  # rows routed by their cluster_k<k_pn> column (a projected network)
    help: str = ""

    def sub(self, domain: str = "", domain_tokens: int = 0, expert: int | None = None) -> str:
        """The sub-run (slm.layout ``RunLayout.pretrain``) a trial of ``domain`` at
        ``domain_tokens`` train tokens (or the expert ``expert``) starts from."""
        if self.runs == "per_domain":
            return domain_run(domain, domain_tokens)
        return expert_name(expert) if self.runs == "per_expert" else ""


FAMILY_INFO: dict[str, FamilyInfo] = {f.name: f for f in (
    FamilyInfo("slm", "slm", "one", help="small LM on the generic corpus"),
    FamilyInfo("llm", "llm", "one", help="large LM on the generic corpus (reference, teacher)"),
    FamilyInfo("is", "slm", "per_domain", help="small LM on the generic corpus importance-resampled to a domain"),
    FamilyInfo("mix", "slm", "per_expert", help="one small LM per generic cluster (k_mix experts)"),
    FamilyInfo("pn", "slm", "one", routed=True, help="projected network over k_pn clusters"),
)}
FAMILIES = tuple(FAMILY_INFO)
LOGGERS = ("tensorboard", "mlflow", "wandb", "none")  # pretrain.logger (slm/needs.py: their packages)

# Transformer presets: (layers, d_model, heads, d_ff). paper-* follow paper.md §6 (Table 6).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "paper-slm": (7, 1024, 8, 4096),     # 126M at 32k vocab
    "paper-llm": (7, 2816, 22, 11264),   # 771M at 32k vocab
    "demo-slm": (2, 128, 4, 512),
    "demo-llm": (3, 256, 4, 1024),
    "tiny": (1, 32, 2, 64),
}


def lora_target_shapes(d_model: int, d_ff: int) -> dict[str, list[tuple[int, int]]]:
    """The weight matrices of a GPT-2 block that LoRA can adapt, by module name (peft matches a
    target by the name's last part: ``c_proj`` is both the attention's and the MLP's), as
    (inputs, outputs) per layer. The tied LM head is left out: an adapter merged into it would
    change the input embedding too. Checked against the built model by tests/test_lora.py."""
    d, f = d_model, d_ff
    return {"c_attn": [(d, 3 * d)], "c_proj": [(d, d), (f, d)], "c_fc": [(d, f)]}


LORA_TARGETS = tuple(lora_target_shapes(1, 1))  # specialize.lora.target_modules: these names


@dataclass
class TrainConfig:
    """Optimisation for pretraining (paper: Adam 1e-4, clip 5, 1k warmup)."""

    micro_batch: int = field(default=8, metadata={"help": "windows per worker per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final LR as a fraction of peak (cosine decay)"})
    warmup: int = field(default=1000, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    clip: float = field(default=5.0, metadata={"help": "gradient-norm clipping"})
    eval_every: int = field(default=200, metadata={"help": "steps between evaluations on held-out windows"})
    eval_batches: int = field(default=8, metadata={"help": "micro-batches per evaluation"})
    ckpt_every: int = field(default=500, metadata={"help": "steps between checkpoints"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept per run (CheckpointConfig.num_to_keep)"})
    log_every: int = field(default=10, metadata={"help": "steps between console progress lines"})
    shuffle_window: int = field(default=16384, metadata={"help": "rows permuted together per epoch (seeded by seed and epoch; rounded down to a multiple of the global batch)"})
    zero_stage: int = field(default=1, metadata={"help": "DeepSpeed ZeRO stage (0-3)"})
    zero_stages: dict[str, int] = field(default_factory=dict, metadata={"help": "per-family ZeRO stage overriding zero_stage, e.g. {llm: 3} (parameters partitioned too: the 771M LLM on smaller GPUs)"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each transformer block's activations in the backward (plain LM families): less memory per micro-batch, ~1/3 more compute"})
    loss_chunk: int = field(default=128, metadata={"help": "positions per chunk of the float32 loss (models/losses.py): no full float32 copy of the logits; 0 = one piece"})
    deepspeed: str = field(default="", metadata={"help": "JSON file of DeepSpeed settings merged into the generated config (offload, bucket sizes...); keys slm sets are refused"})

    def zero_stage_of(self, family: str) -> int:
        return int(self.zero_stages.get(family, self.zero_stage))

    def deepspeed_overrides(self) -> dict[str, Any]:
        """The user's DeepSpeed JSON (``deepspeed``), checked against the keys slm sets."""
        return read_deepspeed_json(self.deepspeed) if self.deepspeed else {}

    def validate(self) -> None:
        positive(self, "micro_batch", "grad_accum", "lr", "eval_every", "eval_batches", "ckpt_every", "clip",
                 "keep_checkpoints", "log_every", "shuffle_window")
        positive(self, "warmup", "weight_decay", "loss_chunk", allow_zero=True)
        for where, stage in (("zero_stage", self.zero_stage),
                             *((f"zero_stages.{f}", s) for f, s in self.zero_stages.items())):
            if stage not in (0, 1, 2, 3):
                raise ConfigError(f"field '{where}' is {stage}; use 0, 1, 2 or 3")
        for fam in self.zero_stages:
            if fam not in FAMILIES:
                raise ConfigError(f"field 'zero_stages' has unknown family '{fam}'; known: {', '.join(FAMILIES)}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"field 'precision' is '{self.precision}'; use auto, bf16 or fp32")
        self.deepspeed_overrides()


# DeepSpeed config keys slm writes itself (models/ds_config.py), and the recipe field that sets
# each: a user JSON may add to the generated config but not contradict these.
DEEPSPEED_OWNED: dict[str, str] = {
    "train_batch_size": "pretrain.train.micro_batch × grad_accum × scaling.num_workers",
    "train_micro_batch_size_per_gpu": "pretrain.train.micro_batch",
    "gradient_accumulation_steps": "pretrain.train.grad_accum",
    "gradient_clipping": "pretrain.train.clip",
    "zero_optimization.stage": "pretrain.train.zero_stage / zero_stages",
    "bf16": "pretrain.train.precision",
    "fp16": "pretrain.train.precision (slm trains in bf16 or fp32)",
    "optimizer": "pretrain.train.lr / weight_decay (slm builds AdamW)",
    "scheduler": "pretrain.train.warmup / min_lr_ratio (slm builds the LR schedule)",
    "activation_checkpointing": "pretrain.train.activation_checkpointing",
}


def read_deepspeed_json(path: str) -> dict[str, Any]:
    """The user's DeepSpeed settings: a JSON object whose keys do not include those slm sets."""
    if not os.path.isfile(path):
        raise ConfigError(f"field 'deepspeed': file '{path}' does not exist; give the path of a "
                          "DeepSpeed JSON file (or '' for none)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"field 'deepspeed': '{path}' is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"field 'deepspeed': '{path}' must hold a JSON object, got {type(data).__name__}")
    zero = data.get("zero_optimization", {})
    keys = set(data) | {f"zero_optimization.{k}" for k in (zero if isinstance(zero, dict) else {})}
    for key in sorted(keys & set(DEEPSPEED_OWNED)):
        raise ConfigError(f"field 'deepspeed': '{path}' sets '{key}', which slm sets from "
                          f"{DEEPSPEED_OWNED[key]}; remove it from the JSON and set that field instead")
    return data


@dataclass
class ScalingConfig:
    """Ray Train scaling: the only fields that change from a laptop to a GPU cluster."""

    num_workers: int = field(default=1, metadata={"help": "Ray Train workers per training run"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs per worker"})
    max_failures: int = field(default=3, metadata={"help": "worker failures to recover from (FailureConfig)"})
    parallel_experts: int = field(default=0, metadata={"help": "SLM-mix experts trained at once (0 = as resources allow)"})
    parallel_families: int = field(default=0, metadata={"help": "pretrainings (a family at one pretraining seed) run at once by slm run (0 = as many runs as the cluster holds; 1 = one after another)"})
    spot_families: list[str] = field(default_factory=list, metadata={"help": "families whose runs go to spot nodes (their workers ask for the `spot` resource only spot node types declare), e.g. [mix]: many short expert runs, each resumed from its checkpoint when a node is preempted"})

    def validate(self) -> None:
        positive(self, "num_workers", "cpus_per_worker")
        positive(self, "max_failures", "parallel_experts", "parallel_families", allow_zero=True)
        for f in self.spot_families:
            if f not in FAMILIES:
                raise ConfigError(f"field 'spot_families' has unknown family '{f}'; known: {', '.join(FAMILIES)}")


@dataclass
class PretrainConfig:
    """Which families to pretrain, their sizes and budgets."""

    families: list[str] = field(default_factory=lambda: list(FAMILIES), metadata={"help": "families to pretrain: slm, llm, is, mix, pn"})
    slm_size: str = field(default="paper-slm", metadata={"help": "preset of the small (served) model"})
    llm_size: str = field(default="paper-llm", metadata={"help": "preset of the large model / teacher"})
    steps: dict[str, int] = field(default_factory=lambda: {"slm": 400_000, "llm": 400_000, "is": 200_000, "mix": 400_000, "pn": 400_000}, metadata={"help": "pretraining budget in optimizer steps per family (mix: per expert)"})
    levels: list[float] = field(default_factory=lambda: [1.0], metadata={"help": "pretraining levels: fractions of each family's steps (increasing, in (0, 1]) at which its model is saved in the one pretraining run; the sweep specializes from each (the paper's pretraining-budget axis; 1.0 is the final model)"})
    seeds: list[int] = field(default_factory=list, metadata={"help": "pretraining seeds: each family is pretrained once per seed (model init and data order), and the sweep specializes from each ([] = the recipe's seed alone; the recipe's seed keeps the paths pretrain/<family>..., another seed s gets pretrain/seed-<s>/<family>...)"})
    pn_h: int = field(default=8, metadata={"help": "SLM-pn capacity multiplier h (T tensors have h slices)"})
    pn_m: int = field(default=8, metadata={"help": "SLM-pn expert-embedding size m"})
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    logger: str = field(default="tensorboard", metadata={"help": "tensorboard | mlflow | wandb | none"})
    valid_fraction: float = field(default=0.01, metadata={"help": "fraction of generic windows held out for evaluation (by a hash of window_id; never trained on)"})

    def validate(self) -> None:
        for f in self.families:
            if f not in FAMILIES:
                raise ConfigError(f"field 'families' has unknown family '{f}'; known: {', '.join(FAMILIES)}")
        for name in (self.slm_size, self.llm_size):
            if name not in SIZES:
                raise ConfigError(f"unknown model size '{name}'; presets: {', '.join(SIZES)}")
        for fam, s in self.steps.items():
            if fam not in FAMILIES:
                raise ConfigError(f"field 'steps' has unknown family '{fam}'; known: {', '.join(FAMILIES)}")
            if s <= 0:
                raise ConfigError(f"field 'steps.{fam}' is {s}; a pretraining budget must be > 0 steps")
        positive(self, "pn_h", "pn_m")
        self.check_levels()
        check_seeds("seeds", self.seeds)
        if not 0.0 < self.valid_fraction < 0.5:
            raise ConfigError(f"field 'valid_fraction' is {self.valid_fraction}; use a fraction in (0, 0.5), e.g. 0.01")
        if self.logger not in LOGGERS:
            raise ConfigError(f"field 'logger' is '{self.logger}'; use {', '.join(LOGGERS)}")

    def check_levels(self) -> None:
        if not self.levels:
            raise ConfigError("field 'levels' is empty; list at least one, e.g. [1.0] (the final model)")
        for lv in self.levels:
            if isinstance(lv, bool) or not isinstance(lv, (int, float)) or not 0.0 < lv <= 1.0:
                raise ConfigError(f"field 'levels' has {lv!r}; a level is a fraction of a family's "
                                  "pretraining steps in (0, 1], e.g. [0.25, 0.5, 1.0]")
        if any(b <= a for a, b in zip(self.levels, self.levels[1:])):
            raise ConfigError(f"field 'levels' is {self.levels}; list the levels increasing, each once, "
                              "e.g. [0.25, 0.5, 1.0]")
        if self.levels[-1] != 1.0:  # the final model is what every other view compares
            raise ConfigError(f"field 'levels' is {self.levels}; end it with 1.0 (the final model), "
                              f"e.g. {[*self.levels, 1.0]}")
        for fam, s in self.steps.items():
            got = [level_step(lv, s) for lv in self.levels]
            if len(set(got)) != len(got):
                raise ConfigError(f"field 'levels' {self.levels} gives family '{fam}' ({s} steps) two levels "
                                  f"at the same step ({got}); use fewer levels or more 'steps.{fam}'")

    def level_steps(self, family: str) -> dict[float, int]:
        """{level: the optimizer step its model is saved at} for one family (mix: per expert)."""
        return {float(lv): level_step(lv, self.steps[family]) for lv in self.levels}


def level_step(level: float, steps: int) -> int:
    """The step of a pretraining level: the fraction ``level`` of ``steps``, at least 1."""
    return max(1, int(round(level * steps)))


def level_name(level: float) -> str:
    """A level as it appears in paths and trial keys ('0.5', '1')."""
    return f"{float(level):g}"
