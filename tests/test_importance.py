"""Cluster importance weights and SLM-is resampling (in memory, and the distributed stage on
real parquet shards with a real local Ray)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slm import stage
from slm.errors import InputError, StageError
from slm.layout import RunLayout, domain_set, packed_set, train_subset
from slm.pipeline.artifacts import parquet_files
from slm.pipeline.importance import (ClusterImportance, read_subset_histogram, write_is_shard,
                                     write_subset_histogram)
from slm.pipeline.shards import build_train_subset

SEQ = 8
GENERIC4 = packed_set("generic", 4)  # what SLM-is resamples from at k_is = 4


def test_weights_are_the_ratio_of_cluster_frequencies():
    imp = ClusterImportance.fit({"k": 4, "counts": [10, 20, 30, 40], "n": 100},
                                {"k": 4, "counts": [5, 0, 3, 2], "n": 10})
    np.testing.assert_allclose(imp.weights(), [0.5 / 0.1, 0.0, 0.3 / 0.3, 0.2 / 0.4])
    # the weighted generic distribution is the domain distribution
    np.testing.assert_allclose(imp.weights() * imp.p_generic(), [0.5, 0.0, 0.3, 0.2])
    assert imp.dropped_mass == 0.0


def test_domain_mass_without_generic_windows_is_dropped_and_renormalised():
    imp = ClusterImportance.fit([10, 20, 0, 30], [5, 0, 3, 2])
    assert imp.dropped_mass == pytest.approx(0.3)
    np.testing.assert_allclose(imp.p_domain(), [5 / 7, 0, 0, 2 / 7])
    np.testing.assert_allclose(imp.weights(), [(5 / 7) / (10 / 60), 0, 0, (2 / 7) / (30 / 60)])
    assert imp.draw_counts(1000, seed=0)[2] == 0
    with pytest.raises(InputError, match="no generic window"):
        ClusterImportance.fit([10, 0], [0, 4])


def test_bad_histograms_are_input_errors():
    with pytest.raises(InputError, match="empty"):
        ClusterImportance.fit([1, 2, 3], {"k": 3, "counts": [0, 0, 0], "n": 0})
    with pytest.raises(InputError, match="k=3 but the domain's has k=2"):
        ClusterImportance.fit([1, 2, 3], [1, 2])
    with pytest.raises(InputError, match="negative"):
        ClusterImportance.fit([1, -2], [1, 2])


def test_resampled_histogram_matches_the_domain():
    rng = np.random.default_rng(0)
    clusters = rng.choice(8, size=2000, p=[.3, .2, .15, .1, .1, .05, .05, .05])
    domain = np.array([1, 0, 2, 30, 5, 40, 0, 22])
    imp = ClusterImportance.fit(np.bincount(clusters, minlength=8), domain)
    idx = imp.resample(20_000, seed=1, cluster_of_windows=clusters)
    assert len(idx) == 20_000 and idx.min() >= 0 and idx.max() < 2000
    got = np.bincount(clusters[idx], minlength=8) / 20_000
    assert np.abs(got - domain / domain.sum()).sum() < 0.03
    assert got[1] == 0 and got[6] == 0


def test_resample_is_seeded_and_repeats_only_when_a_cluster_runs_short():
    clusters = np.array([0] * 3 + [1] * 500)
    imp = ClusterImportance.fit([3, 500], [1, 1])
    a = imp.resample(200, seed=7, cluster_of_windows=clusters)
    np.testing.assert_array_equal(a, imp.resample(200, seed=7, cluster_of_windows=clusters))
    assert not np.array_equal(a, imp.resample(200, seed=8, cluster_of_windows=clusters))
    uses = np.bincount(a, minlength=len(clusters))
    short, plenty = uses[:3], uses[3:]
    n_short = int((clusters[a] == 0).sum())
    assert n_short > 3 * 10  # ~100 draws from a 3-window cluster: with replacement
    assert short.sum() == n_short and short.max() - short.min() <= 1  # evenly repeated
    assert plenty.max() == 1  # ~100 draws from 500 windows: no repeats


# --------------------------------------------------------------------------------------------
# Distributed stage
# --------------------------------------------------------------------------------------------

def write_generic_shards(layout: RunLayout, clusters4: np.ndarray, files: int = 3) -> None:
    """Generic shards packed per cluster at k=4 (``generic-k4``, as build_packed_shards
    publishes them): window_id, input_ids[SEQ], cluster_k4 (and a cluster_k2 passenger)."""
    n = len(clusters4)
    ids = np.arange(n, dtype=np.int64) + 1000
    tokens = (ids[:, None] * 10 + np.arange(SEQ)[None, :]).astype(np.int32)  # row-identifying
    with stage.publish(layout.shards(GENERIC4), stage="shards", config={}, force=True) as out:
        for i, part in enumerate(np.array_split(np.arange(n), files)):
            pq.write_table(pa.table({
                "window_id": pa.array(ids[part]),
                "input_ids": pa.array(list(tokens[part]), pa.list_(pa.int32())),
                "cluster_k4": pa.array(clusters4[part], pa.int32()),
                "cluster_k2": pa.array(clusters4[part] % 2, pa.int32()),
            }), os.path.join(out.local_dir, f"part-{i:05d}.parquet"))


def write_subset_histograms(layout: RunLayout, k: int, hists: dict[tuple[str, int], list[int]]) -> None:
    """Published subset histograms with chosen counts (what ``write_subset_histogram`` writes),
    for the resampling tests; the subset tests below count real subsets."""
    for (domain, tokens), counts in hists.items():
        with stage.publish(layout.subset_histogram(k, domain, tokens), stage="subset-histogram",
                           config=counts) as out:
            stage.write_json(out.file("histogram.json"), {"k": k, "counts": counts, "n": sum(counts)})


def read_rows(uri: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in parquet_files(uri)])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[RunLayout, np.ndarray]:
    layout = RunLayout(str(tmp_path_factory.mktemp("is") / "run"))
    clusters = np.random.default_rng(0).choice(4, size=300, p=[.4, .3, .2, .1])
    write_generic_shards(layout, clusters)
    write_subset_histograms(layout, 4, {("x", 800): [0, 10, 30, 60], ("y", 800): [5, 5, 5, 5],
                                        ("empty", 800): [0, 0, 0, 0]})
    return layout, clusters


def test_is_shard_draws_rows_by_the_domain_histogram(ray_local, shards):
    layout, clusters = shards
    uri = write_is_shard(layout, 4, "x", 800, n_tokens=600 * SEQ, seq_len=SEQ, seed=5)
    assert uri == layout.shards("is-k4-x-800")
    out = read_rows(uri)
    generic = read_rows(layout.shards(GENERIC4))
    assert out.schema == generic.schema and out.num_rows == 600
    # exactly the driver's per-cluster draws, which follow the domain histogram
    imp = ClusterImportance.fit(np.bincount(clusters, minlength=4), [0, 10, 30, 60])
    got = np.bincount(out.column("cluster_k4").to_numpy(), minlength=4)
    np.testing.assert_array_equal(got, imp.draw_counts(600, seed=5))
    assert got[0] == 0 and np.abs(got / 600 - [0, .1, .3, .6]).sum() < 0.12
    # rows are real generic rows (all columns copied); cluster 3 (~10% of windows, ~60% of the
    # draws) is used up and every one of its windows repeats evenly
    by_id = {w: i for i, w in enumerate(generic.column("window_id").to_pylist())}
    src = generic.take(pa.array([by_id[w] for w in out.column("window_id").to_pylist()]))
    assert src.equals(out)
    uses = np.bincount(out.column("window_id").to_numpy() - 1000, minlength=len(clusters))
    in_c3 = uses[clusters == 3]
    assert in_c3.min() >= 2 and in_c3.max() - in_c3.min() <= 1 and in_c3.sum() == got[3]
    m = stage.manifest(uri)
    assert m["rows"] == 600 and m["unique_windows"] == len(set(out.column("window_id").to_pylist()))
    assert m["histogram"] == "data/subset-histograms-k4/domain-x-train-800"  # run-relative
    # deterministic for a seed
    write_is_shard(layout, 4, "x", 800, n_tokens=600 * SEQ, seq_len=SEQ, seed=5, force=True)
    assert read_rows(uri).equals(out)


def test_is_shard_zero_tokens_means_the_generic_size(ray_local, shards):
    layout, _ = shards
    uri = write_is_shard(layout, 4, "y", 800, n_tokens=0, seq_len=SEQ, seed=1)
    assert stage.manifest(uri)["rows"] == 300 == read_rows(uri).num_rows


def test_is_shard_rejects_an_empty_domain_histogram(ray_local, shards):
    layout, _ = shards
    with pytest.raises(InputError, match="domain-empty-train-800.*empty"):
        write_is_shard(layout, 4, "empty", 800, n_tokens=80, seq_len=SEQ, seed=0)
    assert stage.manifest(layout.shards("is-k4-empty-800")) is None
    with pytest.raises(StageError, match="domain 'x' at 160 train tokens is not done"):
        write_is_shard(layout, 4, "x", 160, n_tokens=80, seq_len=SEQ, seed=0)


# --------------------------------------------------------------------------------------------
# The histogram of a domain train subset: exactly the subset's windows
# --------------------------------------------------------------------------------------------

TAIL = 4  # each domain window: SEQ - TAIL tokens of a unit of its cluster c, TAIL of one of c+1


def _unit_columns(clusters4: np.ndarray) -> dict[str, pa.Array]:
    """The plain shards' unit columns of windows cut across two units (see TAIL)."""
    n = len(clusters4)
    return {"unit_tokens": pa.array([[SEQ - TAIL, TAIL]] * n, pa.list_(pa.int32())),
            "unit_clusters_k4": pa.array([[int(c), (int(c) + 1) % 4] for c in clusters4],
                                         pa.list_(pa.int32()))}


