"""Reading a bundle without trusting it: verify, then extract, in one pass.

The archive is read as a stream (gzip, then tar), counting every decompressed byte against a
budget: before the manifest, enough for the manifest; after it, the sizes it declares plus the
headers. `manifest.json` must come first and is checked (manifest.parse_manifest) before any
other entry is read. Then every entry is judged before a byte of it is written
(manifest.check_entry: regular files and directories only, relative portable names, no '..',
no links, no devices), must be listed in the manifest with the size it declares, and is written
into a fresh staging folder (O_CREAT | O_EXCL | O_NOFOLLOW, parents created one by one, the
resolved path checked to lie inside the folder) while its sha256 is computed; extended headers
larger than MAX_EXTENDED_HEADER are refused before they are read. Nothing is ever unpickled,
imported or executed; tarfile's own extraction is never used. A bundle that does not verify is a
one-line BundleError and the staging folder is removed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sqlite3
import tarfile
import tempfile
import zlib
from pathlib import Path

from faultlab.bundles.manifest import (MANIFEST, MAX_EXTENDED_HEADER, MAX_MANIFEST_BYTES,
                                       BundleError, Manifest, check_entry, parse_manifest)
from faultlab.errors import printable

CHUNK = 1 << 20
#: headers and padding allowed per member beyond its data, and at the end of the archive
HEADER_SLACK = 3 * 512 + MAX_EXTENDED_HEADER
END_SLACK = 1 << 20


class _Budget:
    """A read-only stream that refuses to yield more than `limit` bytes in all."""

    def __init__(self, raw, limit: int):
        self.raw, self.limit, self.used = raw, limit, 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.limit - self.used + 1
        data = self.raw.read(min(n, self.limit - self.used + 1))
        self.used += len(data)
        if self.used > self.limit:
            raise BundleError("the bundle decompresses to more than its manifest declares "
                              "(a decompression bomb?)")
        return data


class _CheckedInfo(tarfile.TarInfo):
    """TarInfo that refuses an extended header (pax, GNU long name) larger than
    MAX_EXTENDED_HEADER before tarfile reads it into memory."""

    def _proc_member(self, tarfile_):
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                         tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) \
                and self.size > MAX_EXTENDED_HEADER:
            raise BundleError(f"an extended tar header of {self.size} bytes (more than "
                              f"{MAX_EXTENDED_HEADER >> 10} KiB)")
        return super()._proc_member(tarfile_)


def _open_inside(root: Path, name: str) -> int:
    """Create `root/name` (a validated member name) for writing: each parent created as a
    real folder under `root`, the file created exclusively, never through a link."""
    parts = name.split("/")
    here = root
    for part in parts[:-1]:
        here = here / part
        try:
            os.mkdir(here, 0o755)
        except FileExistsError:
            pass
        if here.is_symlink() or not here.is_dir():
            raise BundleError(f"archive entry {printable(name)}: its folder is not a folder")
    path = here / parts[-1]
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise BundleError(f"archive entry {printable(name)}: outside the target folder")
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise BundleError(f"archive entry {printable(name)} appears twice") from None


def verify_extract(bundle: Path, staging: Path) -> Manifest:
    """Verify the bundle at `bundle` against its manifest and extract its members into the
    empty folder `staging` (see the module docstring). Returns the manifest; a BundleError
    (staging then holds partial files the caller removes) when anything does not verify."""
    try:
        with open(bundle, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            budget = _Budget(gz, MAX_MANIFEST_BYTES + HEADER_SLACK + END_SLACK)
            with tarfile.open(fileobj=budget, mode="r|", tarinfo=_CheckedInfo) as tar:
                return _read(tar, budget, staging)
    except BundleError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise BundleError(f"not a readable bundle: {printable(str(e)) or type(e).__name__} "
                          f"(a truncated or damaged download?)") from None
    except OSError as e:
        raise BundleError(f"cannot read the bundle {printable(bundle)}: "
                          f"{printable(e.strerror or str(e))}") from None


def _read(tar: tarfile.TarFile, budget: _Budget, staging: Path) -> Manifest:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isreg():
        raise BundleError("not a faultlab bundle: its first entry is not manifest.json")
    if first.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest.json is larger than {MAX_MANIFEST_BYTES >> 10} KiB")
    manifest = parse_manifest(tar.extractfile(first).read())
    budget.limit = (budget.used + manifest.total_bytes
                    + HEADER_SLACK * (len(manifest.members) + 1) + END_SLACK)
    free = shutil.disk_usage(staging).free
    if manifest.total_bytes > free:
        raise BundleError(f"the bundle needs {manifest.total_bytes} bytes, {printable(staging)} "
                          f"has {free} free")
    seen: set[str] = set()
    while (entry := tar.next()) is not None:
        is_file = check_entry(entry.name, entry.type, entry.size)
        if not is_file:
            continue
        name = entry.name
        if name == MANIFEST or name in seen:
            raise BundleError(f"archive entry {printable(name)} appears twice")
        spec = manifest.members.get(name)
        if spec is None:
            raise BundleError(f"archive entry {printable(name)} is not listed in the manifest")
        if entry.size != spec.size:
            raise BundleError(f"{printable(name)}: {entry.size} bytes in the archive, "
                              f"{spec.size} in the manifest")
        seen.add(name)
        h = hashlib.sha256()
        src = tar.extractfile(entry)
        fd = _open_inside(staging, name)
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != spec.sha256:
            raise BundleError(f"{printable(name)} does not match its sha256 in the manifest "
                              f"(a damaged or altered bundle)")
    missing = sorted(set(manifest.members) - seen)
    if missing:
        raise BundleError(f"{printable(missing[0])} is listed in the manifest but not in the "
                          f"archive")
    return manifest


def check_results_db(path: Path) -> None:
    """A bundled results database is data: an SQLite file of faultlab's application id whose
    schema holds tables and indexes only (a trigger or a view would run the bundle's SQL
    whenever faultlab writes or reads it). A BundleError otherwise."""
    from faultlab.results.store import APPLICATION_ID
    with open(path, "rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            raise BundleError("the bundled results database is not an SQLite file")
    try:
        conn = sqlite3.connect(f"file:{path.resolve().as_posix()}?mode=ro&immutable=1",
                               uri=True)
        try:
            conn.execute("PRAGMA trusted_schema = OFF")
            app = conn.execute("PRAGMA application_id").fetchone()[0]
            kinds = {k for (k,) in conn.execute("SELECT DISTINCT type FROM sqlite_master")}
            ok = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise BundleError(f"the bundled results database is damaged ({printable(str(e))})") from None
    if app != APPLICATION_ID:
        raise BundleError("the bundled results database is not a faultlab results database")
    if kinds - {"table", "index"}:
        raise BundleError(f"the bundled results database holds "
                          f"{', '.join(sorted(kinds - {'table', 'index'}))} definitions; a "
                          f"results database holds tables and indexes only")
    if ok != "ok":
        raise BundleError(f"the bundled results database is damaged ({printable(ok)})")


def new_staging(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".faultlab-fetch-", dir=parent))
