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
from faultlab.errors import FaultlabError, SpecError
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
    #: training processes (ranks, torch.distributed); each trains one data-parallel replica,
    #: so when processes > 1, replicas == processes. 1: every replica in this one process
    processes: int = 1
    #: logical machines the ranks are spread over: node n holds the processes // nodes
    #: consecutive ranks n * (processes // nodes) ...; a node kill kills them all together
    nodes: int = 1
    #: offloaded training (STRONGHOLD / ZeRO-Offload; docs/offload.md): "window:N" keeps a
    #: window of N layers on the device and the rest of the state in host memory; "" = none
    offload: str = ""

    def __post_init__(self):
        object.__setattr__(self, "framework", parse_enum(Framework, self.framework, "framework"))
        for name in ("replicas", "per_replica_batch", "width", "input_size", "steps_per_epoch",
                     "epochs", "eval_samples", "processes", "nodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpecError(f"{name} must be a positive integer, got {v!r}", name)
        if self.processes > 1 and self.replicas != self.processes:
            raise SpecError(f"replicas {self.replicas} must equal processes {self.processes} "
                            f"(one data-parallel replica per rank)", "replicas")
        if self.processes % self.nodes:
            raise SpecError(f"nodes {self.nodes} must divide processes {self.processes} (each "
                            f"node holds the same number of consecutive ranks)", "nodes")
        if self.processes > 1 and self.framework.value == "tf":
            raise SpecError("TensorFlow multi-worker training is out of scope: processes must "
                            "be 1 for framework tf (use replicas for MirroredStrategy)",
                            "processes")
        if self.checkpoint_every < 0:
            raise SpecError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if not self.lr > 0:
            raise SpecError(f"lr must be positive, got {self.lr}")
        object.__setattr__(self, "options", tuple(sorted((str(k), str(v)) for k, v in self.options)))
        object.__setattr__(self, "offload", parse_offload(self.offload))
        if self.offload:
            check_offload(self)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def global_batch(self) -> int:
        return self.replicas * self.per_replica_batch

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.steps_per_epoch

    @property
    def ranks_per_node(self) -> int:
        """Consecutive ranks each node holds (processes // nodes)."""
        return self.processes // self.nodes

    def node_of(self, rank: int) -> int:
        """The node that holds `rank`."""
        return rank // self.ranks_per_node

    def node_ranks(self, node: int) -> tuple[int, ...]:
        """The ranks node `node` holds."""
        per = self.ranks_per_node
        return tuple(range(node * per, (node + 1) * per))

    def option(self, key: str, default: str | None = None) -> str | None:
        return dict(self.options).get(key, default)

    def to_dict(self) -> dict:
        """Every setting, JSON-able; `processes` and `nodes` only when they differ from 1 and
        `offload` only when set (so a configuration without them has the key() it had before
        they existed)."""
        d = dataclasses.asdict(self)
        d["framework"] = self.framework.value
        d["options"] = dict(self.options)
        for name in ("processes", "nodes"):
            if d[name] == 1:
                del d[name]
        if not d["offload"]:
            del d["offload"]
        return d

    @property
    def offload_window(self) -> int:
        """N of offload "window:N" (layers on the device at once); 0 without offload."""
        return int(self.offload.partition(":")[2]) if self.offload else 0

    def key(self) -> str:
        """Stable digest naming this configuration (golden-run cache key)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **kw) -> "WorkloadConfig":
        return dataclasses.replace(self, **kw)


#: what an `offload` setting may say (docs/offload.md)
OFFLOAD_FORMS = "window:N (N >= 1 layers on the device at once), or empty / none for no offload"


def parse_offload(text) -> str:
    """An `offload` setting in canonical form: "window:N", or "" for none (also "none",
    "off"); a one-line SpecError (field "offload") otherwise."""
    if text is None:
        return ""
    if not isinstance(text, str):
        raise SpecError(f"offload must be a string like 'window:2', got {text!r}", "offload")
    s = text.strip().lower()
    if s in ("", "none", "off"):
        return ""
    kind, sep, n = s.partition(":")
    n = n.strip()
    if kind.strip() != "window" or not sep or not n.isdigit() or not n.isascii():
        raise SpecError(f"offload {text!r} is not understood: expected {OFFLOAD_FORMS}",
                        "offload")
    if int(n) < 1:
        raise SpecError(f"offload window must hold at least 1 layer, got {text!r}", "offload")
    return f"window:{int(n)}"


def offload_layers(config: "WorkloadConfig") -> list[str]:
    """The layers an offloaded built-in workload moves between host and device (those with
    parameters of their own, in forward order), from workloads/estimate.py's parameter list:
    the torch backend builds the same list from the model (tests/torch/test_offload.py)."""
    from faultlab.workloads.estimate import parameter_shapes
    names: list[str] = []
    for name, _ in parameter_shapes(config):
        layer, _, _ = name.rpartition(" ")
        if layer and layer not in names:
            names.append(layer)
    return names


def check_offload(config: "WorkloadConfig") -> None:
    """Refuse an offload setting faultlab cannot train: one line, field "offload"."""
    if config.framework.value != "torch":
        raise SpecError(f"offload is torch-only: framework {config.framework.value} keeps its "
                        f"state on the device (drop offload {config.offload!r})", "offload")
    if config.processes > 1:
        raise SpecError(f"offload trains in one process: processes must be 1, got "
                        f"{config.processes}", "offload")
    if config.workload not in BUILTINS:
        raise SpecError(f"offload applies to the built-in workloads "
                        f"({', '.join(sorted(BUILTINS))}), not {config.workload!r}", "offload")
    layers = offload_layers(config)
    n = config.offload_window
    if n >= len(layers):
        raise SpecError(f"offload {config.offload} keeps all {len(layers)} layers of "
                        f"{config.workload} on the device (none outside the window): choose "
                        f"window:1..window:{len(layers) - 1}", "offload")


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
    """User workloads are named `module:function`, or by the name an installed package gives
    one (entry point group `faultlab.workloads`; see docs/workloads.md)."""
    if name in BUILTINS:
        return False
    if ":" in name:
        return True
    from faultlab.workloads.allow import installed_workloads
    return name in installed_workloads()


def user_workload_target(name: str) -> str:
    """The `module:function` a user workload's name designates."""
    from faultlab.workloads.allow import installed_workloads
    return installed_workloads().get(name, name)


def load_user_workload(config: WorkloadConfig, expected: type):
    """Import and call the `module:function` of a user workload (modules of the current
    directory are importable, as with `python -m`) and check it returns an `expected` instance.

    Nothing here checks the allow-list (faultlab/workloads/allow.py): names from campaign files
    and the command line are checked where they are read, and a config built in Python is the
    caller's own choice. Whatever goes wrong in the user's module or function is a one-line
    SpecError naming the workload (the exception is chained for Python callers)."""
    import importlib
    import os
    import sys
    name = config.workload
    target = user_workload_target(name)
    label = repr(name) if target == name else f"{name!r} ({target})"
    mod_name, _, fn_name = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise SpecError(f"cannot load workload {label}: {' '.join(str(e).split())}") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing
        raise SpecError(f"cannot load workload {label}: importing {mod_name} raised "
                        f"{_one_line(e)}") from e
    try:
        fn = getattr(module, fn_name)
    except AttributeError:
        raise SpecError(f"cannot load workload {label}: module {mod_name!r} has no "
                        f"attribute {fn_name!r}") from None
    if not callable(fn):
        raise SpecError(f"workload {label} is not a workload factory: {fn_name} is not "
                        f"callable ({type(fn).__name__})")
    try:
        wl = fn(config)
    except FaultlabError:
        raise
    except Exception as e:  # noqa: BLE001 - wrong signature, or the factory itself failed
        raise SpecError(f"workload {label} failed: calling {fn_name}(config) raised "
                        f"{_one_line(e)} (a workload factory takes the WorkloadConfig and "
                        f"returns a {expected.__name__})") from e
    if not isinstance(wl, expected):
        raise SpecError(f"workload {label} returned {type(wl).__name__}, not "
                        f"{expected.__name__} (framework {config.framework.value})")
    return wl


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


#: learning-rate schedules (option `schedule`)
SCHEDULES = ("linear", "constant")

#: options faultlab reads for every workload (the learning-rate schedule): key -> what it takes
SCHEDULE_OPTIONS = {
    "schedule": "linear (decay from lr to lr * end_lr_ratio, the default) or constant",
    "decay_steps": "an integer >= 0: steps of the linear decay (0, the default: the whole run)",
    "end_lr_ratio": "a number >= 0: the final learning rate over lr (default 0.1)",
}

#: options of each built-in workload besides the schedule's: key -> what it takes
BUILTIN_OPTIONS = {
    "resnet18": {"dropout": "a number in [0, 1) (default 0.1)",
                 "augment": "1 (the artifact's flip / pad / crop, the default) or 0"},
    "mlp": {},
    "transformer": {"blocks": "an integer >= 0 (default 2)",
                    "heads": "an integer >= 1 that divides width (default 4)"},
}


def _int_option(key: str, text: str, low: int) -> int:
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < low:
        raise SpecError(f"option {key} must be an integer >= {low}, got {text!r}", "options")
    return n


def _float_option(key: str, text: str, low: float, high: float | None = None) -> float:
    import math
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and x >= low and (high is None or x < high)):
        span = f">= {low:g}" if high is None else f"in [{low:g}, {high:g})"
        raise SpecError(f"option {key} must be a number {span}, got {text!r}", "options")
    return x


