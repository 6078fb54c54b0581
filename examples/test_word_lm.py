"""What examples/word_lm.py shows, checked (run: python -m pytest -q examples/test_word_lm.py).

* an injector with nothing armed, or with a fault armed for a step that never comes, and a
  checkpointer leave training bit-identical to the loop without faultlab's lines;
* a bit flip in the LSTM's recurrent gate weight `weight_hh_l0` for one forward call changes
  the loss from that step on; one in `h_n` (the hidden state handed to the next batch) leaves
  that step's loss alone and changes the next one;
* a run cut short and resumed through faultlab.torch.Checkpointer ends bit-identical to an
  uninterrupted one (parameters, hidden state, learning rate, validation perplexity);
* faultlab.torch.Protector: a protected clean run is the plain run; a transient NaN in a
  gradient is detected, rolled back and the run ends bit-identical to the fault-free one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import word_lm  # noqa: E402

import faultlab.torch as ft  # noqa: E402
import without_faultlab  # noqa: E402

pytestmark = pytest.mark.framework("torch")

FLIP_STEP = 6


@pytest.fixture(scope="module")
def lm_plain():
    """The loop without faultlab's lines."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(word_lm, "ft", without_faultlab)
        return word_lm.train(None)


def same_state(a, b) -> bool:
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and all(
        torch.equal(x, y) for x, y in zip(a["hidden"], b["hidden"]))


def test_lm_the_corpus_and_the_run_are_small(lm_plain):
    corpus = word_lm.Corpus()
    assert 50 < len(corpus.dictionary) < 1000 and len(corpus.train) > 1000
    assert len(lm_plain["losses"]) == word_lm.EPOCHS * 8
    assert len(lm_plain["val_ppl"]) == word_lm.EPOCHS
    assert lm_plain["val_ppl"][-1] < lm_plain["val_ppl"][0] < len(corpus.dictionary)  # learns


def test_lm_faultlab_leaves_a_clean_run_alone(lm_plain, tmp_path):
    """The injector (nothing armed, or a fault armed for a step that never comes) and the
    checkpointer leave training bit-identical to the loop without them; so does the script
    form crash_lab drives."""
    run = word_lm.train(tmp_path / "a.ckpt")
    assert run["losses"] == lm_plain["losses"] and run["val_ppl"] == lm_plain["val_ppl"]
    assert same_state(run, lm_plain)
    never = ft.fault("fwd_weight", "rnn", tensor="weight_hh_l0", step=10**6, bit=30)
    run = word_lm.train(tmp_path / "b.ckpt", faults=[never])
    assert run["losses"] == lm_plain["losses"] and same_state(run, lm_plain)
    final = word_lm.script_train(None, lambda k, state: None, word_lm.EPOCHS * 8)
    assert all(torch.equal(final["model"][k], v)
               for k, v in lm_plain["model"].state_dict().items())
    assert torch.equal(final["h"], lm_plain["hidden"][0])


@pytest.mark.parametrize("tensor, site, position, first", [
    ("weight_hh_l0", "fwd_weight", (5, 3), FLIP_STEP),        # this step's forward
    ("h_n", "fwd_output", (0, 1, 7), FLIP_STEP + 1),          # the next batch's hidden state
])
def test_lm_a_bit_flip_changes_training(lm_plain, tmp_path, tensor, site, position, first):
    f = ft.fault(site, "rnn", tensor=tensor, step=FLIP_STEP, bit=30, positions=[position])
    run = word_lm.train(tmp_path / "run.ckpt", faults=[f])
    assert run["losses"][:first] == lm_plain["losses"][:first]
    assert run["losses"][first] != lm_plain["losses"][first]
    assert run["losses"][-1] != lm_plain["losses"][-1]
    assert not same_state(run, lm_plain)


def test_lm_checkpointer_resume_is_bit_identical(lm_plain, tmp_path):
    path = tmp_path / "word_lm.ckpt"
    first = word_lm.train(path, every=5, stop_after=13)
    assert len(first["losses"]) == 13
    rest = word_lm.train(path, every=5)
    assert rest["start"] == 10                       # the newest save before the stop
    assert rest["losses"] == lm_plain["losses"][10:]
    assert rest["val_ppl"] == lm_plain["val_ppl"][1:]   # epochs 2.. (the first ended at step 8)
    assert same_state(rest, lm_plain)



def test_lm_protected_clean_run_is_the_plain_run(lm_plain):
    run = word_lm.train_protected()
    assert run["losses"] == lm_plain["losses"] and run["val_ppl"] == lm_plain["val_ppl"]
    assert same_state(run, lm_plain) and not run["report"].detections


@pytest.mark.parametrize("step", [12, 16])            # 16: the rollback crosses an epoch's end
def test_lm_protector_rolls_back_a_transient_nan(lm_plain, step):
    nan = ft.fault("grad_wt", "rnn", tensor="weight_hh_l0", step=step, value="nan", count=1)
    run = word_lm.train_protected([nan])
    [d] = run["report"].detections
    assert d.step == step and d.detector == "nonfinite" and d.transient
    assert run["report"].recovered
    assert run["losses"] == lm_plain["losses"] and run["val_ppl"] == lm_plain["val_ppl"]
    assert same_state(run, lm_plain)
