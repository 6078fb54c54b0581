"""A bundle's manifest and the rules every entry of a bundle archive meets.

A bundle (docs/bundles.md) is a gzip-compressed tar archive whose first member is
`manifest.json`: strict JSON naming every other member with its sha256 and size, the campaign,
the results database and, per golden run, its configuration key, thread count and determinism
fingerprint. Everything here is pure: it judges names, entry kinds and manifests, and writes
nothing; the reader (extract.py) applies it to each entry before a byte of it is written.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass, field

from faultlab import __version__
from faultlab.errors import FaultlabError, printable

#: the manifest's "format" value and the version this faultlab reads and writes
FORMAT = "faultlab-bundle"
VERSION = 1
MANIFEST = "manifest.json"

#: limits against decompression bombs and hostile archives
MAX_MANIFEST_BYTES = 1 << 20
MAX_MEMBERS = 256
MAX_TOTAL_BYTES = 32 << 30          # all members together, uncompressed
MAX_NAME_CHARS = 200
MAX_DEPTH = 4
#: an extended (pax / GNU long-name) header larger than this is refused before it is read
MAX_EXTENDED_HEADER = 64 << 10

#: a component of a member name: portable characters, never starting with a dot (so never
#: ".", "..", or a hidden file)
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
#: the files of a golden run (runner/golden.py FILES)
GOLDEN_FILES = ("golden.json", "golden.ckpt")


class BundleError(FaultlabError):
    """A bundle that cannot be made, downloaded or trusted: one line, exit code 2, nothing
    installed."""


def check_name(name) -> str:
    """`name` as a member name of a bundle, or a BundleError saying why it cannot be one:
    relative, '/'-separated, at most MAX_DEPTH components of portable characters, none of
    them empty, '.', '..' or starting with a dot; no backslash, no drive, no NUL."""
    if not isinstance(name, str) or not name:
        raise BundleError("an archive entry without a name")
    shown = printable(name)[:120]
    if len(name) > MAX_NAME_CHARS:
        raise BundleError(f"archive entry {shown}...: name longer than {MAX_NAME_CHARS} characters")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise BundleError(f"archive entry {shown}: an absolute path")
    parts = name.split("/")
    if any(p in ("..", ".") for p in parts) or "\\" in name:
        raise BundleError(f"archive entry {shown}: a path that leaves its folder ('..', '.' "
                          f"or a backslash)")
    if len(parts) > MAX_DEPTH:
        raise BundleError(f"archive entry {shown}: deeper than {MAX_DEPTH} folders")
    for p in parts:
        if not _COMPONENT.fullmatch(p):
            raise BundleError(f"archive entry {shown}: only letters, digits, '.', '_' and '-' "
                              f"(not leading), without empty parts, are allowed in names")
    return name


#: what each tar entry kind is called in a refusal
_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link",
          tarfile.CHRTYPE: "a character device", tarfile.BLKTYPE: "a block device",
          tarfile.FIFOTYPE: "a FIFO", tarfile.CONTTYPE: "a contiguous file",
          tarfile.GNUTYPE_SPARSE: "a sparse file"}


def check_entry(name, kind: bytes, size: int) -> bool:
    """Judge one tar entry: True for a regular file, False for a directory (both with a
    valid name, see check_name); anything else (links, devices, FIFOs, sparse files, unknown
    kinds) is a BundleError. Directories carry no data."""
    check_name(name)
    shown = printable(name)
    if kind in (tarfile.REGTYPE, tarfile.AREGTYPE):
        if not isinstance(size, int) or size < 0 or size > MAX_TOTAL_BYTES:
            raise BundleError(f"archive entry {shown}: size {size} out of range")
        return True
    if kind == tarfile.DIRTYPE:
        return False
    what = _KINDS.get(kind, f"an entry of type {printable(repr(kind))}")
    raise BundleError(f"archive entry {shown} is {what}: a bundle holds only regular files "
                      f"and directories")


# --- the manifest --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    sha256: str
    size: int


@dataclass(frozen=True)
class GoldenEntry:
    """One golden run of the bundle: its configuration key, thread count, fingerprint (as in
    its golden.json) and the member names of its files."""

    key: str
    workload: str
    framework: str
    threads: int
    fingerprint: dict
    files: dict          # {"golden.json": member name, "golden.ckpt": member name}

    def to_json(self) -> dict:
        return {"key": self.key, "workload": self.workload, "framework": self.framework,
                "threads": self.threads, "fingerprint": self.fingerprint,
                "files": dict(self.files)}


@dataclass(frozen=True)
class Manifest:
    campaign: str                  # member name of the campaign file
    digest: str                    # the campaign's digest (campaigns.campaign_digest)
    framework: str | None          # the --framework override it was run with
    results: str | None            # member name of the results database, if bundled
    golden: tuple[GoldenEntry, ...]
    members: dict = field(default_factory=dict)    # name -> Member (manifest.json excluded)
    faultlab: str = __version__

    @property
    def total_bytes(self) -> int:
        return sum(m.size for m in self.members.values())

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "faultlab": self.faultlab,
                "campaign": {"member": self.campaign, "digest": self.digest,
                             "framework": self.framework},
                "results": None if self.results is None else {"member": self.results},
                "golden": [g.to_json() for g in self.golden],
                "members": {n: {"sha256": m.sha256, "size": m.size}
                            for n, m in sorted(self.members.items())}}

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), sort_keys=True, indent=1, allow_nan=False)
                + "\n").encode()


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise BundleError(f"manifest.json: key {printable(k)!s} given twice")
        d[k] = v
    return d


def _reject_constant(name):
    raise BundleError(f"manifest.json: {name} is not strict JSON")


def _obj(value, keys: set, where: str) -> dict:
    if not isinstance(value, dict):
        raise BundleError(f"manifest.json: {where} must be an object")
    if set(value) != keys:
        extra = sorted(set(value) - keys)
        missing = sorted(keys - set(value))
        raise BundleError(f"manifest.json: {where} " + (
            f"lacks {', '.join(missing)}" if missing else
            f"has unknown field(s) {printable(', '.join(map(str, extra)))}"))
    return value


def _str(value, where: str, pattern: re.Pattern | None = None, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > 4096 or (pattern and not pattern.fullmatch(value)):
        raise BundleError(f"manifest.json: {where} is not valid")
    return value


def _int(value, where: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise BundleError(f"manifest.json: {where} must be an integer from {low} to {high}")
    return value


def parse_manifest(data: bytes) -> Manifest:
    """The manifest in `data`, checked field by field: strict JSON (no NaN, no duplicate
    keys), the format and version this faultlab reads, every member name valid (check_name)
    and where its kind belongs (campaign/, results/, golden/<run>/), every member the
    manifest refers to listed with a sha256 and a size and every listed member referred to,
    totals within the limits. A BundleError naming the first problem otherwise."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest.json is larger than {MAX_MANIFEST_BYTES >> 10} KiB")
    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"manifest.json is not JSON ({printable(str(e))[:200]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleError("not a faultlab bundle (manifest.json has no "
                          f"\"format\": \"{FORMAT}\")")
    version = doc.get("version")
    if type(version) is int and version > VERSION:
        raise BundleError(f"bundle format version {version} is newer than this faultlab "
                          f"reads ({VERSION}); upgrade faultlab")
    _obj(doc, {"format", "version", "faultlab", "campaign", "results", "golden", "members"},
         "the top level")
    _int(version, "version", VERSION, VERSION)
    made_by = _str(doc["faultlab"], "faultlab")

    raw_members = doc["members"]
    if not isinstance(raw_members, dict):
        raise BundleError("manifest.json: members must be an object")
    if len(raw_members) > MAX_MEMBERS:
        raise BundleError(f"manifest.json lists more than {MAX_MEMBERS} members")
    members = {}
    for name, spec in raw_members.items():
        check_name(name)
        if name == MANIFEST:
            raise BundleError("manifest.json lists itself as a member")
        spec = _obj(spec, {"sha256", "size"}, f"member {printable(name)}")
        members[name] = Member(_str(spec["sha256"], f"sha256 of {printable(name)}", _SHA256),
                               _int(spec["size"], f"size of {printable(name)}", 0,
                                    MAX_TOTAL_BYTES))
    if sum(m.size for m in members.values()) > MAX_TOTAL_BYTES:
        raise BundleError(f"the bundle's members add up to more than {MAX_TOTAL_BYTES >> 30} GiB")

    used: list[str] = []

    def member(value, where: str, folder: str, depth: int) -> str:
        name = _str(value, where)
        check_name(name)
        parts = name.split("/")
        if parts[0] != folder or len(parts) != depth:
            raise BundleError(f"manifest.json: {where} {printable(name)} must be "
                              f"{folder}/{'<run>/' if depth == 3 else ''}<file>")
        if name not in members:
            raise BundleError(f"manifest.json: {where} {printable(name)} is not among the "
                              f"members")
        if name in used:
            raise BundleError(f"manifest.json: {printable(name)} is referred to twice")
        used.append(name)
        return name

    camp = _obj(doc["campaign"], {"member", "digest", "framework"}, "campaign")
    campaign = member(camp["member"], "campaign member", "campaign", 2)
    digest = _str(camp["digest"], "campaign digest", _HEX16)
    framework = _str(camp["framework"], "campaign framework", re.compile(r"[a-z0-9_]{1,32}"),
                     optional=True)
    results = None
    if doc["results"] is not None:
        res = _obj(doc["results"], {"member"}, "results")
        results = member(res["member"], "results member", "results", 2)
        if results.rsplit("/", 1)[1] == campaign.rsplit("/", 1)[1]:
            raise BundleError("manifest.json: the campaign and the results database have the "
                              "same file name")
    if not isinstance(doc["golden"], list) or len(doc["golden"]) > MAX_MEMBERS // 2:
        raise BundleError("manifest.json: golden must be a list of golden runs")
    golden, keys = [], set()
    for i, g in enumerate(doc["golden"]):
        where = f"golden run {i + 1}"
        g = _obj(g, {"key", "workload", "framework", "threads", "fingerprint", "files"}, where)
        key = _str(g["key"], f"{where}: key", _HEX16)
        threads = _int(g["threads"], f"{where}: threads", 1, 4096)
        if (key, threads) in keys:
            raise BundleError(f"manifest.json: {where} repeats configuration {key}")
        keys.add((key, threads))
        if not isinstance(g["fingerprint"], dict) or not g["fingerprint"]:
            raise BundleError(f"manifest.json: {where} has no fingerprint")
        files = _obj(g["files"], set(GOLDEN_FILES), f"{where}: files")
        names = {f: member(files[f], f"{where}: {f}", "golden", 3) for f in GOLDEN_FILES}
        if {n.rsplit("/", 1)[1] for n in names.values()} != set(GOLDEN_FILES) or \
                len({n.rsplit("/", 1)[0] for n in names.values()}) != 1:
            raise BundleError(f"manifest.json: {where}'s files must be golden/<run>/golden.json "
                              f"and golden/<run>/golden.ckpt")
        golden.append(GoldenEntry(key, _str(g["workload"], f"{where}: workload"),
                                  _str(g["framework"], f"{where}: framework"), threads,
                                  g["fingerprint"], names))
    unused = sorted(set(members) - set(used))
    if unused:
        raise BundleError(f"manifest.json lists {printable(unused[0])}, which nothing in the "
                          f"bundle refers to")
    return Manifest(campaign, digest, framework, results, tuple(golden), members, made_by)
