"""Files written by faultlab at fed88b5 (before the restructure into backends/, checkpointing/
api and crash/) still load, bit for bit: a checkpoint-engine file, a torch adapter checkpoint,
a `sync` baseline directory, a results database and a golden-run cache from which a fresh
trial reproduces the old golden run. tests/helpers/make_legacy_files.py wrote them."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from ckpt_helpers import assert_same_state
from make_legacy_files import engine_state

from faultlab.campaigns import parse_campaign
from faultlab.checkpointing import list_commits, load_step, recover, recover_checkpoint
from faultlab.outcomes import IMMEDIATE, MASKED
from faultlab.results import ResultStore

DATA = Path(__file__).resolve().parents[1] / "data" / "fed88b5"


def test_an_engine_file_recovers_its_newest_commit_and_loads_older_ones():
    step, state, meta = recover(DATA / "engine.ckpt")
    assert (step, meta) == (3, {"step": 3, "note": "legacy"})
    assert_same_state(state, engine_state(3))
    assert {2, 3} <= {c.step for c in list_commits(DATA / "engine.ckpt")}
    assert_same_state(load_step(DATA / "engine.ckpt", 2).state, engine_state(2))


@pytest.mark.framework("torch")
def test_a_torch_adapter_checkpoint_resumes_a_fresh_model():
    import torch

    from faultlab.torch import TorchCheckpointAdapter
    torch.manual_seed(99)        # other weights than the saved ones
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    got = TorchCheckpointAdapter(model, opt).resume(lambda: recover(DATA / "adapter.ckpt"))
    assert (got.step, got.data_position) == (3, {"batch": 3})
    want = np.load(DATA / "adapter_expected.npz")
    assert_same_state({k: v.numpy() for k, v in model.state_dict().items()}, dict(want))
    assert len(opt.state) == 4 and all(int(s["step"]) == 3 for s in opt.state.values())


@pytest.mark.framework("torch")
def test_a_sync_baseline_directory_recovers_its_newest_checkpoint():
    step, state, meta = recover_checkpoint("sync", DATA / "sync")
    assert (step, meta) == (5, {"step": 5})
    assert_same_state(state, engine_state(5))


def test_a_results_database_reads_back_every_trial():
    camp = parse_campaign((DATA / "campaign.csv").read_bytes(), "legacy.csv")
    with ResultStore(DATA / "results.sqlite") as store:
        results = {r.trial_id: r for r in store.results(camp.digest)}
    assert set(results) == {"control", "nan"}
    assert results["control"].outcome == MASKED and results["control"].bit_exact
    assert results["nan"].outcome == IMMEDIATE and results["nan"].first_nonfinite_step == 3


@pytest.mark.framework("torch")
def test_a_golden_cache_is_reused_and_a_fault_free_trial_reproduces_it(tmp_path, monkeypatch):
    from faultlab.runner import Session
    from faultlab.runner.golden import legacy_dir

    cache = tmp_path / "cache"
    shutil.copytree(DATA / "cache", cache)
    monkeypatch.setenv("FAULTLAB_CACHE", str(cache))
    camp = parse_campaign((DATA / "campaign.csv").read_bytes(), "legacy.csv")
    control = next(t for t in camp.trials if t.trial_id == "control")
    directory = legacy_dir(control.workload, 1)
    assert directory.is_dir()                         # the old cache is where it is looked for
    before = sorted(p.stat().st_mtime_ns for p in directory.iterdir())
    session = Session(threads=1)
    gold = session.golden(control.workload)
    assert sorted(p.stat().st_mtime_ns for p in directory.iterdir()) == before   # not re-recorded
    with ResultStore(DATA / "results.sqlite") as store:
        old = {r.trial_id: r for r in store.results(camp.digest)}["control"]
    assert gold.loss == old.metrics["loss"]          # the cached run, read back exactly
    import torch
    if torch.backends.cpu.get_cpu_capability() != (DATA / "cpu_capability.txt").read_text().strip():
        return   # CPU kernels of another instruction set: a new run cannot match bit for bit
    # it has no determinism fingerprint: a control trial on this machine vouches for it
    assert gold.fingerprint is None
    assert session.control(control.workload)["steps"] > 0
    assert session.golden(control.workload) is gold   # reproduced: kept, not re-recorded
    result = session.run_trial(control, camp.digest)
    assert result.outcome == MASKED and result.bit_exact
    assert result.metrics["loss"] == gold.loss
