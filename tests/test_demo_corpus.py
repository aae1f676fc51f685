"""The offline demo corpus: real Debian packages, real converters, real parquet files.

The full corpus is built once into the default cache (~/.cache/slm or $SLM_CACHE_DIR) and
reused by later runs; the determinism and failure tests build small specs into tmp dirs from
the same cached .deb files."""

from __future__ import annotations

import hashlib
import os

import pyarrow.parquet as pq
import pytest

from slm.errors import InputError, StageError
from slm.pipeline import demo_corpus as dc
from slm.pipeline import demo_text as dt
from slm.stage import manifest

SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def corpus() -> dict:
    return dc.build_demo_corpus()


def _ids(path: str) -> list[str]:
    return pq.read_table(path, columns=["doc_id"]).column("doc_id").to_pylist()


def _generic_files(m: dict) -> list[str]:
    return [os.path.join(m["path"], f) for f in sorted(m["generic"]["files"])]


def _sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --------------------------------------------------------------------------------------------
# The built corpus
# --------------------------------------------------------------------------------------------

def test_layout_and_sizes(corpus):
    generic_dir, domains = dc.demo_corpus_sources(corpus)
    assert generic_dir == os.path.join(corpus["path"], "generic")
    assert dc.demo_corpus_sources(corpus["path"]) == (generic_dir, domains)
    assert set(domains) == set(dc.DOMAINS) and len(domains) >= 6
    parts = sorted(os.listdir(generic_dir))
    assert parts[0] == "part-00000.parquet" and len(parts) == len(corpus["generic"]["files"])
    schema = pq.read_schema(os.path.join(generic_dir, parts[0]))
    assert schema.names == ["doc_id", "text", "source"]
    assert all(str(t) == "string" for t in schema.types)
    # generic: roughly 15-40 MB of text, millions of words
    assert 15e6 <= corpus["generic"]["bytes"] <= 45e6
    assert corpus["generic"]["words"] > 3_000_000
    for d, ddir in domains.items():
        assert sorted(os.listdir(ddir)) == ["test.parquet", "train.parquet", "valid.parquet"]
        s = corpus["domains"][d]
        rows = {sp: pq.read_metadata(os.path.join(ddir, f"{sp}.parquet")).num_rows for sp in SPLITS}
        assert rows == {sp: s[sp]["documents"] for sp in SPLITS}
        assert min(rows.values()) >= 5
        # gnu-standards is a small manual; every other domain has well over 400 KB of train
        assert s["train"]["bytes"] >= (200_000 if d == "gnu-standards" else 400_000)
        total = sum(rows.values())
        for sp in ("valid", "test"):  # ~10 % each
            assert 0.04 <= rows[sp] / total <= 0.17, (d, sp, rows)


def test_domains_are_held_out_of_generic(corpus):
    generic_ids: set[str] = set()
    sources: set[str] = set()
    for f in _generic_files(corpus):
        t = pq.read_table(f, columns=["doc_id", "source"])
        generic_ids.update(t.column("doc_id").to_pylist())
        sources.update(s.split(":", 1)[0] for s in t.column("source").to_pylist())
    domain_packages = {s.package for srcs in dc.DOMAINS.values() for s in srcs}
    assert not sources & domain_packages
    assert len(sources) >= 8  # a broad generic mix
    assert len(generic_ids) == corpus["generic"]["documents"]  # no duplicate documents
    for d, ddir in dc.demo_corpus_sources(corpus)[1].items():
        split_ids = {sp: _ids(os.path.join(ddir, f"{sp}.parquet")) for sp in SPLITS}
        all_ids = [i for ids in split_ids.values() for i in ids]
        assert len(all_ids) == len(set(all_ids)), f"{d}: a document is in two splits"
        assert not set(all_ids) & generic_ids, f"{d}: domain documents leak into generic"
        for sp, ids in split_ids.items():
            assert ids == sorted(ids)
            assert {dc.split_of(i) for i in ids} == {sp}


