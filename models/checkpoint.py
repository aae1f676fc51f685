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

Which checkpoint a run resumes from is Ray Train's record (its ``checkpoint_manager_snapshot.json``
in the run's storage, the checkpoints it registered): the newest registered one that verifies.
Newer torn ones are dropped from that record (``unregister``), since Ray hands its newest
registered checkpoint to the workers, whole or torn.

DeepSpeed's files are read with ``torch.load(weights_only=True)`` (``weights_only_loads``): they
live on shared storage, and the sha256 markers show integrity, not authenticity.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
from typing import Any, Iterator

import pyarrow.fs as pafs
import torch

from slm.errors import StageError
from slm.hashing import sha256_file
from slm.layout import COSTS
from slm.stage import exists, filesystem, join, remove, write_json

TAG = "ds"
RECORD = "slm_checkpoint.json"
EXPORT_DIR = "export"   # final checkpoint: the served model
COSTS_FILE = COSTS      # final checkpoint: the run's costs (the same file the run publishes)
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record, in the run's storage


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
    sha256); return its record. Raises StageError naming the bad file."""
    fix = "The checkpoint is corrupted or partial"
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


def registered(run_uri: str) -> list[str]:
    """The checkpoints Ray Train registered for the run (its snapshot), newest first; [] when
    it has none (Ray then starts the run afresh, whatever step=* directories there are)."""
    snap = _snapshot(run_uri)
    if snap is None:
        return []
    try:
        names = [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]]
        order = sorted(zip(snap["checkpoint_report_indices"], names), reverse=True)
    except (KeyError, TypeError):
        raise _unknown_snapshot(run_uri) from None
    return [join(run_uri, name) for _, name in order]


def newest_complete(run_uri: str) -> tuple[str | None, dict[str, Any] | None, list[tuple[str, str]]]:
    """(URI, record) of the newest registered checkpoint that verifies (None, None if none
    does), and the (URI, what is wrong) of the registered ones newer than it."""
    torn = []
    for uri in registered(run_uri):
        try:
            return uri, verify(uri), torn
        except StageError as e:
            torn.append((uri, str(e)))
    return None, None, torn


def unregister(run_uri: str, uris: list[str]) -> None:
    """Drop checkpoints from Ray Train's record of the run, so that it resumes from the newest
    one left. Their directories stay: a resumed run rewrites them when it reaches their step
    (under the same name: were the old entry kept, Ray would delete the new directory when it
    evicts the old entry)."""
    gone = {uri.rstrip("/").rsplit("/", 1)[-1] for uri in uris}
    snap = _snapshot(run_uri)
    try:
        kept = [(r, i) for r, i in zip(snap["checkpoint_results"], snap["checkpoint_report_indices"])
                if r["checkpoint_dir_name"] not in gone]
        pending = [(r, v) for r, v in zip(snap["pending_training_results"], snap["pending_validation_specs"])
                   if r["checkpoint_dir_name"] not in gone]
        snap["checkpoint_results"] = [r for r, _ in kept]
        snap["checkpoint_report_indices"] = [i for _, i in kept]
        snap["latest_checkpoint_result"] = max(kept, key=lambda ri: ri[1])[0] if kept else None
        snap["pending_training_results"] = [r for r, _ in pending]
        snap["pending_validation_specs"] = [v for _, v in pending]
        for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                    "failed_validation_checkpoint_dir_names"):
            snap[key] = [n for n in snap[key] if n not in gone]
    except (KeyError, TypeError):
        raise _unknown_snapshot(run_uri) from None
    write_json(join(run_uri, RAY_SNAPSHOT), snap)


def clear(run_uri: str) -> list[str]:
    """Forget a run's checkpoints, so that it starts afresh (``slm pretrain --force`` over a run
    of another config): Ray Train's record, and the ``step=*`` directories slm wrote (they hold
    its RECORD or a rank marker); anything else in the run's storage stays. Returns what was
    removed (URIs)."""
    gone = []
    record = join(run_uri, RAY_SNAPSHOT)
    if exists(record):
        remove(record)
        gone.append(record)
    fs, base = filesystem(run_uri)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return gone
    for info in fs.get_file_info(pafs.FileSelector(base)):
        if info.type != pafs.FileType.Directory or not re.fullmatch(r"step=\d+", info.base_name):
            continue
        uri = join(run_uri, info.base_name)
        if exists(join(uri, RECORD)) or exists(join(uri, "slm-rank0.json")):
            remove(uri)
            gone.append(uri)
    return gone


def _snapshot(run_uri: str) -> dict[str, Any] | None:
    uri = join(run_uri, RAY_SNAPSHOT)
    return _read_json(uri, "list of Ray Train") if exists(uri) else None


def _unknown_snapshot(run_uri: str) -> StageError:
    return StageError(f"Ray Train's checkpoint record '{join(run_uri, RAY_SNAPSHOT)}' is not in the "
                      "format this slm reads (written by another Ray version?); delete the run "
                      f"directory '{run_uri}' to start the run over")


# --------------------------------------------------------------------------------------------
# Loading: no pickled objects from shared storage
# --------------------------------------------------------------------------------------------

def _safe_types() -> list[type]:
    """The only non-tensor types DeepSpeed's checkpoint files hold (its fp32 and bf16
    checkpoints at ZeRO stages 0-3: the optimizer states' loss scaler, ZeRO stage and
    parameter fragment addresses); plain data, nothing that runs code when rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside: every ``torch.load`` (DeepSpeed's own pass ``weights_only=False``) unpickles
    only tensors, plain containers and ``_safe_types``; a file that needs any other type is
    refused with a StageError naming it and the type, and nothing of it runs."""
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise StageError(_unsafe_message(f, e)) from None

    torch.load = load
    try:
        with torch.serialization.safe_globals(_safe_types()):
            yield
    finally:
        torch.load = original


def _unsafe_message(f, error: Exception) -> str:
    # torch's unpickler stops at the first type it refuses and names it ("... GLOBAL posix.system ...")
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = found.group(1) if found else "(an object torch does not name)"
    return (f"checkpoint file '{f}' needs the pickled type {what} to load, which slm refuses "
            "(checkpoints are read with torch.load(weights_only=True): a file on shared storage "
            "could run code): slm did not write it, or it was altered since; delete the run's "
            "directory to start the run over")


def load(engine, local_dir: str, expected_signature: dict[str, Any], source: str) -> dict[str, Any]:
    """Verify, check the signature, then load engine + optimizer + scheduler state; return the
    loop state saved with it. ``local_dir``: this node's copy of the checkpoint ``source`` (a
    URI), which the errors name."""
    try:
        record = verify(local_dir)
        check_signature(record["signature"], expected_signature, local_dir)
        with weights_only_loads():
            load_path, _ = engine.load_checkpoint(local_dir, tag=TAG)
    except StageError as e:
        raise StageError(str(e).replace(local_dir, source)) from None
    except Exception as e:  # DeepSpeed raises many types for unreadable files
        raise StageError(f"DeepSpeed could not load checkpoint '{source}': {e}. Delete the run's "
                         "directory to start the run over") from None
    if load_path is None:
        raise StageError(f"DeepSpeed found no checkpoint under '{source}/{TAG}'")
    return record["state"]
