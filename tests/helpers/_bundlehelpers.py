"""Helpers of tests/bundles: a local HTTP server on 127.0.0.1 that gdown downloads from for
real (Range, If-Range, ETag; a connection cut after N bytes on demand), hostile archives, and
the `faultlab` command run in a child process."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


TIMEOUT = 300


class BundleServer:
    """Serves `files` ({path: bytes}) over HTTP/1.1 on 127.0.0.1. `cut[path] = n`: the next
    plain (non-Range) GET of `path` announces the full length, sends n bytes and closes the
    connection (once). Every request is logged as (path, Range header, If-Range header)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
                server.requests.append((self.path, rng, if_range))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
                start = 0
                if rng and (if_range is None or if_range == etag):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                try:
                    if start:
                        self.send_response(206)
                        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    else:
                        self.send_response(200)
                    self.send_header("Content-Type", "application/gzip")
                    self.send_header("Content-Length", str(len(data) - start))
                    self.send_header("ETag", etag)
                    self.send_header("Accept-Ranges", "bytes")
                    self.end_headers()
                    n = server.cut.pop(self.path, None) if not start else None
                    if n is not None:
                        self.wfile.write(data[:n])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.wfile.write(data[start:])
                except (BrokenPipeError, ConnectionResetError, OSError):
                    self.close_connection = True

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], OSError):   # a client hanging up is fine
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# --- archives -----------------------------------------------------------------------------------

def read_members(bundle: bytes) -> dict[str, bytes]:
    """The members of a (well-formed) bundle, in archive order."""
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def rewrite(bundle: bytes, change) -> bytes:
    """The bundle with `change(members)` applied (it edits the dict of members in place) and
    written again by faultlab's own deterministic writer (manifest hashes untouched: callers
    fix them with `rehash` when only the check under test may catch the change)."""
    from faultlab.bundles.pack import write_archive
    import tempfile
    members = read_members(bundle)
    change(members)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "b.tar.gz"
        write_archive(out, members)
        return out.read_bytes()


def rehash(members: dict[str, bytes], *names: str) -> None:
    """Fix the manifest's sha256 and size of `names` after an edit."""
    m = json.loads(members["manifest.json"])
    for n in names:
        m["members"][n] = {"sha256": hashlib.sha256(members[n]).hexdigest(),
                           "size": len(members[n])}
    members["manifest.json"] = json.dumps(m, sort_keys=True, indent=1).encode()


def raw_archive(entries) -> bytes:
    """A .tar.gz of `entries`: (TarInfo, data or None), exactly as given (no checks)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def file_entry(name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def manifest_for(members: dict[str, bytes], campaign: str = "campaign/c.csv") -> bytes:
    """A structurally valid manifest.json naming `members` (golden runs none)."""
    from faultlab.campaigns import campaign_digest
    doc = {"format": "faultlab-bundle", "version": 1, "faultlab": "0.1.0",
           "campaign": {"member": campaign, "digest": campaign_digest(members[campaign]),
                        "framework": None},
           "results": None, "golden": [],
           "members": {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                       for n, b in members.items()}}
    return json.dumps(doc).encode()


# --- the command --------------------------------------------------------------------------------

def cli_env(cache: Path) -> dict:
    env = dict(os.environ)
    env.pop("FAULTLAB_STOP_AFTER", None)
    env["FAULTLAB_CACHE"] = str(cache)
    return env


def cli(args, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "faultlab.cli", *map(str, args)], cwd=cwd,
                          env=cli_env(cache), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=TIMEOUT)


def show(p: subprocess.CompletedProcess) -> str:
    return f"{p.args}\nexit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"


def user_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 with exactly one stderr line 'faultlab: error: ...' holding every needle."""
    assert p.returncode == 2, show(p)
    assert "Traceback" not in p.stderr + p.stdout, show(p)
    lines = p.stderr.splitlines()
    assert len(lines) == 1, show(p)
    assert lines[0].startswith("faultlab: error:"), show(p)
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
