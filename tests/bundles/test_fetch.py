"""`faultlab bundle` and `faultlab fetch` end to end: a tiny campaign run with the CLI, bundled,
served by a local HTTP server on 127.0.0.1 and fetched through gdown's real code path (no
network, no mock) into another cache; corrupted, interrupted, hostile and foreign bundles."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from _bundlehelpers import (cli, file_entry, files_under, raw_archive, read_members, rehash,
                            rewrite, show, user_error)

pytestmark = pytest.mark.framework("torch")

HEADER = ("trial,workload,replicas,per_replica_batch,width,input_size,dataset,steps_per_epoch,"
          "epochs,site,layer,replica,epoch,step,value,values,positions")
TINY = "mlp,2,8,16,8,digits,5,4"
CAMPAIGN = f"""{HEADER}
control,{TINY},,,,,,,,
nan,{TINY},fwd_output,dense_1,0,1,2,nan,,0/0
"""
EXPECTED = {"control": "Masked", "nan": "ImmediateINFsNaNs"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny campaign run with the CLI (cache A), then bundled twice."""
    work = tmp_path_factory.mktemp("maker")
    cache = work / "cache"
    (work / "tiny.csv").write_text(CAMPAIGN)
    p = cli(["run", "tiny.csv"], work, cache)
    assert p.returncode == 0, show(p)
    p = cli(["bundle", "tiny.csv", "-o", "tiny.tar.gz", "--json"], work, cache)
    assert p.returncode == 0, show(p)
    info = json.loads(p.stdout)
    q = cli(["bundle", "tiny.csv", "-o", "again.tar.gz"], work, cache)
    assert q.returncode == 0, show(q)
    blob = (work / "tiny.tar.gz").read_bytes()
    return SimpleNamespace(work=work, cache=cache, blob=blob, info=info,
                           again=(work / "again.tar.gz").read_bytes())


def _golden_entries(cache: Path) -> list[str]:
    g = cache / "golden"
    return sorted(p.name for p in g.iterdir()) if g.is_dir() else []


def test_bundle_is_deterministic_and_complete(made):
    assert made.blob == made.again
    assert hashlib.sha256(made.blob).hexdigest() == made.info["sha256"]
    members = read_members(made.blob)
    assert list(members)[0] == "manifest.json"
    assert list(members)[1:] == sorted(list(members)[1:])
    man = json.loads(members["manifest.json"])
    assert man["format"] == "faultlab-bundle" and man["version"] == 1
    for name, spec in man["members"].items():
        assert hashlib.sha256(members[name]).hexdigest() == spec["sha256"]
        assert len(members[name]) == spec["size"]
    (g,) = man["golden"]
    assert g["threads"] >= 1 and g["fingerprint"]["threads"] == g["threads"]
    assert set(members) == {"manifest.json", "campaign/tiny.csv", "results/tiny.sqlite",
                            g["files"]["golden.json"], g["files"]["golden.ckpt"]}
    with tarfile.open(fileobj=io.BytesIO(made.blob), mode="r:gz") as tar:
        for m in tar.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


def test_bundle_without_a_golden_run_names_the_configuration(made, tmp_path):
    (tmp_path / "tiny.csv").write_text(CAMPAIGN)
    p = cli(["bundle", "tiny.csv"], tmp_path, tmp_path / "empty-cache")
    user_error(p, "no cached golden run of mlp", "faultlab run tiny.csv")


