"""Where a trial's fine-tuning starts: the heavy side of the methods' start strategies
(tune/methods.py), which ask a ``StartContext`` for a pretrained model, the selected experts of
a mixture, a materialised expert of a projected network, or a fresh model.

Per-expert families have ``kmeans.k_mix`` experts; routed families route over ``kmeans.k_pn``
clusters (models/config.py FamilyInfo). A start is a model directory (local path or URI) that
the trial's Train worker reads, on whatever node it runs: a published pretrained model of the
run, or one the trial writes into its work directory on the run's Train storage
(``grid.trial_workdir``), never into the trial's own temp dir.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from slm.errors import InputError, StageError
from slm.layout import RunLayout, domain_set, expert_name, train_subset
from slm.models.config import FAMILY_INFO
from slm.models.flops import inference_flops_per_token
from slm.models.lm import lm_config, make_lm
from slm.models.projected import ProjectedLM
from slm.pipeline.shards import shard_token_histogram
from slm.stage import Stage, exists, join, local_dir, manifest

from .evaluation import evaluate_counted, load_lm, save_model
from .grid import Trial, vocab_size
from .methods import Start, get_method

log = logging.getLogger(__name__)


def pretrain_final(layout: RunLayout, family: str, domain: str = "", expert: int | None = None,
                   level: float = 1.0, domain_tokens: int = 0, seed: int | None = None) -> str:
    """The published model of a pretraining run at a pretraining level (1: its final model):
    the family's, a per-domain family's for ``domain`` at ``domain_tokens`` train tokens, a
    per-expert family's ``expert``, of the pretraining ``seed`` (as the layout names it; None:
    the recipe's seed). StageError when it is not published."""
    final = layout.pretrain_level(family, FAMILY_INFO[family].sub(domain, domain_tokens, expert), level, seed)
    if not exists(final):
        more = "" if level >= 1.0 else f" (level {level:g}: is it in pretrain.levels?)"
        raise StageError(f"pretrained model '{final}' is missing{more}; run `slm pretrain --family "
                         f"{family}` first")
    return final


def top_cluster(layout: RunLayout, k: int, set_name: str) -> int:
    """The cluster with the most tokens at ``k`` in the windows of a shard set (ties: lowest
    id): each window's units counted by their clusters and tokens (pipeline/shards.py
    ``shard_token_histogram``), so it is the histogram of exactly the train subset being used (the
    pipeline's histograms cover whole domain splits)."""
    uri = layout.shards(set_name)
    if manifest(uri) is None:
        raise StageError(f"shard '{uri}' is missing; run the data pipeline (`slm data run`)")
    counts = shard_token_histogram(uri, k)
    if counts.sum() == 0:
        raise InputError(f"shard '{uri}' holds no windows; the domain train subset is empty")
    return int(np.argmax(counts))


class StartContext:
    """What the start strategies of one trial may use: the run, and the trial's work directory
    (local path or URI on the run's Train storage) for the models it has to write (a
    materialised expert, a fresh model)."""

    def __init__(self, recipe, workdir: str):
        self.recipe = recipe
        self.layout = RunLayout(recipe.run_dir)
        self.workdir = workdir
        # what choosing the start cost (lowest_loss: every expert's valid evaluation), charged
        # to the trial's specialization (tune/specialize.py)
        self.selection = {"flops": 0.0, "device_seconds": 0.0}

    def written(self, name: str, config: dict, build: Callable[[], object]) -> str:
        """The starting model ``build()`` makes, published as ``<workdir>/<name>`` with
        ``config`` (its manifest's fingerprint, which the fine-tuning's checkpoint signature
        covers); reused when it is already there from the same config (a re-run trial)."""
        st = Stage(join(self.workdir, name), stage="start", config=config, force=True)
        if (manifest(st.uri) or {}).get("fingerprint") != st.fingerprint:
            with st.publish() as out:
                save_model(build(), out)
        return st.uri

    def starts(self, trial: Trial) -> list[Start]:
        """The trial's starting model(s), as its method's ``start`` strategy says."""
        return get_method(trial.method).start(self, trial)

    def pretrained(self, family: str, trial: Trial) -> Start:
        # a per-domain family's (SLM-is) model of the trial's own domain *and* size
        return Start(pretrain_final(self.layout, family, domain=trial.domain, level=trial.level,
                                    domain_tokens=trial.domain_tokens, seed=trial.pretrain_seed))

    def selected_experts(self, family: str, trial: Trial) -> list[Start]:
        """``specialize.expert_selection``: the expert of the train subset's most frequent
        cluster, the one with the lowest domain valid loss before fine-tuning, or all."""
        spec, k = self.recipe.specialize, self.recipe.kmeans.k_mix
        experts = list(range(k))
        if spec.expert_selection == "top_cluster":
            experts = [top_cluster(self.layout, k, train_subset(trial.domain, trial.domain_tokens))]
        elif spec.expert_selection == "lowest_loss":
            valid = self.layout.shards(domain_set(trial.domain, "valid"))
            losses = {i: self._charged_loss(pretrain_final(self.layout, family, expert=i, level=trial.level,
                                                           seed=trial.pretrain_seed), valid)
                      for i in experts}
            experts = [min(losses, key=losses.get)]
            log.info("%s/%s: valid losses before fine-tuning %s -> expert %d", trial.method,
                     trial.domain, losses, experts[0])
        return [Start(pretrain_final(self.layout, family, expert=i, level=trial.level, seed=trial.pretrain_seed), i)
                for i in experts]

    def _charged_loss(self, model_uri: str, shard: str) -> float:
        """The model's loss on ``shard``, its forward FLOPs and seconds added to ``selection``."""
        spec = self.recipe.specialize
        model = load_lm(model_uri)
        t0 = time.perf_counter()
        loss, tokens = evaluate_counted(model, shard, spec.micro_batch, spec.eval_batches)
        self.selection["device_seconds"] += time.perf_counter() - t0
        self.selection["flops"] += inference_flops_per_token(model.config) * tokens
        return loss

    def materialized(self, family: str, trial: Trial) -> Start:
        """The routed family's expert of the train subset's most frequent cluster, written as
        a plain small model."""
        i = top_cluster(self.layout, self.recipe.kmeans.k_pn, train_subset(trial.domain, trial.domain_tokens))
        final = pretrain_final(self.layout, family, level=trial.level, seed=trial.pretrain_seed)
        config = {"family": family, "expert": i, "source": self.layout.relative(final),
                  "source_fingerprint": (manifest(final) or {}).get("fingerprint", "")}
        level = f"-p{trial.level:g}" if trial.level < 1.0 else ""
        level += f"-ps{trial.pretrain_seed}" if trial.pretrain_seed is not None else ""
        d = self.written(f"init-{family}-{expert_name(i)}{level}", config,
                         lambda: ProjectedLM.from_pretrained(local_dir(final, "model")).materialize(i))
        return Start(d, i)

    def fresh(self, trial: Trial) -> Start:
        """A new model of the method's served size, initialised with the trial's seed."""
        r = self.recipe
        size = get_method(trial.method).served_preset(r.pretrain)
        config = {"preset": size, "vocab_size": vocab_size(r), "seq_len": r.data.seq_len,
                  "seed": trial.seed}
        return Start(self.written(f"init-{trial.method}", config,
                                  lambda: make_lm(lm_config(size, config["vocab_size"], r.data.seq_len),
                                                  seed=trial.seed)))