def test_doc_ids_are_text_hashes(corpus):
    t = pq.read_table(os.path.join(corpus["path"], "domains", "jargon", "valid.parquet"))
    for doc_id, text in zip(t.column("doc_id").to_pylist(), t.column("text").to_pylist()):
        assert doc_id == hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        assert text == text.strip() and "\n\n\n" not in text


def test_manifest_records_packages_and_counts(corpus):
    m = manifest(corpus["path"])
    assert m["version"] == dc.CORPUS_VERSION and m["path"] == corpus["path"]
    assert m["build_seconds"] > 0
    cache = dc.default_deb_cache()
    for name, p in m["packages"].items():
        assert p["version"] and len(p["sha256"]) == 64 and p["roles"]
        deb = os.path.join(cache, p["filename"])
        assert dc.sha256_file(deb) == p["sha256"], name
    for rel, sha in m["generic"]["files"].items():
        assert _sha(os.path.join(m["path"], rel)) == sha
    assert sum(pq.read_metadata(f).num_rows for f in _generic_files(m)) == m["generic"]["documents"]
    # a second call is a cache hit: same build, not a rebuild
    again = dc.build_demo_corpus()
    assert again["started"] == m["started"] and again["generic"] == m["generic"]


# --------------------------------------------------------------------------------------------
# Determinism and failures (small specs, same .deb cache)
# --------------------------------------------------------------------------------------------

SMALL = dc.CorpusSpec(
    domains={"jargon": dc.DOMAINS["jargon"], "gnu-standards": dc.DOMAINS["gnu-standards"]},
    generic=(dc.Source("manpages-dev", "man", ("usr/share/man/man2/*",)),
             dc.Source("fortunes-min", "fortune", ("usr/share/games/fortunes/*",), ("*.dat",))),
)


def _parquet_digests(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".parquet"):
                p = os.path.join(dirpath, f)
                out[os.path.relpath(p, root)] = _sha(p)
    return out


def test_rebuild_is_byte_identical(tmp_path, corpus):
    a = dc._build(str(tmp_path / "a"), dc.default_deb_cache(), SMALL)
    b = dc._build(str(tmp_path / "b"), dc.default_deb_cache(), SMALL)
    da, db = _parquet_digests(a["path"]), _parquet_digests(b["path"])
    assert da and da == db
    assert a["generic"]["documents"] > 100 and a["domains"] == b["domains"]
    # the jargon domain depends on its package only: same files as in the full corpus
    for sp in SPLITS:
        rel = f"domains/jargon/{sp}.parquet"
        assert da[rel] == _sha(os.path.join(corpus["path"], rel))


def test_failed_build_publishes_nothing(tmp_path):
    out = tmp_path / "corpus"
    # fails after the downloads and the first conversions, inside the staging directory
    broken = dc.CorpusSpec(domains={"jargon": (dc.Source("dict-jargon", "dict", ("no/such/*",)),)},
                           generic=SMALL.generic[1:])
    with pytest.raises(StageError, match="dict-jargon.*no files matching"):
        dc._build(str(out), dc.default_deb_cache(), broken)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.lock"]  # no staging leftovers


def test_unknown_package_names_it_and_the_fix(tmp_path):
    spec = dc.CorpusSpec(domains={}, generic=(dc.Source("slm-no-such-package", "text", ("*",)),))
    with pytest.raises(InputError, match=r"'slm-no-such-package'.*apt-get update"):
        dc._build(str(tmp_path / "c"), str(tmp_path / "debs"), spec)
    assert not (tmp_path / "c").exists()


def test_missing_apt_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StageError, match="apt-cache' was not found.*Debian"):
        dc._build(str(tmp_path / "c"), str(tmp_path / "debs"), SMALL)
    assert not (tmp_path / "c").exists()


def test_unwritable_output_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StageError, match="writable location"):
        dc.build_demo_corpus(str(tmp_path / "file" / "corpus"))


def test_sources_of_an_unbuilt_corpus(tmp_path):
    with pytest.raises(StageError, match="slm data demo"):
        dc.demo_corpus_sources(str(tmp_path))


# --------------------------------------------------------------------------------------------
# Converters
# --------------------------------------------------------------------------------------------

