"""Add a domain to a finished run, later: ingest → tokenize (the run's tokenizer) → embed →
assign to the run's centroids → histograms → shards → specialize, without pretraining again.

The domain is any text files / jsonl / parquet: a directory with train/valid/test files or
sub-directories (used as given), or a flat set of documents (a file, or a directory without
splits), which is split deterministically by document hash (80/10/10). The data stages are the
pipeline's own functions; nothing under ``RUN/pretrain`` is written. SLM-is would need its own
pretraining on resampled generic data, so it is excluded unless asked for by name.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

from slm.errors import InputError
from slm.layout import SPLITS, RunLayout
from slm.stage import exists, filesystem, fingerprint, is_done, join, publish

log = logging.getLogger(__name__)

SPLIT_PERCENT = {"train": (0, 80), "valid": (80, 90), "test": (90, 100)}


def load_run_recipe(run: str):
    """The recipe a run was started with (``RUN/recipe.yaml``), pointed at ``run``."""
    from slm.config import load_recipe

    layout = RunLayout(run)
    if not exists(run):
        raise InputError(f"run '{run}' does not exist; pass the run directory of a finished "
                         "pretraining run (--run RUN, e.g. runs/demo)")
    if not exists(layout.recipe):
        raise InputError(f"'{run}' is not an slm run directory (no recipe.yaml); pass the run "
                         "directory that `slm run` / `slm data run` created")
    fs, path = filesystem(layout.recipe)
    import tempfile

    with fs.open_input_stream(path) as f, tempfile.NamedTemporaryFile("wb", suffix=".yaml") as tmp:
        tmp.write(f.read())
        tmp.flush()
        recipe = load_recipe(tmp.name)
    return dataclasses.replace(recipe, run_dir=run)


def _domain_name(domain_path: str, name: str) -> str:
    base = name or re.sub(r"\.[^.]*$", "", domain_path.rstrip("/").split("/")[-1])
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-")
    if not clean:
        raise InputError(f"cannot derive a domain name from '{domain_path}'; pass --name NAME")
    return clean


def _has_splits(domain: str, domain_path: str) -> bool:
    """True when the path is a directory holding train, valid and test."""
    from slm.pipeline.ingest import domain_split_source

    fs, path = filesystem(domain_path)
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return False
    try:
        for split in SPLITS:
            domain_split_source(domain, domain_path, split)
    except InputError:
        return False
    return True


def _bucket(doc_id: str) -> int:
    return int(doc_id[:8], 16) % 100


class _InSplit:
    """Row filter: documents whose hash bucket falls in [lo, hi)."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def __call__(self, row: dict[str, Any]) -> bool:
        return self.lo <= _bucket(row["doc_id"]) < self.hi


def split_flat_domain(layout: RunLayout, recipe, domain: str, source: str) -> str:
    """Split a flat set of documents into ``RUN/data/sources/<domain>/<split>`` (parquet
    doc_id, text), deterministically by document hash; returns that directory."""
    import ray.data

    from slm.pipeline.artifacts import count_rows, write_dataset
    from slm.pipeline.ingest import read_documents, source_fingerprint

    root = layout.path("data/sources", domain)
    cfg = recipe.corpus
    config = {"source": source, "fingerprint": source_fingerprint(source, cfg.format),
              "split_percent": SPLIT_PERCENT, "text_column": cfg.text_column}
    if read_documents(source, cfg).count() == 0:
        raise InputError(f"domain path '{source}' holds no text (every document is empty); give "
                         "files with documents in them")
    for split, (lo, hi) in SPLIT_PERCENT.items():
        uri = join(root, split)
        if is_done(uri, fingerprint({"config": config, "inputs": {}})):
            continue
        with publish(uri, stage="domain-split", config=config, force=exists(uri)) as out:
            ds = read_documents(source, cfg).filter(_InSplit(lo, hi),
                                                    compute=ray.data.TaskPoolStrategy(size=1))
            write_dataset(ds, out)
            rows = count_rows(out.uri)
            if rows == 0:
                raise InputError(f"domain '{domain}': '{source}' has too few documents to give its "
                                 f"{split} split any (split {lo}-{hi}% by document hash); add "
                                 "documents, or give a directory with train/valid/test files")
            out.manifest["rows"] = rows
    return root


