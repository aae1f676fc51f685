"""The data pipeline end to end: every data stage of a recipe, in order, inside one Ray session.

    corpus → tokenizer → windows + units → embeddings (of units) → k-means (per K)
           → assignments (of units) → histograms
           → shards (generic, domain splits, nested train subsets; the generic set packed
             per cluster at every K)
           → per (domain, train size): the subset's cluster histogram → SLM-is shards (the
             sizes the sweep specializes)

Each stage function opens with ``slm.stage.Stage`` (a fingerprint of its config and of its
inputs, keyed run-relatively: done? else build and publish atomically), so re-running skips
what is done, resumes after a crash and works on a moved run; ``force`` rebuilds every stage. One log line per stage says
done/skipped, rows and seconds; Ray Data shows per-operator progress bars inside a stage.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable

from slm.cluster.ray_env import ray_session
from slm.config import dump_recipe
from slm.configkit import ConfigError
from slm.heap import release_free_heap
from slm.layout import SPLITS, RunLayout, domain_set, is_set, packed_set, train_subset
from slm.pipeline import embed, importance, kmeans
from slm.pipeline.config import STAGE_GROUPS
from slm.pipeline.demo_corpus import build_demo_corpus, demo_corpus_sources
from slm.pipeline.ingest import ingest_domain_split, ingest_generic
from slm.pipeline.shards import build_packed_shards, build_shards, build_train_subset
from slm.pipeline.tokenizer import build_tokenizer
from slm.pipeline.windows import build_units, build_windows
from slm.stage import filesystem, manifest

log = logging.getLogger(__name__)

_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def corpus_sources(recipe) -> tuple[str, dict[str, str]]:
    """(generic source, {domain: directory}) of a recipe; builds the demo corpus when
    ``corpus.generic == "demo"`` (its domains are used when ``corpus.domains`` is empty)."""
    cfg = recipe.corpus
    generic, domains = cfg.generic, dict(cfg.domains)
    if generic == "demo":
        generic, demo_domains = demo_corpus_sources(build_demo_corpus())
        if not domains:
            unknown = [d for d in cfg.demo_domains if d not in demo_domains]
            if unknown:
                raise ConfigError(f"field 'corpus.demo_domains' names unknown demo domain(s) "
                                  f"{', '.join(unknown)}; available: {', '.join(sorted(demo_domains))}")
            domains = {d: demo_domains[d] for d in cfg.demo_domains}
    for d in domains:
        if not _DOMAIN_NAME.match(d):
            raise ConfigError(f"field 'corpus.domains' has domain name '{d}'; use letters, digits, "
                              "'-', '_' or '.' (it becomes part of file names)")
    return generic, domains


def save_recipe(recipe, layout: RunLayout) -> None:
    """RUN/recipe.yaml: the recipe the run was (last) started with."""
    fs, path = filesystem(layout.recipe)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(dump_recipe(recipe).encode("utf-8"))


class _Stages:
    """Runs stage calls and logs one line each: done/skipped, rows, seconds."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def __call__(self, name: str, uri: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return self.many([(name, uri)], fn, *args, **kw)

    def many(self, stages: list[tuple[str, str]], fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """One call that runs one or several stages (``[(name, uri)]``): one line and record
        each. The call's time goes to the stages it ran, by their share of the rows (evenly
        without row counts); when it ran none (all skipped), evenly to all."""
        before = {uri: manifest(uri) for _, uri in stages}
        t0 = time.time()
        result = fn(*args, **kw)
        seconds = time.time() - t0
        release_free_heap()  # else the driver keeps every stage's peak (see slm.heap)
        after = {uri: manifest(uri) or {} for _, uri in stages}
        ran = {uri for uri in after
               if before[uri] is None or before[uri].get("started") != after[uri].get("started")}
        counted = {uri: r if isinstance(r := after[uri].get("rows"), int) else 0 for uri in ran}
        ran_rows = sum(counted.values())  # (a histograms manifest's rows are per set: not counted)
        for name, uri in stages:
            rows = after[uri].get("rows")
            if uri in ran:
                share = seconds * counted[uri] / ran_rows if ran_rows else seconds / len(ran)
            else:
                share = 0.0 if ran else seconds / len(stages)
            status = "done" if uri in ran else "skipped"
            log.info("stage %-44s %-7s rows=%-9s %6.1fs", name, status,
                     rows if rows is not None else "-", share)
            self.records.append({"stage": name, "uri": uri, "status": status, "rows": rows,
                                 "seconds": round(share, 3)})
        return result


def run_pipeline(recipe, force: bool = False, until: str = "") -> dict[str, Any]:
    """Run every data stage of ``recipe`` (skipping completed ones unless ``force``), or the
    stages up to and including the group ``until`` (one of ``STAGE_GROUPS``).
    Returns ``{"run_dir", "stages": [{stage, uri, status, rows, seconds}], "sets": {...}}``."""
    if until and until not in STAGE_GROUPS:
        raise ConfigError(f"unknown stage group '{until}' for --until; use one of "
                          f"{', '.join(STAGE_GROUPS)}")
    layout = RunLayout(recipe.run_dir)
    ks = recipe.kmeans.ks()
    stage = _Stages()
    t0 = time.time()
    corpora: dict[str, tuple[str, str]] = {}
    domains: list[str] = []
    _run_stages(recipe, layout, stage, force, until, corpora, domains)
    total = time.time() - t0
    done = sum(r["status"] == "done" for r in stage.records)
    log.info("data pipeline: %d stages (%d run, %d skipped) in %.1fs; run dir %s",
             len(stage.records), done, len(stage.records) - done, total, layout.root)
    return {"run_dir": layout.root, "stages": stage.records, "seconds": round(total, 3),
            "sets": {"windows": list(corpora), "domains": domains, "ks": ks}}


def _run_stages(recipe, layout: RunLayout, stage: _Stages, force: bool,
                until: str, corpora: dict[str, tuple[str, str]],
                domains: list[str]) -> None:
    """The stages, in order; fills ``corpora`` (windows sets) and ``domains`` as it goes."""
    data = recipe.data
    ks = recipe.kmeans.ks()
    with ray_session(recipe.cluster):
        save_recipe(recipe, layout)
        generic_src, domain_dirs = corpus_sources(recipe)
        domains.extend(sorted(domain_dirs))

        # corpus
        stage("corpus generic", layout.corpus_generic(), ingest_generic, layout, recipe.corpus,
              generic_src, force=force)
        for d in domains:
            for split in SPLITS:
                stage(f"corpus {d} {split}", layout.corpus_domain(d, split), ingest_domain_split,
                      layout, recipe.corpus, d, domain_dirs[d], split, force=force)
        if until == "corpus":
            return

        # tokenizer
        stage("tokenizer", layout.tokenizer, build_tokenizer, layout, recipe.tokenizer, force=force)
        if until == "tokenizer":
            return

        # windows and units: generic + every domain split
        corpora["generic"] = (layout.corpus_generic(), "generic corpus")
        for d in domains:
            for split in SPLITS:
                corpora[domain_set(d, split)] = (layout.corpus_domain(d, split),
                                                 f"domain '{d}' {split} split")
        for name, (corpus_uri, what) in corpora.items():
            stage(f"windows {name}", layout.windows(name), build_windows, layout, name, corpus_uri,
                  data.seq_len, what=what, rows_per_file=data.rows_per_file, force=force)
            stage(f"units {name}", layout.units(name), build_units, layout, name, corpus_uri,
                  data.seq_len, what=what, rows_per_file=data.rows_per_file, force=force)
        if until == "windows":
            return

        # embeddings, k-means, assignments: of the units (text of one document each)
        # one pass over one actor pool for every set (an actor's start is paid once)
        stage.many([(f"embeddings {name}", layout.embeddings(name)) for name in corpora],
                   embed.embed_unit_sets, layout, list(corpora), recipe.embed, force=force)
        if until == "embeddings":
            return
        # every K in one task (one sample read, one scikit-learn import)
        stage.many([(f"kmeans k={k}", layout.kmeans(k)) for k in ks], kmeans.fit_kmeans_all,
                   layout, ks, recipe.kmeans, recipe.seed, force=force)
        # every set at every K in one pass (each embeddings file read once for all Ks)
        stage.many([(f"assign k={k} {name}", layout.assignments(k, name))
                    for k in ks for name in corpora],
                   kmeans.assign_all, layout, ks, list(corpora), force=force)
        if until == "kmeans":
            return

        # histograms: generic + domain train sets
        hist_sets = ["generic"] + [domain_set(d, "train") for d in domains]
        for k in ks:
            stage(f"histograms k={k}", layout.histograms(k), kmeans.histograms, layout, k,
                  hist_sets, force=force)
        if until == "histograms":
            return

        # shards: every windows set, then the nested train subsets
        for name in corpora:
            stage(f"shards {name}", layout.shards(name), build_shards, layout, name, ks,
                  rows_per_file=data.rows_per_file, force=force)
        for d in domains:
            for tokens in sorted(data.domain_train_tokens):
                name = train_subset(d, tokens)
                stage(f"shards {name}", layout.shards(name), build_train_subset, layout, d, tokens,
                      recipe.seed, rows_per_file=data.rows_per_file, force=force)
        # the generic windows packed per cluster at every K: what mix experts, pn's routing and
        # SLM-is's resampling train on (each window is text of the cluster it is labelled with)
        for k in ks:
            name = packed_set("generic", k)
            stage(f"shards {name}", layout.shards(name), build_packed_shards, layout, "generic", k,
                  data.seq_len, recipe.seed, rows_per_file=data.rows_per_file, force=force)

        # SLM-is: the cluster histogram of every train subset, and resampled shards per
        # (domain, size) the sweep specializes (Recipe.domain_sizes: data.is_tokens each, the
        # big part), each matching that subset's histogram only, so SLM-is keeps to the
        # trial's domain data budget
        k_is = recipe.kmeans.k_is
        for d in domains:
            for tokens in sorted(data.domain_train_tokens):
                stage(f"histogram k={k_is} {train_subset(d, tokens)}",
                      layout.subset_histogram(k_is, d, tokens), importance.write_subset_histogram,
                      layout, k_is, d, tokens, force=force)
            for tokens in recipe.domain_sizes():
                name = is_set(d, k_is, tokens)
                stage(f"shards {name}", layout.shards(name), importance.write_is_shard, layout, k_is,
                      d, tokens, data.is_tokens, data.seq_len, recipe.seed, force=force)

