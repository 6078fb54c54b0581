"""Workload configuration and the registry of built-in workloads (framework-free).

A workload is named training code plus the settings that fix it (size, data, replicas, seed).
The registry only knows names and defaults; the framework code is imported when a trainer is
built, so parsing and validating campaigns never imports torch or tensorflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from faultlab.backends import names as framework_names
from faultlab.errors import SpecError
from faultlab.faults import Framework, parse_enum


@dataclass(frozen=True)
class WorkloadConfig:
    """Everything that fixes a training run; two equal configs give bit-identical runs."""

    workload: str
    framework: Framework = Framework.TORCH
    replicas: int = 1
    per_replica_batch: int = 32
    width: int = 64
    input_size: int = 32
    dataset: str = "digits"
    steps_per_epoch: int = 10
    epochs: int = 10
    lr: float = 1e-3
    seed: int = 0
    eval_samples: int = 512
    checkpoint_every: int = 0        # steps between golden checkpoints; 0 = every epoch
    options: tuple[tuple[str, str], ...] = ()   # extra settings of a user workload

    def __post_init__(self):
        object.__setattr__(self, "framework", parse_enum(Framework, self.framework, "framework"))
        for name in ("replicas", "per_replica_batch", "width", "input_size", "steps_per_epoch",
                     "epochs", "eval_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise SpecError(f"{name} must be a positive integer, got {v!r}")
        if self.checkpoint_every < 0:
            raise SpecError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if not self.lr > 0:
            raise SpecError(f"lr must be positive, got {self.lr}")
        object.__setattr__(self, "options", tuple(sorted((str(k), str(v)) for k, v in self.options)))

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def global_batch(self) -> int:
        return self.replicas * self.per_replica_batch

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.steps_per_epoch

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["framework"] = self.framework.value
        d["options"] = dict(self.options)
        return d

    def key(self) -> str:
        """Stable digest naming this configuration (golden-run cache key)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **kw) -> "WorkloadConfig":
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class WorkloadInfo:
    """A registry entry: a name, what it is, and its default configuration."""

    name: str
    description: str
    defaults: dict = field(default_factory=dict)
    frameworks: tuple[str, ...] = tuple(framework_names())   # every registered framework


#: Built-in workloads. ResNet-18's defaults are the ISCA'23 artifact's full size.
BUILTINS: dict[str, WorkloadInfo] = {
    "resnet18": WorkloadInfo(
        "resnet18",
        "ResNet-18 with the ISCA'23 artifact's layer names (CIFAR-10 geometry, NHWC positions)",
        dict(replicas=8, per_replica_batch=128, width=64, input_size=32, dataset="cifar10",
             steps_per_epoch=49, epochs=80, lr=1e-3, seed=123, eval_samples=10000)),
    "mlp": WorkloadInfo(
        "mlp", "three-layer perceptron on scikit-learn's 8x8 digits",
        dict(replicas=2, per_replica_batch=32, width=64, input_size=8, dataset="digits",
             steps_per_epoch=20, epochs=10, lr=1e-2, seed=0, eval_samples=512)),
    "transformer": WorkloadInfo(
        "transformer", "two-block causal transformer language model on a generated corpus",
        dict(replicas=2, per_replica_batch=16, width=64, input_size=32, dataset="corpus",
             steps_per_epoch=20, epochs=10, lr=1e-3, seed=0, eval_samples=256)),
}


def is_user_workload(name: str) -> bool:
    """User workloads are named `module:function` (see docs/workloads.md)."""
    return ":" in name


def load_user_workload(config: WorkloadConfig, expected: type):
    """Call the `module:function` of a user workload (modules of the current directory are
    importable, as with `python -m`) and check it returns an `expected` instance."""
    import importlib
    import os
    import sys
    name = config.workload
    mod_name, _, fn_name = name.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise SpecError(f"cannot load workload {name!r}: {e}") from None
    wl = fn(config)
    if not isinstance(wl, expected):
        raise SpecError(f"workload {name!r} returned {type(wl).__name__}, not "
                        f"{expected.__name__} (framework {config.framework.value})")
    return wl


def lr_schedule(config: WorkloadConfig):
    """The learning rate as a function of the step: polynomial (power 1) decay from lr to
    lr * end_lr_ratio over decay_steps (default: the whole run), as in the artifact."""
    decay = int(config.option("decay_steps", "0")) or config.total_steps
    ratio = float(config.option("end_lr_ratio", "0.1"))
    lr0 = config.lr

    def lr_at(step: int) -> float:
        return (lr0 - lr0 * ratio) * (1 - min(step, decay) / decay) + lr0 * ratio
    return lr_at


def default_config(name: str, **overrides) -> WorkloadConfig:
    """The configuration of workload `name` with the given settings changed."""
    if name in BUILTINS:
        base = dict(BUILTINS[name].defaults)
    elif is_user_workload(name):
        base = {}
    else:
        raise SpecError(f"unknown workload {name!r} (built-ins: {', '.join(sorted(BUILTINS))}; "
                        f"or module:function for your own)")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return WorkloadConfig(workload=name, **base)
