"""Training checkpoints: DeepSpeed shards + our own JSON record, checked before they are used.

A checkpoint directory (``<storage>/<run>/step=00001200/``) holds what every rank wrote:

* DeepSpeed's files under tag ``ds/`` (``engine.save_checkpoint``: model, optimizer and
  ZeRO shards, LR scheduler, and the loop's client state);
* ``slm-rank<r>.json`` per rank: size and sha256 of each file that rank wrote (a completion
  marker: a rank that died mid-upload leaves no marker, ray#41700);
* ``slm_checkpoint.json`` (rank 0): the run's *signature* (model shape, optimisation and data
  settings that must match to resume), the loop state (step, data position, RNG seeds, costs)
  as plain JSON, and the world size;
* the final checkpoint only (rank 0): ``export/``, the served model (an HF directory; for a
  routed family the whole ProjectedLM), and ``costs.json``, the run's measured costs.

Resuming from a checkpoint of another model/config, or a corrupted one, raises a clear
``StageError`` before DeepSpeed sees it, instead of a shape mismatch deep in ``load_state_dict``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import pyarrow.fs as pafs

from slm.errors import StageError
from slm.hashing import sha256_file
from slm.layout import COSTS
from slm.stage import filesystem, join

TAG = "ds"
RECORD = "slm_checkpoint.json"
EXPORT_DIR = "export"   # final checkpoint: the served model
COSTS_FILE = COSTS      # final checkpoint: the run's costs (the same file the run publishes)
STEP_DIR = re.compile(r"^step=(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step={step:08d}"


def save(engine, directory: str, *, rank: int, world_size: int, signature: dict[str, Any],
         state: dict[str, Any]) -> None:
    """Every rank: write DeepSpeed's shards into ``directory`` (a local temp dir), then this
    rank's file list; rank 0 also writes the JSON record. ``state`` must be JSON-able."""
    engine.save_checkpoint(directory, tag=TAG, client_state={"slm": state})
    files = {}
    for root, _, names in os.walk(directory):
        for n in names:
            full = os.path.join(root, n)
            rel = os.path.relpath(full, directory)
            if rel.startswith("slm-rank") or rel == RECORD:
                continue
            files[rel] = {"size": os.path.getsize(full), "sha256": sha256_file(full)}
    with open(os.path.join(directory, f"slm-rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "files": files}, f, sort_keys=True)
    if rank == 0:
        with open(os.path.join(directory, RECORD), "w") as f:
            json.dump({"signature": signature, "state": state, "world_size": world_size},
                      f, indent=2, sort_keys=True)


def _read_json(uri: str, what: str) -> dict[str, Any]:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise StageError(f"checkpoint {what} '{uri}' is missing or unreadable ({e})") from None


def verify(ckpt_uri: str) -> dict[str, Any]:
    """Check a checkpoint is complete and intact (every rank's marker, every file's size and
    sha256); return its record. Raises StageError naming the bad file and the fix."""
    fix = (f"The checkpoint is corrupted or partial: delete '{ckpt_uri}' (and any later "
           "step=* directories) so the run resumes from the previous checkpoint, or delete the "
           "run directory to start over")
    record = _read_json(join(ckpt_uri, RECORD), "record")
    if not isinstance(record, dict) or "signature" not in record or "state" not in record:
        raise StageError(f"'{join(ckpt_uri, RECORD)}' is not an slm checkpoint record. {fix}")
    fs, base = filesystem(ckpt_uri)
    for rank in range(int(record.get("world_size", 1))):
        marker = _read_json(join(ckpt_uri, f"slm-rank{rank}.json"), f"marker of rank {rank}")
        for rel, meta in marker.get("files", {}).items():
            path = f"{base}/{rel}"
            info = fs.get_file_info(path)
            if info.type != pafs.FileType.File:
                raise StageError(f"checkpoint file '{join(ckpt_uri, rel)}' is missing. {fix}")
            if info.size != meta["size"]:
                raise StageError(f"checkpoint file '{join(ckpt_uri, rel)}' has {info.size} bytes, "
                                 f"{meta['size']} were written. {fix}")
            h = hashlib.sha256()
            with fs.open_input_stream(path) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            if h.hexdigest() != meta["sha256"]:
                raise StageError(f"checkpoint file '{join(ckpt_uri, rel)}' does not match its "
                                 f"recorded sha256. {fix}")
    return record


def check_signature(found: dict[str, Any], expected: dict[str, Any], ckpt_uri: str) -> None:
    """Raise StageError listing every setting where the checkpoint differs from this run."""
    diffs = [f"{k}: checkpoint={found.get(k)!r} run={expected.get(k)!r}"
             for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
    if diffs:
        raise StageError(
            f"checkpoint '{ckpt_uri}' belongs to another model/config and cannot be resumed: "
            + "; ".join(diffs) + ". Use another run_dir (or --cluster.storage), or delete the "
            "run's directory to start this configuration from scratch")


def latest(run_uri: str) -> str | None:
    """The highest ``step=*`` checkpoint directory of a Ray Train run, or None."""
    fs, path = filesystem(run_uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return None
    steps = [(int(m.group(1)), i.base_name) for i in infos
             if i.type == pafs.FileType.Directory and (m := STEP_DIR.match(i.base_name))]
    if not steps:
        return None
    return join(run_uri, max(steps)[1])


def load(engine, local_dir: str, expected_signature: dict[str, Any]) -> dict[str, Any]:
    """Verify, check the signature, then load engine + optimizer + scheduler state; return the
    loop state saved with it."""
    record = verify(local_dir)
    check_signature(record["signature"], expected_signature, local_dir)
    try:
        load_path, _ = engine.load_checkpoint(local_dir, tag=TAG)
    except Exception as e:  # DeepSpeed raises many types for unreadable files
        raise StageError(f"DeepSpeed could not load checkpoint '{local_dir}': {e}. Delete it to "
                         "resume from the previous checkpoint") from None
    if load_path is None:
        raise StageError(f"DeepSpeed found no checkpoint under '{local_dir}/{TAG}'")
    return record["state"]