def _check_value(key: str, text: str) -> None:
    if key == "schedule":
        if text not in SCHEDULES:
            raise SpecError(f"option schedule must be one of {', '.join(SCHEDULES)}, got "
                            f"{text!r}", "options")
    elif key in ("decay_steps", "blocks"):
        _int_option(key, text, 0)
    elif key == "heads":
        _int_option(key, text, 1)
    elif key == "end_lr_ratio":
        _float_option(key, text, 0.0)
    elif key == "dropout":
        _float_option(key, text, 0.0, 1.0)
    elif key == "augment" and text not in ("0", "1"):
        raise SpecError(f"option augment must be 0 or 1, got {text!r}", "options")


def check_options(config: WorkloadConfig) -> None:
    """Refuse options a workload does not have and values faultlab cannot read: one line
    (SpecError, field "options") naming the key. A built-in takes the schedule's options and
    its own (BUILTIN_OPTIONS); a user workload takes the schedule's (checked) and any other key,
    which its function reads with `config.option(key)`."""
    import difflib
    opts = dict(config.options)
    builtin = BUILTIN_OPTIONS.get(config.workload)
    known = dict(SCHEDULE_OPTIONS, **(builtin or {}))
    for key, text in config.options:
        if not key or any(c in key for c in "=;") or ";" in text:
            raise SpecError(f"option {key!r}={text!r}: keys cannot be empty or hold '=' or "
                            f"';', values cannot hold ';'", "options")
        if key not in known:
            if builtin is None:
                continue                  # the user's own option: their function reads it
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise SpecError(f"workload {config.workload} has no option {key!r} ({hint}options: "
                            f"{', '.join(known)})", "options")
        _check_value(key, text)
    if opts.get("schedule") == "constant":
        for key in ("decay_steps", "end_lr_ratio"):
            if key in opts:
                raise SpecError(f"option {key} applies to schedule linear, not constant",
                                "options")


