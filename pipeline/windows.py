"""Token windows and units of a set, tokenized from one corpus artifact.

* **Windows**, ``data/windows/<set>``: ``window_id: int64``, ``input_ids: list<int32>`` of
  exactly ``seq_len`` tokens, and which units the window's tokens come from (``unit_ids:
  list<int64>``, ``unit_tokens: list<int32>``, in order; the tokens sum to ``seq_len``). Each
  document is tokenized and followed by EOS; documents are concatenated in corpus order and cut
  into non-overlapping windows (a window may hold the end of one document and the start of the
  next); the tail shorter than a window at the end of a *block* is dropped. These are what the
  models without clusters (SLM, LLM, SLM-nopt) and every fine-tuning read.
* **Units**, ``data/units/<set>``: ``unit_id: int64``, ``input_ids: list<int32>`` of 1 to
  ``seq_len`` tokens, ``tokens: int32``: each document's tokens + EOS cut into pieces of at most
  ``seq_len`` tokens. A unit is text of one document, so it is the unit that is embedded and
  assigned to a cluster (pipeline/embed.py, kmeans.py); the clustered families train on windows
  packed from the units of one cluster (pipeline/shards.py ``build_packed_shards``), and a
  window's cluster histogram is that of its units, weighted by their tokens in it.

A block is one corpus parquet file (ingest writes 2k-20k documents per file): one Ray Data task
per file streams it in record batches, so a task's memory is bounded and neither windows nor
units depend on how Ray happens to split or batch blocks on a given cluster. That is what makes
the ids deterministic: an id packs a hash of the set name (and kind), the file's index and the
row's index inside the file (``(h23 << 40) | (file << 24) | index``); the windows name their
units by these same ids.

Compute: a task pool with the tokenizer cached per worker process (default), or an actor pool
of tokenizer-holding actors (``compute="actors"``). Measured with
``bench/bench_pipeline_scaling.py --compare-compute`` (4000 docs, vocab 400, 2 shared cores):
task pool 1.8 s, actor pool 4.0 s (best of 2). Loading a ``tokenizers`` tokenizer takes
milliseconds, so an actor pool's start-up costs more than it saves; tasks also free the CPUs
as soon as a set is done. The units are a second tokenization pass (they are written as their
own artifact, which a Ray Data write of one dataset cannot do in the same pass); tokenizing is
the cheap part of the pipeline.
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


def window_ids(set_name: str, file_index: int, first: int, n: int, kind: str = "") -> np.ndarray:
    """Deterministic ids of windows (``kind`` "units": units) ``first .. first+n-1`` of corpus
    file ``file_index``."""
    if file_index >= 1 << FILE_BITS or first + n > 1 << WINDOW_BITS:
        raise StageError(f"set '{set_name}': too many corpus files or {kind or 'windows'} per "
                         "file for the id scheme; re-ingest with fewer, smaller files")
    h = set_hash(f"{set_name}/{kind}" if kind else set_name)
    base = (h << (FILE_BITS + WINDOW_BITS)) | (file_index << WINDOW_BITS)
    return base + np.arange(first, first + n, dtype=np.int64)


def unit_lengths(doc_tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Token counts of the units of documents of ``doc_tokens`` tokens each (EOS included):
    every document cut into pieces of at most ``seq_len``, in order."""
    full, rest = np.divmod(doc_tokens, seq_len)
    n = full + (rest > 0)
    lengths = np.full(int(n.sum()), seq_len, dtype=np.int64)
    last = np.cumsum(n) - 1  # each document's last unit
    lengths[last[rest > 0]] = rest[rest > 0]
    return lengths


