"""Early decision changes no outcome on the reference campaigns (slow: every trial of
campaigns/mixed.csv and campaigns/random56.csv twice, with and without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from faultlab.campaigns import load_campaign
from faultlab.runner import Session

pytestmark = [pytest.mark.framework("torch"), pytest.mark.slow]

CAMPAIGNS = Path(__file__).resolve().parents[2] / "campaigns"


@pytest.mark.parametrize("name", ["mixed.csv", "random56.csv"])
def test_every_trial_gets_the_same_outcome_with_and_without_early_decision(name, tmp_path,
                                                                          monkeypatch):
    # golden runs recorded here, with their checksums: an older cache without them would
    # leave nothing to decide early
    monkeypatch.setenv("FAULTLAB_CACHE", str(tmp_path / "cache"))
    camp = load_campaign(str(CAMPAIGNS / name), "torch")
    early, full = Session(threads=2), Session(threads=2, early_stop=False)
    decided, trained, window = 0, 0, 0
    for t in camp.trials:
        a, b = early.run_trial(t, "early"), full.run_trial(t, "full")
        assert (a.outcome, a.bit_exact, a.first_nonfinite_step) == \
            (b.outcome, b.bit_exact, b.first_nonfinite_step), t.trial_id
        if a.bit_exact:
            assert (a.final_loss, a.final_train_acc, a.final_test_acc, a.metrics["loss"],
                    a.metrics["acc"]) == (b.final_loss, b.final_train_acc, b.final_test_acc,
                                          b.metrics["loss"], b.metrics["acc"]), t.trial_id
        decided += bool(a.metrics.get("early_stop"))
        trained, window = trained + a.steps_run, window + b.steps_run
    print(f"\n{name}: {decided}/{len(camp.trials)} decided early, {trained}/{window} steps "
          f"trained")
    if name == "random56.csv":      # its masked faults do come back: early decision was tested
        assert decided > 0 and trained < window
