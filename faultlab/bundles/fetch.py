"""`faultlab fetch`: download a bundle (gdown: Google Drive files and folders, any HTTP(S) URL),
cache it, verify it, extract its data and install its golden runs.

The download lands in `cache_root()/bundles/<sha256 of the URL or id>/bundle.tar.gz`; an
interrupted one leaves gdown's partial file there, and the next fetch of the same source
resumes it with a Range request (gdown's resume=True). A cached download is verified again on
every fetch; one that does not verify is removed from the cache and nothing is installed.
Golden runs are installed through runner.golden.install, which refuses one whose determinism
fingerprint is not this machine's; the campaign and results are data and are placed in the
target folder either way (docs/bundles.md, "Fingerprints").
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from faultlab.bundles.extract import check_results_db, new_staging, verify_extract
from faultlab.bundles.manifest import BundleError, Manifest
from faultlab.errors import printable

#: the downloaded archive's name inside its cache folder
DOWNLOAD = "bundle.tar.gz"
#: a bare Google Drive file or folder id
_DRIVE_ID = re.compile(r"[-\w]{20,}")
_DRIVE_FOLDER = re.compile(r"^/drive/(?:u/\d+/)?folders/([-\w]{20,})(?:/|$)")


@dataclass
class Source:
    text: str          # what the user gave
    url: str           # what gdown is given
    folder: bool       # a Google Drive folder (gdown.download_folder)

    @property
    def key(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def resolve(source: str) -> Source:
    """The URL gdown fetches for `source`: an http(s) URL as it is (a Drive folder URL is a
    folder), a bare Drive file id as https://drive.google.com/uc?id=ID."""
    text = source.strip()
    if _DRIVE_ID.fullmatch(text):
        return Source(text, f"https://drive.google.com/uc?id={text}", False)
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise BundleError(f"{printable(source)}: neither an http(s) URL nor a Google Drive id")
    folder = (parsed.hostname in ("drive.google.com", "docs.google.com")
              and _DRIVE_FOLDER.match(parsed.path) is not None)
    return Source(text, text, folder)


def cache_dir(source: Source) -> Path:
    from faultlab.runner.golden import cache_root
    return cache_root() / "bundles" / source.key


def _partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(DOWNLOAD + "*.part")) if folder.is_dir() else []


def download(source: Source, *, refresh: bool = False, retries: int = 3,
             timeout: float = 60.0, quiet: bool = True) -> Path:
    """The bundle of `source` in the cache, downloaded (or resumed) with gdown unless it is
    already there (`refresh` drops the cached copy and any partial download first)."""
    folder = cache_dir(source)
    target = folder / DOWNLOAD
    if refresh and folder.exists():
        shutil.rmtree(folder)
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import gdown
        import requests
    except ImportError:
        raise BundleError("faultlab fetch needs gdown: pip install 'gdown>=5,<7'") from None
    try:
        if source.folder:
            got = gdown.download_folder(url=source.url, output=str(folder / "folder"),
                                        quiet=quiet, resume=True, use_cookies=False,
                                        retries=retries, timeout=timeout)
            archives = [Path(p) for p in got or [] if str(p).endswith((".tar.gz", ".tgz"))]
            if len(archives) != 1:
                raise BundleError(f"the Drive folder {printable(source.text)} holds "
                                  f"{len(archives)} .tar.gz files; a bundle folder holds one")
            shutil.move(str(archives[0]), target)
            shutil.rmtree(folder / "folder", ignore_errors=True)
        else:
            gdown.download(url=source.url, output=str(target), quiet=quiet, resume=True,
                           use_cookies=False, retries=retries, timeout=timeout)
    except BundleError:
        raise
    except gdown.exceptions.DownloadCancelled:
        raise
    except gdown.exceptions.DownloadError as e:
        kept = sum(p.stat().st_size for p in _partials(folder))
        raise BundleError(
            f"download of {printable(source.text)} failed ({_one_line(e).split('. ')[0]})"
            + (f"; the {kept} bytes received are kept: run the same command again to resume "
               f"(--refresh starts over)" if kept else "")) from None
    except gdown.exceptions.FileURLRetrievalError as e:
        _drop_if_empty(folder)
        raise BundleError(f"cannot download {printable(source.text)} from Google Drive "
                          f"({_one_line(e)[:300]})") from None
    except requests.RequestException as e:
        _drop_if_empty(folder)
        raise BundleError(f"cannot download {printable(source.text)}: {_one_line(e)[:300]}") from None
    except OSError as e:
        raise BundleError(f"cannot write the download into {printable(folder)}: "
                          f"{e.strerror or e}") from None
    if not target.is_file():
        raise BundleError(f"download of {printable(source.text)} produced no file")
    return target


def _drop_if_empty(folder: Path) -> None:
    """Remove a download's cache folder that holds nothing to resume."""
    if folder.is_dir() and not _partials(folder) and not (folder / DOWNLOAD).exists():
        shutil.rmtree(folder, ignore_errors=True)


def _one_line(e: BaseException) -> str:
    return printable(" ".join(str(e).split())) or type(e).__name__


@dataclass
class GoldenStatus:
    workload: str
    key: str
    threads: int
    fingerprint: str                  # short form
    installed: bool
    directory: str | None = None
    reason: str | None = None         # why it was not installed


