"""`faultlab import-isca`: the ISCA'23 artifact's golden checkpoints as faultlab's golden run.

The artifact's checkpoints are written here, not downloaded: tf.Module objects laid out as the
artifact's subclassed Keras 2 ResNet-18 (models/resnet.py, models/residual_block.py: attributes
conv1, bn1, layer1..4 with a `basics` list of BasicBlocks holding conv1 / bn1 / conv2 / bn2 /
downsample_conv / bn3, each InjectConv2D with a BiasLayer `bias_layer`, fc, and the
augmentation's RNG state) and written with TensorFlow's object-based checkpoint
(tf.train.Checkpoint, what Keras 2's save_weights writes in TF format): the same keys,
`layer2/basics/0/downsample_conv/kernel/.ATTRIBUTES/VARIABLE_VALUE`. Keras 2 Adam's slots
(`.OPTIMIZER_SLOT/optimizer/m`) cannot be made by a tf.Module, so that test writes the bundle with
the SaveV2 op under the same keys.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from faultlab.backends.tf.runtime import tf
from faultlab.cli import main
from faultlab.errors import FaultlabError
from faultlab.backends.tf import isca_import as tfimp
from faultlab.runner import golden as goldenmod
from faultlab.runner.isca_import import (available_epochs, checkpoint_steps, import_isca,
                                         isca_config)

pytestmark = pytest.mark.framework("tf")

REPO = Path(__file__).resolve().parents[2]
SHARED = next((p for p in (REPO / "shared", REPO.parent / "shared") if p.is_dir()), None)
INJECTIONS = SHARED / "reference" / "isca_ae" / "injections" if SHARED else None
VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"


# --- the artifact's checkpoint, written here -----------------------------------------------------

class _Obj(tf.Module):
    pass


def _rand(rng, shape, scale=0.05):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def artifact_arrays(seed=0, bias_scale=0.0) -> dict[str, np.ndarray]:
    """{artifact object path: value} of the artifact's ResNet-18 (CIFAR-10, width 64), written
    from the artifact's own structure (not from faultlab's mapping)."""
    rng = np.random.default_rng(seed)
    out = {}

    def conv(path, k, cin, cout):
        out[f"{path}/kernel"] = _rand(rng, (k, k, cin, cout))
        out[f"{path}/bias_layer/bias"] = _rand(rng, (cout,), bias_scale)

    def bn(path, c):
        out[f"{path}/gamma"] = 1 + _rand(rng, (c,))
        out[f"{path}/beta"] = _rand(rng, (c,))
        out[f"{path}/moving_mean"] = _rand(rng, (c,))
        out[f"{path}/moving_variance"] = 1 + np.abs(_rand(rng, (c,)))

    conv("conv1", 7, 3, 64)
    bn("bn1", 64)
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512), 1):
        for b in range(2):
            p = f"layer{stage}/basics/{b}"
            conv(f"{p}/conv1", 3, cin, cout)
            bn(f"{p}/bn1", cout)
            conv(f"{p}/conv2", 3, cout, cout)
            bn(f"{p}/bn2", cout)
            if stage > 1 and b == 0:
                conv(f"{p}/downsample_conv", 1, cin, cout)
                bn(f"{p}/bn3", cout)
            cin = cout
    out["fc/kernel"] = _rand(rng, (512, 10))
    out["fc/bias"] = _rand(rng, (10,))
    return out


def write_module_checkpoint(prefix: Path, arrays: dict[str, np.ndarray]) -> None:
    """Nested tf.Modules whose attribute paths are the keys (a `basics` list for the blocks),
    written with tf.train.Checkpoint, plus the augmentation's Generator state."""
    root: dict = {}
    for path, value in arrays.items():
        *parents, leaf = path.split("/")
        node = root
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value

    def build(node):
        if all(k.isdigit() for k in node):
            return [build(node[k]) for k in sorted(node, key=int)]
        obj = _Obj()
        for k, v in node.items():
            setattr(obj, k, tf.Variable(v) if isinstance(v, np.ndarray) else build(v))
        return obj
    kids = {k: build(v) if isinstance(v, dict) else tf.Variable(v) for k, v in root.items()}
    aug = _Obj()
    aug.rng = tf.random.Generator.from_seed(123)        # MyRandomFlip's state: ignored
    tf.train.Checkpoint(data_augmentation=aug, **kids).write(str(prefix))


