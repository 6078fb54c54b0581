"""The bundle reader's rules without training anything: member names and entry kinds
(hypothesis), the manifest's structure, and hostile archives read by extract.verify_extract:
nothing is written outside the staging folder, every refusal is a one-line BundleError."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _bundlehelpers import file_entry, manifest_for, raw_archive
from faultlab.bundles.extract import verify_extract
from faultlab.bundles.manifest import (MAX_EXTENDED_HEADER, BundleError, check_entry,
                                       check_name, parse_manifest)
from faultlab.errors import FaultlabError

CAMPAIGN = b"trial,workload\nt0,mlp\n"

# --- names and entry kinds ------------------------------------------------------------------------

_component = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
                     min_size=0, max_size=12)


@settings(max_examples=400, deadline=None)
@given(st.lists(_component | st.sampled_from(["..", ".", "", "a", "..\\x", "C:", "/"]),
                min_size=1, max_size=6),
       st.booleans())
def test_an_accepted_name_stays_inside_its_folder(parts, absolute):
    name = ("/" if absolute else "") + "/".join(parts)
    root = "/srv/target"
    try:
        check_name(name)
    except BundleError as e:
        assert "\n" not in str(e)
        return
    joined = os.path.normpath(os.path.join(root, name))
    assert joined.startswith(root + "/")
    assert ".." not in name.split("/") and not name.startswith("/") and "\\" not in name
    assert all(p and not p.startswith(".") for p in name.split("/"))


@given(st.sampled_from([tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
                        tarfile.FIFOTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE, b"Z", b"9"]),
       st.integers(0, 1 << 20))
def test_only_files_and_directories_pass(kind, size):
    with pytest.raises(BundleError, match="regular files and directories"):
        check_entry("golden/run/golden.ckpt", kind, size)
    assert check_entry("golden/run/golden.ckpt", tarfile.REGTYPE, size) is True
    assert check_entry("golden/run", tarfile.DIRTYPE, 0) is False


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/../../evil", "a//b", "./a",
                                  ".hidden", "a\\..\\b", "C:/x", "a/b/c/d/e", "x" * 201,
                                  "a\nb", "a\x00b"])
def test_bad_names(name):
    with pytest.raises(BundleError) as e:
        check_name(name)
    assert "\n" not in str(e.value)


# --- the manifest ---------------------------------------------------------------------------------

def _good() -> dict:
    return json.loads(manifest_for({"campaign/c.csv": CAMPAIGN}))


def test_a_good_manifest_parses_and_round_trips():
    m = parse_manifest(json.dumps(_good()).encode())
    assert m.campaign == "campaign/c.csv" and m.golden == () and m.results is None
    assert parse_manifest(m.to_bytes()) == m


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3) |
                     st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["format", "version", "faultlab", "campaign", "results",
                                 "golden", "members", "extra"]), min_size=1, max_size=3,
                unique=True), _json, st.data())
def test_a_damaged_manifest_is_one_bundle_error(keys, value, data):
    """Any field replaced (or removed, or added) gives a Manifest that is still consistent,
    or a one-line BundleError: never another exception."""
    doc = _good()
    for k in keys:
        if data.draw(st.booleans()) and k in doc:
            del doc[k]
        else:
            doc[k] = value
    try:
        m = parse_manifest(json.dumps(doc).encode())
    except BundleError as e:
        assert "\n" not in str(e)
        return
    assert set(m.members) >= {m.campaign}


@pytest.mark.parametrize("text, needle", [
    (b'{"format": "faultlab-bundle", "format": "x"}', "twice"),
    (b'{"format": "faultlab-bundle", "version": NaN}', "strict JSON"),
    (b"\xff\xfe", "not JSON"),
    (b'{"format": "zip"}', "not a faultlab bundle"),
    (b'{"format": "faultlab-bundle", "version": 99}', "newer"),
])
def test_manifest_refusals(text, needle):
    with pytest.raises(BundleError, match=needle):
        parse_manifest(text)


def test_a_member_nothing_refers_to_is_refused():
    doc = _good()
    doc["members"]["campaign/extra.csv"] = {"sha256": "0" * 64, "size": 1}
    with pytest.raises(BundleError, match="nothing in the bundle refers to"):
        parse_manifest(json.dumps(doc).encode())


# --- hostile archives ------------------------------------------------------------------------------

def _bundle(extra_entries=(), members=None, manifest=None) -> bytes:
    members = members or {"campaign/c.csv": CAMPAIGN}
    man = manifest if manifest is not None else manifest_for(members)
    return raw_archive([file_entry("manifest.json", man),
                        *(file_entry(n, b) for n, b in members.items()), *extra_entries])


def _verify(tmp_path: Path, blob: bytes):
    (tmp_path / "b.tar.gz").write_bytes(blob)
    staging = tmp_path / "target" / "staging"
    staging.mkdir(parents=True)
    return verify_extract(tmp_path / "b.tar.gz", staging), staging


def _link(name, kind, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _device(name):
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info, None


def test_a_good_archive_extracts(tmp_path):
    m, staging = _verify(tmp_path, _bundle())
    assert (staging / "campaign" / "c.csv").read_bytes() == CAMPAIGN
    assert m.campaign == "campaign/c.csv"


@pytest.mark.parametrize("entry, needle", [
    (file_entry("../evil", b"x"), "leaves its folder"),
    (file_entry("campaign/../../evil", b"x"), "leaves its folder"),
    (file_entry("/tmp/evil-abs", b"x"), "absolute path"),
    (_link("campaign/link", tarfile.SYMTYPE, "../../../evil"), "symbolic link"),
    (_link("campaign/hard", tarfile.LNKTYPE, "/etc/passwd"), "hard link"),
    (_device("campaign/null"), "character device"),
    (file_entry("campaign/unlisted.csv", b"x"), "not listed in the manifest"),
    (file_entry("campaign/c.csv", CAMPAIGN), "appears twice"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "device", "unlisted",
        "duplicate"])
def test_hostile_entries_are_refused_and_nothing_leaves_the_target(tmp_path, entry, needle):
    with pytest.raises(BundleError, match=needle) as e:
        _verify(tmp_path, _bundle([entry]))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "target" / "evil").exists()
    assert not Path("/tmp/evil-abs").exists()
    outside = [p for p in tmp_path.rglob("*") if "staging" not in p.parts]
    assert sorted(p.name for p in outside) == ["b.tar.gz", "target"]
    inside = sorted(str(p.relative_to(tmp_path / "target" / "staging"))
                    for p in (tmp_path / "target" / "staging").rglob("*"))
    assert inside in ([], ["campaign", "campaign/c.csv"])


def test_manifest_first(tmp_path):
    blob = raw_archive([file_entry("campaign/c.csv", CAMPAIGN),
                        file_entry("manifest.json", manifest_for({"campaign/c.csv": CAMPAIGN}))])
    with pytest.raises(BundleError, match="first entry is not manifest.json"):
        _verify(tmp_path, blob)


def test_a_member_altered_or_missing_is_refused(tmp_path):
    man = manifest_for({"campaign/c.csv": CAMPAIGN})
    with pytest.raises(BundleError, match="sha256"):
        _verify(tmp_path, _bundle(members={"campaign/c.csv": CAMPAIGN[:-2] + b"X\n"},
                                  manifest=man))
    blob = raw_archive([file_entry("manifest.json", man)])
    (tmp_path / "2").mkdir()
    with pytest.raises(BundleError, match="not in the archive"):
        _verify(tmp_path / "2", blob)


def test_sizes_beyond_the_manifest_are_not_read(tmp_path):
    """A decompression bomb: a member far larger than the manifest says (zeros compress to
    almost nothing) is refused on its header, before its data is read or written."""
    bomb = bytes(64 << 20)
    man = manifest_for({"campaign/c.csv": CAMPAIGN})
    blob = raw_archive([file_entry("manifest.json", man), file_entry("campaign/c.csv", bomb)])
    assert len(blob) < 1 << 20
    with pytest.raises(BundleError, match="bytes in the archive"):
        _verify(tmp_path, blob)
    assert (tmp_path / "target" / "staging").stat().st_size < 1 << 16


def test_a_huge_extended_header_is_refused_before_it_is_read(tmp_path):
    info = tarfile.TarInfo("campaign/c.csv")
    info.pax_headers = {"comment": "x" * (MAX_EXTENDED_HEADER + 10)}
    man = manifest_for({"campaign/c.csv": CAMPAIGN})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        m = tarfile.TarInfo("manifest.json")
        m.size = len(man)
        tar.addfile(m, io.BytesIO(man))
        info.size = len(CAMPAIGN)
        tar.addfile(info, io.BytesIO(CAMPAIGN))
    with pytest.raises(BundleError, match="extended tar header"):
        _verify(tmp_path, buf.getvalue())


@pytest.mark.parametrize("blob", [b"", b"not gzip at all", gzip.compress(b"\0" * 10)],
                         ids=["empty", "garbage", "empty-tar"])
def test_not_a_bundle(tmp_path, blob):
    with pytest.raises(FaultlabError) as e:
        _verify(tmp_path, blob)
    assert isinstance(e.value, BundleError) and "\n" not in str(e.value)


def test_a_truncated_download_is_refused(tmp_path):
    blob = _bundle()
    with pytest.raises(BundleError):
        _verify(tmp_path, blob[: len(blob) // 2])


def test_the_sha256_in_a_manifest_is_of_the_member(tmp_path):
    m, _ = _verify(tmp_path, _bundle())
    assert m.members["campaign/c.csv"].sha256 == hashlib.sha256(CAMPAIGN).hexdigest()


@pytest.mark.parametrize("command", ["bundle", "fetch"])
def test_help_has_examples(tmp_path, command):
    from _bundlehelpers import cli, show
    p = cli([command, "--help"], tmp_path, tmp_path / "cache")
    assert p.returncode == 0, show(p)
    assert "examples" in p.stdout and f"faultlab {command}" in p.stdout
