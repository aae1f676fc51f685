"""``slm pretrain``: build the Ray Datasets of a family from the token shards, run the one
training loop (models/train.py) under Ray Train + DeepSpeed, and publish the results.

Runs and where they live (deterministic names, so a re-submitted run resumes; ecosystem §1.0):

  family  data (train / valid)                                       run(s)
  slm     generic minus held-out / held-out generic                  pretrain/slm
  llm     same, llm_size model                                       pretrain/llm
  pn      same, rows routed by cluster_k<k_pn>                       pretrain/pn
  mix     generic rows with cluster_k<k_mix> == i / held-out, same i pretrain/mix/expert-<i>
  is      is-k<k_is>-<d> / domain-<d>-valid                          pretrain/is/<d>

Held-out generic rows are those whose window_id hashes into ``pretrain.valid_fraction``; they
are never trained on. Each run directory is Ray Train's storage (``step=*`` checkpoints,
TensorBoard events) and, once finished, holds ``final/`` (published atomically: a plain HF
directory; for pn the whole ProjectedLM) and ``costs.json``. mix and is also get a
``costs.json`` summing their runs. A run with ``final/`` and ``costs.json`` is not retrained.
SLM-mix trains its experts in parallel: a Ray Tune grid over expert ids, each trial driving its
own TorchTrainer (Train-in-Tune), at most ``scaling.parallel_experts`` at once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from slm.configkit import ConfigError, validate
from slm.errors import InputError, SlmError, StageError
from slm.layout import RunLayout, domain_set, is_set
from slm.stage import exists, filesystem, is_remote, join, manifest, publish, read_json, write_json

from . import checkpoint as ckpt
from .config import FAMILIES
from .families import FamilySpec, build_family
from .metrics import sum_costs
from .train import COSTS_FILE, EXPORT_DIR, signature, train_loop_per_worker

log = logging.getLogger(__name__)

_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)
_BUCKETS = 1_000_000


# --------------------------------------------------------------------------------------------
# Data: shards → Ray Datasets (streamed; nothing is collected on the driver)
# --------------------------------------------------------------------------------------------

def holdout_mask(window_ids: np.ndarray, fraction: float) -> np.ndarray:
    """True for the held-out windows: a fixed hash of window_id falls in the first
    ``fraction`` of the buckets (independent of file layout, seed and world size)."""
    x = window_ids.astype(np.uint64) * _HASH_MUL
    x ^= x >> np.uint64(29)
    return (x % np.uint64(_BUCKETS)) < np.uint64(int(fraction * _BUCKETS))


def prepare_rows(batch: dict[str, np.ndarray], *, split: str, fraction: float,
                 route: str | None, select: str | None, value: int) -> dict[str, np.ndarray]:
    """Ray Data map: keep this split's rows (and one cluster for a mix expert), as int64
    ``input_ids`` [n, seq_len] (+ ``cluster`` [n] when a column routes the batch)."""
    keep = np.ones(len(batch["window_id"]), dtype=bool)
    if split != "all":
        held = holdout_mask(batch["window_id"], fraction)
        keep &= held if split == "valid" else ~held
    if select is not None:
        keep &= batch[select] == value
    ids = batch["input_ids"][keep]
    out = {"input_ids": np.stack(list(ids)).astype(np.int64) if len(ids) else
           np.zeros((0, 0), dtype=np.int64)}
    if route is not None:
        out["cluster"] = batch[route][keep].astype(np.int64)
    return out


@dataclass
class ShardSet:
    """One shard set of the run (a published parquet artifact) and its checked properties."""

    uri: str
    files: list[str]


def open_shards(layout: RunLayout, name: str, recipe_path: str, need: list[str],
                seq_len: int) -> ShardSet:
    """Check a shard set exists, has the columns the family needs and windows of seq_len."""
    import pyarrow.parquet as pq

    from slm.pipeline.artifacts import parquet_files

    uri = layout.shards(name)
    make = f"`slm data run --recipe {recipe_path}`"
    if manifest(uri) is None:
        raise StageError(f"token shards '{uri}' are missing (not done); build them with {make}")
    files = parquet_files(uri)
    if not files:
        raise InputError(f"token shards '{uri}' hold no parquet files; delete the directory and "
                         f"re-run {make}")
    fs, _ = filesystem(uri)
    pf = pq.ParquetFile(fs.open_input_file(files[0]))
    cols = set(pf.schema_arrow.names)
    for c in ["window_id", "input_ids"] + need:
        if c not in cols:
            raise InputError(f"token shards '{uri}' (file '{files[0]}') have no column '{c}' "
                             f"(columns: {', '.join(sorted(cols))}); rebuild them with {make} "
                             "so that every k of the recipe has its cluster column")
    if pf.metadata.num_rows:
        first = pf.read_row_group(0, columns=["input_ids"]).column(0)[0].as_py()
        if len(first) != seq_len:
            raise InputError(f"token shards '{uri}' hold windows of {len(first)} tokens but "
                             f"data.seq_len is {seq_len}; rebuild the shards or set "
                             f"--data.seq_len {len(first)}")
    return ShardSet(uri, files)


def shard_dataset(shards: ShardSet, *, seed: int, split: str, fraction: float,
                  route: str | None = None, select: str | None = None, value: int = 0):
    """A Ray Dataset of prepared rows. Files are read in an order seeded by ``seed`` (the
    first half of the data order; the loop permutes windows by (seed, epoch))."""
    import ray.data

    fs, _ = filesystem(shards.uri)
    files = [shards.files[i] for i in np.random.default_rng(seed).permutation(len(shards.files))]
    cols = ["window_id", "input_ids"] + sorted({c for c in (route, select) if c})
    ds = ray.data.read_parquet(files, filesystem=fs).select_columns(cols)
    return ds.map_batches(prepare_rows, batch_format="numpy",
                          fn_kwargs={"split": split, "fraction": fraction, "route": route,
                                     "select": select, "value": value},
                          compute=ray.data.TaskPoolStrategy(size=2))


def check_cluster_ids(shards: ShardSet, column: str, k: int) -> None:
    """Every cluster id in [0, k): a distributed min/max over the one column."""
    import ray.data
    from ray.data.aggregate import Max, Min

    fs, _ = filesystem(shards.uri)
    ds = ray.data.read_parquet(shards.files, filesystem=fs).select_columns([column])
    agg = ds.aggregate(Min(column), Max(column)) or {}
    lo, hi = agg.get(f"min({column})"), agg.get(f"max({column})")
    if lo is None:
        return
    if lo < 0 or hi >= k:
        bad = lo if lo < 0 else hi
        raise InputError(f"token shards '{shards.uri}' have {column} = {bad}, outside [0, {k}); "
                         "the shards were built with another k-means: rebuild them with "
                         "`slm data run --force`")


def valid_dataset(ds, rows: int, what: str):
    """The first ``rows`` held-out rows, materialized once (every evaluation reads the same
    small set). Fewer rows than a global batch are fine: evaluation takes partial batches."""
    valid = ds.limit(rows).materialize()
    if valid.count() == 0:
        raise InputError(f"{what} has no held-out rows; raise pretrain.valid_fraction (generic "
                         "shards) or give the domain a larger valid split (at least one window "
                         "of data.seq_len tokens)")
    return valid


# --------------------------------------------------------------------------------------------
# One training run: a TorchTrainer with deterministic name and storage
# --------------------------------------------------------------------------------------------

@dataclass
class RunSpec:
    """Everything one training run needs (JSON-able apart from the datasets)."""

    name: str                   # Ray Train run name (also the run's directory name)
    storage: str                # Ray Train storage_path (local path or URI)
    family: dict[str, Any]      # FamilySpec.to_dict()
    train: dict[str, Any]       # TrainConfig as a dict
    scaling: dict[str, Any]     # ScalingConfig as a dict
    steps: int
    seed: int
    data: str                   # what it trains on (recorded in the checkpoint signature)
    logger: str = "tensorboard"
    stop_at: int | None = None
    pid_dir: str | None = None
    extra: dict[str, Any] | None = None  # optional loop keys (specialization: models/train.py)

    @property
    def run_uri(self) -> str:
        return join(self.storage, self.name)

    def precision(self) -> str:
        p = self.train["precision"]
        return p if p != "auto" else ("bf16" if self.scaling["use_gpu"] else "fp32")

    def loop_config(self) -> dict[str, Any]:
        return {"family": self.family, "train": self.train, "steps": self.steps,
                "seed": self.seed, "data": self.data, "run_name": self.name,
                "run_uri": self.run_uri, "logger": self.logger, "stop_at": self.stop_at,
                "pid_dir": self.pid_dir, **(self.extra or {})}

    def global_batch(self) -> int:
        return self.train["micro_batch"] * self.train["grad_accum"] * self.scaling["num_workers"]


def check_resumable(spec: RunSpec) -> str | None:
    """Before starting workers: the latest checkpoint of this run (if any) must be intact and
    of this model/config. Returns its URI."""
    latest = ckpt.latest(spec.run_uri)
    if latest is None:
        return None
    record = ckpt.verify(latest)
    fam = build_family(spec.family)
    expected = signature(spec.loop_config(), fam, spec.scaling["num_workers"], spec.precision())
    ckpt.check_signature(record["signature"], expected, latest)
    return latest


def _storage_path(storage: str) -> str:
    return storage if is_remote(storage) else os.path.abspath(storage)


def _user_error(e: BaseException) -> SlmError | None:
    """The SlmError behind a Ray Train failure, if a worker raised one."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, SlmError):
            return x
        stack.extend([x.__cause__, x.__context__, getattr(x, "cause", None)])
        stack.extend(getattr(x, "worker_failures", {}).values())
    return None


