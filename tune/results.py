"""The results table of a sweep: one row per finished trial (its ``row.json``), written as
``results.parquet`` + ``results.csv`` and read back, checked, by the cost model, the planner
and the report.

Columns: RESULT_COLUMNS (what every reader needs; docs/design.md), then whatever else the
rows hold (trial, base_lr, expert_selection, teacher, trainable_params, lora_rank, wall_seconds,
finished_at). Paths in it
(``model_path``) are relative to the run directory (slm.layout.RunLayout.relative).
"""

from __future__ import annotations

import io
import uuid
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from slm.errors import InputError
from slm.layout import RunLayout
from slm.stage import exists, filesystem, is_remote, subdirs

from .methods import method_names

RESULT_COLUMNS = ("recipe", "domain", "method", "budget_steps", "domain_tokens", "seed", "lr",
                  "expert", "valid_loss", "test_loss", "test_ppl", "steps_run", "best_step",
                  "spec_flops", "spec_device_seconds", "pretrain_flops",
                  "pretrain_device_seconds", "inference_params", "inference_flops_per_token",
                  "model_path")
_STR_COLUMNS = {"recipe", "domain", "method", "model_path", "trial", "data", "expert_selection",
                "teacher"}
_INT_COLUMNS = {"budget_steps", "domain_tokens", "seed", "expert", "steps_run", "best_step",
                "inference_params", "trainable_params", "lora_rank"}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def write_table(rows: list[dict[str, Any]], parquet_uri: str, csv_uri: str) -> None:
    """The rows as parquet and csv, each replaced atomically."""
    cols = list(RESULT_COLUMNS) + sorted({k for r in rows for k in r} - set(RESULT_COLUMNS))
    table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows],
                                 schema=_schema(cols, rows))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _atomic_write(parquet_uri, buf.getvalue())
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    _atomic_write(csv_uri, buf.getvalue())


def _schema(cols: list[str], rows: list[dict[str, Any]]) -> pa.Schema:
    fields = []
    for c in cols:
        if c in _STR_COLUMNS:
            fields.append(pa.field(c, pa.string()))
        elif c in _INT_COLUMNS:
            fields.append(pa.field(c, pa.int64()))
        else:
            vals = [r.get(c) for r in rows if r.get(c) is not None]
            if vals and all(isinstance(v, str) for v in vals):
                fields.append(pa.field(c, pa.string()))
            else:
                fields.append(pa.field(c, pa.float64()))
    return pa.schema(fields)


def _atomic_write(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` so that a reader sees the old file or the new one: an object
    store replaces a key atomically; on disk, a temp file is renamed onto it."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def find_results(run: str) -> list[str]:
    """Every sweep's results.parquet of the run (``RunLayout.results``, local or object
    storage), sorted by sweep name."""
    layout = RunLayout(run)
    return [uri for uri in (layout.results(name) for name in subdirs(layout.sweep())) if exists(uri)]


def read_results(path: str) -> pd.DataFrame:
    """A sweep's results table (parquet, local or object storage), checked for the columns the
    cost model needs; InputError names the file and what is wrong."""
    if not exists(path):
        raise InputError(f"results file '{path}' does not exist; run `slm sweep` first or pass "
                         "the results.parquet of a finished sweep")
    fs, p = filesystem(path)
    try:
        df = pq.read_table(p, filesystem=fs).to_pandas()
    except Exception as e:  # noqa: BLE001 - any parquet failure is the file's fault
        raise InputError(f"results file '{path}' is not a readable parquet table ({e}); "
                         "re-run `slm sweep` to rewrite it") from None
    check_results(df, path)
    return df


def check_results(df: pd.DataFrame, source: str) -> None:
    """InputError when ``df`` lacks result columns, rows, or has unknown methods."""
    missing = [c for c in RESULT_COLUMNS if c not in df.columns and c != "model_path"]
    if missing:
        raise InputError(f"results '{source}' lack the column(s) {', '.join(missing)}; a results "
                         f"table has {', '.join(RESULT_COLUMNS)} (docs/design.md). Re-run `slm sweep`")
    if df.empty:
        raise InputError(f"results '{source}' have no rows; the sweep finished no trial")
    known = method_names()
    unknown = sorted(set(df["method"]) - set(known))
    if unknown:
        raise InputError(f"results '{source}' have unknown method(s) {', '.join(unknown)}; "
                         f"known: {', '.join(known)}")
    bad = df[~np.isfinite(df["test_loss"].astype(float)) | ~np.isfinite(df["valid_loss"].astype(float))]
    if len(bad):
        raise InputError(f"results '{source}' have {len(bad)} row(s) with a non-finite valid/test "
                         f"loss (e.g. {bad.iloc[0]['domain']}/{bad.iloc[0]['method']}); drop them "
                         "or re-run those trials")


def check_one_recipe(tables: dict[str, pd.DataFrame]) -> str:
    """The one recipe the tables share; InputError naming the files and recipes otherwise
    (results of different recipes are not comparable: other data, sizes, budgets)."""
    seen: dict[str, list[str]] = {}
    for src, df in tables.items():
        for r in sorted(set(map(str, df["recipe"]))):
            seen.setdefault(r, []).append(src)
    if len(seen) != 1:
        detail = "; ".join(f"recipe '{r}' in {', '.join(srcs)}" for r, srcs in sorted(seen.items()))
        raise InputError(f"results of several recipes cannot be mixed in one report/plan: {detail}. "
                         "Pass only results of one recipe (one run), or report each separately")
    return next(iter(seen))
