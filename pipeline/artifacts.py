"""Reading and writing the pipeline's parquet artifacts through pyarrow filesystems.

Shared by the data stages: the same calls work on a local run directory and on s3:// / gs://
(``slm.stage.filesystem``). Counting rows reads parquet footers only, never the data.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from slm.errors import SlmError, StageError
from slm.stage import filesystem, manifest


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


def read_artifact(uri: str, columns: list[str] | None = None):
    """A Ray Dataset over a published parquet artifact (streamed, never collected)."""
    import ray.data

    if manifest(uri) is None:
        raise StageError(f"input artifact '{uri}' is not done; run its stage first")
    fs, _ = filesystem(uri)
    files = parquet_files(uri)
    if not files:
        raise StageError(f"artifact '{uri}' has no parquet files; delete it and re-run its stage")
    ds = ray.data.read_parquet(files, filesystem=fs)
    return ds.select_columns(columns) if columns else ds


def write_dataset(ds, staging, counter: Any = None, **kwargs: Any) -> None:
    """Stream a dataset into a stage's staging directory (the publish step happens after).

    A failure inside the Ray tasks comes back as Ray's wrapper; it is turned into the user
    error a task recorded (``counters.fail``), else an ``StageError`` naming the artifact
    (e.g. a full disk), so the CLI prints one clear line and nothing is published."""
    from slm.pipeline.counters import recorded_error

    try:
        ds.write_parquet(staging.path, filesystem=staging.fs, **kwargs)
    except Exception as e:
        err = recorded_error(counter) or user_error(e)
        if err is not None:
            raise err from None
        if isinstance(e, SlmError):
            raise
        raise StageError(f"writing '{staging.final_uri}' failed: {_reason(e)}. Nothing was "
                         "published; free space or choose a writable run_dir, then re-run "
                         "(completed stages are kept)") from e


def _reason(e: BaseException) -> str:
    """The most specific line of a (Ray-wrapped) exception: the last 'SomeError: ...' line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln)]
    return (errs[-1] if errs else (lines[-1] if lines else type(e).__name__))[:300]


def user_error(e: BaseException) -> SlmError | None:
    """The ``SlmError`` a Ray task raised, if any. Ray keeps only the text of an exception
    raised in a Data task (``RayTaskError(UserCodeException)``); the original's type and message
    are on a line ``slm.errors.<Kind>: <message>`` of that text. Prefer
    ``counters.recorded_error`` (exact); this is the fallback for errors raised elsewhere."""
    if isinstance(e, SlmError) and type(e).__module__.startswith("slm"):
        return e
    from slm.configkit import ConfigError
    from slm.errors import InputError

    kinds = {"InputError": InputError, "StageError": StageError, "ConfigError": ConfigError}
    m = re.search(r"slm\.(?:errors|configkit)\.(InputError|StageError|ConfigError): (.*)", str(e))
    if m is None:
        return None
    return kinds[m.group(1)](m.group(2).strip())