def token_counts(clusters4: np.ndarray) -> list[int]:
    """The token histogram of windows written by ``_unit_columns``."""
    return (np.bincount(clusters4, minlength=4) * (SEQ - TAIL)
            + np.bincount((clusters4 + 1) % 4, minlength=4) * TAIL).tolist()


def write_domain_train(layout: RunLayout, domain: str, clusters4: np.ndarray) -> None:
    """A domain train shard set (``domain-<d>-train``, as build_shards publishes it: windows
    with the clusters and tokens of their units), and a whole-split histogram of it (which the
    subset histograms must not use)."""
    n = len(clusters4)
    ids = np.arange(n, dtype=np.int64) + 50_000
    with stage.publish(layout.shards(domain_set(domain, "train")), stage="shards",
                       config={"clusters": clusters4.tolist()}) as out:
        for i, part in enumerate(np.array_split(np.arange(n), 2)):
            pq.write_table(pa.table({
                "window_id": pa.array(ids[part]),
                "input_ids": pa.array([[int(w)] * SEQ for w in ids[part]], pa.list_(pa.int32())),
                **_unit_columns(clusters4[part]),
            }), os.path.join(out.local_dir, f"part-{i:05d}.parquet"))
        out.manifest.update(rows=n, seq_len=SEQ, tokens=n * SEQ)
    with stage.publish(layout.histograms(4), stage="histograms", config={"n": n}, force=True) as out:
        stage.write_json(out.file(f"{domain_set(domain, 'train')}.json"),
                         {"k": 4, "counts": np.bincount(clusters4, minlength=4).tolist(), "n": n})


