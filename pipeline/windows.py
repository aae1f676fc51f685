"""Fixed-length token windows, ``data/windows/<set>``: ``window_id: int64``,
``input_ids: list<int32>`` of exactly ``seq_len`` tokens.

Each document is tokenized and followed by EOS; documents are concatenated in corpus order and
cut into non-overlapping windows; the tail shorter than a window at the end of a *block* is
dropped. A block is one corpus parquet file (ingest writes 2k-20k documents per file): one Ray
Data task per file streams it in record batches, so a task's memory is bounded and the windows
do not depend on how Ray happens to split or batch blocks on a given cluster. That is what makes
``window_id`` deterministic: it packs a hash of the set name, the file's index and the window's
index inside the file (``(h23 << 40) | (file << 24) | window``).

Compute: a task pool with the tokenizer cached per worker process (default), or an actor pool
of tokenizer-holding actors (``compute="actors"``). Measured with
``bench/bench_pipeline_scaling.py --compare-compute`` (4000 docs, vocab 400, 2 shared cores):
task pool 1.8 s, actor pool 4.0 s (best of 2). Loading a ``tokenizers`` tokenizer takes
milliseconds, so an actor pool's start-up costs more than it saves; tasks also free the CPUs
as soon as a set is done.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from slm.errors import InputError, StageError
from slm.layout import RunLayout
from slm.pipeline.artifacts import count_rows, parquet_files, write_dataset
from slm.pipeline.counters import new_counter, report
from slm.pipeline.tokenizer import load_fast_core, run_vocab_size
from slm.stage import Stage, filesystem, input_fingerprints, manifest

FILE_BITS, WINDOW_BITS, SET_BITS = 16, 24, 23
TEXT_BATCH = 512  # documents tokenized per encode_batch call
# The default compute strategy for tokenization; see the module doc for the measurement.
DEFAULT_COMPUTE = "tasks"


def set_hash(set_name: str) -> int:
    return int.from_bytes(hashlib.sha256(set_name.encode()).digest()[:8], "big") % (1 << SET_BITS)


def window_ids(set_name: str, file_index: int, first: int, n: int) -> np.ndarray:
    """Deterministic ids of windows ``first .. first+n-1`` of corpus file ``file_index``."""
    if file_index >= 1 << FILE_BITS or first + n > 1 << WINDOW_BITS:
        raise StageError(f"set '{set_name}': too many corpus files or windows per file for the "
                         "window id scheme; re-ingest with fewer, smaller files")
    base = (set_hash(set_name) << (FILE_BITS + WINDOW_BITS)) | (file_index << WINDOW_BITS)
    return base + np.arange(first, first + n, dtype=np.int64)


@functools.lru_cache(maxsize=4)
def _cached_core(tokenizer_uri: str):
    return load_fast_core(tokenizer_uri)


def _windows_table(ids: np.ndarray, tokens: np.ndarray, seq_len: int) -> pa.Table:
    values = pa.array(tokens, type=pa.int32())
    offsets = pa.array(np.arange(0, len(tokens) + 1, seq_len, dtype=np.int32))
    return pa.table({"window_id": pa.array(ids, type=pa.int64()),
                     "input_ids": pa.ListArray.from_arrays(offsets, values)})


def tokenize_file(tok, eos_id: int, corpus_uri: str, path: str, file_index: int, set_name: str,
                  seq_len: int, counter: Any) -> Iterator[pa.Table]:
    """Windows of one corpus file, yielded per record batch (bounded memory)."""
    fs, _ = filesystem(corpus_uri)
    pf = pq.ParquetFile(fs.open_input_file(path))
    carry = np.zeros(0, dtype=np.int32)
    n_windows = n_tokens = 0
    for rb in pf.iter_batches(batch_size=TEXT_BATCH, columns=["text"]):
        encs = tok.encode_batch(rb.column(0).to_pylist(), add_special_tokens=False)
        parts = [carry]
        for e in encs:
            parts.append(np.asarray(e.ids, dtype=np.int32))
            parts.append(np.array([eos_id], dtype=np.int32))
        stream = np.concatenate(parts)
        n_tokens += len(stream) - len(carry)
        n = len(stream) // seq_len
        if n:
            yield _windows_table(window_ids(set_name, file_index, n_windows, n),
                                 stream[: n * seq_len], seq_len)
            n_windows += n
        carry = stream[n * seq_len:]
    report(counter, path, tokens=n_tokens, windows=n_windows, dropped_tokens=len(carry))


class _FileTask:
    """Task-pool form: tokenizer cached per worker process."""

    def __init__(self, **kw: Any) -> None:
        self.kw = kw

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        tok, eos = _cached_core(self.kw["tokenizer_uri"])
        for path, idx in zip(batch["path"], batch["file_index"]):
            yield from tokenize_file(tok, eos, self.kw["corpus_uri"], str(path), int(idx),
                                     self.kw["set_name"], self.kw["seq_len"], self.kw["counter"])


class TokenizeActor:
    """Actor-pool form: each actor loads the tokenizer once in its constructor."""

    def __init__(self, tokenizer_uri: str, **kw: Any) -> None:
        self.tok, self.eos = load_fast_core(tokenizer_uri)
        self.kw = kw

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        for path, idx in zip(batch["path"], batch["file_index"]):
            yield from tokenize_file(self.tok, self.eos, self.kw["corpus_uri"], str(path), int(idx),
                                     self.kw["set_name"], self.kw["seq_len"], self.kw["counter"])


def windows_dataset(corpus_uri: str, tokenizer_uri: str, set_name: str, seq_len: int,
                    counter: Any = None, compute: str = DEFAULT_COMPUTE):
    """A Ray Dataset of the set's windows (one task per corpus file; nothing collected)."""
    files = parquet_files(corpus_uri)
    if not files:
        raise StageError(f"corpus artifact '{corpus_uri}' has no parquet files; re-run ingest")
    items = ray.data.from_items([{"path": p, "file_index": i} for i, p in enumerate(files)],
                                override_num_blocks=len(files))
    kw = {"corpus_uri": corpus_uri, "set_name": set_name, "seq_len": seq_len, "counter": counter}
    if compute == "actors":
        return items.map_batches(TokenizeActor, batch_size=1, batch_format="numpy",
                                 fn_constructor_kwargs={"tokenizer_uri": tokenizer_uri, **kw},
                                 compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, len(files))))
    return items.map_batches(_FileTask(tokenizer_uri=tokenizer_uri, **kw), batch_size=1,
                             batch_format="numpy", compute=ray.data.TaskPoolStrategy())


