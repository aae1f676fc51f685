"""``slm pretrain``: pretrain one family of the recipe: open its token shards as Ray Datasets
(models/data.py), run the one training loop through the launcher (models/launch.py: Ray Train +
DeepSpeed) and publish the results.

What a family trains is data in the family registry (models/config.py ``FAMILY_INFO``): which
size preset (``size``), how many runs (``runs``) and whether rows are routed by cluster
(``routed``). Runs and where they live (slm.layout ``RunLayout.pretrain``; deterministic names,
so a re-submitted run resumes; ecosystem §1.0):

  runs        data (train / valid)                                       run(s)
  one         generic minus held-out / held-out generic                  pretrain/<f>
              (routed: generic-k<k_pn>, rows routed by cluster_k<k_pn>)
  per_expert  generic-k<k_mix> rows with cluster_k<k_mix> == i /         pretrain/<f>/expert-<i>
              held-out, same i
  per_domain  is-k<k_is>-<d>-<T> / domain-<d>-valid                      pretrain/<f>/<d>-<T>

``generic-k<K>`` is the generic text packed into windows one cluster at a time
(pipeline/shards.py ``build_packed_shards``): a routed or per-expert family trains on windows
whose every token is text of the cluster they are labelled with.
Today: slm, llm (llm_size), pn (routed) are ``one``; mix is ``per_expert``; is is
``per_domain``: one run per domain and domain train size T (the sizes the sweep specializes:
``Recipe.domain_sizes``), on generic data resampled to the histogram of that size's train
subset, so the SLM-is trial of size T starts from a model that saw no more of the domain.
Each family is trained once per pretraining seed (``pretrain.seeds``: model init and data
order; the held-out rows do not change): the recipe's ``seed`` at the paths above, another
seed ``s`` at the same paths under ``pretrain/seed-<s>/`` (slm.layout).
Each run directory is Ray Train's storage (``step=*`` checkpoints, TensorBoard events) and,
once finished, holds ``final/`` (published atomically: a plain HF directory; for a
routed family the whole ProjectedLM), ``costs.json``, and one ``level-<x>/`` per pretraining level
below 1 (``pretrain.levels``: the same run's model at that fraction of its steps, exported by the
worker when it got there, with its costs to that step; the sweep specializes from each). Families of several runs also get a
``costs.json`` summing them. A run with ``final/`` and ``costs.json`` is not retrained. The
experts of a ``per_expert`` family train in parallel: a Ray Tune grid over expert ids, each trial
driving its own TorchTrainer (Train-in-Tune), at most ``scaling.parallel_experts`` at once.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any

import ray
from ray import tune

from slm.cluster.ray_env import TRIAL_DRIVER_RESOURCES, ray_session, warn_without_spot
from slm.config import resolve_paths
from slm.configkit import ConfigError, validate
from slm.errors import StageError, reraise_user_error
from slm.layout import (RunLayout, domain_of_run, domain_run, domain_set, expert_name, is_set,
                        packed_set, train_root)
from slm.pipeline.tokenizer import run_vocab_size
from slm.stage import fingerprint, input_fingerprints, join, manifest, read_json, write_json

from .config import FAMILY_INFO, FamilyInfo, level_name
from .data import ShardSet, check_cluster_ids, open_shards, shard_dataset, valid_dataset
from .families import FamilySpec
from .launch import (RunSpec, check_resumable, clear_foreign, publish_final, publish_levels, run_done,
                     run_training, storage_path)
from .loop_config import pretraining_config
from .metrics import console, sum_costs

log = logging.getLogger(__name__)


def recipe_domains(recipe) -> list[str]:
    """The recipe's domains: corpus.domains, or the demo domains for the demo corpus."""
    if recipe.corpus.domains:
        return list(recipe.corpus.domains)
    return list(recipe.corpus.demo_domains) if recipe.corpus.generic == "demo" else []


