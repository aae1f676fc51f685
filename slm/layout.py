"""The run directory: one place that names every artifact (local path or object-storage URI).

    RUN/
      recipe.yaml                          the recipe the run was started with
      run.json                             the run's identity (a random id, made once)
      data/corpus/generic/                 ingested documents (doc_id, text)
      data/corpus/domains/<d>/<split>/
      data/tokenizer/                      HF fast tokenizer
      data/windows/<name>/                 fixed-length token windows (window_id, input_ids,
                                           unit_ids, unit_tokens: the units they are cut from)
      data/units/<name>/                   units: pieces of <= seq_len tokens of one document
                                           (unit_id, input_ids, tokens); what is clustered
      data/embeddings/<name>/              unit_id, tokens, embedding
      data/kmeans-k<K>/                    centroids (safetensors)
      data/assign-k<K>/<name>/             unit_id, tokens, cluster, distance
      data/histograms-k<K>/                token histogram per domain + generic (json)
      data/subset-histograms-k<K>/domain-<d>-train-<tokens>/
                                           histogram.json of one domain train subset (SLM-is)
      data/shards/<name>/                  training shards: the windows + unit_clusters_k<K>
                                           (the cluster of each of a window's units)
      data/shards/<name>-k<K>/             windows packed from the units of one cluster each
                                           (cluster_k<K>): what mix, pn and is train on
      data/sources/<domain>/<split>/       a flat document set split by ``slm add-domain``
      pretrain/<family>[/<sub>]/           one training run (of the recipe's seed): Ray Train storage
                                           (step=* checkpoints)
        final/                             its published model (HF directory)
        level-<x>/                         its model at pretraining level x < 1 (pretrain.levels;
                                           HF directory, its costs to that step in the manifest)
        costs.json                         its measured costs (mix, is: also summed one level up)
      pretrain/seed-<s>/<family>[/<sub>]/  the same run for another pretraining seed s (pretrain.seeds;
                                           the recipe's own seed keeps the paths above)
      specialize/<sweep>/                  one sweep:
        tune/<phase>/                      the Ray Tune experiments: teachers, then the grid
        grid.json                          the trials each phase was started with
        trials/<key>/                      one finished trial: HF model, training.json, row.json
        work/<key>/                        a running trial's work: its fine-tuning's Ray Train
                                           storage (run-<e>/ray/), best model (run-<e>/best/) and
                                           written starting models (init-*/); removed once the
                                           trial is published
        results.parquet, results.csv       every finished trial's row
      models/<domain>/<method>/            Hugging Face directories (the products)
      export/<domain>/                     `slm export`'s default output
      report/                              index.html + PNG figures

Ray Train/Tune storage of a training run is ``RUN/pretrain/...`` (a trial's work:
``RUN/specialize/<sweep>/work/<key>/``) itself, or, when the recipe sets ``cluster.storage``,
the same run-relative path under ``<storage>/<run id>/`` (``train_root``): scoped by the
run's identity, so two runs on one storage never resume each other's checkpoints, and a run
copied elsewhere (local → s3) keeps its id and its checkpoints.

``<sub>`` is ``expert-<i>`` for SLM-mix's experts and ``<domain>-<tokens>`` (``domain_run``) for
SLM-is: one run per domain *and* domain train size, as its resampling follows the histogram of
that size's train subset only (a smaller budget never sees more domain windows). Every path written
into a manifest, results table, report or model card is stored *relative to the run*
(``RunLayout.relative``) and resolved on reading (``RunLayout.resolve``), so a run directory can
be moved, copied to object storage, or opened through another path.

Window/shard set names: ``generic``, ``domain-<d>-<split>`` (split: train, valid, test),
``domain-<d>-train-<tokens>`` (nested train subsets), ``is-k<K>-<d>-<tokens>`` (SLM-is resampled
to the histogram of the train subset of that size).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass

from slm.errors import InputError, StageError
from slm.stage import exists, is_remote, join, read_json, subdirs, write_json

SPLITS = ("train", "valid", "test")

FINAL = "final"                 # a training run's published model
COSTS = "costs.json"            # a training run's (or family's) measured costs
TRIAL_ROW = "row.json"          # a trial's row of the results table
TRIAL_TRAINING = "training.json"  # a trial's training record (row + data, teacher, history)
IDENTITY = "run.json"           # the run's identity


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def checked_name(kind: str, value: str) -> str:
    """A domain, method, family, sweep or run name as one safe path component: letters, digits
    and ``. _ + -``, starting with a letter or digit, no ``..`` — never a separator, a newline
    or a control character, so a name can never point outside its place in the run."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        raise InputError(f"{kind} name {value!r} is not a valid name: use letters, digits and "
                         "'. _ + -' (starting with a letter or digit, at most 100 characters, "
                         "no '..', no '/' or spaces)")
    return value