def build_windows(layout: RunLayout, set_name: str, corpus_uri: str, seq_len: int, *,
                  what: str = "", rows_per_file: int = 4096, force: bool = False,
                  compute: str = DEFAULT_COMPUTE) -> str:
    """``data/windows/<set_name>`` from a corpus artifact (skipped when done). ``what`` names
    the corpus in errors (e.g. "domain 'law' valid split")."""
    uri = layout.windows(set_name)
    st = Stage(uri, stage="windows", config={"set": set_name, "seq_len": seq_len},
               inputs=input_fingerprints(layout, corpus_uri, layout.tokenizer), force=force)
    if st.done:
        return uri
    counter = new_counter()
    with st.publish() as out:
        ds = windows_dataset(corpus_uri, layout.tokenizer, set_name, seq_len, counter, compute)
        write_dataset(ds, out, counter, max_rows_per_file=rows_per_file)
        totals = ray.get(counter.totals.remote())
        rows = count_rows(out.uri)
        if rows == 0:
            raise InputError(
                f"{what or f'set {set_name!r}'} ('{corpus_uri}') has {totals.get('tokens', 0)} "
                f"tokens, fewer than one window of data.seq_len={seq_len} tokens; add documents "
                "or lower data.seq_len")
        out.manifest.update({"rows": rows, "windows": rows, "seq_len": seq_len,
                             "tokens": int(totals.get("tokens", 0)),
                             "window_tokens": rows * seq_len,
                             "dropped_tokens": int(totals.get("dropped_tokens", 0)),
                             "corpus_documents": (manifest(corpus_uri) or {}).get("rows"),
                             # what the training side checks its model against (models/data.py)
                             "vocab_size": run_vocab_size(layout)})
    return uri
