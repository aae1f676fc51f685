"""The stage counters: one actor per driver, a scope per stage, on a real local Ray."""

from __future__ import annotations

import gc
import time

import pytest
import ray

from slm.errors import InputError
from slm.pipeline.counters import fail, new_counter, recorded_error, report


@ray.remote
def _count(counter, key: str, n: int) -> None:
    report(counter, key, tokens=n)


def test_one_actor_serves_every_stage(ray_local):
    """Each stage drops its counter when it ends. The driver's actor must outlive that (an
    actor whose handles are all gone is killed, and the next stage would pay a new actor's
    start, ~0.8 s, or find it dying: ActorDiedError)."""
    first = new_counter()
    actor_id = first.actor._actor_id.hex()
    del first
    gc.collect()
    time.sleep(2.0)  # longer than Ray takes to kill an actor whose handles are gone
    for i in range(3):
        counter = new_counter()
        assert counter.actor._actor_id.hex() == actor_id
        ray.get([_count.remote(counter, f"file-{j}", 10 * i + j) for j in range(3)])
        # a retried task overwrites its own key instead of adding twice
        ray.get(_count.remote(counter, "file-0", 10 * i))
        assert counter.totals() == {"tokens": 30 * i + 3}
        del counter
        gc.collect()


def test_scopes_keep_their_own_counts_and_errors(ray_local):
    a, b = new_counter(), new_counter()
    assert a.actor == b.actor and a.scope != b.scope  # one actor, two scopes
    report(a, "x", skipped_files=1)
    report(b, "y", tokens=5)
    with pytest.raises(InputError):
        fail(b, "y", InputError("'y' is bad; fix it"))
    assert a.totals() == {"skipped_files": 1} and b.totals() == {"tokens": 5}
    assert a.keys_with("skipped_files") == ["x"] and b.keys_with("skipped_files") == []
    assert recorded_error(a) is None
    err = recorded_error(b)
    assert isinstance(err, InputError) and str(err) == "'y' is bad; fix it"
