"""Reading the ISCA'23 artifact's golden checkpoints into faultlab's Keras ResNet-18 (the
TensorFlow half of `faultlab import-isca`; the framework-free half, which records the golden
run, is faultlab/runner/isca_import.py; docs/isca_import.md).

The artifact (YLab-UChicago/ISCA_AE, fault_injection/) saves its subclassed Keras 2 model
(models/resnet.py, models/residual_block.py) per epoch as ``ISCA_AE_CKPT/epoch_{K}`` with
``model.save_weights`` in TensorFlow's format: an object-based checkpoint (``epoch_K.index`` +
``epoch_K.data-*``) whose keys are the Python attribute paths of the variables, e.g.
``layer2/basics/0/downsample_conv/kernel/.ATTRIBUTES/VARIABLE_VALUE``, and, since
``model.optimizer`` is an attribute of the model, the Keras 2 Adam's slots
(``<variable>/.OPTIMIZER_SLOT/optimizer/m|v/...``) and ``optimizer/iter``.

Checkpoints are read with ``tf.train.load_checkpoint`` (a CheckpointReader): variables by name,
nothing executed, nothing unpickled. Every variable of faultlab's model must be found with its
shape and a float dtype, or the import stops with a one-line FaultlabError naming it and the file.

The artifact's InjectConv2D adds a bias (``<conv>/bias_layer/bias``, a BiasLayer) that
faultlab's bias-free convolutions do not have. Each of those convolutions feeds a BatchNorm, so
the bias is folded into that BatchNorm's moving mean (moving_mean - bias): in training the batch
mean removes it anyway, in inference (x + b - mm) == (x - (mm - b)). Its Adam slots are dropped.
The artifact's augmentation RNG states (tf.random.Generator in MyRandomFlip / MyRandomCrop) have
no counterpart: faultlab's augmentation is a function of (seed, step).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faultlab.backends.tf.runtime import tf
from faultlab.errors import FaultlabError

VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"
SLOT = "/.OPTIMIZER_SLOT/optimizer/{}" + VALUE
ITER = "optimizer/iter" + VALUE

#: faultlab's BasicBlock layer suffix -> the artifact's BasicBlock attribute
_BLOCK_PARTS = {"conv1": "conv1", "conv2": "conv2", "bn1": "bn1", "bn2": "bn2",
                "downsample": "downsample_conv", "downsample_bn": "bn3"}
#: a convolution (artifact path) -> the BatchNorm (artifact path) its output goes through
_BN_AFTER = {"conv1": "bn1", "conv2": "bn2", "downsample_conv": "bn3"}
_BLOCK = re.compile(r"^basicblock_(\d+)_basic_(\d+)_(conv1|conv2|bn1|bn2|downsample|downsample_bn)"
                    r"/(\w+)$")


def artifact_path(path: str) -> str:
    """The artifact's object path (no prefix, no `/.ATTRIBUTES/VARIABLE_VALUE`) of faultlab's
    ResNet-18 variable `path` (Keras 3's `layer/variable`)."""
    m = _BLOCK.match(path)
    if m:
        stage, block, part, var = m.groups()
        return f"layer{stage}/basics/{block}/{_BLOCK_PARTS[part]}/{var}"
    layer, _, var = path.partition("/")
    if layer == "dense":
        return f"fc/{var}"
    if layer in ("conv1", "bn1"):
        return path
    raise FaultlabError(f"faultlab's variable {path!r} has no counterpart in the ISCA artifact's "
                        f"ResNet-18")


def mapping_table(model) -> list[tuple[str, str, tuple[int, ...]]]:
    """(faultlab path, artifact path, shape) of every variable of faultlab's model."""
    return [(v.path, artifact_path(v.path), tuple(int(d) for d in v.shape)) for v in model.weights]


@dataclass
class Imported:
    """What one artifact checkpoint gives faultlab's model and optimizer."""

    file: str
    weights: dict[str, np.ndarray]                        # faultlab path -> value
    moments: dict[str, tuple[np.ndarray, np.ndarray]]     # faultlab path -> (m, v); {} = none
    iterations: int | None                                # the artifact's optimizer/iter
    table: list[tuple[str, str, tuple[int, ...]]]
    folded: dict[str, float] = field(default_factory=dict)  # BN path -> max |conv bias| folded
    ignored: list[str] = field(default_factory=list)      # artifact keys not used


def _prefix(keys, file: str) -> str:
    """The path prefix of the model's variables: '' for model.save_weights, 'model/' for a
    tf.train.Checkpoint(model=...)."""
    tail = "conv1/kernel" + VALUE
    found = sorted((k[:-len(tail)] for k in keys if k.endswith(tail) and "basics/" not in k
                    and ".OPTIMIZER_SLOT" not in k), key=len)
    if not found:
        raise FaultlabError(f"{file}: not a checkpoint of the ISCA artifact's ResNet-18 (no "
                            f"variable conv1/kernel{VALUE})")
    return found[0]


def read(prefix: str | Path, model) -> Imported:
    """Read the artifact checkpoint `prefix` (e.g. DIR/epoch_29) for faultlab's `model`; every
    variable matched by name with its shape, else a one-line FaultlabError naming it."""
    file = str(prefix)
    try:
        reader = tf.train.load_checkpoint(file)
        shapes = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
    except Exception as e:  # noqa: BLE001 - TF raises several types for an unreadable bundle
        msg = " ".join(str(e).split())[:200]
        raise FaultlabError(f"{file}: not a readable TensorFlow checkpoint ({msg})") from None
    pre = _prefix(shapes, file)
    table = mapping_table(model)
    used: set[str] = set()

    def get(key: str, shape: tuple, what: str) -> np.ndarray:
        if key not in shapes:
            raise FaultlabError(f"{file}: the checkpoint has no variable {key} ({what})")
        got = tuple(int(d) for d in shapes[key])
        if got != tuple(shape):
            raise FaultlabError(f"{file}: variable {key} has shape {got}, {what} needs "
                                f"{tuple(shape)}")
        if not dtypes[key].is_floating:
            raise FaultlabError(f"{file}: variable {key} is {dtypes[key].name}, {what} needs "
                                f"float32")
        used.add(key)
        return np.asarray(reader.get_tensor(key), dtype=np.float32)

    weights = {}
    for path, art, shape in table:
        weights[path] = get(pre + art + VALUE, shape, f"faultlab's {path}")
    # the artifact's conv biases, folded into the BatchNorm after each conv
    folded = {}
    bn_of = {art.rsplit("/", 1)[0]: path.rsplit("/", 1)[0] for path, art, _ in table}
    for path, art, shape in table:
        conv = art.rsplit("/", 1)[0]
        if not art.endswith("/kernel") or conv == "fc":
            continue
        key = pre + conv + "/bias_layer/bias" + VALUE
        if key not in shapes:
            continue
        bias = get(key, (shape[-1],), f"the bias of {path}")
        parent, _, leaf = conv.rpartition("/")
        bn_art = (parent + "/" if parent else "") + _BN_AFTER[leaf]
        bn = bn_of.get(bn_art)
        if bn is None:
            raise FaultlabError(f"{file}: no BatchNorm after {conv} to fold its bias into")
        weights[bn + "/moving_mean"] = weights[bn + "/moving_mean"] - bias
        folded[bn] = float(np.max(np.abs(bias))) if bias.size else 0.0
    # the Adam slots: all of them or none (then a fresh Adam, as the artifact's load_weights
    # of a checkpoint without an optimizer gives)
    trainable = [(p, a, s) for p, a, s in table
                 if not p.endswith(("/moving_mean", "/moving_variance"))]
    present = [pre + a + SLOT.format("m") in shapes for _, a, _ in trainable]
    moments = {}
    if any(present):
        for path, art, shape in trainable:
            moments[path] = (get(pre + art + SLOT.format("m"), shape, f"the Adam m of {path}"),
                             get(pre + art + SLOT.format("v"), shape, f"the Adam v of {path}"))
    iterations = None
    for key in (pre + ITER, ITER):
        if key in shapes:
            used.add(key)
            iterations = int(reader.get_tensor(key))
            break
    ignored = sorted(k for k in shapes if k not in used and k != "_CHECKPOINTABLE_OBJECT_GRAPH")
    return Imported(file, weights, moments, iterations, table, folded, ignored)


def model_for(config):
    """faultlab's bare Keras model of `config` (no strategy, no optimizer): its variable names
    and shapes, to check a checkpoint before the trainer is built."""
    from faultlab.backends.tf.trainer import build_workload
    return build_workload(config, with_data=False).build()


def check(prefix: str | Path, config) -> Imported:
    """Read and check `prefix` against `config`'s model without building a trainer."""
    return read(prefix, model_for(config))


def load_into(trainer, imported: Imported, iterations: int) -> dict[str, str]:
    """Assign `imported` to every replica's copy of the trainer's model and optimizer (through
    get_state / set_state, one traced assign); the optimizer's step counter becomes
    `iterations`. Returns {faultlab path: state key} of what was assigned."""
    state = trainer.get_state()
    state = {k: v for k, v in state.items() if not k.startswith("replica")}
    keys = {id(v): k for k, v in trainer._state_vars()}
    assigned = {}
    weights = {v.path: v for v in trainer.model.weights}
    missing = sorted(set(weights) ^ set(imported.weights))
    if missing:
        raise FaultlabError(f"{imported.file}: faultlab's model and the checked one differ "
                            f"({missing[0]})")
    for path, var in weights.items():
        key = keys[id(var)]
        value = imported.weights[path]
        state[key] = value.astype(state[key].dtype, copy=False).reshape(state[key].shape)
        assigned[path] = key
    opt = trainer.optimizer
    for var in trainer.model.trainable_variables:
        i = opt._get_variable_index(var)
        m, v = opt._momentums[i], opt._velocities[i]
        if imported.moments:
            mm, vv = imported.moments[var.path]
        else:
            mm, vv = np.zeros(m.shape, np.float32), np.zeros(v.shape, np.float32)
        state[keys[id(m)]], state[keys[id(v)]] = mm, vv
    it_key = keys[id(opt.iterations)]
    state[it_key] = np.asarray(iterations, dtype=state[it_key].dtype)
    trainer.set_state(state)
    return assigned
