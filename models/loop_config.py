"""The typed config of one training run: what the launcher (models/launch.py) hands every Ray
Train worker and the Trainer (models/train.py) reads. Pretraining and specialization build the
same tree; only the values differ (specialization sets ``init_from``, ``patience`` and, for
SLM-d, ``distillation``; with LoRA, ``lora``).

It crosses the Ray boundary as ``to_dict()`` (Ray Train's ``train_loop_config``) and the worker
rebuilds the typed tree with ``from_dict``, which refuses a key it does not know, naming it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from slm.configkit import ConfigError
from slm.stage import join

from .config import TrainConfig
from .families import FamilySpec


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class DataSection:
    """What the run reads and in which order (models/train.py explains the data order)."""

    name: str = _help("what the run trains on, recorded in the checkpoint signature (e.g. generic, is-k4-alpha)", default="")
    fingerprint: str = _help("content fingerprint of what the run is built from (its shard sets' manifests; for specialization also the starting model and teacher): part of the checkpoint signature, so changed data never resumes old checkpoints", default="")
    micro_batch: int = _help("windows per worker per micro-step", default=8)
    grad_accum: int = _help("micro-steps per optimizer step", default=1)
    shuffle_window: int = _help("rows permuted together per epoch (rounded down to a multiple of the global batch)", default=16384)


@dataclass
class OptimSection:
    """AdamW with linear warm-up and cosine decay, gradient clipping."""

    lr: float = _help("peak learning rate", default=1e-4)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    clip: float = _help("gradient-norm clipping", default=5.0)
    warmup: int = _help("linear warm-up steps", default=1000)
    min_lr_ratio: float = _help("final LR as a fraction of peak (cosine decay)", default=0.1)


@dataclass
class ScheduleSection:
    """How long the run is and how often the hooks fire."""

    steps: int = _help("optimizer steps of the whole run (the LR schedule's length)", default=1)
    stop_at: int = _help("end this attempt after a checkpoint at this step (0: run to steps); re-submitting continues the run", default=0)
    eval_every: int = _help("steps between evaluations on the held-out windows (and always at the last step)", default=200)
    ckpt_every: int = _help("steps between checkpoints (and always at the last step)", default=500)
    log_every: int = _help("steps between console progress lines", default=10)
    export_at: list[int] = _help("steps before the last at which the model is also exported (pretraining levels), to <run>/levels/step=<N>/", default_factory=list)


@dataclass
class EngineSection:
    """DeepSpeed's numerics and memory partitioning."""

    precision: str = _help("auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32", default="auto")
    zero_stage: int = _help("DeepSpeed ZeRO stage (0-3)", default=1)
    activation_checkpointing: bool = _help("recompute each block's activations in the backward", default=False)
    loss_chunk: int = _help("positions per chunk of the float32 loss (0: one piece)", default=0)
    deepspeed: dict = _help("user DeepSpeed settings merged into the generated config (models/ds_config.py)", default_factory=dict)

    def resolved_precision(self, use_gpu: bool) -> str:
        return self.precision if self.precision != "auto" else ("bf16" if use_gpu else "fp32")


@dataclass
class CheckpointSection:
    """Which reported checkpoints Ray Train keeps."""

    keep: int = _help("checkpoints kept per run (Ray CheckpointConfig.num_to_keep)", default=2)


@dataclass
class LoggingSection:
    """Where the run lives and where its metrics go."""

    run_name: str = _help("the run's name: Ray Train run name, its directory under storage, progress-line prefix", default="")
    storage: str = _help("Ray Train storage of the run (local path or URI); the run is <storage>/<run_name>", default="")
    logger: str = _help("rank 0 metric sink: tensorboard | mlflow | wandb | none", default="tensorboard")
    tensorboard: str = _help("where TensorBoard events go (local path or URI); '' = <run>/tensorboard", default="")
    group: str = _help("what the run belongs to in the tracker (W&B group, MLflow experiment): e.g. the recipe, or its sweep; '' = the run's name", default="")

    @property
    def run_uri(self) -> str:
        """The run's directory: checkpoints (step=*) and TensorBoard events."""
        return join(self.storage, self.run_name)


@dataclass
class DistillationSection:
    """SLM-d: the loss is losses.kd_loss against a teacher's next-token distributions."""

    teacher: str = _help("local HF directory of the teacher model")
    weight: float = _help("weight of the KD term (0: the domain loss only, the teacher still runs)", default=0.5)
    temperature: float = _help("softmax temperature of the KD term", default=1.0)


