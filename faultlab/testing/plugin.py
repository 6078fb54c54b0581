"""The pytest plugin: a `crash_lab` fixture that kills and resumes your training loop.

Installed with faultlab (entry point ``pytest11: "faultlab.testing.plugin" =
"faultlab.testing.plugin"``), so the fixture is available in every test session:

    def make_loop():                      # module level: forked training processes import it
        return MyLoop()                   # step(k), capture(step), restore(state, meta)

    def test_survives_kills(crash_lab):
        result = crash_lab.run(make_loop, kills=[KillPoint("committing", 2)], steps=12)
        result.assert_ok()               # no torn / mixed / lost checkpoint, no incomplete
                                         # loop state; bit-identical end

or a script-style loop, a plain function that trains from a resume point:

    def train(resume, checkpoint, steps):  # resume: ResumePoint(step, state) or None
        ...                               # build, seed, load resume.state, train from
        checkpoint(k + 1, state)          # resume.step; after each step k
        return state                      # the final state

    crash_lab.run(train, kills=..., steps=12).assert_ok()

`crash_lab` is session-scoped (hypothesis-friendly): the training code is imported once per
loop factory into a zygote process, and the uninterrupted reference run of each (factory,
steps, every) is recorded once. See docs/checkpointing.md.

Every pytest session in an environment with faultlab installed loads this module, so it
imports nothing but pytest at load time: the crash harness (and through it numpy, the
checkpoint engine and the frameworks) is imported when a test first uses the fixture.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from faultlab.crash import KillCampaign, KillPoint, RunResult, Zygote


class CrashLab:
    """Kill campaigns on demand; zygotes and reference runs are shared across tests."""

    def __init__(self, workdir: str | Path, *, threads: int = 1, timeout: float = 120.0):
        self.workdir = Path(workdir)
        self.threads, self.timeout = threads, timeout
        self._zygotes: dict[str, Zygote] = {}
        self._campaigns: dict[tuple, KillCampaign] = {}

    def campaign(self, loop: str | Callable, *, steps: int = 12, every: int = 1,
                 preload: Sequence[str] = ()) -> KillCampaign:
        """The KillCampaign of a loop: a loop factory or a script-style loop (a module-level
        function, or "module:function")."""
        from faultlab.checkpointing.api import checkpointer_names
        from faultlab.crash import KillCampaign, LoopSpec, Zygote, factory_name, is_script
        if callable(loop):
            is_script(loop)                  # a one-line error here, not in the zygote
        factory = factory_name(loop)
        key = (factory, steps, every)
        if key not in self._campaigns:
            zygote = self._zygotes.get(factory)
            if zygote is None:
                # any engine may run on it later: the loop's backend preloads what each needs
                zygote = Zygote(factory, self.workdir / f"zygote{len(self._zygotes)}",
                                threads=self.threads, timeout=self.timeout,
                                preload=preload, engines=checkpointer_names())
                self._zygotes[factory] = zygote
            self._campaigns[key] = KillCampaign(
                LoopSpec(factory, steps, every),
                self.workdir / f"campaign{len(self._campaigns)}", zygote=zygote)
        return self._campaigns[key]

    def run(self, loop: str | Callable, *, kills: Sequence[KillPoint | Mapping],
            engine: str = "faultlab", settings: Mapping | None = None, steps: int = 12,
            every: int = 1) -> RunResult:
        """Run the loop `steps` steps under `engine`, SIGKILLing it at each kill point in turn
        (a restart per kill), then to the end; every recovery is classified (exact, torn,
        mixed, lost-committed, or incomplete-state: a whole checkpoint of a loop that leaves
        part of its state out) and the final state compared bit for bit with an uninterrupted
        run. `loop`: a loop factory or a script-style loop (``train(resume, checkpoint,
        steps) -> state``). Call `.assert_ok()` on the RunResult."""
        from faultlab.crash import KillPoint
        points = [k if isinstance(k, KillPoint) else KillPoint(**k) for k in kills]
        return self.campaign(loop, steps=steps, every=every).run(engine, points,
                                                                  settings=settings)

    def close(self) -> None:
        for z in self._zygotes.values():
            z.close()
        self._zygotes.clear()
        self._campaigns.clear()


@pytest.fixture(scope="session")
def crash_lab(tmp_path_factory):
    """A CrashLab for the session (see faultlab.testing.plugin)."""
    lab = CrashLab(tmp_path_factory.mktemp("faultlab-crash"))
    try:
        yield lab
    finally:
        lab.close()


def pytest_configure(config):
    config.addinivalue_line("markers", "crash: a crash-recovery test (kills real processes)")
