"""Hypothesis strategies for crash-recovery tests (kill points, kill plans, engine settings)
and for fault specs.

    from faultlab.testing import strategies as fst

    @given(plan=fst.kill_plans(max_kills=4), settings=fst.engine_settings())
    def test_my_loop_survives(crash_lab, plan, settings):
        crash_lab.run(make_loop, kills=plan, settings=settings).assert_ok()

Strategies are composable values: `kill_points(phases=[Phase.COMMITTING])` aims every kill at
the commit protocol, `engine_settings("checkfreq")` draws a checkpointer's settings from its
``settings_space``, `crash_scenarios()` draws an engine, its settings and a plan together, and
`fault_specs()` draws valid FaultSpecs. Shrinking moves towards fewer kills, earlier
occurrences, held (exact-instant) kills and the first choice of each setting.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

from faultlab.bits import LAYOUT_BITS, BitLayout
from faultlab.checkpointing.api import COMPARED, Phase, checkpointer_class
from faultlab.crash.points import MAX_OCCURRENCE, KillPoint
from faultlab.faults import (UNSUPPORTED_SITES, Duration, DurationKind, FaultSpec, PositionMode,
                             PositionSpec, Site, ValueModel, ValueSpec)


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
    """Valid settings of any registered checkpointer, drawn from its class's settings_space
    (``{setting: choices}``; an empty space draws ``{}``)."""
    space = checkpointer_class(engine).settings_space
    return st.fixed_dictionaries({k: st.sampled_from(list(v)) for k, v in space.items()})


def engines(names: Sequence[str] = COMPARED) -> st.SearchStrategy[str]:
    """One of the checkpointers (default: the engine and the baselines it is compared with)."""
    return st.sampled_from(list(names))


@st.composite
def crash_scenarios(draw, names: Sequence[str] = ("faultlab",), max_kills: int = 4):
    """(engine, settings, kill plan) drawn together."""
    engine = draw(engines(names))
    return engine, draw(engine_settings(engine)), draw(kill_plans(max_kills=max_kills))


# -- fault specs ----------------------------------------------------------------------------

#: tensors a state site may name (None: the site's default)
_TENSORS = {Site.PARAM: (None, "weight", "bias"), Site.OPT_STATE: (None, "m", "v"),
            Site.HOST_STATE: (None, "weight", "bias", "m", "v", "transit", "grad")}

_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
_layer_names = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.\[\]-]{0,15}\Z")


@st.composite
def _value_and_positions(draw, max_index: int = 63, max_count: int = 8, max_groups: int = 4,
                         set_values: st.SearchStrategy[float] = _finite
                         ) -> tuple[ValueSpec, PositionSpec]:
    model = draw(st.sampled_from(list(ValueModel)))
    layout = draw(st.sampled_from(list(BitLayout)))
    width = LAYOUT_BITS.get(layout, 64)
    mode = draw(st.sampled_from(list(PositionMode)))
    if mode is PositionMode.EXPLICIT:
        rank = draw(st.integers(1, 4))
        indices = tuple(draw(st.lists(st.tuples(*[st.integers(0, max_index)] * rank),
                                      min_size=1, max_size=4, unique=True)))
        positions = PositionSpec(mode, indices=indices)
        hit = len(indices)
    else:
        count = draw(st.integers(1, max_count))
        groups = draw(st.integers(1, max_groups)) if mode is PositionMode.GROUPS else 1
        positions = PositionSpec(mode, count=count, groups=groups)
        hit = None if mode is PositionMode.GROUPS else count
    kw: dict = {"layout": layout}
    if model in (ValueModel.BITFLIP, ValueModel.STUCK_AT) and draw(st.booleans()):
        kw["bit"] = draw(st.integers(0, width - 1))
    elif model is ValueModel.BITFLIP:
        kw["bits"] = draw(st.integers(1, width))
    if model is ValueModel.STUCK_AT:
        kw["stuck"] = draw(st.integers(0, 1))
    if model is ValueModel.SCALE:
        kw["factor"] = draw(_finite)
    if model is ValueModel.DEGRADE:
        kw["ramp"] = draw(_finite.filter(lambda x: x != 0))
    if model is ValueModel.SET:            # one replacement, or one per element hit
        n = draw(st.sampled_from([1] if hit is None or hit == 1 else [1, hit]))
        kw["values"] = tuple(draw(st.lists(set_values, min_size=n, max_size=n)))
    return ValueSpec(model, **kw), positions


def durations() -> st.SearchStrategy[Duration]:
    """When a fault fires after its first step: once, for some steps, always, or at random."""
    return st.one_of(
        st.just(Duration(DurationKind.TRANSIENT)),
        st.just(Duration(DurationKind.PERMANENT)),
        st.integers(1, 1000).map(lambda n: Duration(DurationKind.STEPS, steps=n)),
        st.floats(0.0, 1.0, exclude_min=True).map(
            lambda p: Duration(DurationKind.INTERMITTENT, probability=p)))


@st.composite
def fault_specs(draw, sites: Sequence[Site | str] | None = None,
                layers: Sequence[str] | None = None, max_replica: int = 0,
                max_step: int = 1000, *, max_index: int = 63, max_count: int = 8,
                max_groups: int = 4,
                set_values: st.SearchStrategy[float] = _finite) -> FaultSpec:
    """A valid FaultSpec: a site, a value model with its parameters, positions, a duration,
    a replica (0..max_replica), a first step (0..max_step) and a seed. Every spec drawn on
    the default sites can be written to and read back from a columnar campaign file (a SET
    has one replacement or one per element hit). `layers`: names to draw from (default: arbitrary valid layer names);
    whether a layer exists in a workload is the workload's check, not the spec's.
    max_index / max_count / max_groups bound explicit indices, counts and groups of positions;
    set_values draws SET replacements (default finite; a parser test may pass st.floats()).
    `sites` defaults to every site a backend injects into (those of
    faultlab.faults.UNSUPPORTED_SITES, host_state, only when named)."""
    site = draw(st.sampled_from([Site(s) for s in sites] if sites else
                                [s for s in Site if s not in UNSUPPORTED_SITES]))
    layer = draw(st.sampled_from(list(layers)) if layers else _layer_names)
    tensor = draw(st.sampled_from(_TENSORS[site])) if site in _TENSORS else None
    value, positions = draw(_value_and_positions(max_index, max_count, max_groups, set_values))
    return FaultSpec(site, value, positions, layer=layer, tensor=tensor,
                     replica=draw(st.integers(0, max_replica)),
                     step=draw(st.integers(0, max_step)), duration=draw(durations()),
                     seed=draw(st.integers(0, 2**63 - 1)))
