"""The zygote (a process that imports the training code once and forks a training process per
run) and the training process itself. Entry point: ``python -m faultlab.crash.zygote``.

What the zygote imports before it forks is chosen by the loop's backend
(``Backend.crash_preload(engines)``; a user's loop: the backends whose framework its module
imported), and then ``Backend.prepare_fork(threads)`` runs before any fork (torch fixes its
thread pools there).
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote, unquote

from faultlab.backends import backend_module, entry, names as framework_names
from faultlab.checkpointing.api import (Phase, checkpointer_class, checkpointer_framework,
                                        open_checkpointer, recover_checkpoint)
from faultlab.crash.loops import (LoopSpec, final_state, load_factory, loop_framework,
                                  loop_maker)
from faultlab.crash.points import KillPoint
from faultlab.crash.verdicts import Reference, fingerprint, record_saved, save_state_npz
from faultlab.errors import CheckpointError, FaultlabError


class CrashCampaignError(FaultlabError):
    """The campaign itself could not run (a training process failed or hung)."""


# -- the training process (runs in a child forked from the zygote) ---------------------------

class _Channel:
    """Lines to the parent through the shared pipe; each write is one atomic line."""

    def __init__(self, fd: int, token: int):
        self.fd, self.token = fd, token

    def send(self, kind: str, *args) -> None:
        line = " ".join([str(self.token), kind, *(quote(str(a)[:1000], safe="") for a in args)])
        os.write(self.fd, (line + "\n").encode())


class _Tracker:
    """The phase hook of a training process: counts the points it passes and stops or
    announces at the planned one."""

    def __init__(self, kill: KillPoint | None, chan: _Channel):
        self.kill, self.chan = kill, chan
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def __call__(self, phase: str, point: str, step: int) -> None:
        kill = self.kill
        with self._lock:
            self.counts[phase] += 1
            hit = kill is not None and phase == kill.phase.value \
                and self.counts[phase] == kill.occurrence
        if hit:
            self.chan.send("hold" if kill.hold else "at", phase, point, step)
            if kill.hold:
                threading.Event().wait()          # stopped here until SIGKILL arrives

    def wants_idle(self) -> bool:
        """Whether the next idle point (a step start) is the planned kill; in-flight saves
        then drain first, so that the kill lands with nothing in flight."""
        kill = self.kill
        return kill is not None and kill.phase is Phase.IDLE \
            and self.counts[Phase.IDLE.value] + 1 == kill.occurrence


def _child_main(job: dict, fd: int) -> int:
    chan = _Channel(fd, job["token"])
    spec = LoopSpec(**job["loop"])
    make = loop_maker(load_factory(spec.factory), spec.steps)
    loop = make()
    if job.get("record"):
        return _record_reference(loop, spec, Path(job["dir"]), chan)
    kill = KillPoint(**job["kill"]) if job.get("kill") else None
    tracker = _Tracker(kill, chan)
    engine, directory = job["engine"], Path(job["dir"])
    start = 0
    try:
        step, state, meta = recover_checkpoint(engine, directory)
    except CheckpointError as e:
        chan.send("norecover", str(e)[:200])
    else:
        try:
            loop.restore(state, meta)
            start = step
        except Exception as e:       # garbage that got past recovery (the naive engine)
            chan.send("restorefailed", f"{type(e).__name__}: {e}"[:200])
            loop = make()
    ckpt = open_checkpointer(engine, directory, phase_hook=tracker, **job.get("settings", {}))
    chan.send("resumed", start)

    def committed(h):
        if h.error is None:
            chan.send("committed", h.step)

    for k in range(start, spec.steps):
        if tracker.wants_idle():
            ckpt.wait_all()                  # the kill is to land with nothing in flight
        tracker(Phase.IDLE.value, "step", k)
        loop.step(k)
        chan.send("trained", k + 1)
        if (k + 1) % spec.every == 0 or k + 1 == spec.steps:
            tracker(Phase.STAGING.value, "capture", k + 1)
            if getattr(ckpt, "cow", False):
                # copy-on-write: the adapter freezes what the engine writes in place
                adapter = getattr(loop, "adapter", None)
                if not hasattr(adapter, "cow_stats"):
                    raise CheckpointError(f"engine {engine} needs a torch loop (the torch "
                                          "adapter's copy-on-write saves)")
                adapter.cow_min_bytes = ckpt.cow_min_bytes
                adapter.cow_policy = ckpt.cow_policy
                handle = adapter.save(ckpt, k + 1, data_position=k + 1, cow=True)
            else:
                state, meta = loop.capture(k + 1)
                if job.get("saved"):
                    # what the loop hands over, so that the parent tells a torn checkpoint
                    # from a whole one of a loop whose resumed run went elsewhere
                    record_saved(job["saved"], k + 1, start, fingerprint(state, meta))
                handle = ckpt.save(k + 1, state, meta)
            handle.add_done_callback(committed)
    ckpt.wait_all()
    ckpt.close()
    state, meta = final_state(loop, spec.steps)
    save_state_npz(Path(job["final"]), state, meta)
    chan.send("done", spec.steps)
    return 0


def _record_reference(loop, spec: LoopSpec, out: Path, chan: _Channel) -> int:
    steps = {}
    for k in range(spec.steps):
        loop.step(k)
        if (k + 1) % spec.every == 0 or k + 1 == spec.steps:
            state, meta = loop.capture(k + 1)
            steps[k + 1] = fingerprint(state, meta)
    state, meta = final_state(loop, spec.steps)
    save_state_npz(out / "reference-final.npz", state, meta)
    (out / "reference.json").write_text(json.dumps(Reference(steps).to_json()))
    chan.send("done", spec.steps)
    return 0


# -- the zygote --------------------------------------------------------------------------------

def _preload(modules: Sequence[str], done: set[str]) -> None:
    for name in modules:
        if name not in done:
            importlib.import_module(name)
            done.add(name)


def _prepare_backend(framework: str, engines: Sequence[str], threads: int,
                     done: set[str]) -> None:
    """Preload what a framework's backend asks for, then let it prepare for fork()."""
    backend = backend_module(framework).BACKEND
    _preload(backend.crash_preload(tuple(engines)), done)
    backend.prepare_fork(threads)