def test_each_domain_size_gets_the_histogram_of_its_own_subset_only(ray_local, tmp_path):
    """The subset histogram counts exactly the windows build_train_subset chose (the ones the
    size's trials fine-tune on): a smaller size has its own histogram, and changing or
    removing windows outside the subset, or the whole split's histogram, does not change it."""
    layout = RunLayout(str(tmp_path / "run"))
    clusters = np.random.default_rng(3).choice(4, size=120, p=[.55, .25, .15, .05])
    write_domain_train(layout, "z", clusters)
    hist = {}
    for tokens in (10 * SEQ, 60 * SEQ):
        build_train_subset(layout, "z", tokens, seed=0)
        uri = write_subset_histogram(layout, 4, "z", tokens)
        assert uri == layout.subset_histogram(4, "z", tokens)
        assert uri.endswith(f"data/subset-histograms-k4/domain-z-train-{tokens}")
        hist[tokens] = read_subset_histogram(layout, 4, "z", tokens)
        subset = read_rows(layout.shards(train_subset("z", tokens)))
        first = np.array([c[0] for c in subset.column("unit_clusters_k4").to_pylist()])
        assert hist[tokens]["n"] == sum(hist[tokens]["counts"]) == tokens == len(first) * SEQ
        assert hist[tokens]["unit"] == "tokens"
        assert hist[tokens]["counts"] == token_counts(first)  # both units of every window
    small, large = hist[10 * SEQ]["counts"], hist[60 * SEQ]["counts"]
    assert small != large and large != token_counts(clusters)

    # outside the small subset: every window's cluster changed and half of them removed; the
    # whole split's histogram changed too. The selection (rebuilt) is the same windows, so is
    # the histogram; the larger subset's (which holds changed windows) is not.
    chosen = set(read_rows(layout.shards(train_subset("z", 10 * SEQ))).column("window_id").to_pylist())
    ids = np.arange(len(clusters)) + 50_000
    inside = np.isin(ids, list(chosen))
    changed = np.where(inside, clusters, 3)
    keep = inside | (np.arange(len(clusters)) % 2 == 0)
    write_domain_train_rows(layout, "z", ids[keep], changed[keep])
    for tokens, same in ((10 * SEQ, True), (60 * SEQ, False)):
        build_train_subset(layout, "z", tokens, seed=0, force=True)
        write_subset_histogram(layout, 4, "z", tokens, force=True)
        again = read_subset_histogram(layout, 4, "z", tokens)["counts"]
        assert (again == hist[tokens]["counts"]) == same, (tokens, again, hist[tokens]["counts"])

    # the SLM-is shards of the two sizes follow their own histograms
    write_generic_shards(layout, np.random.default_rng(0).choice(4, size=300, p=[.4, .3, .2, .1]))
    generic = np.bincount(read_rows(layout.shards(GENERIC4)).column("cluster_k4").to_numpy(), minlength=4)
    for tokens in (10 * SEQ, 60 * SEQ):
        uri = write_is_shard(layout, 4, "z", tokens, n_tokens=200 * SEQ, seq_len=SEQ, seed=2)
        want = ClusterImportance.fit(generic, read_subset_histogram(layout, 4, "z", tokens)).draw_counts(200, seed=2)
        got = np.bincount(read_rows(uri).column("cluster_k4").to_numpy(), minlength=4)
        np.testing.assert_array_equal(got, want)
        assert stage.manifest(uri)["histogram"] == layout.relative(layout.subset_histogram(4, "z", tokens))


