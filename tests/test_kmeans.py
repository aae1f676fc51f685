"""k-means fit, distributed assignment and histograms on real parquet and a real local Ray."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.cluster import KMeans

from slm import stage
from slm.errors import InputError, SlmError
from slm.layout import RunLayout
from slm.pipeline.artifacts import parquet_files, vectors_to_arrow
from slm.pipeline.config import KMeansConfig
from slm.configkit import ConfigError
from slm.pipeline.kmeans import (assign, assign_all, assign_sets, fit_kmeans, fit_kmeans_all, fit_with, histograms,
                                 load_centroids, nearest, read_histogram)

DIM = 32


def blobs(sizes: list[int], seed: int) -> np.ndarray:
    """Unit vectors around len(sizes) well-separated centres, in cluster order."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), DIM)) * 3
    x = np.concatenate([centres[i] + rng.normal(size=(s, DIM)) for i, s in enumerate(sizes)])
    x = x[rng.permutation(len(x))]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def unit_tokens(ids: np.ndarray) -> np.ndarray:
    """Each test unit's length in tokens (1 to 5): what histograms weigh it by."""
    return 1 + ids % 5


def write_embeddings(layout: RunLayout, set_name: str, x: np.ndarray, id_base: int = 0,
                     files: int = 3) -> None:
    """An embeddings artifact as design.md describes it, split over several parquet files."""
    with stage.publish(layout.embeddings(set_name), stage="embed", config={"set": set_name}) as out:
        for i, part in enumerate(np.array_split(np.arange(len(x)), files)):
            ids = part + id_base
            table = pa.table({"unit_id": pa.array(ids, pa.int64()),
                              "tokens": pa.array(unit_tokens(ids), pa.int32()),
                              "embedding": vectors_to_arrow(x[part])})
            pq.write_table(table, os.path.join(out.local_dir, f"part-{i}.parquet"))


def read_assign(layout: RunLayout, k: int, set_name: str) -> pa.Table:
    files = parquet_files(layout.assignments(k, set_name))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("unit_id")


FIT = KMeansConfig(k_is=4, k_mix=2, k_pn=2, fit_sample=10_000, max_iter=50)


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory) -> tuple[RunLayout, np.ndarray, np.ndarray]:
    """One run directory for the module (each Ray Data pass costs seconds): embeddings of a
    generic and a domain set, k-means at k=4, both sets assigned."""
    layout = RunLayout(str(tmp_path_factory.mktemp("kmeans") / "run"))
    generic = blobs([100, 100, 100, 100], seed=0)
    domain = blobs([60, 30, 10, 0], seed=0)[:100]
    write_embeddings(layout, "generic", generic)
    write_embeddings(layout, "domain-x-train", domain, id_base=10_000, files=1)
    fit_kmeans(layout, 4, FIT, seed=0)
    # both sets in one Ray Data execution, each into its own artifact
    assert assign_sets(layout, 4, ["generic", "domain-x-train"]) == ["generic", "domain-x-train"]
    return layout, generic, domain


def test_fit_and_assign_agree_with_sklearn(run):
    layout, generic, domain = run
    uri = layout.kmeans(4)
    centroids, offsets = load_centroids(layout, 4)
    ref = KMeans(n_clusters=4, init="k-means++", n_init=1, max_iter=50, random_state=0,
                 algorithm="lloyd").fit(generic)
    np.testing.assert_allclose(centroids, ref.cluster_centers_, atol=1e-5)
    assert not offsets.any()
    m = stage.manifest(uri)
    assert m["sample_rows"] == 400 and sum(m["sizes"]) == 400 and m["balanced"] is False
    assert m["inertia"] == pytest.approx(ref.inertia_, rel=1e-4)
    assert m["fit_in_ray_task"] is True  # fitted in a Ray task with its own CPUs, not the driver

    got = read_assign(layout, 4, "generic")
    assert got.schema.field("cluster").type == pa.int32()
    assert got.schema.field("distance").type == pa.float32()
    assert got.column("unit_id").to_pylist() == list(range(400))
    np.testing.assert_array_equal(got.column("cluster").to_numpy(), ref.predict(generic))
    want_d = np.linalg.norm(generic - ref.cluster_centers_[ref.predict(generic)], axis=1)
    np.testing.assert_allclose(got.column("distance").to_numpy(), want_d, atol=1e-4)
    # the other set of the same pass holds exactly its own rows
    dom = read_assign(layout, 4, "domain-x-train")
    assert dom.column("unit_id").to_pylist() == list(range(10_000, 10_100))
    np.testing.assert_array_equal(dom.column("cluster").to_numpy(), ref.predict(domain))
    assert stage.manifest(layout.assignments(4, "domain-x-train"))["shared_pass"]["rows"] == 500
    # done artifacts are reused, not rebuilt
    assert fit_kmeans(layout, 4, FIT, seed=0) == uri
    assert stage.manifest(uri)["started"] == m["started"]
    assert assign_sets(layout, 4, ["generic", "domain-x-train"]) == []


