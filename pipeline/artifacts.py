"""Reading and writing the pipeline's parquet artifacts through pyarrow filesystems.

Shared by the data stages: the same calls work on a local run directory and on s3:// / gs://
(``slm.stage.filesystem``). Counting rows reads parquet footers only, never the data. Also the
user's error behind a failed Ray Data task, and the embedding column's array conversions.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import Datasink
from ray.data.block import BlockAccessor

from slm.configkit import ConfigError
from slm.errors import InputError, SlmError, StageError
from slm.errors import user_error as raised_user_error
from slm.pipeline.counters import recorded_error
from slm.stage import Staging, filesystem, manifest


def natural_key(path: str) -> list[Any]:
    """Sort key in write order: Ray names files ``<uuid>_<task:06>-<i>.parquet`` with an
    unpadded ``i`` (pyarrow's basename template), so ``-10`` must sort after ``-9``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def parquet_files(uri: str) -> list[str]:
    """The artifact's parquet files (paths inside its filesystem), in write order."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted((i.path for i in info if i.type == pafs.FileType.File and i.path.endswith(".parquet")),
                  key=natural_key)


def count_rows(uri: str) -> int:
    """Rows in the artifact, from the parquet footers (no data is read)."""
    fs, _ = filesystem(uri)
    return sum(pq.ParquetFile(fs.open_input_file(p)).metadata.num_rows for p in parquet_files(uri))


def read_rows(uri: str, columns: list[str] | None = None) -> pa.Table:
    """All rows of a small artifact, in file order, on the driver (tests, tiny tables)."""
    fs, _ = filesystem(uri)
    return pa.concat_tables([pq.read_table(f, columns=columns, filesystem=fs)
                             for f in parquet_files(uri)])


def read_artifact(uri: str, columns: list[str] | None = None, *, file_blocks: bool = False):
    """A Ray Dataset over a published parquet artifact (streamed, never collected);
    ``file_blocks``: read it in ``file_block_count`` blocks (for wide rows, e.g. embeddings)."""
    fs, _ = filesystem(uri)
    files = input_files(uri)
    blocks = {"override_num_blocks": file_block_count(len(files))} if file_blocks else {}
    ds = ray.data.read_parquet(files, filesystem=fs, **blocks)
    return ds.select_columns(columns) if columns else ds


def file_block_count(files: int) -> int:
    """Read blocks for an artifact of wide rows (the embeddings: 1.5 KiB a row): one per file,
    or twice the cluster's CPUs where there are more of those. Ray Data's default asks for at
    least 200 blocks of at least 1 MiB: it split a 300 MB embeddings artifact of 16 files into
    208 blocks, and reading it took 4.0-4.9 s against 0.9-1.2 s in 16 blocks (2 cores).
    Ray still caps each block at ``target_max_block_size`` while reading."""
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return max(files, 2 * cpus, 1)


def input_files(uri: str) -> list[str]:
    """The parquet files of a published artifact a stage reads; StageError when it is not done
    or holds none."""
    if manifest(uri) is None:
        raise StageError(f"input artifact '{uri}' is not done; run its stage first")
    files = parquet_files(uri)
    if not files:
        raise StageError(f"artifact '{uri}' has no parquet files; delete it and re-run its stage")
    return files


def write_dataset(ds, staging, counter: Any = None, **kwargs: Any) -> None:
    """Stream a dataset into a stage's staging directory (the publish step happens after).

    A failure inside the Ray tasks comes back as Ray's wrapper; it is turned into the user
    error a task recorded (``counters.fail``), else an ``StageError`` naming the artifact
    (e.g. a full disk), so the CLI prints one clear line and nothing is published."""
    with _write_errors(f"'{staging.final_uri}'", counter):
        ds.write_parquet(staging.path, filesystem=staging.fs, **kwargs)


@contextlib.contextmanager
def _write_errors(what: str, counter: Any = None) -> Iterator[None]:
    """A failed write (``what``: the artifacts, as shown) as one clear error: the user error a
    task recorded or raised, else a ``StageError`` with the most specific reason."""
    try:
        yield
    except Exception as e:
        err = recorded_error(counter) or user_error(e)
        if err is not None:
            raise err from None
        if isinstance(e, SlmError):
            raise
        raise StageError(f"writing {what} failed: {_reason(e)}. Nothing was published; free "
                         "space or choose a writable run_dir, then re-run (completed stages "
                         "are kept)") from e


SET_COLUMN = "_set"  # which output set a row of a multi-set pass goes to (never written out)


def read_tagged(uris: list[str], columns: list[str] | None = None):
    """One Ray Dataset over several artifacts, each row tagged with its artifact's index in
    ``uris`` (``SET_COLUMN``): the input of a multi-set pass written by ``write_sets``.

    One ``read_parquet`` over every artifact's files (the set told by each row's file), not a
    union of one read per artifact: with 7 small sets the union took ~1.1 s more to run (one
    read operator and its metadata pass per set)."""
    files = [f for u in uris for f in input_files(u)]
    fs, _ = filesystem(uris[0])
    ds = ray.data.read_parquet(files, filesystem=fs, include_paths=True)
    if columns:
        ds = ds.select_columns([*columns, "path"])
    dirs = [filesystem(u)[1].rstrip("/") + "/" for u in uris]
    return ds.map_batches(_tag_by_path, fn_kwargs={"dirs": dirs}, batch_format="pyarrow",
                          batch_size=None, zero_copy_batch=True)


def owner_of(path: str, dirs: list[str]) -> int:
    """Index of the directory of ``dirs`` (each ending in "/") that holds ``path``: the most
    specific one (a set's directory may be inside another's name space, e.g. ``a/`` and
    ``a/b/``)."""
    owners = [i for i, d in enumerate(dirs) if d in path]
    if not owners:
        raise StageError(f"file '{path}' belongs to none of the artifacts being read")
    return max(owners, key=lambda i: len(dirs[i]))


def _tag_by_path(batch: pa.Table, dirs: list[str]) -> pa.Table:
    """map_batches function: ``SET_COLUMN`` from each row's file, then the path dropped."""
    paths = batch.column("path")
    sets = np.empty(batch.num_rows, dtype=np.int32)
    for path in pc.unique(paths).to_pylist():
        sets[pc.equal(paths, path).to_numpy(zero_copy_only=False)] = owner_of(path, dirs)
    return batch.drop_columns(["path"]).append_column(SET_COLUMN, pa.array(sets))


