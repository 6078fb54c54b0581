"""The framework-free half of a backend: the trainer base and the backend contract.

A backend builds a :class:`TrainerBase` for a workload configuration, reports the shapes of
every injectable operand, configures its runtime and names its checkpoint adapter,
checkpointers and crash loops. The runner, replay, the checkpoint harness and the CLI talk only
to these; the torch and TensorFlow code lives behind them in ``backends/<framework>/``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from faultlab.errors import SpecError
from faultlab.faults import FaultSpec, Site, check_target
from faultlab.workloads.base import WorkloadConfig

if TYPE_CHECKING:
    from faultlab.detectors import DetectorSuite, SignalSpec, Signals


@dataclass(frozen=True)
class StepMetrics:
    loss: float
    acc: float
    #: cheap per-step detector signals when the trainer was asked for them; not part of
    #: equality, so metrics compare as the run's numbers
    signals: Signals | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class EvalMetrics:
    loss: float
    acc: float


#: shapes of a layer's operands in the canonical layout, per replica, by site
OperandTable = Mapping[str, Mapping[Site, tuple[tuple[int, ...], str]]]


class TrainerBase(abc.ABC):
    """A live training session of one workload configuration (each backend subclasses it).

    The four abstract methods are the whole contract the runner needs; the rest has defaults
    that the replay and overhead code rely on, so they call them without ``hasattr``."""

    config: WorkloadConfig
    #: which optional signals train_step collects, or None (set by the Protector)
    signal_spec: SignalSpec | None = None
    #: the learning rate is multiplied by this for the next step (a recovery policy's lever)
    lr_scale: float = 1.0

    @abc.abstractmethod
    def train_step(self, step: int, faults: Sequence[FaultSpec] = ()) -> StepMetrics:
        """Run global step `step` (all replicas), injecting `faults` (those firing now)."""

    @abc.abstractmethod
    def evaluate(self) -> EvalMetrics:
        """Loss and accuracy on the held-out set."""

    @abc.abstractmethod
    def get_state(self) -> dict[str, np.ndarray]:
        """Everything that determines the following steps (model, optimizer), as arrays that
        nobody else holds (callers may hand them to the engine as borrowed saves). An offloaded
        torch trainer (docs/offload.md) returns views of its host store instead, which it never
        writes again: its later writes to those tensors are copy-on-write."""

    @abc.abstractmethod
    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a state returned by get_state (bit-exact)."""

    def full_checksum(self) -> int:
        """bits.state_checksum of get_state(): exact (equal states, equal sums; one flipped bit
        always changes it). A backend may compute the same value without copying the state."""
        from faultlab.bits import state_checksum
        return state_checksum(self.get_state())

    def prepare_restore(self) -> None:
        """Do ahead of time whatever makes a later set_state fast (TF traces its bulk assign);
        called when protection starts, so a rollback does not pay for it. Default: nothing."""

    def signal_cost(self, spec: SignalSpec, suite: DetectorSuite | None = None,
                    repeats: int = 50) -> float | None:
        """Seconds one step's detector signals cost in isolation, or None when the backend
        cannot separate them from the step (then only the whole-step comparison counts)."""
        return None


#: what faultlab needs of a trainer (the name the rest of the code types against)
Trainer = TrainerBase


