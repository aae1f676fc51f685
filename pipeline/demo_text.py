"""Plain text out of the formats Debian documentation ships in, for the demo corpus.

One converter per format (HTML, man/troff, pod, dictd dictionaries, fortune files, WordNet
data files, plain text). Converters return *sections* ``(title, level, text)`` or finished
document texts; :func:`group_sections` and :func:`group_chunks` turn them into documents of a
sensible size. Everything here is pure and deterministic (same bytes in, same texts out), so a
rebuild from the same ``.deb`` files gives the same corpus.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import unicodedata
from html.parser import HTMLParser
from typing import Iterable, NamedTuple

from slm.errors import StageError


class Section(NamedTuple):
    """A titled piece of a longer text; ``level`` 1 is a chapter/page, larger is deeper."""

    title: str
    level: int
    text: str


# Sections with these titles are licence or index boilerplate, not prose: dropped everywhere.
_BOILERPLATE_TITLE = re.compile(
    r"^\W*(?:appendix\s+)?(?:[a-z]|\d+(?:\.\d+)*)?[.:]?\s*(?:the\s+)?(?:gnu\s+)?"
    r"(?:(?:free\s+documentation|general\s+public|lesser\s+general\s+public)\s+)?"
    r"(?:licen[cs]es?|licensing|copying|copyright|colophon|copyright\s+notice|"
    r"(?:concept|function|variable|general|keyword|program|operator|command|option)?\s*index)"
    r"(?:\s+(?:and|&)\s+\w+)?(?:\s+this\s+manual)?\W*$",
    re.IGNORECASE)


def is_boilerplate_title(title: str) -> bool:
    """True for licence / copyright / colophon / index sections."""
    return bool(_BOILERPLATE_TITLE.match(title.strip()))


def decode(data: bytes) -> str:
    """Bytes as text: UTF-8, or Latin-1 for the few legacy files that are not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff]")