def _check_source(domain_path: str, text_column: str, recipe) -> None:
    """InputError when the path does not exist or holds no text files."""
    from slm.pipeline.ingest import list_source

    if not exists(domain_path):
        raise InputError(f"domain path '{domain_path}' does not exist; give a directory or file of "
                         "text/jsonl/parquet documents (--domain PATH)")
    try:
        list_source(domain_path, recipe.corpus.format)
    except InputError as e:
        raise InputError(f"domain path '{domain_path}' holds no text: {e}") from None


def specialize_new_domain(run: str, domain_path: str, name: str = "", methods: list[str] | None = None,
                          text_column: str = "", sweep_name: str = "") -> dict[tuple[str, str], str]:
    """Add ``domain_path`` as a new domain of the finished run ``run`` and specialize it.

    Returns {(domain, method): published model URI} (``RUN/models/<domain>/<method>/``).
    The sweep is the run's recipe's sweep restricted to this domain, under
    ``RUN/specialize/<sweep_name or 'domain-<name>'>``.
    """
    from slm.cluster.ray_env import ray_session

    from .sweep import publish_products, run_sweep

    recipe = load_run_recipe(run)
    if text_column:
        recipe = dataclasses.replace(recipe, corpus=dataclasses.replace(recipe.corpus, text_column=text_column))
    _check_source(domain_path, text_column, recipe)
    domain = _domain_name(domain_path, name)
    layout = RunLayout(run)
    _check_pretrained(layout)

    asked = list(methods or [m for m in recipe.sweep.methods if m != "is"])
    if not methods and "is" in recipe.sweep.methods:
        log.warning("method 'is' skipped for the new domain '%s': SLM-is pretrains a model on generic "
                    "data resampled for this domain (its own pretraining run). Ask for it with "
                    "--method is to run that pretraining too", domain)
    with ray_session(recipe.cluster):
        from slm.pipeline.run import corpus_sources

        _, existing = corpus_sources(recipe)  # the run's domains (the demo's, for generic=demo)
        source = domain_path if _has_splits(domain, domain_path) else split_flat_domain(layout, recipe, domain, domain_path)
        if domain in existing and existing[domain] != source:
            raise InputError(f"run '{run}' already has a domain '{domain}' (from '{existing[domain]}'); "
                             "pass another --name")
        corpus = dataclasses.replace(recipe.corpus, domains={**existing, domain: source})
        recipe = dataclasses.replace(recipe, corpus=corpus)
        _prepare_domain(recipe, domain, with_is="is" in asked)
        sweep = dataclasses.replace(recipe.sweep, name=sweep_name or f"domain-{domain}",
                                    domains=[domain], methods=asked)
        recipe = dataclasses.replace(recipe, sweep=sweep)
        run_sweep(recipe)
    from .sweep import collect_rows, sweep_trials

    return publish_products(recipe, collect_rows(recipe, sweep_trials(recipe)))


def _check_pretrained(layout: RunLayout) -> None:
    if not exists(layout.path("pretrain")):
        raise InputError(f"run '{layout.root}' has no pretrained models (no pretrain/ directory); "
                         "run `slm pretrain` (or `slm run`) on it first")


def _prepare_domain(recipe, domain: str, with_is: bool) -> None:
    """The data stages for the new domain: the pipeline itself, whose stages skip every
    artifact already done (tokenizer, centroids, generic shards, the other domains) and build
    the new domain's (windows with the run's tokenizer, embeddings, assignments to the run's
    centroids, histograms, shards, train subsets). Nothing under RUN/pretrain is written,
    unless SLM-is is asked for: it then pretrains the new domain's own model."""
    from slm.pipeline.run import run_pipeline

    run_pipeline(recipe)
    if with_is:
        from slm.models.pretrain import pretrain

        pretrain(recipe, "is", domains=[domain])
