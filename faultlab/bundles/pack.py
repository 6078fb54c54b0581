"""`faultlab bundle`: a campaign, its golden runs and its results as one deterministic
`.tar.gz`.

Members are written in a fixed order (manifest.json first, the rest sorted), with mtime 0,
uid/gid 0, no user or group names, mode 0644, and a gzip header without a name or a time, so
the same inputs give the same bytes. The results database is a consistent snapshot (SQLite's
backup API, journal mode DELETE), never the live file with a write-ahead log beside it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import sqlite3
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from faultlab.bundles.manifest import (MANIFEST, BundleError, GoldenEntry, Manifest, Member,
                                       check_name)
from faultlab.errors import printable


@dataclass
class BundleInfo:
    path: Path
    manifest: Manifest
    size: int
    sha256: str


def member_file_name(name: str, fallback: str) -> str:
    """A file name usable as the last part of a member name (manifest.check_name): characters
    outside letters, digits, '.', '_', '-' become '_', a leading dot or dash is dropped."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".-")[:100]
    try:
        return check_name(clean)
    except BundleError:
        return fallback


def snapshot_results(path: Path) -> bytes:
    """A consistent copy of the SQLite results database at `path` (whatever its write-ahead
    log holds included), as the bytes of a standalone file."""
    with tempfile.TemporaryDirectory(prefix="faultlab-bundle-") as tmp:
        dst_path = Path(tmp) / "results.sqlite"
        try:
            src = sqlite3.connect(f"file:{path.resolve().as_posix()}?mode=ro", uri=True)
            try:
                dst = sqlite3.connect(str(dst_path))
                try:
                    src.backup(dst)
                    dst.execute("PRAGMA journal_mode = DELETE")
                finally:
                    dst.close()
            finally:
                src.close()
        except sqlite3.Error as e:
            raise BundleError(f"{printable(path)}: cannot read the results database "
                              f"({printable(str(e))})") from None
        return dst_path.read_bytes()


def write_archive(out: Path, members: dict[str, bytes]) -> tuple[int, str]:
    """Write `members` (manifest.json first, the rest sorted) as a deterministic .tar.gz at
    `out`, atomically (a temporary file renamed into place). Returns (size, sha256)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    order = [MANIFEST] + sorted(n for n in members if n != MANIFEST)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0,
                               compresslevel=6) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
                    for name in order:
                        data = members[name]
                        info = tarfile.TarInfo(name)
                        info.size, info.mtime, info.mode = len(data), 0, 0o644
                        info.uid = info.gid = 0
                        info.uname = info.gname = ""
                        info.type = tarfile.REGTYPE
                        tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    data = out.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def default_output(campaign_path) -> Path:
    return Path(Path(campaign_path).stem + ".bundle.tar.gz")


def make_bundle(campaign_path, out=None, *, results=None, threads: int = 0,
                framework: str | None = None,
                say: Callable[[str], None] = lambda m: None) -> BundleInfo:
    """Bundle the campaign at `campaign_path`: the file, the cached golden run of each of its
    configurations for this machine's current fingerprint at `threads` threads (default: the
    thread count `faultlab run` uses with one worker), the results database (`results`, or
    the default path of `faultlab run`; left out with a note when that default is absent) and
    the manifest. A configuration without such a golden run is a BundleError naming it."""
    from faultlab.campaigns import load_campaign
    from faultlab.determinism import fingerprint
    from faultlab.runner import golden
    from faultlab.runner.campaign import default_results_path, default_threads

    camp = load_campaign(campaign_path, framework)
    data = Path(campaign_path).read_bytes()
    from faultlab.campaigns import campaign_digest
    if campaign_digest(data, framework) != camp.digest:
        raise BundleError(f"{printable(campaign_path)} changed while it was being read")
    threads = threads or default_threads(1)
    if threads < 1:
        raise BundleError(f"--threads must be at least 1, got {threads}")
    members: dict[str, bytes] = {}
    stem = member_file_name(Path(campaign_path).name, "campaign.csv")
    campaign_member = f"campaign/{stem}"
    members[campaign_member] = data

    configs = {t.workload.key(): t.workload for t in camp.trials}
    entries = []
    for key in sorted(configs):
        cfg = configs[key]
        fp = fingerprint(cfg.framework, threads)
        run = golden.load(cfg, golden.golden_dir(cfg, threads, fp), fp)
        if run is None:
            raise BundleError(_missing(cfg, threads, fp, campaign_path))
        files = golden.pack(run)
        folder = f"golden/{key}-t{threads}"
        names = {f: f"{folder}/{f}" for f in golden.FILES}
        for f, blob in files.items():
            members[names[f]] = blob
        entries.append(GoldenEntry(key, cfg.workload, cfg.framework.value, threads,
                                   fp.to_dict(), names))

    results_member = None
    explicit = results is not None
    db = Path(results) if explicit else default_results_path(campaign_path)
    if db.is_file():
        results_member = "results/" + member_file_name(
            Path(stem).stem + ".sqlite", "results.sqlite")
        members[results_member] = snapshot_results(db)
    elif explicit:
        raise BundleError(f"--results {printable(db)}: no such results database")
    else:
        say(f"no results database at {printable(db)}: bundling the campaign and its golden "
            f"runs only (--results names another)")

    manifest = Manifest(campaign_member, camp.digest, framework, results_member,
                        tuple(entries),
                        {n: Member(hashlib.sha256(b).hexdigest(), len(b))
                         for n, b in members.items()})
    members[MANIFEST] = manifest.to_bytes()
    out = Path(out) if out else default_output(campaign_path)
    try:
        size, sha = write_archive(out, members)
    except OSError as e:
        raise BundleError(f"{printable(out)}: cannot write the bundle: "
                          f"{e.strerror or e}") from None
    return BundleInfo(out, manifest, size, sha)


def _missing(cfg, threads: int, fp, campaign_path) -> str:
    """The refusal for a configuration without a cached golden run here, with the thread
    counts that do have one (for --threads)."""
    from faultlab.determinism import fingerprint
    from faultlab.runner import golden
    others = [t for t in range(1, max(64, os.cpu_count() or 1) + 1) if t != threads and
              golden.load(cfg, golden.golden_dir(cfg, t, fingerprint(cfg.framework, t)),
                          fingerprint(cfg.framework, t)) is not None]
    hint = (f"; cached at --threads {', '.join(map(str, others))}" if others else
            f"; run the campaign first: faultlab run {printable(campaign_path)}")
    return (f"no cached golden run of {cfg.workload} (configuration {cfg.key()}) at {threads} "
            f"thread(s) for this machine ({fp.short()}{', portable' if fp.portable else ''})"
            f"{hint}")