def normalize_text(text: str) -> str:
    """NFC, no control characters, tabs expanded, no trailing spaces, at most one blank line
    in a row, no leading/trailing blank lines."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text.expandtabs(4)).replace("\u00a0", " ")
    lines = [ln.rstrip() for ln in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def dedent_body(text: str, skip_first: bool = True) -> str:
    """Remove the indentation common to the lines after the first (dictionary entries put the
    headword at column 0 and indent the body)."""
    lines = text.split("\n")
    head, body = (lines[:1], lines[1:]) if skip_first else ([], lines)
    ind = min((len(ln) - len(ln.lstrip(" ")) for ln in body if ln.strip()), default=0)
    return "\n".join(head + [ln[ind:] for ln in body])


def group_sections(sections: Iterable[Section], min_chars: int = 2000) -> list[str]:
    """Documents from consecutive sections: a new document starts at a section boundary once
    the current one holds ``min_chars``; boilerplate sections are dropped. So a document is a
    doc section (or a few short ones), never a cut in the middle of one."""
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for sec in sections:
        if is_boilerplate_title(sec.title):
            continue
        text = normalize_text(sec.text)
        if not text:
            continue
        if cur and size >= min_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(text)
        size += len(text)
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def group_chunks(chunks: Iterable[str], min_chars: int = 2000) -> list[str]:
    """Documents of consecutive small chunks (dictionary entries, glosses) of ≥ ``min_chars``."""
    return group_sections((Section("", 2, c) for c in chunks), min_chars)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_SKIP_TAGS = {"script", "style", "head", "nav", "noscript", "form", "select", "button", "svg",
              "iframe", "template", "map"}
# Navigation, tables of contents and permalink anchors of Sphinx, Texinfo, DocBook and the
# SQLite site: chrome, not content.
_SKIP_CLASSES = {"nosearch", "header", "navheader", "navfooter", "nav-panel", "navigation",
                 "related", "sphinxsidebar", "footer", "headerlink", "toc", "contents",
                 "shortcontents", "fancy-toc1", "fancy-toc2", "fancy-toc3", "list-of-tables",
                 "list-of-figures", "list-of-examples", "version_switcher_placeholder",
                 "language_switcher_placeholder", "menu", "copiable-link",
                 "copiable-anchor", "searchmenu", "breadcrumbs"}
_SKIP_ROLES = {"navigation", "search", "banner", "contentinfo"}
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3}
_PARA_TAGS = {"p", "pre", "blockquote", "table", "ul", "ol", "dl", "h4", "h5", "h6", "hr",
              "figure", "section", "article", "main", "center", "title"}
_LINE_TAGS = {"br", "div", "li", "dt", "dd", "tr", "caption", "figcaption", "tbody", "thead",
              "body"}


class _HtmlText(HTMLParser):
    """Streams an HTML page into sections split at h1-h3 headings, skipping page chrome."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[Section] = []
        self._title, self._level = "", 1
        self._buf: list[str] = []
        self._heading: list[str] | None = None
        self._skip: list[str] = []          # stack of tags being skipped (same-name nesting)
        self._pre = 0
        self._line_start = True

    # -- helpers
    def _emit(self, s: str) -> None:
        (self._heading if self._heading is not None else self._buf).append(s)

    def _newline(self, n: int) -> None:
        if self._heading is not None:
            self._heading.append(" ")
            return
        if self._buf and self._buf[-1] == "- ":     # a list item's first paragraph: same line
            return
        self._buf.append("\n" * n)
        self._line_start = True

    def _flush(self) -> None:
        text = "".join(self._buf)
        if text.strip():
            self.sections.append(Section(self._title, self._level, text))
        self._buf = []

    # -- parser callbacks
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip:
            if tag == self._skip[-1]:
                self._skip.append(tag)
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        if tag in _SKIP_TAGS or classes & _SKIP_CLASSES or a.get("role") in _SKIP_ROLES:
            self._skip.append(tag)
            return
        if tag in _HEADINGS:
            self._flush()
            self._heading, self._level = [], _HEADINGS[tag]
        elif tag in _PARA_TAGS:
            self._newline(2)
            self._pre += tag == "pre"
        elif tag in _LINE_TAGS:
            self._newline(1)
            if tag == "li":
                self._emit("- ")
                self._line_start = False
        elif tag in ("td", "th") and not self._line_start:
            self._emit("  ")
        elif tag == "img" and a.get("alt") and "logo" not in classes:
            self._emit(a["alt"] or "")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("br", "hr", "img"):
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if self._skip:
            if tag == self._skip[-1]:
                self._skip.pop()
            return
        if tag in _HEADINGS and self._heading is not None:
            title = re.sub(r"\s+", " ", "".join(self._heading)).strip()
            self._heading = None
            self._title = title
            self._buf = [title, "\n\n"]
            self._line_start = True
        elif tag in _PARA_TAGS:
            self._pre -= tag == "pre" and self._pre > 0
            self._newline(2)
        elif tag in _LINE_TAGS:
            self._newline(1)

    def handle_data(self, data: str) -> None:
        if self._skip or not data:
            return
        if self._pre:
            self._emit(data)
            self._line_start = data.endswith("\n")
            return
        data = re.sub(r"\s+", " ", data)
        if self._line_start:
            data = data.lstrip()
        if data:
            self._emit(data)
            self._line_start = False

    def close(self) -> None:
        super().close()
        self._flush()


_META_REFRESH = re.compile(r"<meta[^>]+http-equiv=[\"']?refresh", re.IGNORECASE)


def html_to_sections(html: str) -> list[Section]:
    """Sections (split at h1/h2/h3) of an HTML page's content, without navigation, tables of
    contents, scripts and styles; ``<pre>`` keeps its layout."""
    if _META_REFRESH.search(html):   # a redirect stub (Texinfo leaves one per old node name)
        return []
    p = _HtmlText()
    p.feed(html)
    p.close()
    return [Section(s.title, s.level, _clean_html_text(s.text)) for s in p.sections]


def _clean_html_text(text: str) -> str:
    lines = [ln.rstrip() for ln in text.split("\n")]
    return normalize_text("\n".join(lines))


# --------------------------------------------------------------------------------------------
# man pages (troff)
# --------------------------------------------------------------------------------------------

