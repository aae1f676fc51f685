"""Atomic, resumable artifacts: a stage is done only when its manifest is published."""

from __future__ import annotations

import os

import pytest

from slm.errors import StageError
from slm.layout import RunLayout
from slm.stage import MANIFEST, Stage, fingerprint, input_fingerprints, is_done, manifest, publish


def test_publish_writes_manifest_and_renames(tmp_path):
    uri = str(tmp_path / "art")
    with publish(uri, stage="t", config={"a": 1}) as out:
        with open(os.path.join(out.local_dir, "x.txt"), "w") as f:
            f.write("hi")
        assert not is_done(uri)  # nothing visible before the end
        out.manifest["rows"] = 1
    assert is_done(uri)
    m = manifest(uri)
    assert m["stage"] == "t" and m["rows"] == 1 and m["complete"] is True and "versions" in m
    assert sorted(os.listdir(uri)) == [MANIFEST, "x.txt"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_failure_mid_stage_publishes_nothing(tmp_path):
    uri = str(tmp_path / "art")
    with pytest.raises(RuntimeError):
        with publish(uri, stage="t", config={}) as out:
            open(os.path.join(out.local_dir, "half.bin"), "wb").write(b"x" * 10)
            raise RuntimeError("crash")
    assert not is_done(uri) and not os.path.exists(uri)
    assert not os.listdir(tmp_path)


def test_leftovers_of_a_crashed_attempt_are_cleared(tmp_path):
    uri = str(tmp_path / "art")
    os.makedirs(uri)  # a manifest-less directory from an older crash is not done
    os.makedirs(str(tmp_path / "art.tmp-deadbeef"))
    assert not is_done(uri)
    with publish(uri, stage="t", config={}) as out:
        open(os.path.join(out.local_dir, "ok"), "w").write("1")
    assert is_done(uri) and sorted(os.listdir(tmp_path)) == ["art"]


def test_stale_artifact_is_refused(tmp_path):
    uri = str(tmp_path / "art")
    with publish(uri, stage="t", config={"k": 8}):
        pass
    assert is_done(uri, fingerprint({"config": {"k": 8}, "inputs": {}}))
    with pytest.raises(StageError, match="different config"):
        is_done(uri, fingerprint({"config": {"k": 16}, "inputs": {}}))
    with publish(uri, stage="t", config={"k": 16}, force=True):
        pass
    assert manifest(uri)["config"] == {"k": 16}


def test_unwritable_parent_is_a_clear_error(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    os.chmod(parent, 0o500)
    try:
        if os.access(parent, os.W_OK):  # root ignores permission bits: use a path under a file
            blocker = tmp_path / "file"
            blocker.write_text("")
            target = str(blocker / "art")
        else:
            target = str(parent / "art")
        with pytest.raises(StageError, match="run_dir"):
            with publish(target, stage="t", config={}):
                pass
    finally:
        os.chmod(parent, 0o700)


def test_write_failure_becomes_stage_error_and_nothing_is_published(tmp_path):
    uri = str(tmp_path / "art")
    with pytest.raises(StageError, match="Nothing was published"):
        with publish(uri, stage="t", config={}):
            raise OSError(28, "No space left on device")
    assert not os.path.exists(uri)


def test_stage_opening_skips_done_and_refuses_other_inputs(tmp_path):
    layout = RunLayout(str(tmp_path / "run"))
    with publish(layout.tokenizer, stage="tokenizer", config={"v": 1}):
        pass
    inputs = input_fingerprints(layout, layout.tokenizer)
    assert list(inputs) == ["data/tokenizer"]  # keyed run-relatively
    st = Stage(layout.windows("generic"), stage="windows", config={"seq": 8}, inputs=inputs)
    assert not st.done
    with st.publish() as out:
        out.manifest["rows"] = 3
    assert st.done and manifest(st.uri)["inputs"] == inputs and manifest(st.uri)["rows"] == 3
    assert Stage(st.uri, stage="windows", config={"seq": 8}, inputs=inputs, force=True).done is False
    with pytest.raises(StageError, match="different config or inputs"):
        _ = Stage(st.uri, stage="windows", config={"seq": 16}, inputs=inputs).done


def test_fingerprints_do_not_depend_on_how_the_run_is_opened(tmp_path, monkeypatch):
    layout = RunLayout(str(tmp_path / "runs" / "r"))
    with publish(layout.tokenizer, stage="tokenizer", config={"v": 1}):
        pass
    monkeypatch.chdir(tmp_path)
    relative = RunLayout("runs/r")
    assert input_fingerprints(relative, relative.tokenizer) == \
        input_fingerprints(layout, layout.tokenizer)
    os.rename(tmp_path / "runs" / "r", tmp_path / "moved")
    moved = RunLayout(str(tmp_path / "moved"))
    assert input_fingerprints(moved, moved.tokenizer) == {"data/tokenizer": fingerprint(
        {"config": {"v": 1}, "inputs": {}})}
