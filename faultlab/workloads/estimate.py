"""The memory a built-in workload needs, from its configuration alone (framework-free), and the
check that refuses sizes this machine cannot hold (docs/workloads.md, "Sizes").

The parameter count is exact: it follows the models of ``backends/torch/models.py`` and
``backends/tf/models.py`` (the same layers in both) and equals the built model's trainable
parameter count. The rest is an estimate of the same order as what a run holds:

* parameters: 4 bytes each, one copy on torch (replicas are emulated one after another in one
  process), one copy per replica on TensorFlow (MirroredStrategy);
* training state: gradients, Adam's two moments, the normalisation statistics, and the copy of
  all of it that a checkpoint takes (``get_state``);
* activations: every layer's outputs and intermediates for one replica's batch, twice (kept
  for the backward pass, and their gradients); TensorFlow runs its replicas at once, so times
  the replicas; evaluation (batches of 256, no backward) when that is larger;
* data: the dataset's arrays as the pipeline holds them and a global batch.

A multi-process configuration (``processes`` > 1, torch.distributed: one replica per rank) needs
what one rank needs (the configuration with one replica and one process) times ``processes``;
the largest tensor is one rank's. No more ranks are started than ``max_processes()``: 64, or 8
per CPU core when that is fewer.

Two limits apply: the estimate must fit the machine's memory (physical memory, or a cgroup's
limit when lower; ``FAULTLAB_MEMORY_LIMIT`` in bytes overrides both), and no single tensor may
hold more than 2**31-1 elements (32-bit indexing in TensorFlow's kernels and torch's CUDA
kernels, and the largest size a campaign cell can hold). User workloads (``module:function``)
have no estimate and are not checked. A refusal is a SpecError whose ``field`` is the
configuration setting responsible: of width, input_size, per_replica_batch and replicas, the
one whose reduction to 1 shrinks the estimate most (``processes`` rather than ``replicas`` for a
multi-process configuration).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from faultlab.errors import FaultlabError, SpecError
from faultlab.workloads.base import BUILTINS, WorkloadConfig, is_user_workload

#: the most elements one tensor may hold
MAX_TENSOR_ELEMENTS = 2**31 - 1
#: the settings a refusal can name (the campaign columns of the same names)
SIZE_COLUMNS = ("width", "input_size", "per_replica_batch", "replicas")
#: environment variable: the memory (bytes) the check compares against, instead of the machine's
MEMORY_ENV = "FAULTLAB_MEMORY_LIMIT"

_FLOAT = 4              # bytes of a float32 (parameters, activations, images)
_EVAL_BATCH = 256       # both trainers evaluate in batches of 256
_CLASSES = 10
#: samples (train + test) of each image dataset; the corpus' token count is bounded below
_SAMPLES = {"digits": 1797, "cifar10": 60000, "synthetic": 1200}
_TEST = {"digits": 359, "cifar10": 10000, "synthetic": 200}
_CORPUS_TOKENS = 6000 * 64   # sentences x the longest sentence of the grammar, in characters


@dataclass(frozen=True)
class Estimate:
    """What a configuration needs, in bytes (see the module docstring)."""

    parameters: int          # trainable parameters of one copy of the model (exact)
    param_bytes: int         # every copy of the parameters the run holds
    state_bytes: int         # gradients, optimizer state, statistics, a checkpoint's copy
    activation_bytes: int
    data_bytes: int
    largest: int             # elements of the largest single tensor
    largest_what: str        # which tensor that is

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.state_bytes + self.activation_bytes + self.data_bytes


# --- the models, layer by layer ----------------------------------------------------------------

def _options(config: WorkloadConfig) -> tuple[int, int]:
    """(blocks, heads) of a transformer, checked."""
    out = []
    for key, default, low in (("blocks", "2", 0), ("heads", "4", 1)):
        text = config.option(key, default)
        try:
            n = int(text)
        except (TypeError, ValueError):
            raise SpecError(f"transformer option {key} must be an integer, got {text!r}",
                            "options") from None
        if n < low:
            raise SpecError(f"transformer option {key} must be at least {low}, got {n}",
                            "options")
        out.append(n)
    return out[0], out[1]


def _vocab(config: WorkloadConfig) -> int:
    from faultlab.workloads.data import VOCAB
    return len(VOCAB) if config.dataset == "corpus" else _CLASSES


def _channels(config: WorkloadConfig) -> int:
    """Channels of the images the model reads (the built-ins read 3, the MLP 1)."""
    return 1 if config.workload == "mlp" else 3


def parameter_shapes(config: WorkloadConfig) -> list[tuple[str, int]]:
    """(name, elements) of every trainable parameter of a built-in workload's model."""
    w, s = config.width, config.input_size
    name = config.workload
    out: list[tuple[str, int]] = []

    def dense(layer: str, fan_in: int, fan_out: int) -> None:
        out.extend([(f"{layer} weight", fan_in * fan_out), (f"{layer} bias", fan_out)])

    def norm(layer: str, c: int) -> None:
        out.extend([(f"{layer} weight", c), (f"{layer} bias", c)])

    if name == "mlp":
        dense("dense_1", s * s, w)
        dense("dense_2", w, w)
        dense("dense_3", w, _CLASSES)
    elif name == "resnet18":
        out.append(("conv1 weight", 3 * w * 49))
        norm("bn1", w)
        cin = w
        for stage, mult in enumerate((1, 2, 4, 8), start=1):
            cout = w * mult
            for b in range(2):
                stride = 2 if stage > 1 and b == 0 else 1
                p = f"basicblock_{stage}_basic_{b}_"
                out.append((p + "conv1 weight", cin * cout * 9))
                norm(p + "bn1", cout)
                out.append((p + "conv2 weight", cout * cout * 9))
                norm(p + "bn2", cout)
                if stride != 1 or cin != cout:
                    out.append((p + "downsample weight", cin * cout))
                    norm(p + "downsample_bn", cout)
                cin = cout
        dense("dense", 8 * w, _CLASSES)
    elif name == "transformer":
        blocks, _ = _options(config)
        v = _vocab(config)
        out.extend([("embed weight", v * w), ("pos", s * w)])
        for i in range(blocks):
            p = f"block_{i}_"
            norm(p + "ln1", w)
            dense(p + "attn_qkv", w, 3 * w)
            dense(p + "attn_out", w, w)
            norm(p + "ln2", w)
            dense(p + "mlp_fc1", w, 4 * w)
            dense(p + "mlp_fc2", 4 * w, w)
        norm("ln_f", w)
        dense("lm_head", w, v)
    else:
        raise SpecError(f"no size estimate for workload {name!r}")
    return out