def groff_command() -> list[str]:
    """The groff command that renders a man page as plain UTF-8 text: one long page (cR=1), no
    hyphenation, no bold/underline overstriking (left adjustment: see :func:`man_to_text`)."""
    exe = shutil.which("groff")
    if exe is None:
        raise StageError("groff is not installed, and the demo corpus renders man pages with it. "
                         "Install it (Debian/Ubuntu: `apt-get install groff-base`) and re-run")
    return [exe, "-t", "-mandoc", "-Tutf8", "-rLL=80n", "-rcR=1", "-rHY=0",
            "-P-c", "-P-b", "-P-u", "-P-o"]


def is_man_alias(troff: bytes) -> bool:
    """True for a man page that only includes another one (``.so man3/foo.3``)."""
    return troff.lstrip().startswith(b".so ")


# Ragged right and no hyphenation for the whole page: groff 1.22's man macros have no option
# for it, and pages and macros (.EE) switch adjustment back on, so the ``ad``/``hy`` requests
# are renamed away and replaced by no-ops after setting them once.
_MAN_PROLOGUE = b".ad l\n.nh\n.rn ad slm-ad\n.de ad\n..\n.rn hy slm-hy\n.de hy\n..\n"


def man_to_text(troff: bytes, groff: list[str]) -> str:
    """A man page rendered to text by groff, without the running header/footer lines and the
    COPYRIGHT/COLOPHON sections; the standard 7-column body indent is removed."""
    proc = subprocess.run(groff, input=_MAN_PROLOGUE + troff, capture_output=True, timeout=120,
                          env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    text = decode(proc.stdout)
    lines = text.split("\n")
    nonblank = [i for i, ln in enumerate(lines) if ln.strip()]
    if len(nonblank) < 3:
        return ""
    lines = lines[nonblank[0] + 1:nonblank[-1]]       # running header and footer
    kept: list[str] = []
    drop = False
    for ln in lines:
        if ln and not ln[0].isspace():                 # a .SH heading starts at column 0
            drop = is_boilerplate_title(ln)
        if not drop:
            kept.append(ln[min(7, len(ln) - len(ln.lstrip(" "))):])
    return normalize_text("\n".join(kept))


# --------------------------------------------------------------------------------------------
# pod (Perl documentation)
# --------------------------------------------------------------------------------------------

_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&",
                "apos": "'", "nbsp": " ", "copy": "©", "eacute": "é", "auml": "ä",
                "ouml": "ö", "uuml": "ü", "szlig": "ß", "laquo": "«", "raquo": "»"}


def pod_inline(s: str) -> str:
    """Expand pod formatting codes (B<> I<> C<> L<> E<> F<> S<> X<> Z<>, also ``C<< >>``)."""
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        if i + 1 < n and s[i] in "BICLEFSXZ" and s[i + 1] == "<":
            j = i + 1
            while j < n and s[j] == "<":
                j += 1
            depth = j - (i + 1)
            if depth > 1:
                if j < n and not s[j].isspace():
                    out.append(s[i]); i += 1; continue
                end = s.find(" " + ">" * depth, j)
                if end < 0:
                    end = s.find(">" * depth, j)
                if end < 0:
                    out.append(s[i:]); break
                inner, i = s[j:end].strip(), end + 1 + depth if s[end] == " " else end + depth
            else:
                k, level = j, 1
                while k < n and level:
                    if s[k] == ">":
                        level -= 1
                    elif s[k] == "<" and k > 0 and s[k - 1] in "BICLEFSXZ":
                        level += 1
                    k += 1
                inner, i = s[j:k - 1] if not level else s[j:], k
            out.append(_pod_code(s[j - depth - 1], inner))
        else:
            out.append(s[i]); i += 1
    return "".join(out)


def _pod_code(code: str, inner: str) -> str:
    if code in "XZ":
        return ""
    if code == "E":
        if inner.isdigit():
            return chr(int(inner))
        if inner.lower().startswith("0x"):
            return chr(int(inner, 16))
        return _POD_ESCAPES.get(inner, inner)
    if code == "L":
        text = inner.split("|", 1)[0] if "|" in inner else inner
        if "|" not in inner and "/" in inner and not re.match(r"\w+://", inner):
            page, _, sec = inner.partition("/")
            sec = sec.strip('"')
            text = f'"{sec}" in {page}' if page else f'"{sec}"'
        return pod_inline(text)
    return pod_inline(inner)


