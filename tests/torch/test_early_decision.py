"""Early decision (issue 16): a trial whose whole state equals the golden run's, bit for bit,
after its last fault ends there as Masked with the golden run's metrics; a non-finite loss ends
a trial at once; everything else runs its horizon. It must change no outcome: every trial gets
the same outcome, and where bit-exact the same metrics, with and without it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from faultlab.bits import bit_sum, state_checksum
from faultlab.campaigns import parse_campaign
from faultlab.cli import main
from faultlab.runner import Session

pytestmark = pytest.mark.framework("torch")

HEADER = ("trial,workload,replicas,per_replica_batch,width,input_size,dataset,steps_per_epoch,"
          "epochs,lr,seed,horizon,site,layer,tensor,replica,epoch,step,value,bit,bits,stuck,"
          "factor,values,ramp,layout,positions,position_mode,count,groups,duration,"
          "duration_steps,probability")
W = "mlp,2,32,64,8,digits,20,3,0.01,0"
FAULT_COLS = HEADER.split(",")[11:]


def row(name, horizon="", **cols):
    """A columnar row: the trial, the workload W, then the named fault columns."""
    cols["horizon"] = horizon
    return ",".join([name, W] + [str(cols.get(c, "")) for c in FAULT_COLS])


def fo(name, layer, replica, epoch, step, value, **kw):
    return row(name, kw.pop("horizon", 20), site="fwd_output", layer=layer, replica=replica,
               epoch=epoch, step=step, value=value, position_mode="random", count=1, **kw)


ROWS = [
    row("control"),
    # random values into activations a ReLU follows: negative ones vanish, bit for bit
    *[fo(f"relu_random_{i}", "dense_1", i % 2, 0, 4 + 3 * i, "random") for i in range(5)],
    fo("relu_zero", "dense_2", 1, 1, 4, "zero"),
    fo("exp_flip", "dense_1", 0, 0, 9, "bitflip", bit=30),
    row("param_flip", 20, site="param", layer="dense_2", replica=0, epoch=1, step=2,
        value="bitflip", bit=22, position_mode="random", count=1),
    row("grad_nan", 20, site="grad_wt", layer="dense_3", replica=1, epoch=0, step=12,
        value="nan", position_mode="random", count=1),
    fo("to_the_end", "dense_1", 0, 1, 6, "random", horizon=""),
    fo("permanent", "dense_1", 1, 1, 0, "random", duration="permanent"),
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FAULTLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _campaign(rows=ROWS):
    return parse_campaign(("\n".join([HEADER, *rows]) + "\n").encode(), "early.csv", "torch")


def test_state_checksum_is_exact_and_the_fast_path_agrees(cache):
    """One flipped bit in any array changes the checksum; the same bits under another key
    change it; the torch trainer's in-place sum equals the NumPy one of its get_state()."""
    camp = _campaign(ROWS[:1])
    s = Session(threads=1)
    trainer = s.trainer(camp.trials[0].workload)
    for step in range(3):
        trainer.train_step(step)
    state = trainer.get_state()
    ref = state_checksum(state)
    assert trainer.full_checksum() == ref
    rng = np.random.default_rng(0)
    for key in rng.choice(sorted(state), 8):
        a = state[key].copy()
        flat = a.reshape(-1).view(np.uint8)
        flat[rng.integers(flat.size)] ^= np.uint8(1 << int(rng.integers(8)))
        assert state_checksum({**state, key: a}) != ref, key
    k0 = sorted(state)[0]
    moved = {("x" + k if k == k0 else k): v for k, v in state.items()}
    assert state_checksum(moved) != ref
    assert bit_sum(np.array([1.0], np.float32)) == 0x3F800000


def test_early_decision_changes_no_outcome_and_skips_steps(cache):
    camp = _campaign()
    early, full = Session(threads=1), Session(threads=1, early_stop=False)
    decided = []
    for t in camp.trials:
        a, b = early.run_trial(t, "e"), full.run_trial(t, "f")
        assert (a.outcome, a.bit_exact, a.first_nonfinite_step) == \
            (b.outcome, b.bit_exact, b.first_nonfinite_step), t.trial_id
        assert "early_stop" not in b.metrics
        if a.bit_exact:
            assert (a.final_loss, a.final_train_acc, a.final_test_acc, a.golden_test_acc) == \
                (b.final_loss, b.final_train_acc, b.final_test_acc, b.golden_test_acc)
            assert a.metrics["loss"] == b.metrics["loss"] and a.metrics["acc"] == b.metrics["acc"]
        es = a.metrics.get("early_stop")
        if es:
            decided.append(t.trial_id)
            assert a.outcome == "Masked" and a.bit_exact
            assert a.steps_run + es["steps_skipped"] == b.steps_run > a.steps_run
            last = max(f.step for f in t.faults)
            assert es["after_step"] >= last
        else:
            assert a.steps_run == b.steps_run, t.trial_id
    # the control runs its whole window (it is the reproducibility check); a fault that fires
    # to the end, a permanent one and a non-finite one are never decided early
    assert not {"control", "to_the_end", "permanent", "grad_nan", "exp_flip"} & set(decided)
    print("decided early:", decided)
    assert len(decided) >= 2, decided


def test_faultlab_run_no_early_stop_runs_every_trial_to_its_horizon(cache, tmp_path, capsys):
    path = tmp_path / "early.csv"
    path.write_text("\n".join([HEADER, ROWS[0], ROWS[3], ROWS[6]]) + "\n")   # 2 decided early
    for flag, db in (([], "a.sqlite"), (["--no-early-stop"], "b.sqlite")):
        assert main(["run", str(path), "--results", str(tmp_path / db), "--threads", "1"]
                    + flag) == 0
    from faultlab.results import load
    a, b = load(tmp_path / "a.sqlite"), load(tmp_path / "b.sqlite")
    assert list(a.outcome) == list(b.outcome)
    assert list(a.bit_exact) == list(b.bit_exact) == [True, True, True]
    assert a.steps_run.sum() < b.steps_run.sum()
    out = capsys.readouterr().out
    assert out.count("early decision: 2 of 3 trial(s)") == 1      # the first run only