def parse_options(text: str, what: str = "options") -> tuple[tuple[str, str], ...]:
    """`key=value;key=value` (the columnar `options` cell) as WorkloadConfig.options; keys are
    checked by check_options once the workload is known."""
    out: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise SpecError(f"{what} must be key=value pairs separated by ';', got {part!r}",
                            what)
        if key in out:
            raise SpecError(f"{what}: option {key!r} is given twice", what)
        out[key] = value
    return tuple(sorted(out.items()))


def format_options(options: tuple[tuple[str, str], ...]) -> str:
    """The `options` cell that parse_options reads back to `options`."""
    return ";".join(f"{k}={v}" for k, v in options)


def lr_schedule(config: WorkloadConfig):
    """The learning rate as a function of the step. Option `schedule`: `linear` (the default)
    is polynomial (power 1) decay from lr to lr * end_lr_ratio over decay_steps (default: the
    whole run), as in the artifact; `constant` keeps lr. Bad options: one-line SpecError."""
    check_options(config)
    lr0 = config.lr
    if config.option("schedule", "linear") == "constant":
        return lambda step: lr0
    decay = int(config.option("decay_steps", "0")) or config.total_steps
    ratio = float(config.option("end_lr_ratio", "0.1"))

    def lr_at(step: int) -> float:
        return (lr0 - lr0 * ratio) * (1 - min(step, decay) / decay) + lr0 * ratio
    return lr_at


def default_config(name: str, **overrides) -> WorkloadConfig:
    """The configuration of workload `name` with the given settings changed. With processes
    > 1 and no replicas given, replicas = processes (one data-parallel replica per rank)."""
    if name in BUILTINS:
        base = dict(BUILTINS[name].defaults)
    elif is_user_workload(name):
        base = {}
    else:
        from faultlab.workloads.allow import installed_workloads
        names = sorted(installed_workloads())
        installed = f"; installed: {', '.join(names)}" if names else ""
        raise SpecError(f"unknown workload {name!r} (built-ins: {', '.join(sorted(BUILTINS))}"
                        f"{installed}; or module:function for your own)")
    base.update({k: v for k, v in overrides.items() if v is not None})
    procs = base.get("processes", 1)
    if isinstance(procs, int) and procs > 1 and overrides.get("replicas") is None:
        base["replicas"] = procs               # one data-parallel replica per rank
    return WorkloadConfig(workload=name, **base)