def write_raw_checkpoint(prefix: Path, tensors: dict[str, np.ndarray]) -> None:
    """A TF checkpoint bundle with exactly these keys (the SaveV2 op Checkpoint uses)."""
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tensors[n]) for n in names])


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """A tiny CIFAR-10 binary release (random pixels, labels 0..9) and a private cache."""
    root = tmp_path / "data" / "cifar-10-batches-bin"
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in [(f"data_batch_{i}.bin", 512) for i in range(1, 6)] + [("test_batch.bin", 256)]:
        rows = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
        rows[:, 0] = np.arange(n) % 10
        rows.tofile(root / name)
    monkeypatch.setenv("FAULTLAB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FAULTLAB_CACHE", str(tmp_path / "cache"))
    from faultlab.workloads import data
    data._cifar10.cache_clear()
    yield tmp_path
    data._cifar10.cache_clear()


@pytest.fixture
def ckpt_dir(tmp_path):
    d = tmp_path / "ISCA_AE_CKPT"
    d.mkdir()
    return d


CONFIG = isca_config("tf")


def _faultlab_to_artifact(arrays):
    """The values faultlab's model must hold: the written ones, moving means minus the bias of
    the conv before them."""
    want = dict(arrays)
    after = {"conv1": "bn1", "conv2": "bn2", "downsample_conv": "bn3"}
    for key, b in arrays.items():
        if key.endswith("/bias_layer/bias"):
            conv = key[: -len("/bias_layer/bias")]
            parent, _, leaf = conv.rpartition("/")
            bn = (parent + "/" if parent else "") + after[leaf]
            want[f"{bn}/moving_mean"] = arrays[f"{bn}/moving_mean"] - b
    return want


# --- the mapping: fast (a bare Keras model, no trainer) ------------------------------------------

def test_every_variable_is_matched_bit_for_bit(ckpt_dir):
    arrays = artifact_arrays()
    write_module_checkpoint(ckpt_dir / "epoch_29", arrays)
    assert available_epochs(ckpt_dir) == [29]
    got = tfimp.check(ckpt_dir / "epoch_29", CONFIG)
    assert len(got.weights) == 102 == len(got.table)
    assert got.moments == {} and got.iterations is None
    assert len(got.folded) == 20                           # every conv's bias, zero here
    for path, art, shape in got.table:
        assert got.weights[path].shape == shape
        assert got.weights[path].tobytes() == arrays[art].tobytes(), path
    assert got.ignored and all("data_augmentation" in k for k in got.ignored)


def test_conv_biases_fold_into_the_batchnorm_moving_mean(ckpt_dir):
    arrays = artifact_arrays(seed=3, bias_scale=0.2)
    write_module_checkpoint(ckpt_dir / "epoch_0", arrays)
    got = tfimp.check(ckpt_dir / "epoch_0", CONFIG)
    want = _faultlab_to_artifact(arrays)
    for path, art, _ in got.table:
        assert got.weights[path].tobytes() == want[art].tobytes(), path
    assert got.weights["basicblock_3_basic_0_downsample_bn/moving_mean"].tobytes() == (
        arrays["layer3/basics/0/bn3/moving_mean"]
        - arrays["layer3/basics/0/downsample_conv/bias_layer/bias"]).tobytes()
    assert max(got.folded.values()) > 0


