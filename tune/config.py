"""Recipe sections owned by specialization and sweeps."""

from __future__ import annotations

from dataclasses import dataclass, field

from slm.configkit import ConfigError, check_seeds, distinct, positive
from slm.models.config import LORA_TARGETS

from .methods import get_method, method_names

SELECTIONS = ("top_cluster", "lowest_loss", "all")
TRIAL_RUNTIMES = ("local", "train")


@dataclass
class LoraConfig:
    """LoRA fine-tuning (Hu et al. 2021, through peft) for the trials of some methods: the
    starting model frozen, low-rank adapters trained on ``target_modules``, the published model
    the merged plain one (models/lora.py). Paper App. F: the LLM with rank 64 (5M trainable
    parameters: the 771M LLM's c_attn at rank 64)."""

    methods: list[str] = field(default_factory=list, metadata={"help": "methods whose trials fine-tune with LoRA ([] = none: every weight trains)"})
    rank: int = field(default=64, metadata={"help": "adapter rank r (paper App. F: 64)"})
    alpha: float = field(default=64.0, metadata={"help": "adapter scaling numerator: the update is scaled by alpha / rank (the paper gives none; alpha = rank scales by 1)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input, in [0, 1)"})
    target_modules: list[str] = field(default_factory=lambda: ["c_attn"], metadata={"help": f"modules that get adapters, by name: {', '.join(LORA_TARGETS)} (c_proj: the attention's and the MLP's output)"})

    def validate(self) -> None:
        for m in self.methods:
            get_method(m, field="methods")
        positive(self, "rank", "alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"field 'dropout' is {self.dropout}; use a probability in [0, 1)")
        if not self.target_modules:
            raise ConfigError("field 'target_modules' is empty; name the modules that get "
                              f"adapters ({', '.join(LORA_TARGETS)})")
        for name in self.target_modules:
            if name not in LORA_TARGETS:
                raise ConfigError(f"field 'target_modules' has '{name}', which the served GPT-2 "
                                  f"models do not have; their adaptable modules are "
                                  f"{', '.join(LORA_TARGETS)}")


@dataclass
class SpecializeConfig:
    """Fine-tuning a pretrained model on a domain (early stopping on the valid split)."""

    max_steps: int = field(default=2000, metadata={"help": "specialization budget in steps (upper bound; early stopping may end sooner)"})
    lr: float = field(default=1e-4, metadata={"help": "fine-tuning LR"})
    small_data_tokens: int = field(default=1_000_000, metadata={"help": "at or below this many domain tokens the LR is divided by small_data_lr_div (paper: 1M -> LR/3)"})
    small_data_lr_div: float = field(default=3.0, metadata={"help": "LR divisor for small domains"})
    micro_batch: int = field(default=8, metadata={"help": "windows per worker per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step (a step's batch: micro_batch × grad_accum × workers)"})
    warmup: int = field(default=0, metadata={"help": "warm-up steps"})
    eval_every: int = field(default=50, metadata={"help": "steps between valid evaluations"})
    patience: int = field(default=3, metadata={"help": "evaluations without improvement before stopping"})
    expert_selection: str = field(default="top_cluster", metadata={"help": "mix/pn expert: top_cluster | lowest_loss | all"})
    kd_weight: float = field(default=0.5, metadata={"help": "SLM-d: weight of the teacher (KD) loss; 0 = domain loss only"})
    kd_temperature: float = field(default=1.0, metadata={"help": "SLM-d: softmax temperature"})
    inference_budget: int = field(default=0, metadata={"help": "max parameters of a served model (0 = the small model's size)"})
    eval_batches: int = field(default=0, metadata={"help": "micro-batches of the valid split per evaluation (0 = the whole split)"})
    clip: float = field(default=1.0, metadata={"help": "gradient-norm clipping while fine-tuning"})
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        positive(self, "max_steps", "lr", "micro_batch", "grad_accum", "eval_every", "patience", "small_data_lr_div", "kd_temperature")
        positive(self, "clip")
        positive(self, "warmup", "small_data_tokens", "inference_budget", "eval_batches", allow_zero=True)
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ConfigError(f"field 'kd_weight' is {self.kd_weight}; use a weight in [0, 1]")
        if self.expert_selection not in SELECTIONS:
            raise ConfigError(f"field 'expert_selection' is '{self.expert_selection}'; use {', '.join(SELECTIONS)}")


@dataclass
class SweepConfig:
    """Ray Tune grid over domains x methods x budgets x domain sizes x seeds (x LRs) x
    pretraining levels x pretraining seeds."""

    name: str = field(default="main", metadata={"help": "sweep name (deterministic: re-running resumes it)"})
    domains: list[str] = field(default_factory=list, metadata={"help": "domains to specialize ([] = all)"})
    methods: list[str] = field(default_factory=lambda: ["slm", "llm", "is", "mix", "pn", "d"], metadata={"help": f"methods: {', '.join(method_names())} (tune/methods.py)"})
    budgets: list[int] = field(default_factory=lambda: [2000], metadata={"help": "specialization budgets in steps"})
    domain_tokens: list[int] = field(default_factory=list, metadata={"help": "domain train sizes ([] = all of data.domain_train_tokens)"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "fine-tuning seeds"})
    pretrain_seeds: list[int] = field(default_factory=list, metadata={"help": "pretraining seeds to specialize from ([] = every one of pretrain.seeds; each must be one of them)"})
    levels: list[float] = field(default_factory=list, metadata={"help": "pretraining levels to specialize from ([] = every one of pretrain.levels; each must be one of them)"})
    lrs: list[float] = field(default_factory=list, metadata={"help": "LRs to search ([] = specialize.lr)"})
    asha: bool = field(default=False, metadata={"help": "ASHA early termination on valid loss, ranking only like trials (same domain, method, domain size, budget and pretraining level: LRs and seeds compete; tune/schedulers.py)"})
    max_concurrent: int = field(default=0, metadata={"help": "trials at once (0 = as resources allow)"})
    cpus_per_trial: float = field(default=1.0, metadata={"help": "CPUs per trial (per worker of a trial of several workers)"})
    gpus_per_trial: float = field(default=0.0, metadata={"help": "GPUs per trial; a fraction (e.g. 0.5: two trials share a GPU) only with workers_per_trial 1"})
    trial_runtime: str = field(default="local", metadata={"help": "where a trial fine-tunes: local = inside its Tune trial's own process, one worker (nothing else starts; the trial holds the CPUs/GPU; a failed trial is retried whole) | train = a Ray Train worker group of workers_per_trial workers per trial (Train-in-Tune: data parallel across nodes, Ray Train's worker restarts)"})
    workers_per_trial: int = field(default=1, metadata={"help": "Ray Train workers per trial (trial_runtime train), each with cpus_per_trial CPUs and one GPU when gpus_per_trial > 0"})
    asha_grace: int = field(default=2, metadata={"help": "ASHA: valid evaluations a trial gets before it may be stopped"})
    max_failures: int = field(default=1, metadata={"help": "retries of a failed trial"})
    spot: bool = field(default=False, metadata={"help": "trials go to spot nodes: each trial (or Train worker) asks for the `spot` resource only spot node types declare (cluster/launcher, cluster/kuberay); a preempted trial is retried (max_failures)"})
    pid_dir: str = field(default="", metadata={"help": "each trial's training process writes <pid_dir>/<run>/rank<r>.pid (operators and the fault tests find them); '' = none"})

    def validate(self) -> None:
        for m in self.methods:
            get_method(m, field="methods")
        positive(self, "budgets", "domain_tokens", "cpus_per_trial")
        positive(self, "lrs")
        positive(self, "max_concurrent", "gpus_per_trial", "max_failures", allow_zero=True)
        positive(self, "asha_grace", "workers_per_trial")
        if self.trial_runtime not in TRIAL_RUNTIMES:
            raise ConfigError(f"field 'trial_runtime' is '{self.trial_runtime}'; use {' or '.join(TRIAL_RUNTIMES)}")
        if self.workers_per_trial > 1 and self.trial_runtime == "local":
            raise ConfigError(f"field 'workers_per_trial' is {self.workers_per_trial} but trial_runtime is "
                              "'local' (one worker, in the trial's process); set trial_runtime: train")
        if self.workers_per_trial > 1 and 0 < self.gpus_per_trial != int(self.gpus_per_trial):
            raise ConfigError(f"field 'gpus_per_trial' is {self.gpus_per_trial} with workers_per_trial "
                              f"{self.workers_per_trial}: each worker of a multi-worker trial holds a whole "
                              "GPU; use gpus_per_trial 1 (or workers_per_trial 1 to share GPUs between trials)")
        check_seeds("pretrain_seeds", self.pretrain_seeds)
        check_seeds("seeds", self.seeds)
        distinct(self, "domains", "methods", "budgets", "domain_tokens", "lrs", "levels")
        if not self.name or "/" in self.name:
            raise ConfigError(f"field 'name' is '{self.name}'; give the sweep a plain name (no '/')")
        if not self.methods or not self.budgets or not self.seeds:
            raise ConfigError("fields 'methods', 'budgets' and 'seeds' must each list at least one value")
