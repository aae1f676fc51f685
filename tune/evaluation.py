"""Evaluating a model on a published shard (in a sweep trial's process, on its device; domain
valid/test shards are small): the valid losses that pick an expert (``lowest_loss``), a
published model's loss in tests and tools; and loading and saving the HF models evaluated (local
paths or object-storage URIs). A trial's own test loss is measured by its training loop
(models/hooks.py ``TestEvaluation``)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM

from slm.errors import InputError, StageError
from slm.models.losses import lm_loss
from slm.pipeline.artifacts import parquet_files
from slm.stage import Staging, copy_dir, filesystem, is_remote, local_dir, manifest


def shard_batches(uri: str, batch_size: int, max_batches: int = 0) -> Iterator[torch.Tensor]:
    """Yield int64 [batch, seq_len] tensors of ``input_ids`` from a published shard, in order,
    streamed record batch by record batch."""
    if manifest(uri) is None:
        raise StageError(f"shard '{uri}' is not done; run the data pipeline first")
    fs, _ = filesystem(uri)
    n = 0
    for path in parquet_files(uri):
        pf = pq.ParquetFile(fs.open_input_file(path))
        for rb in pf.iter_batches(batch_size=batch_size, columns=["input_ids"]):
            col = rb.column(0)
            arr = np.asarray(col.values.to_numpy(zero_copy_only=False)).reshape(len(col), -1)
            yield torch.from_numpy(arr.astype(np.int64))
            n += 1
            if max_batches and n >= max_batches:
                return


def evaluate(model, uri: str, batch_size: int = 8, max_batches: int = 0) -> float:
    """Mean next-token loss (nats) of ``model`` over a shard (token-weighted)."""
    return evaluate_counted(model, uri, batch_size, max_batches)[0]


def evaluate_counted(model, uri: str, batch_size: int = 8, max_batches: int = 0) -> tuple[float, int]:
    """(``evaluate``'s loss, the number of input tokens the model read): what an evaluation
    costs is charged by its tokens (e.g. expert selection by lowest loss). On this process's
    GPU when it has one (a sweep trial's actor that holds a GPU), else on its CPUs."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    read = 0
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in shard_batches(uri, batch_size, max_batches):
            ids = ids.to(device)
            read += int(ids.numel())
            loss, n = lm_loss(model(input_ids=ids).logits, ids)
            total += float(loss) * n
            count += n
    if count == 0:
        raise InputError(f"shard '{uri}' holds no windows; the domain split is too small for "
                         "one window of data.seq_len tokens: add text or lower data.seq_len")
    return total / count, read


def load_lm(uri: str):
    """An HF causal LM directory (local path, or a URI: read through this node's cached copy,
    slm.stage ``local_dir``)."""
    return AutoModelForCausalLM.from_pretrained(local_dir(uri, "model"))


def save_model(model, out: Staging) -> None:
    """``save_pretrained`` (safetensors) into a staging directory: in place when it is local, else
    into a node-local scratch directory copied to the store."""
    if not is_remote(out.uri):
        model.save_pretrained(out.local_dir, safe_serialization=True)
        return
    with tempfile.TemporaryDirectory(prefix="slm-save-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        copy_dir(tmp, out.uri)