def run_training(spec: RunSpec, train_ds, valid_ds, callbacks: list | None = None) -> dict[str, Any]:
    """Run (or resume) one training run to ``spec.steps`` (or ``spec.stop_at``). Returns
    ``{"checkpoint": uri, "metrics": {...}, "finished": bool}``. ``callbacks``: Ray Train
    callbacks (a Tune trial passes TuneReportCallback to forward the reports)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    check_resumable(spec)
    sc = spec.scaling
    resources = {"CPU": sc["cpus_per_worker"]} | ({"GPU": 1} if sc["use_gpu"] else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.loop_config(),
        scaling_config=ray.train.ScalingConfig(num_workers=sc["num_workers"], use_gpu=sc["use_gpu"],
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=spec.name, storage_path=_storage_path(spec.storage), callbacks=callbacks or None,
            failure_config=ray.train.FailureConfig(max_failures=sc["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.train["keep_checkpoints"])),
        datasets={"train": train_ds, "valid": valid_ds},
        # Not split: every worker reads the same ordered stream and takes its rank's slice of
        # each global batch (deterministic order; see models/train.py).
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        user = _user_error(e)
        if user is not None:
            raise type(user)(str(user)) from None
        raise StageError(f"training run '{spec.run_uri}' failed: {e}") from e
    if result.checkpoint is None:
        raise StageError(f"training run '{spec.run_uri}' reported no checkpoint; check its logs")
    ck_uri = _ck_uri(result.checkpoint, spec)
    return {"checkpoint": ck_uri, "metrics": dict(result.metrics or {}),
            "finished": exists(join(ck_uri, COSTS_FILE))}


def _ck_uri(checkpoint, spec: RunSpec) -> str:
    """A Ray Checkpoint's location as a URI our filesystem helpers take."""
    path = checkpoint.path
    if is_remote(spec.storage):
        scheme = spec.storage.split("://", 1)[0]
        return path if "://" in path else f"{scheme}://{path}"
    return path


