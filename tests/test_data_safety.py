"""No command deletes what it did not create (issue 11, item 1): publishing replaces only an
artifact of the same stage that slm wrote, an export never lands over the run, and names are
single safe path components."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slm.errors import InputError, StageError
from slm.layout import RunLayout, checked_name
from slm.stage import MANIFEST, PARTIAL, exists, join, manifest, publish, write_json
from slm.deploy.export import check_out

BIN = Path(sys.executable).parent


def _write(staging, name: str, text: str) -> None:
    with staging.fs.open_output_stream(f"{staging.path}/{name}") as f:
        f.write(text.encode())


def _foreign(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "thesis.tex").write_text("years of work")
    return d


# ---- publish ----------------------------------------------------------------------------------

def test_publish_refuses_a_foreign_directory_even_with_force(tmp_path):
    target = _foreign(tmp_path / "out")
    for force in (False, True):
        with pytest.raises(StageError, match="does not delete what it did not create"):
            with publish(str(target), stage="export", force=force) as st:
                _write(st, "a.txt", "new")
    assert (target / "thesis.tex").read_text() == "years of work"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging leftovers


def test_publish_refuses_an_artifact_of_another_stage(tmp_path):
    target = str(tmp_path / "windows")
    with publish(target, stage="windows", config={"n": 1}) as st:
        _write(st, "rows.txt", "1")
    with pytest.raises(StageError, match="holds a 'windows' artifact, not a 'export' one"):
        with publish(target, stage="export", force=True) as st:
            _write(st, "a.txt", "x")
    assert manifest(target)["stage"] == "windows"


def test_force_replaces_its_own_artifact_and_keeps_it_when_the_rebuild_fails(tmp_path):
    target = str(tmp_path / "tok")
    with publish(target, stage="tokenizer", config={"v": 1}) as st:
        _write(st, "vocab.txt", "old")
    with pytest.raises(RuntimeError):
        with publish(target, stage="tokenizer", config={"v": 2}, force=True) as st:
            _write(st, "vocab.txt", "half")
            raise RuntimeError("crash mid-stage")
    assert Path(target, "vocab.txt").read_text() == "old"  # the old artifact is still whole
    assert manifest(target)["config"] == {"v": 1}
    with publish(target, stage="tokenizer", config={"v": 2}, force=True) as st:
        _write(st, "vocab.txt", "new")
    assert Path(target, "vocab.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["tok"]


def test_an_empty_directory_is_published_into(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    with publish(str(target), stage="report") as st:
        _write(st, "index.html", "<p>")
    assert manifest(str(target))["stage"] == "report"


def test_object_storage_replaces_only_its_own_unfinished_output(s3_prefix):
    foreign = f"{s3_prefix}/foreign"
    write_json(f"{foreign}/notes.json", {"mine": True})
    with pytest.raises(StageError, match="does not delete what it did not create"):
        with publish(foreign, stage="export", force=True) as st:
            _write(st, "a.txt", "x")
    assert exists(f"{foreign}/notes.json")

    crashed = f"{s3_prefix}/crashed"
    with pytest.raises(RuntimeError):
        with publish(crashed, stage="export") as st:
            _write(st, "half.txt", "x")
            raise RuntimeError("crash mid-stage")
    assert exists(join(crashed, PARTIAL)) and not exists(join(crashed, MANIFEST))
    with publish(crashed, stage="export") as st:  # the same stage takes its leftovers over
        _write(st, "whole.txt", "y")
    assert manifest(crashed)["stage"] == "export"
    assert not exists(f"{crashed}/half.txt") and not exists(join(crashed, PARTIAL))


# ---- export targets ---------------------------------------------------------------------------

@pytest.mark.parametrize("out", [".", "models/jargon/slm", "data", "export", "pretrain/slm/final"])
def test_export_into_the_run_is_refused(tmp_path, out):
    layout = RunLayout(str(tmp_path / "run"))
    with pytest.raises(InputError, match="inside the run"):
        check_out(layout, layout.root if out == "." else layout.path(out))


def test_export_outside_the_run_or_under_export_is_allowed(tmp_path):
    layout = RunLayout(str(tmp_path / "run"))
    check_out(layout, str(tmp_path / "elsewhere" / "jargon"))
    check_out(layout, layout.path("export", "jargon"))
    check_out(RunLayout("s3://b/run"), "s3://b/exports/jargon")
    with pytest.raises(InputError, match="inside the run"):
        check_out(RunLayout("s3://b/run"), "s3://b/run")
    with pytest.raises(InputError, match="'..'"):
        check_out(layout, layout.path("export", "..", "data"))


def test_export_into_the_run_through_a_symlink_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "alias").symlink_to(run)
    with pytest.raises(InputError, match="inside the run"):
        check_out(RunLayout(str(run)), str(tmp_path / "alias" / "models"))


def test_cli_export_over_the_run_exits_nonzero_and_deletes_nothing(tmp_path):
    run = _foreign(tmp_path / "run")
    for args in (["--domain", "jargon", "--out", str(run)],
                 ["--domain", "../pretrain/slm"]):
        proc = subprocess.run([str(BIN / "slm"), "export", "--run", str(run), *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert (run / "thesis.tex").read_text() == "years of work"


def test_cli_demo_corpus_over_a_foreign_directory_deletes_nothing(tmp_path):
    out = _foreign(tmp_path / "corpus")
    proc = subprocess.run([str(BIN / "slm"), "data", "demo", "--out", str(out), "--force"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "did not create" in proc.stderr, proc.stderr
    assert (out / "thesis.tex").read_text() == "years of work"


# ---- names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a\\b", "..", "a..b", ".hidden", "-flag",
                                 "new\nline", "tab\there", "nul\x00", "esc\x1b[31m", "sp ace",
                                 "x" * 101])
def test_bad_names_are_refused(bad):
    with pytest.raises(InputError, match="not a valid name"):
        checked_name("domain", bad)


@pytest.mark.parametrize("good", ["jargon", "gnu-standards", "c++", "v1.2_x", "expert-0",
                                  "jargon--slm--b60--t32768--s0--lr0.0005"])
def test_good_names_pass(good):
    assert checked_name("domain", good) == good


def test_layout_checks_every_name_it_puts_in_a_path(tmp_path):
    layout = RunLayout(str(tmp_path))
    for build in (lambda: layout.model("../x", "slm"), lambda: layout.model("jargon", "a/b"),
                  lambda: layout.export(".."), lambda: layout.models("x\ny"),
                  lambda: layout.pretrain("slm", "../../etc"), lambda: layout.sweep("a/b"),
                  lambda: layout.trial("main", ".."), lambda: layout.corpus_domain("..", "train"),
                  lambda: layout.sources("/abs"), lambda: layout.windows("a/../b")):
        with pytest.raises(InputError):
            build()