def expert_name(i: int) -> str:
    """The sub-run name of SLM-mix expert ``i``."""
    return f"expert-{i}"


def domain_set(domain: str, split: str) -> str:
    return f"domain-{domain}-{split}"


def train_subset(domain: str, tokens: int) -> str:
    return f"domain-{domain}-train-{tokens}"


def is_set(domain: str, k: int, tokens: int) -> str:
    """The SLM-is shard set of a domain train size: generic windows resampled to the cluster
    histogram of ``train_subset(domain, tokens)``."""
    return f"is-k{k}-{domain}-{tokens}"


def packed_set(name: str, k: int) -> str:
    """The shard set of ``name``'s windows packed per cluster at ``k`` (pipeline/shards.py
    ``build_packed_shards``): each window is text of one cluster."""
    return f"{name}-k{k}"


def domain_run(domain: str, tokens: int) -> str:
    """The sub-run name of a family pretrained per (domain, domain train size): SLM-is."""
    return f"{domain}-{tokens}"


def domain_of_run(sub: str) -> str:
    """The domain of a ``domain_run`` name (sizes are integers: the last '-' splits them off)."""
    domain, tokens = sub.rsplit("-", 1)
    if not tokens.isdigit():
        raise InputError(f"'{sub}' is not a <domain>-<tokens> run name")
    return domain


