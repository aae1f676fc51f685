"""Logging for the training loop: TensorBoard (default), MLflow or W&B from rank 0, plus
console progress lines (step, loss, tokens/s, MFU, ETA) and the run's cost meter.

Ray Train V2 keeps only the metrics attached to checkpoints, so rank 0 logs every step itself
(ecosystem.md §1.0). TensorBoard event files go under the run's storage
(``<storage>/<name>/tensorboard``); on object storage they are written locally and copied there
at each checkpoint.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

from slm.errors import SlmError
from slm.stage import filesystem, is_remote, join


# --------------------------------------------------------------------------------------------
# Cost accounting: what C_pretrain is made of, summed over a run (and over its restarts).
# --------------------------------------------------------------------------------------------

@dataclass
class Costs:
    """Measured training cost of one run (written to ``costs.json``).

    ``flops`` is the model-FLOPs formula (models/flops.py) times the tokens trained;
    ``device_seconds`` is the wall time of the training steps times the devices working on them
    (workers × 1 device each); evaluation and checkpoint time are kept apart."""

    flops: float = 0.0
    device_seconds: float = 0.0
    tokens: int = 0
    steps: int = 0
    params: int = 0
    trainable_params: int = 0  # what the optimizer updates: params, or LoRA's adapters
    flops_per_token: float = 0.0
    eval_device_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    world_size: int = 1
    device: str = "cpu"
    attempts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def add_step(self, tokens: int, seconds: float, flops: float) -> None:
        """One optimizer step: its tokens, wall seconds and model FLOPs (all workers)."""
        self.steps += 1
        self.tokens += tokens
        self.flops += flops
        self.device_seconds += seconds * self.world_size

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        extra = out.pop("extra")
        out.update(extra)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Costs":
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})


def sum_costs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Costs of several runs (e.g. the k experts of SLM-mix) as one: sums, params summed too
    (a mixture holds every expert's parameters during pretraining)."""
    keys = ("flops", "device_seconds", "tokens", "steps", "params", "eval_device_seconds",
            "checkpoint_seconds")
    out: dict[str, Any] = {k: sum(p.get(k, 0) for p in parts) for k in keys}
    out["runs"] = len(parts)
    return out


# --------------------------------------------------------------------------------------------
# Metric sinks (rank 0 only)
# --------------------------------------------------------------------------------------------

def tracker_run_id(run_name: str, run_dir: str) -> str:
    """The run's id in the tracker: its name plus a hash of its directory, so two runs of the
    same name (every recipe has a pretraining run named 'slm') never write into one tracker
    run, while a resumed run (same directory) continues its own."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-")[:80] or "run"
    return f"{safe}-{hashlib.sha256(run_dir.encode('utf-8')).hexdigest()[:10]}"


class MetricLogger:
    """Writes scalar metrics to the chosen backend; ``none`` writes nothing."""

    def __init__(self, kind: str, run_dir: str, run_name: str, config: dict[str, Any],
                 group: str = "", tensorboard: str = ""):
        self.kind = kind
        self.tb_target = tensorboard or join(run_dir, "tensorboard")
        self.run_id = tracker_run_id(run_name, run_dir)
        self.run_dir = run_dir
        self._tb = None
        self._local_tb = None
        self._mlflow = None
        self._wandb = None
        # The sinks' packages are imported only when chosen: tensorboard, mlflow and wandb are
        # optional extras (pyproject's `logging`), not dependencies.
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            target = self.tb_target
            if is_remote(target):
                self._local_tb = tempfile.mkdtemp(prefix="slm-tb-")
                self._tb = SummaryWriter(self._local_tb)
            else:
                self._tb = SummaryWriter(filesystem(target)[1])
        elif kind == "mlflow":
            try:
                import mlflow
            except ImportError:
                raise SlmError("pretrain.logger is 'mlflow' but mlflow is not installed; "
                               "`pip install mlflow` or set --pretrain.logger tensorboard") from None
            mlflow.set_experiment(group or run_name)
            self._mlflow = mlflow
            mlflow.start_run(run_name=run_name, tags={"slm.run_id": self.run_id, "slm.group": group})
            mlflow.log_params({k: str(v)[:250] for k, v in config.items()})
        elif kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise SlmError("pretrain.logger is 'wandb' but wandb is not installed; "
                               "`pip install wandb` or set --pretrain.logger tensorboard") from None
            self._wandb = wandb.init(name=run_name, id=self.run_id, group=group or None,
                                     resume="allow", config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(metrics, step=step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def flush(self) -> None:
        """Make the event files durable (called at checkpoints): flush, and copy them to
        object storage when the run's storage is remote."""
        if self._tb is None:
            return
        self._tb.flush()
        if self._local_tb:
            fs, path = filesystem(self.tb_target)
            fs.create_dir(path, recursive=True)
            pafs.copy_files(self._local_tb, path, destination_filesystem=fs)

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb.close()
            if self._local_tb:
                shutil.rmtree(self._local_tb, ignore_errors=True)
        if self._mlflow is not None:
            self._mlflow.end_run()
        if self._wandb is not None:
            self._wandb.finish()


# --------------------------------------------------------------------------------------------
# Console progress (rank 0)
# --------------------------------------------------------------------------------------------

def console(line: str) -> None:
    """One line on the worker's stdout, which Ray streams to the driver. Not ``print``: in a
    Train worker Ray Train patches ``print`` to tee into its logger as well, and the driver
    showed every progress line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Prints ``[name] step 120/400 | loss 3.21 | 5.1k tok/s | MFU 1.2% | ETA 0:01:05``."""

    def __init__(self, name: str, total_steps: int, start_step: int, every: int):
        self.name = name
        self.total = total_steps
        self.every = max(1, every)
        self.t0 = time.perf_counter()
        self.s0 = start_step

    def maybe_print(self, step: int, metrics: dict[str, float], force: bool = False) -> None:
        if not force and step % self.every and step != self.total:
            return
        done = step - self.s0
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        parts = [f"[{self.name}] step {step}/{self.total}", f"loss {metrics['train/loss']:.4f}"]
        if "valid/loss" in metrics:
            parts.append(f"valid {metrics['valid/loss']:.4f}")
        parts.append(f"{metrics['perf/tokens_per_s'] / 1000:.1f}k tok/s")
        parts.append(f"MFU {100 * metrics['perf/mfu']:.2f}%")
        parts.append(f"ETA {_fmt_eta(eta)}")
        console(" | ".join(parts))