def test_html_keeps_content_and_drops_chrome():
    html = """<html><head><title>T</title><style>p{}</style></head><body>
    <div class="nosearch"><a href="/">Home</a> menu</div><nav>Next Prev</nav>
    <h1>Intro<a class="headerlink" href="#">¶</a></h1><p>First   paragraph
    of text.</p><script>var x = 1;</script>
    <ul><li><p>item one</p></li><li>item two</li></ul>
    <h2>Code</h2><pre>for x in y:
        print(x)</pre><table><tr><td>a</td><td>b</td></tr></table>
    <h2>License</h2><p>Permission is hereby granted</p></body></html>"""
    secs = dt.html_to_sections(html)
    assert [s.title for s in secs] == ["Intro", "Code", "License"]
    # a list item holding a paragraph ends with a blank line (a "loose" list), as in Markdown
    assert secs[0].text == "Intro\n\nFirst paragraph of text.\n\n- item one\n\n- item two"
    assert "for x in y:\n        print(x)" in secs[1].text and "a  b" in secs[1].text
    docs = dt.group_sections(secs, min_chars=0)
    assert len(docs) == 2 and not any("Permission" in d or "Home" in d for d in docs)
    assert dt.group_sections(secs, min_chars=10_000) == ["\n\n".join(s.text for s in secs[:2])]


def test_pod_sections_and_formatting_codes():
    pod = ("=head1 NAME\n\nperlfoo - B<bold> and C<< $a->b >> and L<perlfunc/open>\n\n"
           "=head2 Sub\n\n    my $x = 1;\n      indented;\n\n=over\n\n=item * E<lt>tagE<gt>\n\n"
           "=back\n\n=begin html\n\n<b>skip</b>\n\n=end html\n\n=cut\n\nsub code {}\n")
    secs = dt.pod_to_sections(pod)
    assert [(s.title, s.level) for s in secs] == [("NAME", 1), ("Sub", 2)]
    assert secs[0].text == 'NAME\n\nperlfoo - bold and $a->b and "open" in perlfunc'
    assert secs[1].text == "Sub\n\nmy $x = 1;\n  indented;\n\n- <tag>"


def test_dictd_entries_fortunes_wordnet():
    data = b"00-database-url\nhttp://x\nfoo\n   first entry\n   more\nbar\n   second\n"
    # dictd base64 offsets/lengths: foo at 25 (Z), 27 bytes (b); bar at 52 (0), 14 bytes (O)
    index = "00-database-url\tA\tZ\nfoo\tZ\tb\nfoo2\tZ\tb\nbar\t0\tO\n"
    assert dt.dict_entries(index, data) == ["foo\nfirst entry\nmore", "bar\nsecond"]
    assert dt.fortunes_to_docs("one\n  two\n%\n%\nthree\n") == ["one\n  two", "three"]
    line = "00001740 03 n 02 entity 0 thing_(p) 1 003 | that which exists  \n"
    assert dt.wordnet_glosses("  1 licence header\n" + line, "noun") == \
        [(3, "entity, thing (noun): that which exists")]


def test_man_page_rendered_without_header_footer_and_copyright():
    troff = (b".TH FOO 1 2024 slm\n.SH NAME\nfoo \\- do a thing\n.SH DESCRIPTION\n"
             b"The \\fBfoo\\fP command does a thing.\n.SH COPYRIGHT\nCopyright 2024 nobody\n")
    text = dt.man_to_text(troff, dt.groff_command())
    assert text == "NAME\nfoo - do a thing\n\nDESCRIPTION\nThe foo command does a thing."
    assert dt.is_man_alias(b".so man3/foo.3\n") and not dt.is_man_alias(troff)


def test_boilerplate_titles():
    for t in ("COPYRIGHT", "LICENSE AND COPYRIGHT", "Appendix A GNU Free Documentation License",
              "Concept Index", "COLOPHON"):
        assert dt.is_boilerplate_title(t), t
    for t in ("Creating an index", "Partial Indexes", "DESCRIPTION", "Using licenses wisely"):
        assert not dt.is_boilerplate_title(t), t