def seed_dir(seed: int) -> str:
    """The folder of a pretraining seed's own tree of training runs (``pretrain/seed-<s>/``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"pretraining seed {seed!r} is not a non-negative integer")
    return f"seed-{seed}"


@dataclass(frozen=True)
class RunLayout:
    root: str

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    @property
    def recipe(self) -> str:
        return self.path("recipe.yaml")

    @property
    def identity(self) -> str:
        return self.path(IDENTITY)

    @property
    def data(self) -> str:
        return self.path("data")

    def corpus_generic(self) -> str:
        return self.path("data/corpus/generic")

    def corpus_domain(self, domain: str, split: str) -> str:
        return self.path("data/corpus/domains", checked_name("domain", domain), split)

    @property
    def tokenizer(self) -> str:
        return self.path("data/tokenizer")

    def windows(self, name: str) -> str:
        return self.path("data/windows", checked_name("window set", name))

    def units(self, name: str) -> str:
        return self.path("data/units", checked_name("unit set", name))

    def embeddings(self, name: str) -> str:
        return self.path("data/embeddings", checked_name("unit set", name))

    def kmeans(self, k: int) -> str:
        return self.path(f"data/kmeans-k{k}")

    def kmeans_ks(self) -> list[int]:
        """The k of every k-means artifact directory in the run, sorted (a listing)."""
        return sorted(int(m.group(1)) for n in subdirs(self.data)
                      if (m := re.fullmatch(r"kmeans-k(\d+)", n)))

    def assignments(self, k: int, name: str) -> str:
        return self.path(f"data/assign-k{k}", name)

    def histograms(self, k: int) -> str:
        return self.path(f"data/histograms-k{k}")

    def subset_histogram(self, k: int, domain: str, tokens: int) -> str:
        """The cluster histogram of one domain train subset (SLM-is's target): a stage
        directory holding ``histogram.json``."""
        checked_name("domain", domain)
        return self.path(f"data/subset-histograms-k{k}", train_subset(domain, tokens))

    def shards(self, name: str = "") -> str:
        """A shard set ('' = the folder of every shard set)."""
        return self.path("data/shards", checked_name("shard set", name)) if name else self.path("data/shards")

    def sources(self, domain: str, split: str = "") -> str:
        checked_name("domain", domain)
        return self.path("data/sources", domain, split) if split else self.path("data/sources", domain)

    def pretrain(self, family: str = "", sub: str = "", seed: int | None = None) -> str:
        """A training run's directory (``sub``: a mix expert or an is ``domain_run``; no family: the
        folder of every training run of that pretraining seed). ``seed``: a pretraining seed
        other than the recipe's own (``Recipe.layout_seed``); its runs live in their own tree
        ``pretrain/seed-<s>/``, which mirrors ``pretrain/`` (None: the recipe's seed, today's
        paths)."""
        root = self.path("pretrain") if seed is None else self.path("pretrain", seed_dir(seed))
        if not family:
            return root
        checked_name("family", family)
        return join(root, family, checked_name("sub-run", sub)) if sub else join(root, family)

    def pretrain_final(self, family: str, sub: str = "", seed: int | None = None) -> str:
        return join(self.pretrain(family, sub, seed), FINAL)

    def pretrain_level(self, family: str, sub: str = "", level: float = 1.0, seed: int | None = None) -> str:
        """A training run's published model at a pretraining level (1.0: ``final/``)."""
        if float(level) >= 1.0:
            return self.pretrain_final(family, sub, seed)
        return join(self.pretrain(family, sub, seed), f"level-{float(level):g}")

    def pretrain_costs(self, family: str, sub: str = "", seed: int | None = None) -> str:
        return join(self.pretrain(family, sub, seed), COSTS)

    def pretrain_seeds(self) -> list[int]:
        """The pretraining seeds with their own tree (``pretrain/seed-<s>/``) in the run, sorted
        (a listing; the recipe's own seed is not among them)."""
        return sorted(int(m.group(1)) for n in subdirs(self.pretrain())
                      if (m := re.fullmatch(r"seed-(\d+)", n)))

    def sweep(self, name: str = "") -> str:
        """A sweep's folder ('' = the folder of every sweep)."""
        return self.path("specialize", checked_name("sweep", name)) if name else self.path("specialize")

    def sweep_tune(self, name: str) -> str:
        return join(self.sweep(name), "tune")

    def sweep_grid(self, name: str) -> str:
        return join(self.sweep(name), "grid.json")

    def sweep_tensorboard(self, name: str) -> str:
        """TensorBoard events of the sweep's fine-tunings: one sub-folder (TensorBoard run) each."""
        return join(self.sweep(name), "tensorboard")

    def sweep_stopped(self, name: str) -> str:
        """The trials the sweep's scheduler (ASHA) stopped early, with their last metrics."""
        return join(self.sweep(name), "stopped.json")

    def trial(self, sweep: str, key: str) -> str:
        return join(self.sweep(sweep), "trials", checked_name("trial", key))

    def trial_work(self, sweep: str, key: str) -> str:
        """A running trial's work directory (see the module doc); under ``train_root`` at the
        same run-relative path when the recipe sets ``cluster.storage``."""
        return join(self.sweep(sweep), "work", checked_name("trial", key))

    def results(self, sweep: str, fmt: str = "parquet") -> str:
        return join(self.sweep(sweep), f"results.{fmt}")

    def model(self, domain: str, method: str) -> str:
        return self.path("models", checked_name("domain", domain), checked_name("method", method))

    def models(self, domain: str = "") -> str:
        return self.path("models", checked_name("domain", domain)) if domain else self.path("models")

    def export(self, domain: str = "") -> str:
        """`slm export`'s default output for ``domain`` ('' = the folder of every export)."""
        return self.path("export", checked_name("domain", domain)) if domain else self.path("export")

    @property
    def report(self) -> str:
        return self.path("report")

    # ---- run-relative paths ------------------------------------------------------------------

    def relative(self, uri: str) -> str:
        """``uri`` relative to the run root (what manifests and tables store). A path outside
        the run is returned unchanged."""
        root = self.root.rstrip("/")
        if not is_remote(root) and not is_remote(uri):
            root_abs, uri_abs = os.path.abspath(root), os.path.abspath(uri)
            if uri_abs == root_abs:
                return "."
            if uri_abs.startswith(root_abs + os.sep):
                return os.path.relpath(uri_abs, root_abs)
            return uri
        if uri.rstrip("/") == root:
            return "."
        if uri.startswith(root + "/"):
            return uri[len(root) + 1:]
        return uri

    def resolve(self, rel: str) -> str:
        """A stored run-relative path as a URI of this run (absolute paths/URIs unchanged)."""
        if not rel or rel == ".":
            return self.root
        if is_remote(rel) or os.path.isabs(rel):
            return rel
        return self.path(rel)


def run_id(layout: RunLayout) -> str:
    """The run's identity: a random id written to ``RUN/run.json`` the first time it is asked
    for, and read back afterwards (so it travels with the run when it is copied or moved)."""
    uri = layout.identity
    if exists(uri):
        try:
            return str(read_json(uri)["run_id"])
        except (KeyError, ValueError, OSError) as e:
            raise StageError(f"'{uri}' is unreadable ({e}); it names the run's checkpoints under "
                             "cluster.storage: restore it from a copy of the run") from None
    rid = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    write_json(uri, {"run_id": rid, "created": time.time()})
    return rid


def train_root(layout: RunLayout, storage: str) -> str:
    """Where this run's Ray Train/Tune storage lives: the run directory itself, or
    ``<storage>/<run id>`` when the recipe names a shared ``cluster.storage``."""
    return join(storage, run_id(layout)) if storage else layout.root