def test_every_k_in_one_pass(run):
    """One pass assigns each set at every K it still needs; each K's result is what that K's
    centroids give alone, and output file i holds the rows of input file i."""
    layout, generic, domain = run
    fit_kmeans(layout, 2, FIT, seed=0, balanced=False)
    before = read_assign(layout, 4, "generic")
    # k=4 is done for both sets: only k=2 runs
    assert assign_all(layout, [4, 2], ["generic", "domain-x-train"]) == [
        (2, "generic"), (2, "domain-x-train")]
    for s, x in (("generic", generic), ("domain-x-train", domain)):
        c, off = load_centroids(layout, 2)
        np.testing.assert_array_equal(read_assign(layout, 2, s).column("cluster").to_numpy(),
                                      nearest(x, c, off)[0])
    assert stage.manifest(layout.assignments(2, "generic"))["shared_pass"]["ks"] == [2]
    files = parquet_files(layout.assignments(2, "generic"))
    want = [pq.read_table(f, columns=["unit_id"]) for f in parquet_files(layout.embeddings("generic"))]
    assert [pq.read_table(f).column("unit_id") for f in files] == [t.column("unit_id") for t in want]
    # forced: both Ks again in one pass, k=4 unchanged
    assert len(assign_all(layout, [4, 2], ["generic", "domain-x-train"], force=True)) == 4
    assert read_assign(layout, 4, "generic").equals(before)
    assert stage.manifest(layout.assignments(4, "generic"))["shared_pass"]["ks"] == [4, 2]


def test_embeddings_without_vectors_are_an_input_error(run):
    layout, _, _ = run
    with stage.publish(layout.embeddings("broken"), stage="embed", config={"set": "broken"}) as out:
        pq.write_table(pa.table({"unit_id": pa.array([1, 2], pa.int64())}),
                       os.path.join(out.local_dir, "part-0.parquet"))
    with pytest.raises(InputError, match=r"embeddings file '.*broken/part-0.parquet' has columns "
                                         r"\['unit_id'\], not unit_id and embedding; re-run `slm data run "
                                         r"--recipe .* --force`"):
        assign(layout, 4, "broken")
    assert stage.manifest(layout.assignments(4, "broken")) is None  # nothing published


def test_fit_uses_a_bounded_seeded_sample(run):
    layout, _, _ = run
    cfg = KMeansConfig(k_is=3, k_mix=2, k_pn=2, fit_sample=150)
    m = stage.manifest(fit_kmeans(layout, 3, cfg, seed=3))
    assert 100 <= m["sample_rows"] <= 150
    first = load_centroids(layout, 3)[0]
    fit_kmeans(layout, 3, cfg, seed=3, force=True)
    np.testing.assert_array_equal(load_centroids(layout, 3)[0], first)
    # every K in one task, on one sample read: each K is what its fit alone gives
    assert fit_kmeans_all(layout, [2, 3], cfg, seed=3, force=True) == [2, 3]
    np.testing.assert_array_equal(load_centroids(layout, 3)[0], first)
    two, three = stage.manifest(layout.kmeans(2)), stage.manifest(layout.kmeans(3))
    assert (two["sample_shared"], three["sample_shared"]) == (False, True)
    assert two["sample_rows"] == three["sample_rows"] and two["k"] == 2
    assert fit_kmeans_all(layout, [2, 3], cfg, seed=3) == []  # done: nothing refitted