@dataclass
class _Family:
    """One family's pretraining: the recipe, the family's registry entry, the vocabulary."""

    recipe: Any
    info: FamilyInfo
    recipe_path: str
    vocab: int
    force: bool = False  # rebuild a run published from another config or data
    pretrain_seed: int | None = None  # the pretraining seed (model init, data order); None: recipe.seed

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.recipe.run_dir)

    @property
    def seed(self) -> int:
        return self.recipe.seed if self.pretrain_seed is None else int(self.pretrain_seed)

    @property
    def tree(self) -> int | None:
        """The seed as the layout names its runs (None: the recipe's seed, today's paths)."""
        return self.recipe.layout_seed(self.seed)

    def model(self) -> FamilySpec:
        r, p, routed = self.recipe, self.recipe.pretrain, self.info.routed
        return FamilySpec(family=self.info.name, size={"slm": p.slm_size, "llm": p.llm_size}[self.info.size],
                          vocab_size=self.vocab, seq_len=r.data.seq_len,
                          n_experts=r.kmeans.k_pn if routed else 0,
                          pn_h=p.pn_h if routed else 0, pn_m=p.pn_m if routed else 0)

    def location(self, sub: str) -> tuple[str, str]:
        """(Ray Train storage, run name) of one run: the parent and name of its directory, in
        the run directory or under ``<cluster.storage>/<run id>`` (slm.layout ``train_root``)."""
        parent, name = self.layout.relative(self.layout.pretrain(self.info.name, sub, self.tree)).rsplit("/", 1)
        return join(train_root(self.layout, self.recipe.cluster.storage), parent), name

    def sources(self, sub: str, data: str) -> list[str]:
        """The shard sets one run is built from (what its data fingerprint covers): a
        per-domain run's train set is ``data`` (its is-k<K>-<d>-<T> set)."""
        if self.info.runs == "per_domain":
            return [self.layout.shards(data), self.layout.shards(domain_set(domain_of_run(sub), "valid"))]
        return [self.layout.shards(self.generic_set())]

    def generic_set(self) -> str:
        """The generic shard set a ``one`` or ``per_expert`` family trains on: the windows as
        cut (no clusters), or, for a routed or per-expert family, packed per cluster at the k it
        routes or splits by (each window is text of its labelled cluster)."""
        if self.info.runs == "per_expert":
            return packed_set("generic", self.recipe.kmeans.k_mix)
        if self.info.routed:
            return packed_set("generic", self.recipe.kmeans.k_pn)
        return "generic"

    def data_fingerprint(self, sub: str, data: str) -> str:
        """Content fingerprint of one run's data: its shard sets' manifest fingerprints (which
        chain back to the corpus, tokenizer and k-means), keyed run-relative, and the rows it
        selects (``data``)."""
        return fingerprint({"data": data, "inputs": input_fingerprints(self.layout, *self.sources(sub, data))})

    def final_config(self, sub: str, data: str) -> dict[str, Any]:
        """What a published ``final/`` is built from (its manifest's fingerprinted config)."""
        r, f = self.recipe, self.info.name
        return {"family": self.model().to_dict(), "train": asdict(r.pretrain.train),
                "steps": r.pretrain.steps[f], "levels": self.levels(), "seed": self.seed, "data": data,
                "data_fingerprint": self.data_fingerprint(sub, data)}

    def levels(self) -> dict[str, int]:
        """{level name: step} of the family's pretraining levels (pretrain.levels)."""
        return {level_name(lv): st for lv, st in self.recipe.pretrain.level_steps(self.info.name).items()}

    def done(self, sub: str, data: str) -> bool:
        """A run published from this very config and data is not retrained; one published from
        another config or data is refused, naming what differs (never silently reused), or,
        with ``force``, rebuilt (its ``final/`` is replaced only once the rebuild finishes)."""
        if not run_done(self.layout, self.info.name, sub, self.tree):
            return False
        final = self.layout.pretrain_final(self.info.name, sub, self.tree)
        found = (manifest(final) or {}).get("config") or {}
        want = json.loads(json.dumps(self.final_config(sub, data), default=str))  # as stored
        diffs = sorted(k for k in set(found) | set(want) if k != "recipe" and found.get(k) != want.get(k))
        if diffs and self.force:
            console(f"pretrained model '{final}' was built from another config or data (differs "
                    f"in: {', '.join(diffs)}); --force: rebuilding it")
            return False
        if diffs:
            raise StageError(
                f"pretrained model '{final}' was built from another config or data (differs in: "
                f"{', '.join(diffs)}). Rebuild it with `slm pretrain --force` (or `slm run "
                "--force`), use another run_dir, or restore the recipe it was built with; its "
                "checkpoints are kept under the run's Train storage")
        return True

    def spec(self, sub: str, data: str) -> RunSpec:
        r, p = self.recipe, self.recipe.pretrain
        storage, name = self.location(sub)
        loop = pretraining_config(p.train, self.model(), steps=p.steps[self.info.name], seed=self.seed,
                                  data=data, run_name=name, storage=storage, logger=p.logger, group=r.name,
                                  data_fingerprint=self.data_fingerprint(sub, data),
                                  export_at=list(p.level_steps(self.info.name).values()))
        return RunSpec(loop, p.scaling, spot=self.info.name in p.scaling.spot_families)

    def shards(self, name: str, need: list[str]) -> ShardSet:
        return open_shards(self.layout, name, self.recipe_path, need, self.recipe.data.seq_len,
                           vocab=self.vocab)

    def train(self, sub: str, data: str, train_ds, valid_ds, what: str) -> dict[str, Any]:
        """Train (or resume) one run on ``train_ds``, evaluated on the first held-out rows of
        ``valid_ds``; publish it when finished."""
        r, spec = self.recipe, self.spec(sub, data)
        if self.force:  # checkpoints of another config would be refused: start afresh
            clear_foreign(spec)
        valid = valid_dataset(valid_ds, r.pretrain.train.eval_batches * spec.global_batch(), what)
        out = run_training(spec, train_ds, valid)
        if not out["finished"]:
            return {"finished": False, "checkpoint": out["checkpoint"]}
        f = self.info.name
        config = {"recipe": r.name, **self.final_config(sub, data)}
        # levels first: a published final/ means every level of the run is published too
        publish_levels(spec.loop.logging.run_uri, self.layout, f, sub, r.pretrain.level_steps(f),
                       stage=f"pretrain-{spec.name}", config=config, seed=self.tree)
        costs = publish_final(out["checkpoint"], self.layout, f, sub, stage=f"pretrain-{spec.name}",
                              config=config, seed=self.tree)
        return {"finished": True, "final": self.layout.pretrain_final(f, sub, self.tree), "costs": costs}

    def sum_runs(self, parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The family's costs.json: its runs' costs summed, and each run's."""
        costs = {**sum_costs(list(parts.values())), "per_run": parts}
        write_json(self.layout.pretrain_costs(self.info.name, seed=self.tree), costs)
        return costs


# --------------------------------------------------------------------------------------------
# One run per family (slm, llm, pn)
# --------------------------------------------------------------------------------------------

def _train_one(job: _Family, shards: ShardSet) -> dict[str, Any]:
    r, f = job.recipe, job.info.name
    route = job.model().route_column
    if route:
        check_cluster_ids(shards, route, r.kmeans.k_pn)
    kw = dict(seed=job.seed, fraction=r.pretrain.valid_fraction, route=route)
    out = job.train("", job.generic_set(), shard_dataset(shards, split="train", **kw),
                    shard_dataset(shards, split="valid", **kw), f"'{shards.uri}'")
    if not out["finished"]:
        raise StageError(f"pretraining '{f}' stopped before its last step; re-run to resume")
    return {"family": f, "seed": job.seed, "runs": {f: out["final"]}, "costs": out["costs"]}


# --------------------------------------------------------------------------------------------
# One run per expert (mix): a Tune grid of Train-in-Tune trials
# --------------------------------------------------------------------------------------------

def _expert_column(job: _Family) -> str:
    return f"cluster_k{job.recipe.kmeans.k_mix}"


def _expert_data(column: str, i: int) -> str:
    return f"generic:{column}=={i}"  # rows of the packed set generic-k<K> (see generic_set)


def _train_expert(job: _Family, i: int) -> dict[str, Any]:
    r, col = job.recipe, _expert_column(job)
    shards = job.shards(job.generic_set(), [col])
    kw = dict(seed=job.seed, fraction=r.pretrain.valid_fraction, select=col, value=i)
    return job.train(expert_name(i), _expert_data(col, i), shard_dataset(shards, split="train", **kw),
                     shard_dataset(shards, split="valid", **kw), f"expert {i} of '{shards.uri}'")


def _expert_trial(cfg: dict[str, Any], job: _Family | None = None) -> dict[str, Any]:
    """Ray Tune function trainable: train one expert with its own TorchTrainer."""
    out = _train_expert(job, int(cfg["expert"]))
    return {"expert": int(cfg["expert"]), "finished": out["finished"]}


def runs_that_fit(recipe) -> int:
    """How many training runs of ``pretrain.scaling`` the cluster holds at once: its GPUs (GPU
    training) or CPUs, keeping one CPU free for the Ray Data tasks that feed the workers (on
    CPU-only clusters they compete with the workers). At least 1."""
    sc = recipe.pretrain.scaling
    res = ray.cluster_resources()
    if sc.use_gpu:
        fits = res.get("GPU", 0) // sc.num_workers
    else:
        fits = (res.get("CPU", 1) - 1) // (sc.num_workers * sc.cpus_per_worker)
    return int(max(1, fits))


def _parallel_experts(recipe, todo: list[int]) -> int:
    """How many experts train at once: scaling.parallel_experts, else as many runs as fit."""
    sc = recipe.pretrain.scaling
    if sc.parallel_experts:
        return min(sc.parallel_experts, len(todo))
    return min(len(todo), runs_that_fit(recipe))


def _train_experts(job: _Family) -> dict[str, Any]:
    layout, f, k = job.layout, job.info.name, job.recipe.kmeans.k_mix
    col = _expert_column(job)
    check_cluster_ids(job.shards(job.generic_set(), [col]), col, k)
    todo = [i for i in range(k) if not job.done(expert_name(i), _expert_data(col, i))]
    for i in todo:  # fail fast on a foreign/corrupted checkpoint, before any trial starts
        spec = job.spec(expert_name(i), _expert_data(col, i))
        if job.force:
            clear_foreign(spec)
        check_resumable(spec)
    if todo:
        if f in job.recipe.pretrain.scaling.spot_families:
            warn_without_spot(f"SLM-{f} pretraining", "pretrain.scaling.spot_families")
        storage, _ = job.location(expert_name(todo[0]))  # where the experts' runs live
        trainable = tune.with_resources(tune.with_parameters(_expert_trial, job=job),
                                        TRIAL_DRIVER_RESOURCES)  # the trial only drives its TorchTrainer
        tuner = tune.Tuner(
            trainable, param_space={"expert": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(max_concurrent_trials=_parallel_experts(job.recipe, todo)),
            run_config=tune.RunConfig(name="experts-tune", storage_path=storage_path(storage),
                                      failure_config=tune.FailureConfig(max_failures=0)))
        for result in tuner.fit():
            if result.error is not None:
                reraise_user_error(result.error)
                raise StageError(f"SLM-{f} expert {result.config.get('expert')} failed: {result.error}")
    parts = {}
    for i in range(k):
        name = expert_name(i)
        if not run_done(layout, f, name, job.tree):
            raise StageError(f"SLM-{f} expert {i} did not finish ('{layout.pretrain(f, name, job.tree)}' has "
                             f"no final/); re-run `slm pretrain --family {f}` to resume it")
        parts[name] = read_json(layout.pretrain_costs(f, name, job.tree))
    return {"family": f, "seed": job.seed, "runs": {n: layout.pretrain_final(f, n, job.tree) for n in parts},
            "costs": job.sum_runs(parts)}


# --------------------------------------------------------------------------------------------
# One run per (domain, domain train size) (is): on generic data resampled to that train subset
# --------------------------------------------------------------------------------------------

def domain_sizes(recipe, sizes: list[int] | None) -> list[int]:
    """The domain train sizes a per-domain family is pretrained for: ``sizes`` (each one of
    data.domain_train_tokens), else the sizes the sweep specializes (``Recipe.domain_sizes``,
    what the data pipeline builds SLM-is data for)."""
    for t in sizes or []:
        if t not in recipe.data.domain_train_tokens:
            raise ConfigError(f"domain train size {t} is not one of data.domain_train_tokens "
                              f"({recipe.data.domain_train_tokens}); SLM-is is pretrained for "
                              "those sizes only")
    return sorted(set(sizes)) if sizes else recipe.domain_sizes()


def _train_domains(job: _Family, domains: list[str], sizes: list[int]) -> dict[str, Any]:
    """One run per (domain, size) on its resampled generic set, validated on the domain's valid
    split. Runs one after another (each may use the whole cluster)."""
    layout, f, r = job.layout, job.info.name, job.recipe
    if not domains:
        raise ConfigError(f"family '{f}' needs domains: set corpus.domains (or use the demo corpus)")
    k = r.kmeans.k_is
    parts, runs = {}, {}
    for d in domains:
        for t in sizes:
            sub, data = domain_run(d, t), is_set(d, k, t)
            if not job.done(sub, data):
                train_shards, valid_shards = job.shards(data, []), job.shards(domain_set(d, "valid"), [])
                kw = dict(seed=job.seed, split="all", fraction=r.pretrain.valid_fraction)
                out = job.train(sub, data, shard_dataset(train_shards, **kw),
                                shard_dataset(valid_shards, **kw), f"'{valid_shards.uri}'")
                if not out["finished"]:
                    raise StageError(f"pretraining '{f}' for domain '{d}' at {t} train tokens "
                                     "stopped before its last step")
            parts[sub] = read_json(layout.pretrain_costs(f, sub, job.tree))
            runs[sub] = layout.pretrain_final(f, sub, job.tree)
    return {"family": f, "seed": job.seed, "runs": runs, "costs": job.sum_runs(parts)}


# --------------------------------------------------------------------------------------------
# pretrain(recipe, family)
# --------------------------------------------------------------------------------------------

def pretrain(recipe, family: str, domains: list[str] | None = None, recipe_path: str | None = None,
             force: bool = False, sizes: list[int] | None = None,
             seed: int | None = None) -> dict[str, Any]:
    """Pretrain one family of the recipe for one pretraining ``seed`` (None: the recipe's
    ``seed``; ``Recipe.pretrain_seeds`` lists them all; see the module docstring); returns
    ``{"family", "seed", "runs": {name: final_uri}, "costs": {...}}``. Finished runs are not retrained;
    unfinished ones resume from their latest checkpoint. A run finished from another config or
    data is refused, or with ``force`` rebuilt (its checkpoints of the other config removed; a
    run finished from this very config is still kept: rebuilding it would give the same
    model). ``domains``/``sizes``: a per-domain family's domains and domain train sizes
    (default: the recipe's domains, and the sizes its sweep specializes: ``domain_sizes``)."""
    recipe = resolve_paths(recipe)  # experts run as Tune trials, in their own directories
    if family not in FAMILY_INFO:
        raise ConfigError(f"unknown family '{family}'; known: {', '.join(FAMILY_INFO)}")
    validate(recipe)
    if family not in recipe.pretrain.steps:
        raise ConfigError(f"field 'pretrain.steps' has no budget for family '{family}'; "
                          f"add e.g. --pretrain.steps '{{{family}: 1000}}'")
    recipe_path = recipe_path or recipe.name
    layout, info = RunLayout(recipe.run_dir), FAMILY_INFO[family]
    one_run = info.runs == "one"
    job = _Family(recipe, info, recipe_path, run_vocab_size(layout, recipe_path), force, seed)
    if one_run and job.done("", job.generic_set()):  # finished from this config and data: nothing to start
        return {"family": family, "seed": job.seed, "runs": {family: layout.pretrain_final(family, seed=job.tree)},
                "costs": read_json(layout.pretrain_costs(family, seed=job.tree))}
    if one_run:  # checks that need no Ray, before starting it
        route = job.model().route_column
        shards = job.shards(job.generic_set(), [route] if route else [])
    with ray_session(recipe.cluster):
        if info.runs == "per_expert":
            return _train_experts(job)
        if info.runs == "per_domain":
            return _train_domains(job, domains or recipe_domains(recipe), domain_sizes(recipe, sizes))
        return _train_one(job, shards)


def pretrain_families(recipe, families: list[str], domains: list[str] | None = None,
                      recipe_path: str | None = None, force: bool = False,
                      sizes: list[int] | None = None) -> list[dict[str, Any]]:
    """Pretrain several families, once per pretraining seed (``Recipe.pretrain_seeds``), as
    many runs at once as the cluster holds runs of ``pretrain.scaling`` (``runs_that_fit``;
    ``scaling.parallel_families`` caps it): each (family, seed)'s ``pretrain`` in a thread of
    this driver, each driving its own TorchTrainer (or its experts' Tune grid), so GPUs are not
    left idle while one family trains. Returns, in the order of ``families`` then seeds,
    ``{"family", "seed", "seconds", "started", "ended", "out"}``; the first failure is raised
    once every run has stopped (the others' runs are kept). ``domains``, ``sizes`` (per-domain
    families only) and ``force`` as in ``pretrain``."""
    def one(family: str, seed: int) -> dict[str, Any]:
        per_domain = FAMILY_INFO[family].runs == "per_domain"
        t0 = time.time()
        out = pretrain(recipe, family, domains=domains if per_domain else None, recipe_path=recipe_path,
                       force=force, sizes=sizes if per_domain else None, seed=seed)
        return {"family": family, "seed": seed, "seconds": time.time() - t0, "started": t0,
                "ended": time.time(), "out": out}

    units = [(f, s) for f in families for s in recipe.pretrain_seeds()]
    with ray_session(recipe.cluster):
        # a family of one run per expert already fills the cluster with its experts (a Tune
        # grid, which wants the main thread): it trains alone, the others together
        alone = [u for u in units if FAMILY_INFO[u[0]].runs == "per_expert"]
        together = [u for u in units if u not in alone]
        cap = recipe.pretrain.scaling.parallel_families or len(units)
        at_once = max(1, min(len(together), runs_that_fit(recipe), cap))
        done = {u: one(*u) for u in alone}
        if at_once == 1:
            done.update({u: one(*u) for u in together})
        else:
            log.info("pretraining %d runs at once (%s)", at_once,
                     ", ".join(f"{f} seed {s}" for f, s in together))
            with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="pretrain") as pool:
                futures = {u: pool.submit(one, *u) for u in together}
                wait(list(futures.values()))
            for fut in futures.values():
                if fut.exception() is not None:
                    raise fut.exception()
            done.update({u: fut.result() for u, fut in futures.items()})
        return [done[u] for u in units]
