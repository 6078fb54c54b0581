"""What examples/cnn_loop.py shows, checked (run: python -m pytest -q examples/test_cnn_loop.py):
the injector with nothing armed and the checkpointer leave training bit-identical to the loop
without faultlab's lines; a bit flip in conv1's output
changes the loss of exactly the step it is armed for and training after it; a run stopped
mid-epoch and resumed through faultlab.torch.Checkpointer ends bit-identical to an
uninterrupted one (data order, dropout masks, Adadelta state, StepLR)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cnn_loop  # noqa: E402

import faultlab.torch as ft  # noqa: E402
import without_faultlab  # noqa: E402

pytestmark = pytest.mark.framework("torch")

EPOCHS = 2


@pytest.fixture(scope="module")
def cnn_plain():
    """The loop without faultlab's lines."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cnn_loop, "ft", without_faultlab)
        return cnn_loop.train(None, epochs=EPOCHS)


def same_params(a, b) -> bool:
    return cnn_loop.same_params(a["model"], b["model"])


def test_cnn_faultlab_leaves_a_clean_run_alone(cnn_plain, tmp_path):
    run = cnn_loop.train(tmp_path / "a.ckpt", epochs=EPOCHS)
    assert run["losses"] == cnn_plain["losses"] and same_params(run, cnn_plain)
    assert run["acc"] == cnn_plain["acc"] and cnn_plain["acc"][-1] > 0.8      # it learns


def test_cnn_a_bit_flip_in_conv1_changes_training(cnn_plain, tmp_path):
    flip = ft.fault("fwd_output", "conv1", step=30, bit=30, positions=[(0, 5, 3, 4)])
    run = cnn_loop.train(tmp_path / "a.ckpt", faults=[flip], epochs=EPOCHS)
    assert run["losses"][:30] == cnn_plain["losses"][:30]
    assert run["losses"][30] != cnn_plain["losses"][30]
    assert run["losses"][-1] != cnn_plain["losses"][-1] and not same_params(run, cnn_plain)


def test_cnn_checkpointer_resume_mid_epoch_is_bit_identical(cnn_plain, tmp_path):
    path = tmp_path / "cnn.ckpt"
    cnn_loop.train(path, every=10, stop_after=35, epochs=EPOCHS)
    rest = cnn_loop.train(path, every=10, epochs=EPOCHS)
    assert rest["start"] == 30                          # mid-epoch 2 (24 steps an epoch)
    assert rest["losses"] == cnn_plain["losses"][30:]
    assert rest["acc"] == cnn_plain["acc"][1:] and same_params(rest, cnn_plain)