def test_round_trip(made, server, tmp_path, monkeypatch):
    """Fetched into another cache: the golden run is found by golden.load, and a run of the
    fetched campaign reuses it (no golden run recorded again), with the same outcomes."""
    server.files["/tiny.tar.gz"] = made.blob
    cache = tmp_path / "cache"
    p = cli(["fetch", server.url("/tiny.tar.gz"), "-o", "got", "--json"], tmp_path, cache)
    assert p.returncode == 0, show(p)
    rep = json.loads(p.stdout)
    assert [g["installed"] for g in rep["golden"]] == [True]
    assert (tmp_path / "got" / "tiny.csv").read_text() == CAMPAIGN
    assert rep["results"] == "got/tiny.sqlite"
    assert (cache / "bundles" / hashlib.sha256(server.url("/tiny.tar.gz").encode()).hexdigest()
            / "bundle.tar.gz").read_bytes() == made.blob

    from faultlab.campaigns import load_campaign
    from faultlab.determinism import Fingerprint
    from faultlab.runner import golden
    man = json.loads(read_members(made.blob)["manifest.json"])
    (g,) = man["golden"]
    fp = Fingerprint.from_dict(g["fingerprint"])
    cfg = load_campaign(tmp_path / "got" / "tiny.csv").trials[0].workload
    monkeypatch.setenv("FAULTLAB_CACHE", str(cache))
    run = golden.load(cfg, golden.golden_dir(cfg, g["threads"], fp), fp)
    assert run is not None and run.checkpoints
    shipped = read_members(made.blob)[g["files"]["golden.json"]]
    assert (run.directory / "golden.json").read_bytes() == shipped
    before = _golden_entries(cache)

    # a fresh results database, so the trials really run against the fetched golden run
    p = cli(["run", "got/tiny.csv", "--results", "fresh.sqlite", "--json"], tmp_path, cache)
    assert p.returncode == 0, show(p)
    outcomes = {t["trial_id"]: t["outcome"] for t in json.loads(p.stdout)["trials"]}
    assert outcomes == EXPECTED
    assert _golden_entries(cache) == before            # nothing recorded again
    assert (run.directory / "golden.json").read_bytes() == shipped
    # the fetched results are the maker's: resuming them runs nothing
    con = sqlite3.connect(tmp_path / "got" / "tiny.sqlite")
    try:
        assert dict(con.execute("SELECT trial_id, outcome FROM results")) == EXPECTED
    finally:
        con.close()

    # a second fetch uses the cached download: no request reaches the server
    n = len(server.requests)
    p = cli(["fetch", server.url("/tiny.tar.gz"), "-o", "got"], tmp_path, cache)
    assert p.returncode == 0, show(p)
    assert len(server.requests) == n