@dataclass
class FetchReport:
    source: str
    bundle: Path
    campaign: Path
    results: Path | None
    framework: str | None
    golden: list[GoldenStatus] = field(default_factory=list)

    @property
    def refused(self) -> list[GoldenStatus]:
        return [g for g in self.golden if not g.installed]

    def run_command(self) -> str:
        threads = {g.threads for g in self.golden}
        from faultlab.runner.campaign import default_threads
        parts = ["faultlab", "run", str(self.campaign)]
        if self.results is not None:
            parts += ["--results", str(self.results)]
        if self.framework:
            parts += ["--framework", self.framework]
        if len(threads) == 1 and threads != {default_threads(1)}:
            parts += ["--threads", str(threads.pop())]
        return " ".join(printable(p) for p in parts)

    def to_json(self) -> dict:
        return {"source": self.source, "bundle": str(self.bundle),
                "campaign": str(self.campaign),
                "results": None if self.results is None else str(self.results),
                "golden": [g.__dict__ for g in self.golden], "run": self.run_command()}


def default_target(manifest: Manifest) -> Path:
    return Path("faultlab-bundles") / Path(manifest.campaign.rsplit("/", 1)[1]).stem


def fetch(source_text: str, out=None, *, refresh: bool = False, retries: int = 3,
          timeout: float = 60.0, quiet: bool = True,
          say: Callable[[str], None] = lambda m: None) -> FetchReport:
    """Download (or find in the cache), verify and unpack the bundle of `source_text`: the
    campaign and results into `out` (default faultlab-bundles/<campaign name>), each golden
    run installed where its fingerprint is this machine's. A bundle that does not verify is a
    BundleError with nothing installed or placed and the download removed from the cache;
    golden runs of another fingerprint are reported in the returned FetchReport's `refused`."""
    from faultlab.campaigns import campaign_digest, parse_campaign
    from faultlab.determinism import DeterminismError, Fingerprint, fingerprint
    from faultlab.runner import golden

    source = resolve(source_text)
    cached = (cache_dir(source) / DOWNLOAD).is_file() and not refresh
    say(f"using the cached download of {printable(source.text)}" if cached
        else f"downloading {printable(source.text)}")
    path = download(source, refresh=refresh, retries=retries, timeout=timeout, quiet=quiet)
    staging = new_staging(cache_dir(source))
    try:
        try:
            manifest = verify_extract(path, staging)
            if manifest.results is not None:
                check_results_db(staging / manifest.results)
            data = (staging / manifest.campaign).read_bytes()
            if campaign_digest(data, manifest.framework) != manifest.digest:
                raise BundleError("the campaign's digest differs from the manifest's")
            target = Path(out) if out else default_target(manifest)
            campaign_path = target / manifest.campaign.rsplit("/", 1)[1]
            camp = parse_campaign(data, str(campaign_path), manifest.framework)
            configs = {t.workload.key(): t.workload for t in camp.trials}
            shipped = []
            for g in manifest.golden:
                cfg = configs.get(g.key)
                if cfg is None:
                    raise BundleError(f"golden run {g.key} is of no configuration of the "
                                      f"campaign")
                files = {name: (staging / member).read_bytes()
                         for name, member in g.files.items()}
                try:
                    meta = json.loads(files["golden.json"], parse_constant=_no_constant)
                except (ValueError, UnicodeDecodeError):
                    raise BundleError(f"golden.json of {g.workload} is not strict JSON") from None
                if not isinstance(meta, dict) or meta.get("config") != cfg.to_dict():
                    raise BundleError(f"the golden run of {g.key} is of another configuration "
                                      f"than the campaign's")
                if meta.get("fingerprint") != g.fingerprint:
                    raise BundleError(f"the golden run of {g.key}: its fingerprint differs "
                                      f"from the manifest's")
                try:
                    theirs = Fingerprint.from_dict(g.fingerprint)
                except DeterminismError as e:
                    raise BundleError(f"the golden run of {g.key}: {e}") from None
                shipped.append((g, cfg, files, theirs))
        except BundleError:
            shutil.rmtree(cache_dir(source), ignore_errors=True)   # the bad download too
            raise

        # verified: place the data (refusing to overwrite different files), then install
        results_path = (target / manifest.results.rsplit("/", 1)[1]
                        if manifest.results is not None else None)
        moves = [(staging / manifest.campaign, campaign_path)]
        if results_path is not None:
            moves.append((staging / manifest.results, results_path))
        for src, dst in moves:
            if dst.exists() and (not dst.is_file() or dst.read_bytes() != src.read_bytes()):
                raise BundleError(f"{printable(dst)} exists and differs from the bundle's: "
                                  f"fetch into another folder with -o")
        report = FetchReport(source.text, path, campaign_path, results_path,
                             manifest.framework)
        for g, cfg, files, theirs in shipped:
            ours = fingerprint(cfg.framework, g.threads)
            status = GoldenStatus(cfg.workload, g.key, g.threads,
                                  theirs.short() + (" (portable)" if theirs.portable else ""),
                                  False)
            if theirs != ours:
                status.reason = _mismatch(cfg.workload, theirs, ours)
            else:
                try:
                    run = golden.install(cfg, g.threads, files)
                    status.installed, status.directory = True, str(run.directory)
                except DeterminismError as e:
                    status.reason = str(e)
            report.golden.append(status)
        try:
            target.mkdir(parents=True, exist_ok=True)
            for src, dst in moves:
                if not dst.exists():
                    shutil.move(str(src), str(dst))
        except OSError as e:
            raise BundleError(f"cannot write into {printable(target)}: {e.strerror or e}") from None
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _no_constant(name):
    raise ValueError(f"{name} is not strict JSON")


def _mismatch(workload: str, theirs, ours) -> str:
    hint = ("fetch and run with --portable (the bundle was made in portable mode)"
            if theirs.portable and not ours.portable else
            "fetch and run with --native (the bundle was made with --native)"
            if ours.portable and not theirs.portable else
            "faultlab run records this machine's golden run")
    return (f"the golden run of {workload} was made on a machine whose arithmetic differs from "
            f"this one ({theirs.diff(ours)}): not installed; {hint}")