@dataclass
class LoraSection:
    """LoRA: the model's weights frozen, low-rank adapters on ``target_modules`` trained, the
    export merged into a plain model (models/lora.py; the recipe's ``specialize.lora``)."""

    rank: int = _help("adapter rank r", default=64)
    alpha: float = _help("the adapters' update is scaled by alpha / rank", default=64.0)
    dropout: float = _help("dropout on the adapters' input", default=0.0)
    target_modules: list[str] = _help("names of the modules that get adapters (peft matches a name's last part)", default_factory=lambda: ["c_attn"])


@dataclass
class TrainLoopConfig:
    """Everything one training run's workers need (serialisable: ``to_dict`` / ``from_dict``)."""

    model: FamilySpec = _help("the family's model (shape, vocabulary, routing)")
    seed: int = _help("seed of the initial weights, the data order and every micro-batch's RNG", default=0)
    data: DataSection = _help("batching and shuffling", default_factory=DataSection)
    optim: OptimSection = _help("optimizer and LR schedule", default_factory=OptimSection)
    schedule: ScheduleSection = _help("steps and hook frequencies", default_factory=ScheduleSection)
    engine: EngineSection = _help("precision and ZeRO stage", default_factory=EngineSection)
    checkpointing: CheckpointSection = _help("checkpoint retention", default_factory=CheckpointSection)
    logging: LoggingSection = _help("run name, storage, metric sink", default_factory=LoggingSection)
    init_from: str = _help("local HF directory whose weights replace the fresh initialisation (same shape); '' = fresh", default="")
    test_at_end: bool = _help("evaluate the run's 'test' set at its end with the final (best-valid) weights, on the worker: test/loss in the final report and costs (specialization trials)", default=False)
    patience: int = _help("> 0: early stopping after this many evaluations without a better valid loss; the exported model is the best-valid one", default=0)
    distillation: DistillationSection | None = _help("SLM-d's teacher and KD loss; None = the family's own loss", default=None)
    lora: LoraSection | None = _help("LoRA adapters on a frozen model; None = every weight trains", default=None)
    pid_dir: str = _help("each worker writes rank<r>.pid here (operators and the fault-tolerance test find the workers); '' = none", default="")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainLoopConfig":
        return _build(cls, data, "")

    def flat(self) -> dict[str, Any]:
        """Leaf fields as ``section.field`` keys (the run's parameters for MLflow / W&B)."""
        out: dict[str, Any] = {}

        def walk(obj: Any, prefix: str) -> None:
            for f in fields(obj):
                v = getattr(obj, f.name)
                if is_dataclass(v):
                    walk(v, f"{prefix}{f.name}.")
                else:
                    out[prefix + f.name] = v

        walk(self, "")
        return out


def _section_type(tp: Any) -> type | None:
    """The dataclass a field holds (also inside ``X | None``), or None for a plain value."""
    for t in (tp, *typing.get_args(tp)):
        if isinstance(t, type) and is_dataclass(t):
            return t
    return None


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown train loop config key '{where}{unknown[0]}'; "
                          f"{cls.__name__} has: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        section = _section_type(hints[key])
        nested = section is not None and isinstance(value, dict)
        kwargs[key] = _build(section, value, f"{where}{key}.") if nested else value
    return cls(**kwargs)


def pretraining_config(train: TrainConfig, model: FamilySpec, *, steps: int, seed: int, data: str,
                       run_name: str, storage: str, logger: str = "tensorboard", group: str = "",
                       data_fingerprint: str = "", export_at: list[int] | None = None) -> TrainLoopConfig:
    """The loop config of a pretraining run from the recipe's ``pretrain.train`` section."""
    return TrainLoopConfig(
        model=model, seed=int(seed),
        data=DataSection(name=data, fingerprint=data_fingerprint, micro_batch=train.micro_batch,
                         grad_accum=train.grad_accum, shuffle_window=train.shuffle_window),
        optim=OptimSection(lr=train.lr, weight_decay=train.weight_decay, clip=train.clip,
                           warmup=train.warmup, min_lr_ratio=train.min_lr_ratio),
        schedule=ScheduleSection(steps=int(steps), eval_every=train.eval_every,
                                 ckpt_every=train.ckpt_every, log_every=train.log_every,
                                 export_at=sorted(s for s in (export_at or []) if s < steps)),
        engine=EngineSection(precision=train.precision, zero_stage=train.zero_stage_of(model.family),
                             activation_checkpointing=train.activation_checkpointing,
                             loss_chunk=train.loss_chunk, deepspeed=train.deepspeed_overrides()),
        checkpointing=CheckpointSection(keep=train.keep_checkpoints),
        logging=LoggingSection(run_name=run_name, storage=storage, logger=logger, group=group))
