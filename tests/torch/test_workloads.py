"""Built-in workloads: shapes, determinism, data pipeline, offline datasets."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from faultlab.errors import DataError
from faultlab.faults import FaultSpec, PositionSpec, Site, ValueSpec
from faultlab.workloads import data as datamod
from faultlab.workloads.base import default_config
from faultlab.backends.torch.trainer import TorchTrainer, operand_shapes

LM = default_config("transformer", replicas=2, per_replica_batch=4, width=16, input_size=16,
                    steps_per_epoch=3, epochs=2, seed=3)


def test_resnet18_full_size_shapes_match_the_artifact():
    t = operand_shapes(default_config("resnet18"))
    assert t["basicblock_2_basic_0_conv2"][Site.FWD_OUTPUT][0] == (128, 8, 8, 128)
    assert t["basicblock_4_basic_0_conv2"][Site.FWD_WEIGHT][0] == (3, 3, 512, 512)
    assert t["basicblock_4_basic_0_downsample"][Site.BWD_INPUT][0] == (128, 4, 4, 512)
    assert t["conv1"][Site.FWD_OUTPUT][0] == (128, 16, 16, 64)
    names = {f"basicblock_{b}_basic_{k}_conv{c}" for b in (1, 2, 3, 4) for k in (0, 1) for c in (1, 2)}
    names |= {f"basicblock_{b}_basic_0_downsample" for b in (2, 3, 4)} | {"conv1", "dense"}
    assert names <= set(t)


def test_transformer_trains_deterministically_and_takes_faults():
    a, b = TorchTrainer(LM), TorchTrainer(LM)
    assert [a.train_step(s) for s in range(3)] == [b.train_step(s) for s in range(3)]
    f = FaultSpec(site=Site.FWD_OUTPUT, layer="block_0_attn_qkv", value=ValueSpec("nan"),
                  positions=PositionSpec("explicit", indices=((1, 2, 5),)), replica=1, step=3)
    m = a.train_step(3, [f])
    assert not np.isfinite(m.loss)
    assert np.isfinite(b.train_step(3).loss)
    shapes = operand_shapes(LM)
    assert shapes["block_1_mlp_fc1"][Site.FWD_OUTPUT][0] == (4, 16, 64)
    assert shapes["lm_head"][Site.FWD_WEIGHT][0] == (16, len(datamod.VOCAB))


def test_cifar10_absent_is_a_one_line_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULTLAB_DATA", str(tmp_path))
    datamod._cifar10.cache_clear()
    with pytest.raises(DataError, match="CIFAR-10 not found") as e:
        datamod.load(default_config("resnet18"))
    assert "\n" not in str(e.value)


def test_cifar10_binary_release_is_read_from_a_local_directory(tmp_path, monkeypatch):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        r = rng.integers(0, 256, size=(3, 3073), dtype=np.uint8)
        r[:, 0] %= 10
        r.tofile(root / name)
        rows[name] = r
    monkeypatch.setenv("FAULTLAB_DATA", str(tmp_path))
    datamod._cifar10.cache_clear()
    d = datamod.load(default_config("resnet18"))
    datamod._cifar10.cache_clear()
    assert d.x_train.shape == (15, 32, 32, 3) and d.x_test.shape == (3, 32, 32, 3)
    first = rows["data_batch_1.bin"][0]
    assert d.y_train[0] == first[0]
    # channel-major bytes (R plane, G plane, B plane) become NHWC
    assert d.x_train[0, 0, 1, 2] == pytest.approx(first[1 + 2 * 1024 + 1] / 255.0)


def test_truncated_cifar_file_is_rejected(tmp_path, monkeypatch):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        np.zeros(3073 * 2 - 5, dtype=np.uint8).tofile(root / name)
    monkeypatch.setenv("FAULTLAB_DATA", str(tmp_path))
    datamod._cifar10.cache_clear()
    with pytest.raises(DataError, match="not a CIFAR-10 binary batch"):
        datamod.load(default_config("resnet18"))
    datamod._cifar10.cache_clear()


@settings(max_examples=30, deadline=None)
@given(step=st.integers(0, 500), seed=st.integers(0, 2**31))
def test_a_batch_is_a_pure_function_of_seed_and_step(step, seed):
    cfg = default_config("resnet18", dataset="digits", per_replica_batch=8, replicas=2,
                         input_size=16, steps_per_epoch=7, seed=seed)
    data = datamod.load(cfg)
    p1, p2 = datamod.Pipeline(cfg, data, augment=True), datamod.Pipeline(cfg, data, augment=True)
    p2.batch(step + 1)  # order of calls does not matter
    x1, y1 = p1.batch(step)
    x2, y2 = p2.batch(step)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert x1.shape == (16, 16, 16, 3)


def test_an_epoch_never_repeats_a_sample_before_the_dataset_is_exhausted():
    cfg = default_config("mlp", per_replica_batch=16, replicas=2, steps_per_epoch=20)
    data = datamod.load(cfg, channels=1)
    p = datamod.Pipeline(cfg, data)
    n = len(data.y_train)
    idx = np.concatenate([p._indices(s) for s in range(20)])
    assert len(set(idx[:n].tolist())) == min(n, len(idx))


def test_generated_corpus_is_deterministic_text():
    t = datamod.corpus_text()
    assert t == datamod.corpus_text() and set(t) <= set(datamod.VOCAB) and len(t) > 10000