class SetSink(Datasink):
    """Ray Data sink that writes each row to the staging directory of the set its ``SET_COLUMN``
    names (the column itself is dropped): one Ray Data execution fills many stages' outputs,
    where ``write_parquet`` would need one execution per output. Files are named by write task
    and block (``part-<task>-<block>.parquet``), so with the pipeline's ordered execution the
    files of a set are in its row order, as ``parquet_files`` sorts them. Publishing stays with
    each stage (``slm.stage.publish``): the sink only writes into staging directories."""

    def __init__(self, stagings: list[Staging]) -> None:
        self.dests = [(s.fs, s.path) for s in stagings]

    def write(self, blocks, ctx) -> list[int]:
        rows = [0] * len(self.dests)
        for j, block in enumerate(blocks):
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows == 0:
                continue
            sets = table.column(SET_COLUMN)
            for i in pc.unique(sets).to_pylist():
                part = table.filter(pc.equal(sets, i)).drop_columns([SET_COLUMN])
                fs, path = self.dests[i]
                pq.write_table(part, f"{path}/part-{ctx.task_idx:06d}-{j}.parquet", filesystem=fs)
                rows[i] += part.num_rows
        return rows

    def get_name(self) -> str:
        return "WriteSets"


def write_sets(ds, stagings: list[Staging], counter: Any = None) -> None:
    """Stream a dataset whose rows carry ``SET_COLUMN`` (``read_tagged``) into the staging
    directories of several stages in one execution; errors as ``write_dataset``."""
    shown = ", ".join(f"'{s.final_uri}'" for s in stagings[:3]) + (", ..." if len(stagings) > 3 else "")
    with _write_errors(shown, counter):
        ds.write_datasink(SetSink(stagings))


def _reason(e: BaseException) -> str:
    """The most specific line of a (Ray-wrapped) exception: the last 'SomeError: ...' line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln)]
    return (errs[-1] if errs else (lines[-1] if lines else type(e).__name__))[:300]


def user_error(e: BaseException) -> SlmError | None:
    """The ``SlmError`` a Ray task raised, if any: behind Ray's wrappers
    (``slm.errors.user_error``), or, as Ray keeps only the text of an exception raised in a Data
    task (``RayTaskError(UserCodeException)``), from its line ``slm.errors.<Kind>: <message>``.
    Prefer ``counters.recorded_error`` (exact); this is the fallback for errors raised elsewhere."""
    found = raised_user_error(e)
    if found is not None and type(found).__module__.startswith("slm"):
        return found
    kinds = {"InputError": InputError, "StageError": StageError, "ConfigError": ConfigError}
    m = re.search(r"slm\.(?:errors|configkit)\.(InputError|StageError|ConfigError): (.*)", str(e))
    if m is None:
        return None
    return kinds[m.group(1)](m.group(2).strip())


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise an ``SlmError`` that a Ray task raised as itself (Ray wraps it in its own
    types), so the CLI prints its message instead of a Ray traceback."""
    try:
        yield
    except SlmError:
        raise
    except Exception as e:  # noqa: BLE001 - anything else is re-raised untouched
        err = user_error(e)
        if err is None:
            raise
        raise err from None


# --------------------------------------------------------------------------------------------
# Vector columns (embeddings)
# --------------------------------------------------------------------------------------------

def vectors_to_arrow(vectors: np.ndarray) -> pa.ListArray:
    """[n, dim] float32 → list<float32> column (the artifact schema), without a Python loop."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)))


def arrow_to_vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """list<float32> (equal lengths) column → [n, dim] float32 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(n, -1)
