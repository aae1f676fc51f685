"""Debian packages for the demo corpus: resolve them in the apt lists, download them (cached
by sha256) and read their files straight from ``dpkg-deb --fsys-tarfile`` (nothing installed).
"""

from __future__ import annotations

import fnmatch
import gzip
import os
import shutil
import subprocess
import tarfile
import tempfile

from slm.errors import InputError, StageError
from slm.hashing import sha256_file

def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise StageError(
            f"'{name}' was not found on PATH. The demo corpus is built from Debian packages with "
            "apt-get and dpkg-deb: run `slm data demo` on Debian/Ubuntu (or in the slm container), "
            "or use your own corpus instead (recipe fields corpus.generic and corpus.domains)")
    return exe


def resolve_package(spec: str) -> dict[str, str]:
    """The archive's record for the first of the ``a|b`` alternatives apt knows: name,
    version, filename, sha256, size. Raises InputError naming the package and the fix."""
    apt_cache = _tool("apt-cache")
    for name in spec.split("|"):
        proc = subprocess.run([apt_cache, "show", "--no-all-versions", name],
                              capture_output=True, text=True)
        rec: dict[str, str] = {}
        for line in proc.stdout.split("\n"):
            if not line.strip():
                if rec:
                    break
                continue
            key, sep, val = line.partition(": ")
            if sep and not line.startswith(" "):
                rec[key] = val.strip()
        if proc.returncode == 0 and {"Package", "Version", "SHA256", "Filename"} <= rec.keys():
            return {"name": rec["Package"], "version": rec["Version"], "sha256": rec["SHA256"],
                    "filename": os.path.basename(rec["Filename"]), "size": rec.get("Size", "")}
    raise InputError(
        f"Debian package '{spec}' is not in this machine's apt package lists. Run `apt-get "
        "update` as root (`sudo apt-get update`) so apt knows the archive, check that the Debian "
        "mirror in /etc/apt/sources.list(.d) is reachable, then re-run `slm data demo`")


def fetch_debs(records: list[dict[str, str]], deb_cache: str) -> dict[str, str]:
    """``{name: path of its .deb}``: files already in ``deb_cache`` with the archive's sha256
    are reused; the others are fetched with one ``apt-get download`` and checked."""
    os.makedirs(deb_cache, exist_ok=True)
    paths, missing = {}, []
    for r in records:
        path = os.path.join(deb_cache, r["filename"])
        paths[r["name"]] = path
        if not (os.path.exists(path) and sha256_file(path) == r["sha256"]):
            missing.append(r)
    if not missing:
        return paths
    apt_get = _tool("apt-get")
    tmp = tempfile.mkdtemp(prefix=".download-", dir=deb_cache)
    try:
        wanted = [f"{r['name']}={r['version']}" for r in missing]
        proc = subprocess.run([apt_get, "download", "-q", *wanted], cwd=tmp,
                              capture_output=True, text=True)
        got = {f.split("_", 1)[0]: f for f in os.listdir(tmp) if f.endswith(".deb")}
        for r in missing:
            if r["name"] not in got:
                err = (proc.stderr.strip().splitlines() or ["no error message"])[-1]
                raise StageError(
                    f"downloading Debian package '{r['name']}' ({r['version']}) failed: {err}. "
                    "Check the network to the Debian mirror (/etc/apt/sources.list), run "
                    "`apt-get update` as root if the archive moved on, then re-run `slm data demo`")
            src = os.path.join(tmp, got[r["name"]])
            digest = sha256_file(src)
            if digest != r["sha256"]:
                raise StageError(
                    f"downloaded '{got[r['name']]}' has sha256 {digest}, but the apt lists say "
                    f"{r['sha256']}. Run `apt-get update` as root and re-run `slm data demo`")
            os.replace(src, paths[r["name"]])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def read_deb(deb: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> dict[str, bytes]:
    """``{path: bytes}`` of the regular files of a .deb matching include and not exclude,
    streamed from ``dpkg-deb --fsys-tarfile`` (nothing is unpacked or installed)."""
    proc = subprocess.Popen([_tool("dpkg-deb"), "--fsys-tarfile", deb], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out: dict[str, bytes] = {}
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for m in tar:
            path = m.name.removeprefix("./")
            if not m.isfile() or not any(fnmatch.fnmatchcase(path, p) for p in include):
                continue
            if any(fnmatch.fnmatchcase(path, p) for p in exclude):
                continue
            f = tar.extractfile(m)
            if f is not None:
                out[path] = f.read()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.wait() != 0:
        raise StageError(f"cannot read '{deb}' with dpkg-deb: {err.strip()}. Delete the file and "
                         "re-run `slm data demo` to download it again")
    return out


def unpack(path: str, data: bytes) -> tuple[str, bytes]:
    """Strip a gzip/dictzip layer (``.gz``, ``.dz``): dictzip is gzip-compatible."""
    if path.endswith((".gz", ".dz")):
        return path[:-3], gzip.decompress(data)
    return path, data