@pytest.mark.parametrize("damage, words", [
    ("missing", ["has no variable", "layer3/basics/1/bn2/gamma", "basicblock_3_basic_1_bn2/gamma"]),
    ("shape", ["layer4/basics/0/conv2/kernel", "shape (3, 3, 512, 256)", "(3, 3, 512, 512)"]),
])
def test_a_missing_or_misshaped_variable_is_refused_in_one_line(ckpt_dir, capsys, damage, words):
    arrays = artifact_arrays()
    if damage == "missing":
        del arrays["layer3/basics/1/bn2/gamma"]
    else:
        arrays["layer4/basics/0/conv2/kernel"] = np.zeros((3, 3, 512, 256), np.float32)
    write_module_checkpoint(ckpt_dir / "epoch_6", arrays)
    with pytest.raises(FaultlabError) as e:
        tfimp.check(ckpt_dir / "epoch_6", CONFIG)
    msg = str(e.value)
    assert "\n" not in msg and str(ckpt_dir / "epoch_6") in msg
    assert all(w in msg for w in words), msg
    t0 = time.perf_counter()
    assert main(["import-isca", str(ckpt_dir), "--epoch", "7", "--threads", "1", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("faultlab: error: "), err
    assert all(w in err for w in words), err
    assert time.perf_counter() - t0 < 120            # refused before any trainer is built


def test_folder_and_epoch_errors_are_one_line(ckpt_dir, capsys):
    assert main(["import-isca", str(ckpt_dir / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["import-isca", str(ckpt_dir)]) == 2
    assert "no artifact checkpoint" in capsys.readouterr().err
    write_module_checkpoint(ckpt_dir / "epoch_6", artifact_arrays())
    assert main(["import-isca", str(ckpt_dir), "--epoch", "30", "--json"]) == 2
    err = capsys.readouterr().err
    assert "epoch_29" in err and "epoch_6" in err and err.count("\n") == 1
    assert main(["import-isca", str(ckpt_dir), "--framework", "torch"]) == 2
    assert "--framework tf" in capsys.readouterr().err


def test_adam_slots_all_or_none(ckpt_dir):
    arrays = artifact_arrays()
    tensors = {k + VALUE: v for k, v in arrays.items()}
    rng = np.random.default_rng(5)
    trainable = [k for k in arrays if not k.endswith(("moving_mean", "moving_variance"))]
    for k in trainable:
        tensors[f"{k}/.OPTIMIZER_SLOT/optimizer/m{VALUE}"] = _rand(rng, arrays[k].shape)
        tensors[f"{k}/.OPTIMIZER_SLOT/optimizer/v{VALUE}"] = np.abs(_rand(rng, arrays[k].shape))
    tensors[f"optimizer/iter{VALUE}"] = np.int64(1421)
    write_raw_checkpoint(ckpt_dir / "epoch_28", tensors)
    got = tfimp.check(ckpt_dir / "epoch_28", CONFIG)
    assert got.iterations == 1421 and len(got.moments) == 62
    m, v = got.moments["basicblock_2_basic_0_downsample/kernel"]
    k = "layer2/basics/0/downsample_conv/kernel/.OPTIMIZER_SLOT/optimizer/"
    assert m.tobytes() == tensors[k + "m" + VALUE].tobytes()
    assert v.tobytes() == tensors[k + "v" + VALUE].tobytes()
    del tensors[f"fc/bias/.OPTIMIZER_SLOT/optimizer/v{VALUE}"]
    write_raw_checkpoint(ckpt_dir / "epoch_27", tensors)
    with pytest.raises(FaultlabError, match=r"no variable fc/bias/\.OPTIMIZER_SLOT/optimizer/v"):
        tfimp.check(ckpt_dir / "epoch_27", CONFIG)


def test_checkpoint_steps():
    assert checkpoint_steps(CONFIG, 1470, 1472) == [1470, 1472]
    assert checkpoint_steps(CONFIG, 343, 450) == [343, 392, 441, 450]
    assert checkpoint_steps(CONFIG, 3871, 3920) == [3871, 3920]


# --- the import at full size: builds the 8 x 128 trainer -----------------------------------------

def test_cli_import_puts_the_artifact_weights_in_the_golden_checkpoint(ckpt_dir, fake_cifar,
                                                                      capsys):
    """--steps 0: the imported state alone, as the golden checkpoint at step 30 * 49."""
    import json
    arrays = artifact_arrays(seed=7, bias_scale=0.01)
    write_module_checkpoint(ckpt_dir / "epoch_29", arrays)
    t0 = time.perf_counter()
    assert main(["import-isca", str(ckpt_dir), "--epoch", "30", "--steps", "0", "--threads", "2",
                 "--json"]) == 0
    print(f"\nimport at full size, 0 steps: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    doc = json.loads(capsys.readouterr().out)
    assert (doc["origin_step"], doc["end_step"], doc["optimizer"], doc["iterations"],
            doc["variables"]) == (1470, 1470, "fresh", 0, 102)
    assert doc["workload_key"] == CONFIG.key() and len(doc["conv_bias_folded"]) == 20
    gold = goldenmod.load(CONFIG, Path(doc["golden_dir"]))
    assert Path(doc["golden_dir"]) == goldenmod.golden_dir(CONFIG, 2)
    assert gold is not None and gold.checkpoints == [1470] and gold.loss == [None] * 1470
    _check_state(gold.state(1470), arrays)
    if INJECTIONS is None:
        return
    # a trial past the recorded steps (inj_masked runs to the end of training) is refused in
    # one line before any trial runs, naming the file; the results file is not created
    db = ckpt_dir.parent / "r.sqlite"
    assert main(["run", str(INJECTIONS / "inj_masked.csv"), "--framework", "tf",
                 "--threads", "2", "--results", str(db), "--horizon", "0"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and "inj_masked.csv" in err[0], err
    assert "runs to step 1519" in err[0] and "holds steps up to 1470 only" in err[0], err
    assert "--steps" in err[0] and "--horizon" in err[0]


def _check_state(state, arrays):
    """The golden checkpoint holds the artifact's values bit for bit (moving means minus the
    folded bias), the same on every replica, with a fresh Adam."""
    want = _faultlab_to_artifact(arrays)
    model_keys = sorted(k for k in state if k.startswith("model/"))
    assert len(model_keys) == 102
    names = tfimp.mapping_table(tfimp.model_for(CONFIG))
    for key, (path, art, _) in zip(model_keys, names):
        assert key.endswith("/" + path.rsplit("/", 1)[1])
        assert state[key].tobytes() == want[art].tobytes(), (key, art)
    opt = {k: v for k, v in state.items() if k.startswith("optim/")}
    assert any(v.ndim == 0 and v.dtype.kind == "i" and v == 0 for v in opt.values())
    assert all(not np.any(v) for v in opt.values() if v.ndim > 0)       # a fresh Adam
    assert not any(k.startswith("replica") for k in state)              # every replica alike
    return model_keys


def test_imported_adam_state_reaches_every_slot(ckpt_dir, fake_cifar):
    """Slots and iter land in the optimizer's state (a smaller batch: the variables are the
    same, the trainer is quicker to build)."""
    arrays = artifact_arrays(seed=2)
    tensors = {k + VALUE: v for k, v in arrays.items()}
    rng = np.random.default_rng(9)
    slots = []
    for k in arrays:
        if not k.endswith(("moving_mean", "moving_variance", "/bias_layer/bias")):
            for s in "mv":
                a = _rand(rng, arrays[k].shape)
                tensors[f"{k}/.OPTIMIZER_SLOT/optimizer/{s}{VALUE}"] = a
                slots.append(a.tobytes())
    tensors[f"optimizer/iter{VALUE}"] = np.int64(1421)
    write_raw_checkpoint(ckpt_dir / "epoch_28", tensors)
    small = dataclasses.replace(CONFIG, replicas=2, per_replica_batch=4, eval_samples=64)
    rep = import_isca(ckpt_dir, epoch=29, steps=0, threads=2, config=small)
    assert (rep.origin, rep.optimizer, rep.iterations) == (29 * 49, "imported", 1421)
    state = goldenmod.load(small, rep.directory).state(29 * 49)
    opt = [v for k, v in state.items() if k.startswith("optim/")]
    assert sorted(v.tobytes() for v in opt if v.ndim > 0) == sorted(slots)
    assert any(v.ndim == 0 and v.dtype.kind == "i" and v == 1421 for v in opt)


STEPS = 2


@pytest.mark.slow
def test_import_records_the_golden_run_from_the_artifact_weights(ckpt_dir, fake_cifar):
    arrays = artifact_arrays(seed=7, bias_scale=0.01)
    write_module_checkpoint(ckpt_dir / "epoch_29", arrays)
    t0 = time.perf_counter()
    rep = import_isca(ckpt_dir, epoch=30, steps=STEPS, threads=2)
    print(f"\nimport at full size, {STEPS} steps: {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    assert (rep.origin, rep.end, rep.optimizer, rep.iterations) == (1470, 1470 + STEPS, "fresh", 0)
    gold = goldenmod.load(CONFIG, rep.directory)
    assert rep.directory == goldenmod.golden_dir(CONFIG, 2)
    assert gold is not None and gold.checkpoints == [1470, 1470 + STEPS]
    assert gold.loss[:1470] == [None] * 1470 and len(gold.loss) == 1470 + STEPS
    assert all(np.isfinite(gold.loss[1470:])) and len(gold.signals) == STEPS
    keys = _check_state(gold.state(1470), arrays)
    assert not np.array_equal(gold.state(1470 + STEPS)[keys[0]], gold.state(1470)[keys[0]])


# --- the artifact's three injection files, from imported weights ---------------------------------

@pytest.mark.skipif(INJECTIONS is None, reason="shared/reference/isca_ae/injections not found")
def test_inj_masked_runs_from_imported_weights_at_a_small_batch(ckpt_dir, fake_cifar):
    """CI's size: inj_masked (read unmodified; a weight fault, so its position does not depend
    on the batch) on 4 replicas x 2 instead of 8 x 128, at full width, from the artifact's
    checkpoint of epoch 30: one epoch recorded (--steps 49), the trial with --horizon 0 (to
    that epoch's end), replayed from the imported state. A trial to the end of training is
    refused in one line (the golden run stops at step 1519). The other two files fault
    activations at batch index 107 and 124, so they need the full per-replica batch of 128:
    test_the_artifact_injection_files_run_from_imported_weights runs all three (slow)."""
    from faultlab.campaigns import load_campaign
    from faultlab.runner.session import Session
    camp = load_campaign(str(INJECTIONS / "inj_masked.csv"), "tf").with_horizon(0)
    (trial,) = camp.trials
    small = dataclasses.replace(CONFIG, replicas=4, per_replica_batch=2, eval_samples=64)
    trial = dataclasses.replace(trial, workload=small)
    write_module_checkpoint(ckpt_dir / "epoch_29", artifact_arrays(seed=30))
    rep = import_isca(ckpt_dir, epoch=30, steps=49, threads=2, config=small)
    assert (rep.origin, rep.end) == (1470, 1519)
    session = Session(threads=2)
    with pytest.raises(FaultlabError, match=r"runs to step 3920 .* holds steps up to 1519 only"):
        session.run_trial(dataclasses.replace(trial, horizon=None), "isca-import")
    result = session.run_trial(trial, "isca-import")
    assert result.metrics["start"] == 1470 and result.inject_step == 1470 + 32
    assert result.steps_run == 1519 - 1470 and result.error is None
    assert result.final_test_acc is not None and result.golden_test_acc is not None
    assert result.outcome not in {"Crash", "Hang"}


@pytest.mark.slow
@pytest.mark.skipif(INJECTIONS is None, reason="shared/reference/isca_ae/injections not found")
@pytest.mark.parametrize("name, outcomes", [
    ("inj_immediate_infs_nans", {"ImmediateINFsNaNs"}),
    ("inj_masked", None),
    ("inj_slow_degrade", None),
])
def test_the_artifact_injection_files_run_from_imported_weights(ckpt_dir, fake_cifar, name,
                                                                outcomes):
    """Each file (read unmodified) runs from the artifact's checkpoint of its target epoch:
    imported with the steps to the end of that epoch, the trial with a horizon of 0 (so it ends
    at that epoch's end, where the golden run is evaluated). Full size: 8 x 128 per step."""
    from faultlab.campaigns import load_campaign
    from faultlab.runner.session import Session
    camp = load_campaign(str(INJECTIONS / f"{name}.csv"), "tf")
    (trial,) = camp.trials
    assert trial.workload == CONFIG
    epoch = trial.inject_step // CONFIG.steps_per_epoch
    write_module_checkpoint(ckpt_dir / f"epoch_{epoch - 1}", artifact_arrays(seed=epoch))
    t0 = time.perf_counter()
    rep = import_isca(ckpt_dir, epoch=epoch, steps=CONFIG.steps_per_epoch, threads=2)
    t1 = time.perf_counter()
    session = Session(threads=2)
    result = session.run_trial(dataclasses.replace(trial, horizon=0), "isca-import")
    t2 = time.perf_counter()
    print(f"\n{name}: import + {CONFIG.steps_per_epoch} golden steps {t1 - t0:.0f} s, "
          f"trial {t2 - t1:.0f} s: {result.outcome}")
    assert result.metrics["start"] == rep.origin == epoch * CONFIG.steps_per_epoch
    assert result.inject_step == trial.inject_step
    if outcomes is not None:
        assert result.outcome in outcomes