def parameter_count(config: WorkloadConfig) -> int:
    """The exact number of trainable parameters of a built-in workload's model."""
    return sum(n for _, n in parameter_shapes(config))


def _statistics(params: list[tuple[str, int]]) -> int:
    """Elements of the normalisation statistics: each BatchNorm's moving mean and variance."""
    return 2 * sum(n for name, n in params if "bn" in name and name.endswith("weight"))


def _activations(config: WorkloadConfig) -> list[tuple[str, int]]:
    """(what, elements per sample) of the outputs and intermediates of one forward pass."""
    w, s = config.width, config.input_size
    name = config.workload
    if name == "mlp":
        return [("input", s * s), ("dense_1 output", 2 * w), ("dense_2 output", 2 * w),
                ("dense_3 output", 3 * _CLASSES)]
    if name == "resnet18":
        h = -(-s // 2)
        out = [("input", 3 * s * s), ("padded input", 3 * (s + 6) ** 2),
               ("conv1 output", 4 * w * h * h)]
        cin = w
        for stage, mult in enumerate((1, 2, 4, 8), start=1):
            cout = w * mult
            for b in range(2):
                stride = 2 if stage > 1 and b == 0 else 1
                hout = -(-h // stride)
                p = f"basicblock_{stage}_basic_{b}"
                convs = 11 + (3 if stride != 1 or cin != cout else 0)
                out += [(p + " padded input", cin * (h + 2) ** 2),
                        (p + " padded hidden", cout * (hout + 2) ** 2),
                        (p + " outputs", convs * cout * hout * hout)]
                cin, h = cout, hout
        out.append(("dense output", 8 * w + 3 * _CLASSES))
        return out
    blocks, heads = _options(config)
    t, v = s, _vocab(config)
    out = [("embedding", 2 * t * w)]
    for i in range(blocks):
        out += [(f"block_{i} outputs", 24 * t * w), (f"block_{i} attention scores",
                                                       4 * heads * t * t)]
    out.append(("lm_head output", 2 * t * w + 3 * t * v))
    return out


def _largest_activation(config: WorkloadConfig) -> tuple[int, str]:
    """(elements per sample, what) of the largest single activation tensor."""
    w, s = config.width, config.input_size
    name = config.workload
    if name == "mlp":
        return max((s * s, "input"), (w, "dense_1 output"))
    if name == "resnet18":
        h = -(-s // 2)
        return max((3 * (s + 6) ** 2, "padded input"), (w * (h + 2) ** 2, "conv1 output"))
    _, heads = _options(config)
    return max((4 * s * w, "mlp_fc1 output"), (heads * s * s, "attention scores"),
               (s * _vocab(config), "lm_head output"))


def _data_bytes(config: WorkloadConfig) -> int:
    s = config.input_size
    if config.dataset == "corpus" or config.workload == "transformer":
        dataset = _CORPUS_TOKENS * 8 * 4     # ids, inputs, targets (int64), a copy
    else:
        c = _channels(config) if config.dataset == "digits" else 3
        n = _SAMPLES.get(config.dataset, _SAMPLES["cifar10"])
        if config.dataset == "cifar10":       # the file's bytes, as floats, resized
            dataset = n * 3073 + n * 32 * 32 * 3 * _FLOAT
            dataset += n * s * s * 3 * _FLOAT if s != 32 else 0
        else:                                  # the arrays, and a copy while they are made
            dataset = 2 * n * s * s * c * _FLOAT
    sample = s if config.workload == "transformer" else s * s * _channels(config)
    augment = config.workload == "resnet18" and config.option("augment", "1") == "1"
    per = 8 * 2 if config.workload == "transformer" else _FLOAT * (4 if augment else 2)
    return dataset + config.global_batch * sample * per


def estimate(config: WorkloadConfig) -> Estimate | None:
    """The memory a built-in workload's run needs (every rank's together); None for a user
    workload."""
    if is_user_workload(config.workload) or config.workload not in BUILTINS:
        return None
    if config.processes > 1:
        one = estimate(config.replace(replicas=1, processes=1, nodes=1))
        n = config.processes
        return Estimate(one.parameters, n * one.param_bytes, n * one.state_bytes,
                        n * one.activation_bytes, n * one.data_bytes, one.largest,
                        one.largest_what)
    params = parameter_shapes(config)
    p = sum(n for _, n in params)
    stats = _statistics(params)
    tf = config.framework.value == "tf"
    copies = config.replicas if tf else 1
    param_bytes = copies * p * _FLOAT
    # gradients and two Adam moments per copy, the statistics; a checkpoint's copy of the
    # parameters, moments and statistics (get_state)
    state_bytes = (copies * 3 * p + 3 * p + 2 * stats) * _FLOAT
    per_sample = sum(n for _, n in _activations(config))
    b = config.per_replica_batch
    train = b * per_sample * (config.replicas if tf else 1)
    test = _TEST.get(config.dataset, _EVAL_BATCH)
    evaluation = min(_EVAL_BATCH, config.eval_samples, test) * per_sample
    activation_bytes = max(train, evaluation) * _FLOAT
    big_param = max(params, key=lambda x: x[1])
    act, act_what = _largest_activation(config)
    batch = max(b, min(_EVAL_BATCH, config.eval_samples))
    sample = config.input_size * (1 if config.workload == "transformer"
                                  else config.input_size * _channels(config))
    largest = max((big_param[1], big_param[0]), (batch * act, act_what),
                  ((config.global_batch if tf else b) * sample, "input batch"))
    return Estimate(p, param_bytes, state_bytes, activation_bytes, _data_bytes(config),
                    largest[0], largest[1])


# --- the machine --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _machine_bytes() -> int | None:
    """Physical memory, or the cgroup's limit when it is lower; None when neither is known."""
    found = []
    try:
        found.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < 2**60:
            found.append(int(text))
    found = [n for n in found if n > 0]
    return min(found) if found else None


def machine_memory() -> tuple[int | None, str]:
    """(bytes, how to say it) of the memory a run may use: ``FAULTLAB_MEMORY_LIMIT`` when set,
    else this machine's memory (None when it cannot be told)."""
    text = os.environ.get(MEMORY_ENV, "").strip()
    if text:
        if not text.isdigit() or len(text) > 30:
            raise FaultlabError(f"{MEMORY_ENV} must be a number of bytes, got {text[:40]!r}")
        return int(text), f"{MEMORY_ENV} is"
    return _machine_bytes(), "this machine has"


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB' (binary units up to EiB)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    x, i = float(n), 0
    while x >= 1024 and i < len(units) - 1:
        x /= 1024
        i += 1
    if i == 0:
        return f"{n} B"
    return f"{x:.1f} {units[i]}" if x < 10_000 else f"{x:.3g} {units[i]}"


# --- the check ----------------------------------------------------------------------------------

#: the most ranks (processes) a configuration may have, whatever the machine
MAX_PROCESSES = 64
#: ranks per CPU core at most
PROCESSES_PER_CORE = 8


def max_processes() -> int:
    """The most training processes (ranks) one run may start on this machine: 64, or 8 per
    CPU core when that is fewer."""
    return min(MAX_PROCESSES, PROCESSES_PER_CORE * (os.cpu_count() or 1))


def check_processes(config: WorkloadConfig) -> None:
    """Refuse more ranks than this machine can run: a SpecError (``field`` processes)."""
    bound = max_processes()
    if config.processes > bound:
        raise SpecError(f"processes {config.processes} is more ranks than this machine can run:"
                        f" at most {bound} (the smaller of {MAX_PROCESSES} and "
                        f"{PROCESSES_PER_CORE} per CPU core, {os.cpu_count() or 1} cores here)",
                        "processes")


def _responsible(config: WorkloadConfig, measure) -> str:
    """The size setting whose reduction to 1 shrinks `measure(estimate)` the most."""
    best, best_col = None, SIZE_COLUMNS[0]
    multi = config.processes > 1
    for col in SIZE_COLUMNS:
        if getattr(config, col) <= 1:
            continue
        if col == "replicas" and multi:   # one replica per rank: fewer replicas, fewer ranks
            col = "processes"
            smaller = config.replace(replicas=1, processes=1, nodes=1)
        else:
            smaller = config.replace(**{col: 1})
        m = measure(estimate(smaller))
        if best is None or m < best:
            best, best_col = m, col
    return best_col


def check_fits(config: WorkloadConfig) -> Estimate | None:
    """Refuse a configuration that this machine cannot hold: more ranks than
    :func:`max_processes` (any workload), or a built-in workload's estimate over the memory: a
    SpecError (``field``: the setting responsible) naming the estimate; the estimate otherwise
    (None for a user workload, which has none)."""
    check_processes(config)
    est = estimate(config)
    if est is None:
        return None
    if config.workload == "transformer":
        heads = _options(config)[1]
        if config.width % heads:
            raise SpecError(f"transformer width {config.width} is not a multiple of its "
                            f"{heads} attention heads", "width")
    limit, machine = machine_memory()
    if limit is not None and est.total_bytes > limit:
        col = _responsible(config, lambda e: e.total_bytes)
        raise SpecError(
            f"workload {config.workload} with {col} {getattr(config, col)} needs about "
            f"{human_bytes(est.total_bytes)} (parameters {human_bytes(est.param_bytes)}, "
            f"gradients and optimizer state {human_bytes(est.state_bytes)}, activations "
            f"{human_bytes(est.activation_bytes)}, data {human_bytes(est.data_bytes)}) but "
            f"{machine} {human_bytes(limit)}", col)
    if est.largest > MAX_TENSOR_ELEMENTS:
        col = _responsible(config, lambda e: e.largest)
        raise SpecError(
            f"workload {config.workload} with {col} {getattr(config, col)} makes a tensor "
            f"({est.largest_what}) of {est.largest} elements; one tensor may hold at most "
            f"2**31-1 = {MAX_TENSOR_ELEMENTS}", col)
    return est

