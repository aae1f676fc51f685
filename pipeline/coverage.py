"""What the clustering sees of a set, measured on a sample of its units.

The units (pipeline/windows.py: pieces of at most seq_len tokens of one document) are what is
embedded and assigned to a cluster. Two figures the report states beside every cluster-based
method (this module measures, it changes nothing):

* ``embedded_token_fraction``: the embedding model reads at most ``embed.max_seq_length`` of
  its own tokens of a unit's text (its special tokens included); the fraction of the units'
  text tokens (the embedder's tokenization) that fit, over the sample.
* ``multi_document_fraction``: the fraction of units with an EOS before their last position,
  i.e. text of two documents. Units are cut inside one document, so it is 0 by construction;
  it is measured so that the report shows it, not asserted.

The sample is the set's first ``sample`` units in file order (deterministic; no Ray).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from transformers import AutoTokenizer

from slm.layout import RunLayout
from slm.pipeline.artifacts import count_rows, parquet_files
from slm.pipeline.config import EmbedConfig
from slm.pipeline.embed import is_local_model, resolve_model
from slm.pipeline.tokenizer import load_tokenizer
from slm.stage import filesystem, manifest

SAMPLE = 2000
_SBERT_CONFIG = "sentence_bert_config.json"


def sample_rows(uri: str, n: int) -> list[list[int]]:
    """The first ``n`` rows' ``input_ids`` of a units (or windows) artifact, in file order."""
    fs, _ = filesystem(uri)
    out: list[list[int]] = []
    for path in parquet_files(uri):
        for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(
                batch_size=min(n, 1024), columns=["input_ids"]):
            out.extend(batch.column(0).to_pylist()[: n - len(out)])
            if len(out) >= n:
                return out
    return out


def model_max_length(resolved: str, cfg: EmbedConfig, embed_tok) -> int:
    """Tokens the embedder reads: ``embed.max_seq_length``, else the model's own setting (its
    sentence-transformers config; a plain transformers directory has none: its tokenizer's)."""
    if cfg.max_seq_length:
        return int(cfg.max_seq_length)
    path = os.path.join(resolved, _SBERT_CONFIG)
    if not os.path.isfile(path):
        return int(embed_tok.model_max_length)
    with open(path, encoding="utf-8") as f:
        return int(json.load(f)["max_seq_length"])


def unit_coverage(units: list[list[int]], eos_id: int, texts: list[str], embed_tok,
                  max_length: int) -> dict[str, Any]:
    """The two figures of the module doc for decoded ``texts`` of ``units``."""
    special = embed_tok.num_special_tokens_to_add(pair=False)
    lengths = np.array([len(ids) for ids in embed_tok(texts, add_special_tokens=False)["input_ids"]])
    kept = np.minimum(lengths, max(max_length - special, 0))
    # an EOS with text on both sides in the unit (one at either end separates nothing here)
    multi = sum(eos_id in ids[1:-1] for ids in units)
    return {"sampled_units": len(units), "embedder_max_tokens": max_length,
            "embedder_tokens_per_unit_mean": float(lengths.mean()) if len(lengths) else 0.0,
            "embedded_token_fraction": float(kept.sum() / max(lengths.sum(), 1)),
            "truncated_unit_fraction": float((lengths > kept).mean()) if len(lengths) else 0.0,
            "multi_document_fraction": multi / max(len(units), 1)}


def embedding_coverage(layout: RunLayout, set_name: str, cfg: EmbedConfig,
                       sample: int = SAMPLE) -> dict[str, Any] | None:
    """Coverage figures of ``data/units/<set_name>``; None when the set or a local copy of
    the embedding model (its tokenizer) is not there."""
    uri = layout.units(set_name)
    resolved = resolve_model(cfg.model)
    if manifest(uri) is None or manifest(layout.tokenizer) is None or not is_local_model(resolved):
        return None
    tok = load_tokenizer(layout.tokenizer)
    units = sample_rows(uri, sample)
    texts = tok.batch_decode(units, skip_special_tokens=True)  # what TokenEmbedder embeds
    embed_tok = AutoTokenizer.from_pretrained(resolved, local_files_only=True)
    out = unit_coverage(units, tok.eos_token_id, texts, embed_tok, model_max_length(resolved, cfg, embed_tok))
    return {"set": set_name, "units": count_rows(uri), "model": cfg.model, **out}
