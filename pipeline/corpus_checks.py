"""Checks that turn a malformed corpus into one clear error naming the file (and line).

Ray Data's readers fail on bad input with their own exception text (a JSON decoder's "Extra
data: line 2", a pyarrow ``KeyError``), raised from inside a task and without the file. These
checks run on the driver: ``walk_local`` before anything is read (a symlink loop would
otherwise be followed until the OS refuses, reading the corpus dozens of times), and
``json_problem`` only after a JSON read failed, to say which file and line is at fault, so the
cost of scanning a file is paid on the error path only.
"""

from __future__ import annotations

import io
import json
import logging
import os

import pyarrow.fs as pafs

from slm.errors import InputError

log = logging.getLogger(__name__)

UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_EXAMPLE = '{"text": "..."}'


def walk_local(root: str) -> list[str]:
    """Every file under a local directory, following symlinks (a linked sub-corpus is part of
    the corpus) but refusing a symlink loop, naming the link. A file reached twice through
    links is read once."""
    files: list[str] = []
    seen: set[str] = set()

    def visit(directory: str, ancestors: frozenset[str]) -> None:
        real = os.path.realpath(directory)
        if real in ancestors:
            raise InputError(f"corpus directory '{root}' has a symlink loop: '{directory}' leads "
                             f"back to '{real}'; remove that link, or point the corpus at a "
                             "directory without loops")
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.is_dir(follow_symlinks=True):
                visit(e.path, ancestors | {real})
            elif e.is_file(follow_symlinks=True):
                target = os.path.realpath(e.path)
                if target in seen:
                    log.warning("corpus: '%s' is a link to a file already read (%s); read once",
                                e.path, target)
                    continue
                seen.add(target)
                files.append(e.path)

    visit(root, frozenset())
    return files


def looks_utf16(head: bytes) -> bool:
    """A UTF-16 byte-order mark, or the NUL bytes of UTF-16 text without one (ASCII text in
    UTF-16 has a NUL in every other byte; UTF-8 text has none)."""
    return head.startswith(UTF16_BOMS) or b"\x00" in head


def _utf16_error(path: str) -> InputError:
    return InputError(f"'{path}' is UTF-16 (or binary), not UTF-8: it holds NUL bytes; convert it "
                      f"to UTF-8 (e.g. iconv -f UTF-16 -t UTF-8 '{os.path.basename(path)}'), or "
                      "remove it from the corpus")


def json_problem(fs: pafs.FileSystem, path: str) -> InputError | None:
    """The first reason a .json/.jsonl file cannot be read as documents, or None.

    Accepted: JSON lines (one object per line), or one JSON array of objects (a ``.json``
    export); the error names the line, what is wrong, and the expected shape."""
    with fs.open_input_stream(path) as raw:
        stream = io.BufferedReader(raw)
        head = stream.peek(4096)[:4096]
        if looks_utf16(head):
            return _utf16_error(path)
        first = head.lstrip()[:1]
        number = 0
        for number, line in enumerate(stream, start=1):
            text = line.strip()
            if not text:
                continue
            try:
                value = json.loads(text)
            except UnicodeDecodeError as e:
                return InputError(f"'{path}' line {number} is not UTF-8 (bad byte at column "
                                  f"{e.start + 1}); convert the file to UTF-8")
            except json.JSONDecodeError as e:
                if number == 1 and first in (b"[", b"{"):
                    return _whole_file_problem(fs, path)  # a pretty-printed array or object
                return InputError(f"'{path}' line {number} is not valid JSON ({e.msg}, column "
                                  f"{e.colno}); each line of a JSON-lines file is one object like "
                                  f"{_EXAMPLE}: fix or remove that line")
            if not isinstance(value, dict):
                if number == 1 and isinstance(value, list):
                    return _array_problem(path, value)
                return InputError(f"'{path}' line {number} is a JSON {type(value).__name__}, not "
                                  f"an object; write each document as {_EXAMPLE}")
    return None


def _whole_file_problem(fs: pafs.FileSystem, path: str) -> InputError | None:
    with fs.open_input_stream(path) as f:
        data = f.read()
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
        return InputError(f"'{path}' is not valid JSON ({where}); give JSON lines (one object like "
                          f"{_EXAMPLE} per line) or one array of such objects")
    if isinstance(value, list):
        return _array_problem(path, value)
    return None


def _array_problem(path: str, value: list) -> InputError | None:
    bad = next((i for i, v in enumerate(value) if not isinstance(v, dict)), None)
    if bad is None:
        return None
    return InputError(f"'{path}' is a JSON array whose element {bad} is a "
                      f"{type(value[bad]).__name__}, not an object; write each document as "
                      f"{_EXAMPLE} (an array of objects, or one object per line)")
