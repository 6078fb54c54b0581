"""The one small interface between faultlab's framework-free core and a framework.

A backend builds a :class:`Trainer` for a workload configuration and reports the shapes of
every injectable operand. The runner, the outcome rules and the campaign code only ever talk
to these two things; the torch and TensorFlow code lives behind them.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np

from .errors import FaultlabError, SpecError
from .faults import FaultSpec, Framework, Site
from .workloads.base import WorkloadConfig


@dataclass(frozen=True)
class StepMetrics:
    loss: float
    acc: float
    #: cheap per-step detector signals (faultlab.detectors.Signals) when the trainer was
    #: asked for them; not part of equality, so metrics compare as the run's numbers
    signals: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class EvalMetrics:
    loss: float
    acc: float


#: shapes of a layer's operands in the canonical layout, per replica, by site
OperandTable = Mapping[str, Mapping[Site, tuple[tuple[int, ...], str]]]


class Trainer(Protocol):
    """A live training session of one workload configuration."""

    config: WorkloadConfig
    #: which optional signals train_step collects (a faultlab.detectors.SignalSpec), or None
    signal_spec: object

    def train_step(self, step: int, faults: Sequence[FaultSpec] = ()) -> StepMetrics:
        """Run global step `step` (all replicas), injecting `faults` (those firing now)."""

    def evaluate(self) -> EvalMetrics:
        """Loss and accuracy on the held-out set."""

    def get_state(self) -> dict[str, np.ndarray]:
        """Everything that determines the following steps (model, optimizer), as arrays."""

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a state returned by get_state (bit-exact)."""


class Backend(Protocol):
    name: str

    def build_trainer(self, config: WorkloadConfig) -> Trainer: ...

    def operand_shapes(self, config: WorkloadConfig) -> OperandTable: ...


_MODULES = {Framework.TORCH: "faultlab.workloads.torch_trainer",
            Framework.TF: "faultlab.workloads.tf_trainer"}
_PACKAGES = {Framework.TORCH: ("torch", "faultlab[torch]"),
             Framework.TF: ("tensorflow", "faultlab[tf]")}


def load_backend(framework: Framework | str) -> Backend:
    fw = Framework(framework)
    pkg, extra = _PACKAGES[fw]
    try:  # find, not import: the backend module configures the framework before its import
        found = importlib.util.find_spec(pkg) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise FaultlabError(f"framework {fw.value} needs {pkg}: pip install '{extra}'")
    try:
        mod = importlib.import_module(_MODULES[fw])
    except ModuleNotFoundError as e:
        if e.name == _MODULES[fw]:
            raise FaultlabError(f"framework {fw.value} is not supported yet") from None
        raise
    return mod.BACKEND


def check_fault(table: OperandTable, fault: FaultSpec, config: WorkloadConfig) -> None:
    """Raise SpecError when a fault names a missing layer, an unsupported site or a position
    outside its operand."""
    if fault.layer not in table:
        close = difflib.get_close_matches(fault.layer, list(table), n=3, cutoff=0.6)
        hint = (f"did you mean {', '.join(close)}?" if close else
                f"'faultlab workloads --layers {config.workload}' lists them")
        raise SpecError(f"unknown layer {fault.layer!r} in workload {config.workload} ({hint})",
                        "layer")
    sites = table[fault.layer]
    site = fault.site
    if site in (Site.PARAM, Site.GRAD_WT, Site.OPT_STATE) and fault.tensor == "bias":
        key = "bias"
    else:
        key = site
    if key not in sites:
        raise SpecError(f"site {site.value} is not available on layer {fault.layer}", "site")
    shape, _ = sites[key]
    if fault.replica >= config.replicas:
        raise SpecError(f"replica {fault.replica} is out of range 0..{config.replicas - 1}",
                        "replica")
    if fault.step >= config.total_steps:
        raise SpecError(f"step {fault.step} is past the end of training "
                        f"({config.total_steps} steps)", "step")
    try:
        fault.positions.check(shape, what=f"{site.value} operand of {fault.layer}")
    except SpecError as e:
        raise SpecError(str(e), "positions") from None