def zygote_main(argv: list[str]) -> int:
    """The zygote: argv = factory, pipe fd, threads, preload modules, engines (comma lists)."""
    factory, fd, threads = argv[0], int(argv[1]), int(argv[2])
    preload = [m for m in (argv[3] if len(argv) > 3 else "").split(",") if m]
    engines = [e for e in (argv[4] if len(argv) > 4 else "").split(",") if e]
    done: set[str] = set()
    framework = loop_framework(factory)
    if framework is not None:
        _prepare_backend(framework, engines, threads, done)
    _preload(preload, done)
    for name in engines:                     # framework-free checkpointers: imported once here
        if checkpointer_framework(name) is None:
            checkpointer_class(name)
    make = load_factory(factory)
    if framework is None:                    # a user's loop: the frameworks its module imported
        for fw in framework_names():
            if entry(fw).package in sys.modules:
                _prepare_backend(fw, engines, threads, done)
    if getattr(make, "fork_safe", True):
        loop_maker(make, 1)()                # warm caches (datasets, lazy imports)
    os.write(fd, f"0 ready {os.getpid()}\n".encode())
    children: set[int] = set()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "spawn":
            job = cmd["job"]
            pid = os.fork()
            if pid == 0:                     # the training process
                code = 1
                try:
                    sys.stdin.close()
                    os.dup2(os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND), 2)
                    code = _child_main(job, fd)
                except BaseException as e:
                    traceback.print_exc()
                    try:
                        _Channel(fd, job["token"]).send(
                            "error", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
                    except OSError:
                        pass
                finally:
                    os._exit(code)
            children.add(pid)
            os.write(fd, f"{job['token']} spawned {pid}\n".encode())
        elif cmd["cmd"] == "reap":
            pid = cmd["pid"]
            _, status = os.waitpid(pid, 0)
            children.discard(pid)
            os.write(fd, f"{cmd['token']} reaped {os.waitstatus_to_exitcode(status)}\n".encode())
    for pid in children:                     # the parent went away: leave nothing behind
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    return 0


class Zygote:
    """A process that has imported the training code; forks training processes on demand.

    preload: modules to import besides what the loop's backend needs for `engines`."""

    def __init__(self, factory: str, workdir: Path, *, threads: int = 1,
                 preload: Sequence[str] = (), engines: Sequence[str] = (),
                 timeout: float = 120.0):
        self.factory, self.timeout = factory, timeout
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        r, w = os.pipe()
        self._r = r
        self._buf = b""
        self._pending: dict[int, list] = {}
        self._token = 0
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in [root, os.getcwd(),
                                                        env.get("PYTHONPATH", "")] if p)
        self.log = self.workdir / "zygote.log"
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "faultlab.crash.zygote", factory, str(w), str(threads),
                 ",".join(preload), ",".join(engines)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, pass_fds=(w,),
                env=env, text=True)
        os.close(w)
        try:
            self._expect(0, "ready", timeout=max(timeout, 300.0))
        except BaseException:
            self.close()
            raise

    # messages ----------------------------------------------------------------------------

    def read(self, timeout: float) -> bool:
        """Collect the messages that arrive within `timeout` seconds (False: none came)."""
        ready, _, _ = select.select([self._r], [], [], timeout)
        if not ready:
            return False
        data = os.read(self._r, 1 << 16)
        if not data:
            raise CrashCampaignError(f"the zygote exited (log: {self.log}): {self._tail()}")
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            parts = [unquote(p) for p in line.decode().split(" ")]
            self._pending.setdefault(int(parts[0]), []).append(parts[1:])
        return True

    def next(self, token: int, timeout: float | None = None) -> list[str] | None:
        """The next message of `token` ([kind, args...]); None after `timeout` seconds."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            q = self._pending.get(token)
            if q:
                return q.pop(0)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.read(left)

    def _expect(self, token: int, kind: str, timeout: float | None = None) -> list[str]:
        while True:
            msg = self.next(token, timeout)
            if msg is None:
                raise CrashCampaignError(f"no '{kind}' from the zygote within "
                                         f"{timeout or self.timeout:.0f} s (log: {self.log}): "
                                         f"{self._tail()}")
            if msg[0] == kind:
                return msg
            if token == 0:
                continue

    def _tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    # commands ------------------------------------------------------------------------------

    def _send(self, cmd: dict) -> None:
        if self._proc.poll() is not None:
            raise CrashCampaignError(f"the zygote exited (log: {self.log}): {self._tail()}")
        self._proc.stdin.write(json.dumps(cmd) + "\n")
        self._proc.stdin.flush()

    def spawn(self, job: dict) -> tuple[int, int]:
        """Fork a training process for `job`; returns (token, pid)."""
        self._token += 1
        token = self._token
        job = dict(job, token=token, log=str(self.workdir / "children.log"))
        self._send({"cmd": "spawn", "job": job})
        # messages of the child may come before "spawned": keep them queued for the caller
        while True:
            q = self._pending.get(token, [])
            for i, msg in enumerate(q):
                if msg[0] == "spawned":
                    del q[i]
                    return token, int(msg[1])
            if not self.read(self.timeout):
                raise CrashCampaignError(f"the zygote did not fork within {self.timeout:.0f} s")

    def reap(self, token: int, pid: int) -> list[list[str]]:
        """Wait for the process to end; returns its remaining messages, the last being
        ["reaped", exit code] (negative: killed by that signal)."""
        self._send({"cmd": "reap", "pid": pid, "token": token})
        out = []
        while True:
            msg = self.next(token)
            if msg is None:
                raise CrashCampaignError(f"training process {pid} did not end "
                                         f"(log: {self.workdir / 'children.log'})")
            out.append(msg)
            if msg[0] == "reaped":
                return out

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if getattr(self, "_r", None) is not None:
            os.close(self._r)
            self._r = None


if __name__ == "__main__":
    sys.exit(zygote_main(sys.argv[1:]))