def publish_final(checkpoint_uri: str, run_dir: str, *, stage: str, config: dict[str, Any]) -> dict[str, Any]:
    """Copy the final checkpoint's export to ``<run_dir>/final`` (atomic publish; costs in the
    manifest), then write ``<run_dir>/costs.json``. Returns the costs."""
    import pyarrow.fs as pafs

    costs = read_json(join(checkpoint_uri, COSTS_FILE))
    src_fs, src = filesystem(join(checkpoint_uri, EXPORT_DIR))
    with publish(join(run_dir, "final"), stage=stage, config=config, force=True) as out:
        pafs.copy_files(src, out.path, source_filesystem=src_fs, destination_filesystem=out.fs)
        out.manifest["costs"] = costs
        out.manifest["checkpoint"] = checkpoint_uri
    write_json(join(run_dir, COSTS_FILE), costs)
    return costs


def run_done(run_dir: str) -> bool:
    return manifest(join(run_dir, "final")) is not None and exists(join(run_dir, COSTS_FILE))


# --------------------------------------------------------------------------------------------
# pretrain(recipe, family)
# --------------------------------------------------------------------------------------------

def _vocab_size(layout: RunLayout, recipe_path: str) -> int:
    from tokenizers import Tokenizer

    uri = layout.tokenizer
    if manifest(uri) is None:
        raise StageError(f"tokenizer '{uri}' is missing (not done); build it with "
                         f"`slm data run --recipe {recipe_path}`")
    fs, path = filesystem(join(uri, "tokenizer.json"))
    with fs.open_input_stream(path) as f:
        return Tokenizer.from_str(f.read().decode("utf-8")).get_vocab_size()