def write_domain_train_rows(layout: RunLayout, domain: str, ids: np.ndarray, clusters4: np.ndarray) -> None:
    """``write_domain_train`` with chosen window ids (some removed) and their clusters."""
    with stage.publish(layout.shards(domain_set(domain, "train")), stage="shards",
                       config={"ids": ids.tolist(), "clusters": clusters4.tolist()}, force=True) as out:
        pq.write_table(pa.table({
            "window_id": pa.array(ids),
            "input_ids": pa.array([[int(w)] * SEQ for w in ids], pa.list_(pa.int32())),
            **_unit_columns(clusters4),
        }), os.path.join(out.local_dir, "part-00000.parquet"))
        out.manifest.update(rows=len(ids), seq_len=SEQ, tokens=len(ids) * SEQ)
    with stage.publish(layout.histograms(4), stage="histograms", config={"ids": ids.tolist()},
                       force=True) as out:
        stage.write_json(out.file(f"{domain_set(domain, 'train')}.json"),
                         {"k": 4, "counts": np.bincount(clusters4, minlength=4).tolist(), "n": len(ids)})


def test_a_subset_histogram_refuses_a_subset_that_is_not_built(tmp_path):
    layout = RunLayout(str(tmp_path / "run"))
    with pytest.raises(StageError, match="domain-w-train-80.*not done"):
        write_subset_histogram(layout, 4, "w", 80)
