"""One JSON file for the data-pipeline benches (``bench/results/data_pipeline.json``).

Each bench run replaces its own top-level keys (e.g. ``embed_ratio`` and ``embed``) and leaves
the other benches' keys as they are, so one file holds the latest run of each; every entry
carries the machine, the load averages and the exact command that measured it."""

from __future__ import annotations

import json
import os
import sys

from machine_info import machine

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "data_pipeline.json")


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def record(entries: dict, path: str = RESULTS) -> None:
    """Merge ``entries`` into the JSON file at ``path``; dict entries get the machine, the
    command line and the load average at the end of the run."""
    data = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    info = {"machine": machine(), "command": " ".join(["python"] + sys.argv),
            "load_average_at_end": load_average()}
    for key, value in entries.items():
        data[key] = {**value, **info} if isinstance(value, dict) else value
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    print(f"wrote {', '.join(entries)} to {path}")
