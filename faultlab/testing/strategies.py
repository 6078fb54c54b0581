"""Hypothesis strategies for crash-recovery tests: kill points, kill plans, engine settings.

    from faultlab.testing import strategies as fst

    @given(plan=fst.kill_plans(max_kills=4), settings=fst.engine_settings())
    def test_my_loop_survives(crash_lab, plan, settings):
        crash_lab.run(make_loop, kills=plan, settings=settings).assert_ok()

Strategies are composable values: `kill_points(phases=[Phase.COMMITTING])` aims every kill at
the commit protocol, `engine_settings("checkfreq")` draws a baseline's settings, and
`crash_scenarios()` draws an engine, its settings and a plan together. Shrinking moves towards
fewer kills, earlier occurrences, held (exact-instant) kills and default-like settings.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

from faultlab.checkpointing.baselines import COMPARED
from faultlab.crash.harness import MAX_OCCURRENCE, KillPoint, Phase

KiB = 1 << 10


def phases(allowed: Sequence[Phase | str] | None = None) -> st.SearchStrategy[Phase]:
    """A phase of the checkpoint life cycle: staging, writing, committing, idle."""
    return st.sampled_from([Phase(p) for p in (allowed or list(Phase))])


def kill_points(phases_: Sequence[Phase | str] | None = None, *,
                max_occurrence: int | None = None,
                hold: bool | None = None) -> st.SearchStrategy[KillPoint]:
    """Where to SIGKILL a training process: a phase, which occurrence of it (counted from the
    process's start) and whether it stops at that exact instant (hold) or is raced."""
    @st.composite
    def build(draw):
        phase = draw(phases(phases_))
        top = max_occurrence or MAX_OCCURRENCE[phase]
        return KillPoint(phase, draw(st.integers(1, top)),
                         draw(st.booleans().map(lambda b: not b)) if hold is None else hold)
    return build()


def kill_plans(min_kills: int = 1, max_kills: int = 5, **point_kw) -> st.SearchStrategy[list]:
    """A sequence of kill points, one per restart of the training process."""
    return st.lists(kill_points(**point_kw), min_size=min_kills, max_size=max_kills)


def engine_settings(engine: str = "faultlab") -> st.SearchStrategy[dict]:
    """Valid settings of a checkpointer (for the engine: in-flight saves, retention, chunk
    size, staging pool, writer threads; for the baselines: retention)."""
    if engine in ("faultlab", "faultlab+cow"):
        return st.builds(
            lambda inflight, keep, chunk, pool_chunks, writers: {
                "max_in_flight": inflight, "keep": keep, "chunk_bytes": chunk,
                "pool_bytes": chunk * pool_chunks, "writers": writers},
            st.integers(1, 3), st.integers(1, 3),
            st.sampled_from([4 * KiB, 8 * KiB, 16 * KiB, 64 * KiB]),
            st.integers(1, 4), st.integers(1, 3))
    if engine in ("sync", "checkfreq", "dcp-async"):
        return st.builds(lambda keep: {"keep": keep}, st.integers(1, 3))
    if engine == "naive":
        return st.just({})
    raise ValueError(f"no settings strategy for engine {engine!r}")


def engines(names: Sequence[str] = COMPARED) -> st.SearchStrategy[str]:
    """One of the checkpointers (default: the engine and the baselines)."""
    return st.sampled_from(list(names))


@st.composite
def crash_scenarios(draw, names: Sequence[str] = ("faultlab",), max_kills: int = 4):
    """(engine, settings, kill plan) drawn together."""
    engine = draw(engines(names))
    return engine, draw(engine_settings(engine)), draw(kill_plans(max_kills=max_kills))