def pod_to_sections(pod: str) -> list[Section]:
    """Sections (split at =head1/=head2) of a pod document as plain text."""
    sections: list[Section] = []
    title, level, buf = "", 1, []
    in_pod, skip_block = True, None
    paras = re.split(r"\n[ \t]*\n", pod.replace("\r\n", "\n"))
    for para in paras:
        if not para.strip():
            continue
        if para.startswith("="):
            m = re.match(r"=(\w*)(.*)", para, flags=re.DOTALL)
            cmd, arg = m.group(1), " ".join(m.group(2).split())
            if cmd == "cut":
                in_pod = False
            elif cmd in ("pod", "encoding"):
                in_pod = True
            elif cmd == "begin":
                skip_block = None if arg.split()[:1] == ["text"] else arg.split()[0] if arg else ""
            elif cmd == "end":
                skip_block = None
            elif cmd == "for":
                continue
            elif cmd.startswith("head") and skip_block is None:
                in_pod = True
                lvl = int(cmd[4:] or 1) if cmd[4:].isdigit() else 1
                if lvl <= 2:
                    if buf:
                        sections.append(Section(title, level, "\n\n".join(buf)))
                    title, level, buf = pod_inline(arg), lvl, []
                buf.append(pod_inline(arg))
            elif cmd == "item" and skip_block is None:
                item = pod_inline(re.sub(r"^\*\s*", "", arg))   # "=item *" is a bullet
                buf.append(f"- {item}" if item else "-")
            continue
        if not in_pod or skip_block is not None:
            continue
        if para[0] in " \t":                     # verbatim (code): keep its layout
            buf.append(dedent_body(para.expandtabs(8), skip_first=False))
        else:
            buf.append(pod_inline(" ".join(para.split())))
    if buf:
        sections.append(Section(title, level, "\n\n".join(buf)))
    return [Section(s.title, s.level, normalize_text(s.text)) for s in sections]


# --------------------------------------------------------------------------------------------
# dictd dictionaries (.index + .dict.dz), fortune files, WordNet, plain text
# --------------------------------------------------------------------------------------------

_B64 = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def dict_entries(index: str, data: bytes) -> list[str]:
    """The entries of a dictd dictionary in file order (``index``: ``word\\toffset\\tlength`` in
    dictd base64; ``data``: the uncompressed .dict). Headwords pointing at one entry give it
    once; the ``00-database-*`` metadata entries (URLs, licence notes) are dropped."""
    spans = set()
    for line in index.split("\n"):
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith(("00-database", "00database")):
            continue
        spans.add((_dictd_number(parts[1]), _dictd_number(parts[2])))
    out = []
    for start, length in sorted(spans):
        entry = normalize_text(dedent_body(normalize_text(decode(data[start:start + length]))))
        if entry:
            out.append(entry)
    return out


def fortunes_to_docs(text: str) -> list[str]:
    """One document per fortune (strfile format: fortunes separated by lines holding ``%``)."""
    docs = (normalize_text(f) for f in re.split(r"^%\s*$", text, flags=re.MULTILINE))
    return [d for d in docs if d]


def wordnet_glosses(data: str, pos: str) -> list[tuple[int, str]]:
    """``(lexicographer file number, "word, word (pos): gloss")`` for each synset of a WordNet
    ``data.<pos>`` file (the licence header lines start with spaces and are skipped)."""
    out = []
    for line in data.split("\n"):
        if not line or line[0] == " " or " | " not in line:
            continue
        fields, gloss = line.split(" | ", 1)
        f = fields.split()
        lexfile, count = int(f[1]), int(f[3], 16)
        words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ").strip()
                 for w in f[4:4 + 2 * count:2]]
        out.append((lexfile, f"{', '.join(words)} ({pos}): {gloss.strip()}"))
    return out


def text_to_sections(text: str) -> list[Section]:
    """A plain-text document cut into sections at its paragraphs (blank lines), so that
    :func:`group_sections` can make documents of a sensible size out of a long file."""
    return [Section("", 2, p) for p in re.split(r"\n\s*\n", normalize_text(text)) if p.strip()]