def recipe_domains(recipe) -> list[str]:
    """The recipe's domains: corpus.domains, or the demo domains for the demo corpus."""
    if recipe.corpus.domains:
        return list(recipe.corpus.domains)
    return list(recipe.corpus.demo_domains) if recipe.corpus.generic == "demo" else []


def _base_spec(recipe, family: str, vocab: int, steps: int, storage: str, name: str,
               data: str) -> RunSpec:
    p = recipe.pretrain
    size = p.llm_size if family == "llm" else p.slm_size
    fam = FamilySpec(family=family, size=size, vocab_size=vocab, seq_len=recipe.data.seq_len,
                     n_experts=recipe.kmeans.k_pn if family == "pn" else 0,
                     pn_h=p.pn_h if family == "pn" else 0, pn_m=p.pn_m if family == "pn" else 0)
    return RunSpec(name=name, storage=storage, family=fam.to_dict(), train=asdict(p.train),
                   scaling=asdict(p.scaling), steps=steps, seed=recipe.seed, data=data,
                   logger=p.logger)


def _storage(recipe, layout: RunLayout, family: str) -> str:
    """Ray Train storage of a family's runs: the run directory, or cluster.storage on clusters."""
    base = join(recipe.cluster.storage, "pretrain") if recipe.cluster.storage else layout.path("pretrain")
    return base if family in ("slm", "llm", "pn") else join(base, family)


def _final_dir(layout: RunLayout, family: str, sub: str) -> str:
    return join(layout.pretrain(family), sub) if sub else layout.pretrain(family)


def _train_and_publish(spec: RunSpec, train_ds, valid_ds, run_dir: str, recipe_name: str) -> dict[str, Any]:
    out = run_training(spec, train_ds, valid_ds)
    if not out["finished"]:
        return {"finished": False, "checkpoint": out["checkpoint"]}
    costs = publish_final(out["checkpoint"], run_dir, stage=f"pretrain-{spec.name}",
                          config={"recipe": recipe_name, "family": spec.family, "train": spec.train,
                                  "steps": spec.steps, "seed": spec.seed, "data": spec.data})
    return {"finished": True, "final": join(run_dir, "final"), "costs": costs}


def _mix_expert_trial(cfg: dict[str, Any], recipe=None, recipe_path: str = "", vocab: int = 0) -> dict[str, Any]:
    """Ray Tune function trainable: train one SLM-mix expert with its own TorchTrainer."""
    out = _mix_expert(recipe, recipe_path, vocab, int(cfg["expert"]))
    return {"expert": int(cfg["expert"]), "finished": out["finished"]}