def window_units(unit_len: np.ndarray, n_windows: int, seq_len: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How the first ``n_windows`` windows of a stream of units (``unit_len`` tokens each, in
    stream order) are made of them: (offsets [n_windows + 1], unit index, tokens of that unit in
    the window) — window w holds the pieces ``offsets[w] .. offsets[w+1]-1``."""
    end = n_windows * seq_len
    unit_end = np.cumsum(unit_len)
    cuts = np.union1d(unit_end[unit_end < end], np.arange(0, end + 1, seq_len)[1:])
    starts = np.concatenate([[0], cuts[:-1]]).astype(np.int64)
    unit = np.searchsorted(unit_end, starts, side="right")
    window = starts // seq_len
    offsets = np.concatenate([[0], np.cumsum(np.bincount(window, minlength=n_windows))])
    return offsets, unit, (cuts - starts)


@functools.lru_cache(maxsize=4)
def _cached_core(tokenizer_uri: str):
    return load_fast_core(tokenizer_uri)


def _list_array(values: np.ndarray, offsets: np.ndarray, type_: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(values, type=type_))


def _windows_table(ids: np.ndarray, tokens: np.ndarray, seq_len: int, unit_offsets: np.ndarray,
                   unit_ids: np.ndarray, unit_tokens: np.ndarray) -> pa.Table:
    return pa.table({"window_id": pa.array(ids, type=pa.int64()),
                     "input_ids": _list_array(tokens, np.arange(0, len(tokens) + 1, seq_len), pa.int32()),
                     "unit_ids": _list_array(unit_ids, unit_offsets, pa.int64()),
                     "unit_tokens": _list_array(unit_tokens, unit_offsets, pa.int32())})


def _units_table(ids: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> pa.Table:
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return pa.table({"unit_id": pa.array(ids, type=pa.int64()),
                     "input_ids": _list_array(tokens, offsets, pa.int32()),
                     "tokens": pa.array(lengths, type=pa.int32())})


def tokenize_file(tok, eos_id: int, corpus_uri: str, path: str, file_index: int, set_name: str,
                  seq_len: int, counter: Any, kind: str = "windows",
                  batch_size: int = TEXT_BATCH) -> Iterator[pa.Table]:
    """Windows (or, ``kind="units"``, units) of one corpus file, yielded per record batch of
    ``batch_size`` documents (bounded memory; the rows do not depend on it)."""
    fs, _ = filesystem(corpus_uri)
    pf = pq.ParquetFile(fs.open_input_file(path))
    carry = np.zeros(0, dtype=np.int32)
    carry_uid = np.zeros(0, dtype=np.int64)  # the units of the carried tokens, and how many
    carry_ulen = np.zeros(0, dtype=np.int64)  # of each unit's tokens are in the carry
    n_windows = n_units = n_tokens = 0
    for rb in pf.iter_batches(batch_size=batch_size, columns=["text"]):
        encs = tok.encode_batch(rb.column(0).to_pylist(), add_special_tokens=False)
        parts = []
        for e in encs:
            parts.append(np.asarray(e.ids, dtype=np.int32))
            parts.append(np.array([eos_id], dtype=np.int32))
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        ulen = unit_lengths(np.array([len(e.ids) + 1 for e in encs], dtype=np.int64), seq_len)
        uid = window_ids(set_name, file_index, n_units, len(ulen), kind="units")
        n_units += len(ulen)
        n_tokens += len(tokens)
        if kind == "units":
            if len(ulen):
                yield _units_table(uid, tokens, ulen)
            continue
        stream = np.concatenate([carry, tokens])
        uid, ulen = np.concatenate([carry_uid, uid]), np.concatenate([carry_ulen, ulen])
        n = len(stream) // seq_len
        if n:
            offsets, unit, piece = window_units(ulen, n, seq_len)
            yield _windows_table(window_ids(set_name, file_index, n_windows, n),
                                 stream[: n * seq_len], seq_len, offsets, uid[unit], piece)
            n_windows += n
        # the units still (partly) in the carry: those ending after the last window
        unit_end = np.cumsum(ulen)
        first = int(np.searchsorted(unit_end, n * seq_len, side="right"))
        carry, carry_uid = stream[n * seq_len:], uid[first:]
        carry_ulen = ulen[first:].copy()
        if len(carry_ulen):
            carry_ulen[0] = unit_end[first] - n * seq_len
    if kind == "units":
        report(counter, path, tokens=n_tokens, units=n_units)
    else:
        report(counter, path, tokens=n_tokens, windows=n_windows, dropped_tokens=len(carry))


class _FileTask:
    """Task-pool form: tokenizer cached per worker process."""

    def __init__(self, **kw: Any) -> None:
        self.kw = kw

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        tok, eos = _cached_core(self.kw["tokenizer_uri"])
        for path, idx in zip(batch["path"], batch["file_index"]):
            yield from tokenize_file(tok, eos, self.kw["corpus_uri"], str(path), int(idx),
                                     self.kw["set_name"], self.kw["seq_len"], self.kw["counter"],
                                     self.kw["kind"])


class TokenizeActor:
    """Actor-pool form: each actor loads the tokenizer once in its constructor."""

    def __init__(self, tokenizer_uri: str, **kw: Any) -> None:
        self.tok, self.eos = load_fast_core(tokenizer_uri)
        self.kw = kw

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        for path, idx in zip(batch["path"], batch["file_index"]):
            yield from tokenize_file(self.tok, self.eos, self.kw["corpus_uri"], str(path), int(idx),
                                     self.kw["set_name"], self.kw["seq_len"], self.kw["counter"],
                                     self.kw["kind"])


def windows_dataset(corpus_uri: str, tokenizer_uri: str, set_name: str, seq_len: int,
                    counter: Any = None, compute: str = DEFAULT_COMPUTE, kind: str = "windows"):
    """A Ray Dataset of the set's windows (``kind="units"``: units), one task per corpus file;
    nothing collected."""
    files = parquet_files(corpus_uri)
    if not files:
        raise StageError(f"corpus artifact '{corpus_uri}' has no parquet files; re-run ingest")
    items = ray.data.from_items([{"path": p, "file_index": i} for i, p in enumerate(files)],
                                override_num_blocks=len(files))
    kw = {"corpus_uri": corpus_uri, "set_name": set_name, "seq_len": seq_len, "counter": counter,
          "kind": kind}
    if compute == "actors":
        return items.map_batches(TokenizeActor, batch_size=1, batch_format="numpy",
                                 fn_constructor_kwargs={"tokenizer_uri": tokenizer_uri, **kw},
                                 compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, len(files))))
    return items.map_batches(_FileTask(tokenizer_uri=tokenizer_uri, **kw), batch_size=1,
                             batch_format="numpy", compute=ray.data.TaskPoolStrategy())


# The windows' schema: unit_ids / unit_tokens were added with the units (runs built before
# need `slm data run --force`; the fingerprint tells them apart)
WINDOWS_SCHEMA = 2


def build_windows(layout: RunLayout, set_name: str, corpus_uri: str, seq_len: int, *,
                  what: str = "", rows_per_file: int = 4096, force: bool = False,
                  compute: str = DEFAULT_COMPUTE) -> str:
    """``data/windows/<set_name>`` from a corpus artifact (skipped when done). ``what`` names
    the corpus in errors (e.g. "domain 'law' valid split")."""
    uri = layout.windows(set_name)
    st = Stage(uri, stage="windows", config={"set": set_name, "seq_len": seq_len, "schema": WINDOWS_SCHEMA},
               inputs=input_fingerprints(layout, corpus_uri, layout.tokenizer), force=force)
    if st.done:
        return uri
    counter = new_counter()
    with st.publish() as out:
        ds = windows_dataset(corpus_uri, layout.tokenizer, set_name, seq_len, counter, compute)
        write_dataset(ds, out, counter, max_rows_per_file=rows_per_file)
        totals = counter.totals()
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


def build_units(layout: RunLayout, set_name: str, corpus_uri: str, seq_len: int, *,
                what: str = "", rows_per_file: int = 4096, force: bool = False,
                compute: str = DEFAULT_COMPUTE) -> str:
    """``data/units/<set_name>`` from a corpus artifact (skipped when done): every document cut
    into pieces of at most ``seq_len`` tokens, numbered as the windows name them."""
    uri = layout.units(set_name)
    st = Stage(uri, stage="units", config={"set": set_name, "seq_len": seq_len},
               inputs=input_fingerprints(layout, corpus_uri, layout.tokenizer), force=force)
    if st.done:
        return uri
    counter = new_counter()
    with st.publish() as out:
        ds = windows_dataset(corpus_uri, layout.tokenizer, set_name, seq_len, counter, compute,
                             kind="units")
        write_dataset(ds, out, counter, max_rows_per_file=rows_per_file)
        totals = counter.totals()
        rows = count_rows(out.uri)
        if rows == 0:
            raise InputError(f"{what or f'set {set_name!r}'} ('{corpus_uri}') has no documents "
                             "to cut into units; add documents")
        out.manifest.update({"rows": rows, "units": rows, "seq_len": seq_len,
                             "tokens": int(totals.get("tokens", 0)),
                             "corpus_documents": (manifest(corpus_uri) or {}).get("rows"),
                             "vocab_size": run_vocab_size(layout)})
    return uri