def test_a_corrupted_member_is_refused_and_nothing_installed(made, server, tmp_path):
    def flip(members):
        name = next(n for n in members if n.endswith("golden.ckpt"))
        b = bytearray(members[name])
        b[len(b) // 2] ^= 0x01
        members[name] = bytes(b)
    server.files["/bad.tar.gz"] = rewrite(made.blob, flip)
    cache = tmp_path / "cache"
    p = cli(["fetch", server.url("/bad.tar.gz"), "-o", "got"], tmp_path, cache)
    user_error(p, "golden.ckpt does not match its sha256")
    assert _golden_entries(cache) == []
    assert not (tmp_path / "got").exists()
    assert files_under(cache / "bundles") == []        # the bad download is not kept


def _padded(blob: bytes, tmp: Path) -> bytes:
    """The bundle with 1.5 MB of random bytes in a table of its results database (manifest
    fixed): larger than gdown's 512 KiB chunks, so that a cut transfer leaves bytes to resume."""
    def pad(members):
        db = tmp / "pad.sqlite"
        db.write_bytes(members["results/tiny.sqlite"])
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE padding (b BLOB)")
        con.execute("INSERT INTO padding VALUES (?)", (os.urandom(1_500_000),))
        con.commit()
        con.close()
        members["results/tiny.sqlite"] = db.read_bytes()
        rehash(members, "results/tiny.sqlite")
    return rewrite(blob, pad)


def test_an_interrupted_download_resumes_with_a_range_request(made, server, tmp_path):
    """The server closes the connection after `cut` bytes the first time; gdown keeps the
    whole 512 KiB chunks it received, and the next fetch asks for the rest with Range."""
    from gdown.download import CHUNK_SIZE
    blob = _padded(made.blob, tmp_path)
    url, cut = server.url("/tiny.tar.gz"), CHUNK_SIZE + 100_000
    server.files["/tiny.tar.gz"] = blob
    server.cut["/tiny.tar.gz"] = cut
    cache = tmp_path / "cache"
    p = cli(["fetch", url, "-o", "got", "--retries", "0"], tmp_path, cache)
    user_error(p, "run the same command again to resume", f"the {CHUNK_SIZE} bytes received")
    assert _golden_entries(cache) == [] and not (tmp_path / "got").exists()
    partial = [f for f in files_under(cache / "bundles") if f.endswith(".part")]
    assert len(partial) == 1
    first = len(server.requests)

    p = cli(["fetch", url, "-o", "got", "--retries", "0"], tmp_path, cache)
    assert p.returncode == 0, show(p)
    later = server.requests[first:]
    assert later[-1][1] == f"bytes={CHUNK_SIZE}-", later   # the resumed request's Range
    assert later[-1][2] is not None                         # with If-Range: the same file
    assert all(r[1] is None for r in server.requests[:-1])
    assert len(_golden_entries(cache)) == 1
    assert (tmp_path / "got" / "tiny.csv").read_text() == CAMPAIGN
    assert (tmp_path / "got" / "tiny.sqlite").stat().st_size > 1_500_000


def test_retries_resume_within_one_fetch(made, server, tmp_path):
    from gdown.download import CHUNK_SIZE
    url = server.url("/tiny.tar.gz")
    server.files["/tiny.tar.gz"] = _padded(made.blob, tmp_path)
    server.cut["/tiny.tar.gz"] = CHUNK_SIZE + 1000
    p = cli(["fetch", url, "-o", "got"], tmp_path, tmp_path / "cache")
    assert p.returncode == 0, show(p)
    assert [r[1] for r in server.requests] == [None, f"bytes={CHUNK_SIZE}-"]


@pytest.mark.parametrize("evil", ["../evil", "/tmp/faultlab-bundle-abs-evil", "symlink"])
def test_path_traversal_is_refused(made, server, tmp_path, evil):
    members = read_members(made.blob)
    if evil == "symlink":
        info = tarfile.TarInfo("campaign/link")
        info.type, info.linkname = tarfile.SYMTYPE, "../../../../evil"
        extra = (info, None)
    else:
        extra = file_entry(evil, b"owned")
    entries = [file_entry(n, b) for n, b in members.items()]
    server.files["/evil.tar.gz"] = raw_archive(entries[:2] + [extra] + entries[2:])
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    p = cli(["fetch", server.url("/evil.tar.gz"), "-o", "got"], work, cache)
    user_error(p, {"../evil": "leaves its folder", "symlink": "symbolic link"}.get(
        evil, "absolute path"))
    assert not (tmp_path / "evil").exists() and not (work / "evil").exists()
    assert not Path("/tmp/faultlab-bundle-abs-evil").exists()
    assert not (work / "got").exists() and _golden_entries(cache) == []
    assert files_under(tmp_path) == ["cache", "cache/bundles", "work"]


def test_a_golden_run_of_another_fingerprint_is_refused(made, server, tmp_path):
    """Only the fingerprint check can catch it: golden.json's fingerprint and the manifest's
    are edited alike and the manifest's hashes fixed."""
    def foreign(members):
        man = json.loads(members["manifest.json"])
        g = man["golden"][0]
        g["fingerprint"]["isa"] = "SomeOtherVendor avx512f"
        g["fingerprint"]["portable"] = False
        name = g["files"]["golden.json"]
        meta = json.loads(members[name])
        meta["fingerprint"] = g["fingerprint"]
        members[name] = json.dumps(meta).encode()
        members["manifest.json"] = json.dumps(man).encode()
        rehash(members, name)
    server.files["/foreign.tar.gz"] = rewrite(made.blob, foreign)
    cache = tmp_path / "cache"
    p = cli(["fetch", server.url("/foreign.tar.gz"), "-o", "got"], tmp_path, cache)
    user_error(p, "arithmetic differs", "SomeOtherVendor", "not installed")
    assert _golden_entries(cache) == []
    # the campaign and results are data: they are placed all the same
    assert (tmp_path / "got" / "tiny.csv").read_text() == CAMPAIGN
    assert (tmp_path / "got" / "tiny.sqlite").is_file()
    assert "NOT installed" in p.stdout


def test_bad_sources(tmp_path):
    p = cli(["fetch", "ftp://example.org/x.tar.gz"], tmp_path, tmp_path / "cache")
    user_error(p, "neither an http(s) URL nor a Google Drive id")
    p = cli(["fetch", "http://127.0.0.1:9/none.tar.gz", "--retries", "0", "--timeout", "5"],
            tmp_path, tmp_path / "cache")
    user_error(p, "cannot download")
    assert files_under(tmp_path / "cache") in ([], ["bundles"])    # nothing left to resume


def test_a_bundle_without_results_and_a_target_that_differs(made, server, tmp_path):
    def drop(members):
        del members["results/tiny.sqlite"]
        man = json.loads(members["manifest.json"])
        man["results"] = None
        del man["members"]["results/tiny.sqlite"]
        members["manifest.json"] = json.dumps(man).encode()
    server.files["/nores.tar.gz"] = rewrite(made.blob, drop)
    cache = tmp_path / "cache"
    (tmp_path / "got").mkdir()
    (tmp_path / "got" / "tiny.csv").write_text("mine\n")
    p = cli(["fetch", server.url("/nores.tar.gz"), "-o", "got"], tmp_path, cache)
    user_error(p, "got/tiny.csv exists and differs from the bundle's")
    assert (tmp_path / "got" / "tiny.csv").read_text() == "mine\n"
    assert _golden_entries(cache) == []
    p = cli(["fetch", server.url("/nores.tar.gz"), "-o", "other", "--json"], tmp_path, cache)
    assert p.returncode == 0, show(p)
    rep = json.loads(p.stdout)
    assert rep["results"] is None and "--results" not in rep["run"]
    assert files_under(tmp_path / "other") == ["tiny.csv"]