def test_balanced_assignment_gives_equal_sizes(ray_local, tmp_path):
    layout = RunLayout(str(tmp_path / "run"))
    x = blobs([240, 80, 40, 40], seed=1)
    write_embeddings(layout, "generic", x)
    plain = KMeans(n_clusters=4, n_init=1, random_state=0).fit(x)
    assert np.bincount(plain.labels_).max() >= 200  # the data really is unbalanced
    cfg = KMeansConfig(k_is=8, k_mix=4, k_pn=8, balanced_mix=True, fit_sample=10_000)
    m = stage.manifest(fit_kmeans(layout, 4, cfg, seed=0))
    assert m["balanced"] is True
    assign(layout, 4, "generic")
    sizes = np.bincount(read_assign(layout, 4, "generic").column("cluster").to_numpy(), minlength=4)
    assert sizes.sum() == 400
    assert np.abs(sizes - 100).max() <= 5, sizes
    assert load_centroids(layout, 4)[1].any()


def test_histograms_count_assignments(run):
    layout, _, domain = run
    uri = histograms(layout, 4, ["generic"])
    for s in ("generic", "domain-x-train"):  # a set added later joins the same artifact
        uri = histograms(layout, 4, [s])
        h = read_histogram(layout, 4, s)
        a = read_assign(layout, 4, s)  # the units' tokens are carried through the assignment
        assert a.column("tokens").to_pylist() == unit_tokens(a.column("unit_id").to_numpy()).tolist()
        direct = np.bincount(a.column("cluster").to_numpy(), weights=a.column("tokens").to_numpy(),
                             minlength=4).astype(int)
        assert h["k"] == 4 and h["counts"] == direct.tolist() and h["n"] == sum(h["counts"])
        assert h["unit"] == "tokens"
    assert read_histogram(layout, 4, "generic")["n"] == int(unit_tokens(np.arange(400)).sum())
    assert read_histogram(layout, 4, "domain-x-train")["n"] == int(unit_tokens(np.arange(100) + 10_000).sum())
    assert sorted(stage.manifest(uri)["sets"]) == ["domain-x-train", "generic"]
    with open(os.path.join(uri, "generic.json")) as f:
        assert set(json.load(f)) == {"k", "counts", "n", "unit"}


def test_k_larger_than_units_is_an_input_error(run):
    layout, _, _ = run
    with pytest.raises(InputError, match=r"k=500 .* only 400 units"):
        fit_kmeans(layout, 500, KMeansConfig(), seed=0)
    assert stage.manifest(layout.kmeans(500)) is None


def test_assign_needs_fitted_centroids(run):
    layout, _, _ = run
    with pytest.raises(SlmError, match="kmeans-k7"):
        assign(layout, 7, "generic")


def test_nearest_matches_full_distances_with_offsets():
    rng = np.random.default_rng(0)
    x, c = rng.normal(size=(300, DIM)).astype(np.float32), rng.normal(size=(7, DIM)).astype(np.float32)
    off = rng.normal(size=7).astype(np.float32)
    d2 = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    cluster, dist = nearest(x, c, off)
    np.testing.assert_array_equal(cluster, np.argmin(d2 - off, axis=1))
    np.testing.assert_allclose(dist, np.sqrt(d2[np.arange(300), cluster]), rtol=1e-4, atol=1e-4)


def test_faiss_backend_fits_as_well_as_sklearn():
    pytest.importorskip("faiss")  # the optional extra slm[faiss] (in slm[all])
    # more centres than clusters, overlapping (as sentence embeddings are); on a few
    # well-separated blobs faiss's random init can put two centroids in one blob
    x = blobs([60] * 48, seed=2)
    x += np.random.default_rng(3).normal(scale=0.3, size=x.shape).astype(np.float32)
    inertia = {}
    for backend in ("sklearn", "faiss"):
        centroids, iterations = fit_with(backend, x, 16, seed=0, n_init=1, max_iter=30)
        assert centroids.shape == (16, DIM) and centroids.dtype == np.float32 and iterations >= 1
        inertia[backend] = float(np.square(nearest(x, centroids)[1], dtype=np.float64).sum())
    assert inertia["faiss"] == pytest.approx(inertia["sklearn"], rel=0.01)


def test_backend_is_checked_in_the_config():
    with pytest.raises(ConfigError, match="field 'backend' is 'cuml'"):
        KMeansConfig(backend="cuml").validate()