class Backend(abc.ABC):
    """What faultlab needs of a framework. Each backend package exports one as ``BACKEND``.

    Importing a backend package must not import its framework: the methods do, on first use.
    The registries here are "module:attribute" strings, so listing them is free."""

    name: str
    #: checkpointers this framework provides: engine name -> "module:Class"
    checkpointers: Mapping[str, str] = {}
    #: built-in crash-test training loops: loop name -> "module:factory"
    crash_loops: Mapping[str, str] = {}

    @abc.abstractmethod
    def build_trainer(self, config: WorkloadConfig) -> TrainerBase:
        """A trainer at the configuration's initial state (a backend may hand out a reused one)."""

    def new_trainer(self, config: WorkloadConfig) -> TrainerBase:
        """A trainer of its own, never a reused one (for runs side by side in one process)."""
        return self.build_trainer(config)

    @abc.abstractmethod
    def operand_shapes(self, config: WorkloadConfig) -> OperandTable:
        """Every injectable layer's operand shapes, canonical layout, per replica."""

    @abc.abstractmethod
    def configure(self, threads: int) -> None:
        """Fix this process's intra-op thread count (it changes reduction order, so it is part
        of a run); called by a worker before it builds anything."""

    @abc.abstractmethod
    def checkpoint_adapter(self) -> type:
        """The class that turns this framework's training objects into checkpointable arrays
        (a faultlab.checkpointing.adapter.AdapterBase subclass)."""

    def crash_preload(self, engines: Sequence[str] = ()) -> list[str]:
        """Modules a crash-test zygote imports before it forks training children running this
        framework's loops with `engines` (fork-safe imports only). Default: none."""
        return []

    def run_ranks(self, job):
        """Run a multi-process job (runner.ranks.RankJob) under the framework's launcher;
        returns an object with ok, restarts, error, wall_s. Frameworks without multi-process
        training refuse in one line."""
        raise SpecError(f"framework {self.name} has no multi-process training: processes "
                        f"must be 1 (TensorFlow multi-worker training is out of scope)")

    def prepare_fork(self, threads: int) -> None:
        """Called in a crash-test zygote after the preloads, before it forks: whatever the
        framework needs so that forked children work (thread pools). Default: nothing."""

    def _portable(self):
        """The backend's ``portable`` module, or None where it has none."""
        from importlib import import_module
        from importlib.util import find_spec
        name = f"faultlab.backends.{self.name}.portable"
        return import_module(name) if find_spec(name) is not None else None

    def portable_env(self) -> dict[str, str]:
        """Environment variables that pin this framework's CPU kernels to AVX2 + FMA (portable
        mode, faultlab.determinism); set before the framework is imported in a process. Read
        from the backend's ``portable`` module; a framework without one has none."""
        module = self._portable()
        return dict(module.ENV) if module else {}

    def portable_apply(self) -> None:
        """Portable mode's run-time switches, applied once the framework is imported."""
        module = self._portable()
        if module:
            module.apply()

    def kernels(self) -> dict[str, str]:
        """What this process's math kernels are, read from the framework (imports it)."""
        module = self._portable()
        return dict(module.kernels()) if module else {}


def check_fault(table: OperandTable, fault: FaultSpec, config: WorkloadConfig) -> None:
    """Raise a one-line SpecError (its field set) when a fault names a replica outside the
    configuration's, a layer the workload does not have, a site the layer does not have, a
    position outside its operand (faultlab.faults.check_target: the injectors' checks and
    wording) or a step past the end of training."""
    if fault.site is Site.HOST_STATE or (config.offload and fault.site in (Site.PARAM,
                                                                            Site.OPT_STATE)):
        fault = check_host_fault(fault, config)
    check_target(fault, table, config.replicas, f"workload {config.workload}")
    if fault.step >= config.total_steps:
        raise SpecError(f"step {fault.step} is past the end of training "
                        f"({config.total_steps} steps)", "step")


def check_host_fault(fault: FaultSpec, config: WorkloadConfig) -> FaultSpec:
    """The host_state rules (docs/offload.md), one-line SpecErrors with their field: the site
    needs an offloaded workload; its tensor is one of faults.HOST_TENSORS; the shared host
    copies (master weight / bias, moments) are one copy for every replica of the process, so
    replica 0; an offloaded workload has no device-resident param / opt_state to hit. Returns
    the fault as check_target sees its operand (weight- or bias-shaped)."""
    from dataclasses import replace
    from faultlab.faults import HOST_TENSORS
    if fault.site is not Site.HOST_STATE:
        raise SpecError(f"site {fault.site.value} is device-resident state, but workload "
                        f"{config.workload} with offload {config.offload} keeps parameters and "
                        f"optimizer state in host memory: use site host_state (tensor weight, "
                        f"bias, m or v)", "site")
    if not config.offload:
        raise SpecError(f"site host_state needs an offloaded workload: {config.workload} "
                        f"keeps its state on the device (set offload, e.g. window:2)", "site")
    tensor = fault.tensor or "weight"
    if tensor not in HOST_TENSORS:
        raise SpecError(f"unknown tensor {tensor!r} for site host_state: valid tensors are "
                        f"{', '.join(HOST_TENSORS)}", "tensor")
    if tensor in ("weight", "bias", "m", "v") and fault.replica != 0:
        raise SpecError(f"host_state tensor {tensor} is the one host copy every replica "
                        f"shares (a CPU optimizer): replica must be 0, got {fault.replica} "
                        f"(transit and grad hit one replica's transfers)", "replica")
    return replace(fault, tensor="bias" if tensor == "bias" else None)