def _mix_expert(recipe, recipe_path: str, vocab: int, i: int) -> dict[str, Any]:
    layout = RunLayout(recipe.run_dir)
    p, k = recipe.pretrain, recipe.kmeans.k_mix
    col = f"cluster_k{k}"
    shards = open_shards(layout, "generic", recipe_path, [col], recipe.data.seq_len)
    spec = _base_spec(recipe, "mix", vocab, p.steps["mix"], _storage(recipe, layout, "mix"),
                      f"expert-{i}", f"generic:{col}=={i}")
    kw = dict(seed=recipe.seed, fraction=p.valid_fraction, select=col, value=i)
    train = shard_dataset(shards, split="train", **kw)
    valid = valid_dataset(shard_dataset(shards, split="valid", **kw),
                          p.train.eval_batches * spec.global_batch(), f"expert {i} of '{shards.uri}'")
    return _train_and_publish(spec, train, valid, _final_dir(layout, "mix", f"expert-{i}"), recipe.name)


def _parallel_experts(recipe, todo: list[int]) -> int:
    """How many experts train at once: scaling.parallel_experts, else as many runs as the
    cluster's GPUs (GPU training) or CPUs hold, keeping one CPU free for the Ray Data tasks
    that feed the workers (on CPU-only clusters they compete with the workers)."""
    import ray

    sc = recipe.pretrain.scaling
    if sc.parallel_experts:
        return min(sc.parallel_experts, len(todo))
    res = ray.cluster_resources()
    if sc.use_gpu:
        fits = res.get("GPU", 0) // sc.num_workers
    else:
        fits = (res.get("CPU", 1) - 1) // (sc.num_workers * sc.cpus_per_worker)
    return int(max(1, min(len(todo), fits)))


def _train_mix(recipe, recipe_path: str, vocab: int) -> dict[str, Any]:
    from ray import tune

    from slm.cluster.ray_env import TRIAL_DRIVER_RESOURCES

    layout = RunLayout(recipe.run_dir)
    k = recipe.kmeans.k_mix
    col = f"cluster_k{k}"
    shards = open_shards(layout, "generic", recipe_path, [col], recipe.data.seq_len)
    check_cluster_ids(shards, col, k)
    todo = [i for i in range(k) if not run_done(_final_dir(layout, "mix", f"expert-{i}"))]
    for i in todo:  # fail fast on a foreign/corrupted checkpoint, before any trial starts
        spec = _base_spec(recipe, "mix", vocab, recipe.pretrain.steps["mix"],
                          _storage(recipe, layout, "mix"), f"expert-{i}", f"generic:{col}=={i}")
        check_resumable(spec)
    if todo:
        storage = _storage(recipe, layout, "mix")
        trainable = tune.with_resources(
            tune.with_parameters(_mix_expert_trial, recipe=recipe, recipe_path=recipe_path, vocab=vocab),
            TRIAL_DRIVER_RESOURCES)  # the trial only drives its TorchTrainer
        tuner = tune.Tuner(
            trainable, param_space={"expert": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(max_concurrent_trials=_parallel_experts(recipe, todo)),
            run_config=tune.RunConfig(name="experts-tune", storage_path=_storage_path(storage),
                                      failure_config=tune.FailureConfig(max_failures=0)))
        grid = tuner.fit()
        for r in grid:
            if r.error is not None:
                user = _user_error(r.error)
                if user is not None:
                    raise type(user)(str(user)) from None
                raise StageError(f"SLM-mix expert {r.config.get('expert')} failed: {r.error}")
    parts = {}
    for i in range(k):
        d = _final_dir(layout, "mix", f"expert-{i}")
        if not run_done(d):
            raise StageError(f"SLM-mix expert {i} did not finish ('{d}' has no final/); re-run "
                             "`slm pretrain --family mix` to resume it")
        parts[f"expert-{i}"] = read_json(join(d, COSTS_FILE))
    costs = {**sum_costs(list(parts.values())), "per_run": parts}
    write_json(join(layout.pretrain("mix"), COSTS_FILE), costs)
    return {"family": "mix", "runs": {n: join(_final_dir(layout, "mix", n), "final") for n in parts},
            "costs": costs}


def pretrain(recipe, family: str, domains: list[str] | None = None, recipe_path: str | None = None) -> dict[str, Any]:
    """Pretrain one family of the recipe (see the module docstring); returns
    ``{"family", "runs": {name: final_uri}, "costs": {...}}``. Finished runs are not retrained;
    unfinished ones resume from their latest checkpoint."""
    from slm.cluster.ray_env import ray_session
    from slm.config import resolve_paths

    recipe = resolve_paths(recipe)  # mix experts run as Tune trials, in their own directories
    if family not in FAMILIES:
        raise ConfigError(f"unknown family '{family}'; known: {', '.join(FAMILIES)}")
    validate(recipe)
    p = recipe.pretrain
    if family not in p.steps:
        raise ConfigError(f"field 'pretrain.steps' has no budget for family '{family}'; "
                          f"add e.g. --pretrain.steps '{{{family}: 1000}}'")
    recipe_path = recipe_path or recipe.name
    layout = RunLayout(recipe.run_dir)
    run_dir = layout.pretrain(family)
    if family not in ("mix", "is") and run_done(run_dir):  # finished: nothing to start
        return {"family": family, "runs": {family: join(run_dir, "final")},
                "costs": read_json(join(run_dir, COSTS_FILE))}
    vocab = _vocab_size(layout, recipe_path)
    route = f"cluster_k{recipe.kmeans.k_pn}" if family == "pn" else None
    if family not in ("mix", "is"):  # checks that need no Ray, before starting it
        shards = open_shards(layout, "generic", recipe_path, [route] if route else [],
                             recipe.data.seq_len)
    with ray_session(recipe.cluster):
        if family == "mix":
            return _train_mix(recipe, recipe_path, vocab)
        if family == "is":
            return _train_is(recipe, recipe_path, vocab, domains or recipe_domains(recipe))
        if route:
            check_cluster_ids(shards, route, recipe.kmeans.k_pn)
        spec = _base_spec(recipe, family, vocab, p.steps[family], _storage(recipe, layout, family),
                          family, "generic")
        kw = dict(seed=recipe.seed, fraction=p.valid_fraction, route=route)
        train = shard_dataset(shards, split="train", **kw)
        valid = valid_dataset(shard_dataset(shards, split="valid", **kw),
                              p.train.eval_batches * spec.global_batch(),
                              f"'{shards.uri}'")
        out = _train_and_publish(spec, train, valid, run_dir, recipe.name)
        if not out["finished"]:
            raise StageError(f"pretraining '{family}' stopped before its last step; re-run to resume")
        return {"family": family, "runs": {family: out["final"]}, "costs": out["costs"]}


def _train_is(recipe, recipe_path: str, vocab: int, domains: list[str]) -> dict[str, Any]:
    """SLM-is: one run per domain on its resampled generic set, validated on the domain's valid
    split. Runs one after another (each may use the whole cluster)."""
    layout = RunLayout(recipe.run_dir)
    if not domains:
        raise ConfigError("family 'is' needs domains: set corpus.domains (or use the demo corpus)")
    p, k = recipe.pretrain, recipe.kmeans.k_is
    parts, runs = {}, {}
    for d in domains:
        run_dir = _final_dir(layout, "is", d)
        if not run_done(run_dir):
            train_shards = open_shards(layout, is_set(d, k), recipe_path, [], recipe.data.seq_len)
            valid_shards = open_shards(layout, domain_set(d, "valid"), recipe_path, [], recipe.data.seq_len)
            spec = _base_spec(recipe, "is", vocab, p.steps["is"], _storage(recipe, layout, "is"),
                              d, is_set(d, k))
            train = shard_dataset(train_shards, seed=recipe.seed, split="all", fraction=p.valid_fraction)
            valid = valid_dataset(shard_dataset(valid_shards, seed=recipe.seed, split="all",
                                                fraction=p.valid_fraction),
                                  p.train.eval_batches * spec.global_batch(), f"'{valid_shards.uri}'")
            out = _train_and_publish(spec, train, valid, run_dir, recipe.name)
            if not out["finished"]:
                raise StageError(f"pretraining 'is' for domain '{d}' stopped before its last step")
        parts[d] = read_json(join(run_dir, COSTS_FILE))
        runs[d] = join(run_dir, "final")
    costs = {**sum_costs(list(parts.values())), "per_run": parts}
    write_json(join(layout.pretrain("is"), COSTS_FILE), costs)
    return {"family": "is", "runs": runs, "costs": costs}
